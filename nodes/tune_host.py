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
* With ``train_motion_module``: deltas on the attention projections of a motion module another
  extension put into the UNet (AnimateDiff), added by forward hooks while training and by a
  ``DIFFUSION_MODEL`` wrapper on the result (``motion_tuning``); the motion module is never written.
* The result is a fresh clone of the input: ``add_patches`` diffs for ``to_q`` and a tuned
  copy of the temporal bank (projections trained, LayerNorms as they were). An interrupted
  or failed run leaves nothing behind.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Callable, Optional

import comfy.model_management
import torch

from ..vp2p import LayerKey, SettingsError, VP2PError
from ..vp2p.tuned_file import TunedWeights
from ..vp2p.tuning import TuneSettings, trainable_temporal_parameters, tune, window_rows
from .autograd_host import BACKWARD_MEMORY, AddDelta, autograd, make_autograd_clone
from .comfy_call import Stage, run_stage
from .comfy_host import T2SState, get_state, install
from .model_facts import alphas_cumprod, conditioning_tensor, prediction_kind
from .motion_tuning import MotionDeltas, apply_motion_deltas, motion_attention_paths, motion_deltas_of

log = logging.getLogger("VideoP2P")


class NotInflatedError(VP2PError):
    """Tuning needs a T2S model."""


def tune_weights(model: Any, positive: list, latents: torch.Tensor, settings: TuneSettings,
                 progress: Optional[Callable[[int, int, float], None]] = None) -> tuple[Optional[TunedWeights], list[float]]:
    """Tune an inflated MODEL on a video; returns (tuned tensors, losses), or (None, []) for 0 steps.
    ``model`` is not changed."""
    state = require_state(model)
    frames = latents.shape[0]
    if frames == 1:
        log.warning("Tune on Video: a 1-frame video; temporal attention layers learn nothing from it.")
    cond_in = conditioning_tensor(positive, frames, node="Tune on Video")
    if settings.steps == 0:
        return None, []

    device = model.load_device
    dm = model.get_model_object("diffusion_model")
    deltas: dict[tuple[str, LayerKey], torch.Tensor] = {}
    wrappers = {}
    with torch.inference_mode(False):  # ordinary, trainable tensors; the input's bank is never touched
        bank = state.bank.copy().to(device).float() if state.bank is not None else None
        for wkey, ident in to_q_weight_keys(state.blocks).items():
            weight = dm.get_submodule(wkey[len("diffusion_model."):-len(".weight")]).weight
            deltas[ident] = torch.zeros(weight.shape, device=device, dtype=torch.float32, requires_grad=True)
            wrappers[wkey] = AddDelta(deltas[ident])
    mp = make_autograd_clone(model, install(model.clone(), state.settings, bank, state.blocks), wrappers)

    losses: list[float] = []
    # the temporal layers' projections train, their LayerNorms stay frozen (the reference's set)
    params = list(deltas.values()) + (trainable_temporal_parameters(bank) if bank is not None else [])
    motion = MotionDeltas({})

    def on_step(step: int, loss: float) -> None:
        if progress is not None:
            progress(step + 1, settings.steps, loss)

    def loop(stage: Stage) -> list[float]:
        nonlocal motion
        # the model's latent scale (ComfyUI's process_latent_in), as Tune-A-Video trains on VAE latents × 0.18215
        x0 = stage.latent.detach().clone().float()
        cond = cond_in.detach().clone().to(stage.device)
        trained = params
        attached = nullcontext()
        if settings.train_motion_module:
            dm = stage.model.diffusion_model  # loaded: the motion modules other extensions insert are in place
            paths = motion_attention_paths(dm, state.blocks)
            if not paths:
                raise SettingsError(
                    "Tune on Video: train_motion_module is on, but the MODEL has no motion module (attention layers another "
                    "extension put into the UNet, such as an AnimateDiff motion module applied with AnimateDiff-Evolved's nodes "
                    "before Inflate to T2S). Apply one, or turn train_motion_module off.")
            motion = MotionDeltas.zeros(dm, paths, stage.device)
            log.info("Tune on Video: training the attention of the motion module too (%d projections).", len(paths))
            trained = params + motion.parameters()
            attached = motion.attached(dm)
        with attached:
            return tune(stage.denoiser(), x0, cond, trained, alphas_cumprod(mp), settings, prediction=prediction_kind(mp, "Tune on Video"),
                        on_step=on_step, should_stop=comfy.model_management.throw_exception_if_processing_interrupted)

    try:
        with autograd(mp):
            sigmas = mp.get_model_object("model_sampling").sigmas.detach().float().cpu()[[-1, 0]].clone()
            # a step runs the window's frames, not the clip's: the memory estimate asks for those rows
            losses = run_stage(mp, {"positive": positive}, latents, sigmas, loop, memory_rows=window_rows(settings, frames),
                               backward_factor=BACKWARD_MEMORY)
    finally:
        for d in params + motion.parameters():
            d.requires_grad_(False)
    temporal = {k: v.detach().clone() for k, v in bank.state_dict().items()} if bank is not None else {}
    # a tuning of a MODEL whose motion module was tuned before adds to those deltas: the file holds the total
    total = motion_deltas_of(model).combined(motion) if motion.tensors else MotionDeltas({})
    weights = TunedWeights(state.settings, {k: d.detach() for k, d in deltas.items()}, temporal, motion=total.tensors)
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
    if weights.motion:
        apply_motion_deltas(result, MotionDeltas(weights.motion))
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
