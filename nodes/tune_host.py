"""Tune on Video inside ComfyUI: trains on a clone, returns the tuned weights as patches.

* Autograd under the executor's ``inference_mode``: everything runs inside
  ``inference_mode(False)`` + ``enable_grad``. The UNet's own weights are inference
  tensors (the checkpoint loader runs in the executor), so every weight and bias of the
  training clone gets a weight wrapper: ComfyUI then casts (copies) it into an ordinary
  tensor on each forward, and backward can pass through it. ``to_q`` wrappers also add the
  trainable delta. The modules themselves are never written.
* Mixed precision: bf16 compute on devices that support it; fp32 elsewhere. The deltas and
  the temporal bank stay fp32 (optimiser state in full precision).
* Gradient checkpointing per spatial transformer, as a ``PatcherInjection`` on the training
  clone (instance ``forward`` set on inject, removed on eject).
* The result is a fresh clone of the input: ``add_patches`` diffs for ``to_q`` and a tuned
  copy of the temporal bank. An interrupted or failed run leaves nothing behind.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import comfy.model_management
import comfy.patcher_extension
import torch
import torch.utils.checkpoint

from ..vp2p import LayerKey, SettingsError, VP2PError
from ..vp2p.tuned_file import TunedWeights
from ..vp2p.tuning import TuneSettings, tune
from .comfy_host import T2SState, get_state, install

log = logging.getLogger("VideoP2P")

CHECKPOINT_INJECTION_KEY = "vp2p_grad_checkpoint"


class NotInflatedError(VP2PError):
    """Tuning needs a T2S model."""


class _AddDelta:
    """Weight wrapper: base weight + trainable delta (cast to the compute dtype)."""

    def __init__(self, delta: torch.Tensor) -> None:
        self.delta = delta

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta.to(weight.dtype)


def _ordinary(weight: torch.Tensor) -> torch.Tensor:
    # The presence of any weight function makes ComfyUI cast with copy=True, outside
    # inference mode here, which turns the inference tensor into an ordinary one.
    return weight


class _Checkpointing:
    """Gradient checkpointing of every spatial transformer while injected."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.modules: list[torch.nn.Module] = []

    def inject(self, patcher: Any) -> None:
        dm = patcher.model.diffusion_model
        for path in self.paths:
            m = dm.get_submodule(path)
            original = m.forward

            def forward(*args: Any, _orig: Callable = original, **kwargs: Any) -> torch.Tensor:
                if not torch.is_grad_enabled():
                    return _orig(*args, **kwargs)
                return torch.utils.checkpoint.checkpoint(_orig, *args, use_reentrant=False, **kwargs)

            m.forward = forward  # instance attribute shadows the class method until eject
            self.modules.append(m)

    def eject(self, patcher: Any) -> None:
        for m in self.modules:
            if "forward" in m.__dict__:
                del m.forward
        self.modules.clear()


def conditioning_tensor(positive: list, frames: int) -> torch.Tensor:
    """The text embedding of a CONDITIONING: [1, T, D] or [F, T, D]."""
    if not positive:
        raise SettingsError("The positive CONDITIONING is empty; connect a CLIP Text Encode of the source prompt.")
    if len(positive) > 1:
        log.warning("Tune on Video: the CONDITIONING has %d entries; only the first is used.", len(positive))
    cond = positive[0][0]
    if cond.shape[0] not in (1, frames):
        raise SettingsError(
            f"The CONDITIONING has a batch of {cond.shape[0]} but the video has {frames} frames; give one prompt (batch 1) "
            "or one per frame."
        )
    return cond


