"""Autograd through a ComfyUI MODEL (tuning, null-text optimisation, guidance).

ComfyUI executes nodes under ``torch.inference_mode()`` and its checkpoint loader runs
inside the executor, so the UNet's weights are inference tensors that backward cannot
save. An *autograd clone* fixes that without writing a module other MODELs share:

* every weight and bias gets a ComfyUI weight wrapper (identity, or a caller's override
  such as "base + trainable delta"); with any wrapper present ComfyUI casts with
  ``copy=True`` on each forward, outside inference mode here, producing ordinary tensors;
* bf16 compute on devices that support it, else fp32 (never fp16: no silent NaNs without loss
  scaling; ``backward_dtype``); whatever is optimised stays fp32;
* gradient checkpointing per spatial transformer and per ResBlock, as a ``PatcherInjection`` (instance
  ``forward`` set on inject, removed on eject), so activation memory stays bounded and the per-forward
  weight casts are not kept for backward;
* modules and tensors other nodes bring (AnimateDiff's motion modules injected at load, an attention
  replace's own projections): ordinary copies where autograd records (``inference_tensors``), also in a
  checkpointed block's recomputation;
* ControlNets in backward passes: their residuals are computed without gradient (their weights are
  ComfyUI's inference tensors; ``comfy_call``), and each block starts from a copy of its input so
  ComfyUI's in-place residual additions do not touch saved activations (``_SkipCopies``).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, ContextManager, Iterator, Mapping, Optional, Sequence

import comfy.model_management
import comfy.patcher_extension
import torch
import torch.utils.checkpoint

from ..vp2p.denoise import Denoiser
from .comfy_host import get_state, transformer_blocks
from .inference_tensors import ordinary_tensors
from .motion_tuning import motion_deltas_of

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
        return weight.detach() + self.delta.to(weight.dtype)


def _ordinary(weight: torch.Tensor) -> torch.Tensor:
    # Its mere presence makes ComfyUI cast with copy=True, which (outside inference mode) turns the
    # inference-tensor weight into an ordinary one. Detached: ComfyUI's parameters keep requires_grad=True,
    # so the cast copy would carry a graph back to the parameter, and every backward pass would compute a
    # gradient for every UNet weight and keep it in the parameter's .grad (measured on SD1.5's full UNet in
    # fp16: 956 M gradient values, 1.9 GB, kept after the stage).
    return weight.detach()


class _Checkpointing:
    """Gradient checkpointing of the given submodules while injected. ``reentries``: for each piece of per-call
    state a recomputation must see again (the video GroupNorm's call options), a function that, called during
    the forward, returns how to re-enter that state."""

    def __init__(self, reentries: Sequence[Callable[[], Callable[[], ContextManager]]] = ()) -> None:
        self.reentries = list(reentries)
        self.modules: list[torch.nn.Module] = []

    def inject(self, patcher: Any) -> None:
        dm = patcher.model.diffusion_model
        for m in checkpointed_modules(dm):
            if "forward" in m.__dict__:  # already shadowed (by this or another injection): leave it
                continue
            original = m.forward

            def forward(*args: Any, _orig: Callable = original, **kwargs: Any) -> torch.Tensor:
                if not torch.is_grad_enabled():
                    return _orig(*args, **kwargs)
                # ComfyUI rewrites transformer_options["block"] (and more) in place as the UNet runs; a
                # recomputation during backward must see this block's options, not the last block's.
                args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
                kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
                entries = [reentry() for reentry in self.reentries]
                return torch.utils.checkpoint.checkpoint(_recomputable, entries, _orig, *args, use_reentrant=False, **kwargs)

            m.forward = forward  # an instance attribute shadows the class method until eject
            self.modules.append(m)

    def eject(self, patcher: Any) -> None:
        for m in self.modules:
            if "forward" in m.__dict__:
                del m.forward
        self.modules.clear()


# The UNet's own kinds of block children; anything else in a block was put there by another extension.
_OWN_BLOCK_CHILDREN = ("ResBlock", "SpatialTransformer", "Downsample", "Upsample", "Conv2d", "conv_nd", "GroupNorm",
                       "SiLU", "Identity")


def _blocks(dm: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(path, block) of every block Sequential of an SD-style UNet."""
    out = [(f"{top}.{i}", block) for top in ("input_blocks", "output_blocks") for i, block in enumerate(getattr(dm, top, []))]
    middle = getattr(dm, "middle_block", None)
    return out + ([("middle_block", middle)] if middle is not None else [])


def _foreign(child: torch.nn.Module) -> bool:
    return type(child).__name__ not in _OWN_BLOCK_CHILDREN


def checkpointed_modules(dm: torch.nn.Module) -> list[torch.nn.Module]:
    """What backward passes checkpoint, found in the UNet as it is now (loaded): every spatial transformer and ResBlock,
    and the modules other extensions inserted into its blocks (AnimateDiff's motion modules, injected at load after
    each spatial transformer; an extension injected after the pack is not seen): each casts its weights per forward,
    which autograd would otherwise keep for the whole backward pass."""
    own = [m for m in dm.modules() if type(m).__name__ in ("SpatialTransformer", "ResBlock")]
    return own + [child for _, block in _blocks(dm) for child in block if _foreign(child)]


def own_modules(dm: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the UNet's own modules, named as the MODEL's weight keys name them — as with nothing
    inserted: another extension's module inserted into a block (AnimateDiff's in the middle block and before each
    output block's upsampler) shifts the indices after it while it is injected, and is not the MODEL's."""
    renamed: dict[str, str] = {}
    foreign: list[str] = []
    for path, block in _blocks(dm):
        canonical = 0
        for j, child in enumerate(block):
            if _foreign(child):
                foreign.append(f"{path}.{j}.")
                continue
            renamed[f"{path}.{j}"] = f"{path}.{canonical}"
            canonical += 1
    out = []
    for name, module in dm.named_modules():
        if (name + ".").startswith(tuple(foreign)):
            continue
        parts = name.split(".")
        head = ".".join(parts[:2] if parts[0] == "middle_block" else parts[:3])
        if head in renamed:
            name = renamed[head] + name[len(head):]
        out.append((name, module))
    return out


def _recomputable(entries: list[Callable[[], ContextManager]], fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn`` inside the per-call state it ran in (``entries``) and with inference tensors made ordinary where
    autograd records: the same in the first forward and in the recomputation during backward, which runs
    after the UNet call that set that state up has ended."""
    with ExitStack() as stack:
        for entry in entries:
            stack.enter_context(entry())
        stack.enter_context(ordinary_tensors())
        return fn(*args, **kwargs)


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
    transformer_blocks(mp)  # refuses what has no SD-style blocks
    # Checkpointed (``checkpointed_modules``): spatial transformers, ResBlocks — each convolution casts its weight into a
    # fresh tensor per forward (the weight wrappers), which autograd would otherwise keep for the whole backward pass,
    # the UNet's ResNet weights once more in the compute dtype — and what other extensions inserted into the blocks.
    state = get_state(mp)
    reentries = [state.video_norm.reentry] if state is not None and state.video_norm is not None else []
    motion = motion_deltas_of(mp)
    if motion.tensors:  # a tuned motion module's deltas are attached per UNet call: recomputations re-attach them
        reentries.append(motion.reentry(mp.get_model_object("diffusion_model")))
    ck = _Checkpointing(reentries)
    copies = _SkipCopies()
    mp.set_injections(CHECKPOINT_INJECTION_KEY, [comfy.patcher_extension.PatcherInjection(ck.inject, ck.eject),
                                                 comfy.patcher_extension.PatcherInjection(copies.inject, copies.eject)])
    overrides = dict(overrides or {})
    for name, module in own_modules(mp.get_model_object("diffusion_model")):
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
