"""Autograd through a ComfyUI MODEL (tuning, null-text optimisation, guidance).

ComfyUI executes nodes under ``torch.inference_mode()`` and its checkpoint loader runs
inside the executor, so the UNet's weights are inference tensors that backward cannot
save. An *autograd clone* fixes that without writing a module other MODELs share:

* every weight and bias gets a ComfyUI weight wrapper (identity, or a caller's override
  such as "base + trainable delta"); with any wrapper present ComfyUI casts with
  ``copy=True`` on each forward, outside inference mode here, producing ordinary tensors;
* bf16 compute on devices that support it, else fp32 (never fp16: no silent NaNs without loss
  scaling; ``backward_dtype``); whatever is optimised stays fp32;
* gradient checkpointing per spatial transformer, as a ``PatcherInjection`` (instance
  ``forward`` set on inject, removed on eject), so activation memory stays bounded;
* ControlNets in backward passes: their residuals are computed without gradient (their weights are
  ComfyUI's inference tensors; ``comfy_call``), and each block starts from a copy of its input so
  ComfyUI's in-place residual additions do not touch saved activations (``_SkipCopies``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import comfy.model_management
import comfy.patcher_extension
import torch
import torch.utils.checkpoint

from ..vp2p.denoise import Denoiser
from .comfy_host import transformer_blocks

CHECKPOINT_INJECTION_KEY = "vp2p_grad_checkpoint"
# What a backward pass asks of ComfyUI's memory estimate, in forward batches: the activations that
# gradient checkpointing keeps (one spatial transformer's at a time) plus the forward's peak. An
# allowance, not a measurement: no GPU was available to measure it on.
BACKWARD_MEMORY = 2.0



class AddDelta:
    """Weight wrapper: base weight + a (trainable, fp32) delta cast to the compute dtype."""

    def __init__(self, delta: torch.Tensor) -> None:
        self.delta = delta

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta.to(weight.dtype)


def _ordinary(weight: torch.Tensor) -> torch.Tensor:
    # Its mere presence makes ComfyUI cast with copy=True, which (outside inference mode)
    # turns the inference-tensor weight into an ordinary one.
    return weight


class _Checkpointing:
    """Gradient checkpointing of the given submodules while injected."""

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
                # ComfyUI rewrites transformer_options["block"] (and more) in place as the UNet runs; a
                # recomputation during backward must see this block's options, not the last block's.
                args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
                kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
                return torch.utils.checkpoint.checkpoint(_orig, *args, use_reentrant=False, **kwargs)

            m.forward = forward  # an instance attribute shadows the class method until eject
            self.modules.append(m)

    def eject(self, patcher: Any) -> None:
        for m in self.modules:
            if "forward" in m.__dict__:
                del m.forward
        self.modules.clear()


class _SkipCopies:
    """While injected, each input block after the first and the middle block start from a copy of the
    activation they are given. ComfyUI's UNet adds ControlNet/T2I-Adapter residuals in place
    (``h += ctrl``, also on the skip activations the output blocks read), which autograd refuses on a
    tensor a later layer saved for backward; with the copies, the tensors saved are the copies and the
    in-place additions land on tensors nothing saved."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def inject(self, patcher: Any) -> None:
        if self.handles:
            return
        dm = patcher.model.diffusion_model
        firsts = [block[0] for block in list(dm.input_blocks)[1:]] + [dm.middle_block[0]]

        def copy_input(module: torch.nn.Module, args: tuple) -> Optional[tuple]:
            if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
                return None
            return (args[0].clone(), *args[1:])

        self.handles = [m.register_forward_pre_hook(copy_input) for m in firsts]

    def eject(self, patcher: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def backward_dtype(device: Any, model_dtype: torch.dtype) -> torch.dtype:
    """The compute dtype of backward passes: bf16 where the device has it (its range needs no loss
    scaling), else the model's dtype — but never fp16, whose gradients overflow or underflow without
    loss scaling (silent NaNs or zeros in the null-text and tuning losses): fp32 instead."""
    if torch.device(device).type != "cpu" and comfy.model_management.should_use_bf16(device):
        return torch.bfloat16
    return torch.float32 if model_dtype == torch.float16 else model_dtype


def make_autograd_clone(model: Any, clone: Optional[Any] = None,
                        overrides: Optional[Mapping[str, Callable[[torch.Tensor], torch.Tensor]]] = None) -> Any:
    """Prepare ``clone`` (default: a fresh ``model.clone()``) for backward passes.

    ``overrides`` maps ComfyUI weight keys (``diffusion_model.<path>.weight``) to wrappers
    used instead of the identity one. ``model`` is not changed.
    """
    mp = model.clone() if clone is None else clone
    device = mp.load_device
    mp.set_model_compute_dtype(backward_dtype(device, mp.model_dtype()))
    blocks = transformer_blocks(mp)
    spatial = sorted({p.rsplit(".transformer_blocks.", 1)[0] for p in blocks.values()})
    ck = _Checkpointing(spatial)
    copies = _SkipCopies()
    mp.set_injections(CHECKPOINT_INJECTION_KEY, [comfy.patcher_extension.PatcherInjection(ck.inject, ck.eject),
                                                 comfy.patcher_extension.PatcherInjection(copies.inject, copies.eject)])
    overrides = dict(overrides or {})
    for name, module in mp.get_model_object("diffusion_model").named_modules():
        if getattr(module, "weight", None) is None or not hasattr(module, "weight_function"):
            continue
        wkey = f"diffusion_model.{name}.weight"
        mp.add_weight_wrapper(wkey, overrides.pop(wkey, _ordinary))
        if getattr(module, "bias", None) is not None:  # LayerNorm's backward saves its bias too
            mp.add_weight_wrapper(f"diffusion_model.{name}.bias", _ordinary)
    if overrides:
        raise KeyError(f"no such weights to wrap: {sorted(overrides)[:3]}")
    return mp


@contextmanager
def autograd(mp: Any) -> Iterator[None]:
    """Gradients on, inference mode off, ComfyUI's training flag set. The clone is loaded by the stage
    (``comfy_call.run_stage``) with the memory its backward passes declare, partially on small cards:
    the weight wrappers cast each weight per forward, so a partly offloaded UNet backpropagates too."""
    with torch.inference_mode(False), torch.enable_grad():
        flag = comfy.model_management.in_training
        comfy.model_management.in_training = True
        try:
            yield
        finally:
            comfy.model_management.in_training = flag


def denoiser(mp: Any, extra_options: Optional[dict] = None) -> Denoiser:
    """A ``vp2p.denoise.Denoiser`` straight on the MODEL's ``apply_model`` with a bare text embedding
    (its patches and transformer options apply; the conditioning path does not): for tests that compare
    the pack's stages, which go through ``comfy_call``, against plain UNet calls."""
    from ..vp2p import RUN_STATE_KEY

    options = {**mp.model_options.get("transformer_options", {}), **(extra_options or {})}

    def denoise(x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, kinds: Optional[Sequence[int]] = None,
                run: Optional[Any] = None) -> torch.Tensor:
        to = options.copy()
        to["cond_or_uncond"] = list(kinds or [0])
        to["sigmas"] = sigma
        if run is not None:
            to[RUN_STATE_KEY] = run
        return mp.model.apply_model(x, sigma, c_crossattn=context, transformer_options=to)

    return denoise