def tune_weights(model: Any, positive: list, latents: torch.Tensor, settings: TuneSettings,
                 progress: Optional[Callable[[int, int, float], None]] = None) -> tuple[Optional[TunedWeights], list[float]]:
    """Tune an inflated MODEL on a video; returns (tuned tensors, losses), or (None, []) for 0 steps.
    ``model`` is not changed."""
    state = require_state(model)
    frames = latents.shape[0]
    if frames == 1:
        log.warning("Tune on Video: a 1-frame video; temporal attention layers learn nothing from it.")
    cond_in = conditioning_tensor(positive, frames)
    if settings.steps == 0:
        return None, []

    device = model.load_device
    dm = model.get_model_object("diffusion_model")
    with torch.inference_mode(False):  # a trainable copy: the input's bank is never touched
        bank = state.bank.copy().to(device).float() if state.bank is not None else None
    mp = install(model.clone(), state.settings, bank, state.blocks)
    if comfy.model_management.should_use_bf16(device) and torch.device(device).type != "cpu":
        mp.set_model_compute_dtype(torch.bfloat16)

    deltas: dict[tuple[str, LayerKey], torch.Tensor] = {}
    to_q_keys = to_q_weight_keys(state.blocks)
    spatial_paths = sorted({p.rsplit(".transformer_blocks.", 1)[0] for p in state.blocks.values()})
    mp.set_injections(CHECKPOINT_INJECTION_KEY, [comfy.patcher_extension.PatcherInjection(*_injection(spatial_paths))])

    losses: list[float] = []
    with torch.inference_mode(False), torch.enable_grad():
        for name, module in dm.named_modules():
            weight = getattr(module, "weight", None)
            if weight is None or not hasattr(module, "weight_function"):
                continue
            wkey = f"diffusion_model.{name}.weight"
            if wkey in to_q_keys:
                delta = torch.zeros(weight.shape, device=device, dtype=torch.float32, requires_grad=True)
                deltas[to_q_keys[wkey]] = delta
                mp.add_weight_wrapper(wkey, _AddDelta(delta))
            else:
                mp.add_weight_wrapper(wkey, _ordinary)
            if getattr(module, "bias", None) is not None:  # LayerNorm's backward saves its bias too
                mp.add_weight_wrapper(f"diffusion_model.{name}.bias", _ordinary)
        params = list(deltas.values()) + (list(bank.parameters()) if bank is not None else [])
        if bank is not None:
            bank.requires_grad_(True)
        comfy.model_management.load_models_gpu([mp], force_full_load=True)
        x0 = latents.detach().clone().to(device, torch.float32)
        cond = cond_in.detach().clone().to(device)
        options = mp.model_options.get("transformer_options", {})

        def denoise(x: torch.Tensor, sigma: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            to = options.copy()
            to["cond_or_uncond"] = [0]
            to["sigmas"] = sigma
            return mp.model.apply_model(x, sigma, c_crossattn=c, transformer_options=to)

        def on_step(step: int, loss: float) -> None:
            if progress is not None:
                progress(step + 1, settings.steps, loss)

        training_flag = comfy.model_management.in_training
        comfy.model_management.in_training = True
        try:
            losses = tune(denoise, x0, cond, params, alphas_cumprod(mp), settings,
                          prediction=_prediction(mp), on_step=on_step,
                          should_stop=comfy.model_management.throw_exception_if_processing_interrupted)
        finally:
            comfy.model_management.in_training = training_flag
            for d in params:
                d.requires_grad_(False)
    temporal = {k: v.detach().clone() for k, v in bank.state_dict().items()} if bank is not None else {}
    weights = TunedWeights(state.settings, {k: d.detach() for k, d in deltas.items()}, temporal)
    return weights, losses


def apply_tuned(model: Any, weights: TunedWeights) -> Any:
    """A clone of the inflated ``model`` carrying tuned weights: ``to_q`` diffs as patches and a
    tuned copy of the temporal bank. ``model`` is not changed."""
    state = require_state(model)
    dm = model.get_model_object("diffusion_model")
    bank = None
    if state.bank is not None:
        with torch.inference_mode(False):
            bank = state.bank.copy()
            if weights.temporal:
                bank.load_state_dict({k: v.to(bank.device) for k, v in weights.temporal.items()})
    result = install(model.clone(), state.settings, bank, state.blocks)
    patches = {}
    for wkey, ident in to_q_weight_keys(state.blocks).items():
        base = dm.get_submodule(wkey[len("diffusion_model."):-len(".weight")]).weight
        patches[wkey] = (weights.deltas[ident].to(base.device, base.dtype),)
    result.add_patches(patches, 1.0)
    return result


def require_state(model: Any) -> T2SState:
    state = get_state(model)
    if state is None:
        raise NotInflatedError(
            "This node needs a T2S model: the MODEL was not inflated. Put an 'Inflate to T2S' node between the "
            "checkpoint loader and this node."
        )
    return state


def to_q_weight_keys(blocks: dict[LayerKey, str]) -> dict[str, tuple[str, LayerKey]]:
    """ComfyUI weight key of every trainable ``to_q`` -> (kind, layer key)."""
    return {f"diffusion_model.{path}.{kind}.to_q.weight": (kind, key) for key, path in blocks.items() for kind in ("attn1", "attn2")}


def model_fingerprint(model: Any) -> str:
    """Fingerprint of what a MODEL computes: its effective UNet weights (base + its patches,
    e.g. LoRAs and earlier tuning, as loaded for this MODEL) and its temporal layers."""
    from ..vp2p.fingerprint import fingerprint

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    tensors = list(model.model.diffusion_model.state_dict().items())
    state = get_state(model)
    if state is not None and state.bank is not None:
        tensors += [(f"vp2p_temporal.{k}", v) for k, v in state.bank.state_dict().items()]
    settings = {"t2s": state.settings.describe() if state else None}
    return fingerprint(tensors, settings)


def _injection(paths: list[str]) -> tuple[Callable, Callable]:
    ck = _Checkpointing(paths)
    return ck.inject, ck.eject


def alphas_cumprod(model: Any) -> torch.Tensor:
    """ᾱ of the model's discrete training schedule, from its sigmas (ᾱ = 1/(1+σ²))."""
    sigmas = model.get_model_object("model_sampling").sigmas.detach().double().cpu()
    return 1.0 / (1.0 + sigmas**2)


def _prediction(model: Any) -> str:
    import comfy.model_base

    kind = getattr(model.model, "model_type", None)
    if kind == comfy.model_base.ModelType.V_PREDICTION:
        return "v"
    if kind in (comfy.model_base.ModelType.EPS, None):
        return "eps"
    raise SettingsError(f"Tune on Video supports eps- and v-prediction models; this MODEL predicts {kind}.")
