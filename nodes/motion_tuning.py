"""Tuning a motion module's attention: AnimateDiff as the temporal layer of a T2S model.

Tune-A-Video (and Video-P2P after it) trains the temporal attention of its 3-D UNet on the input video. With an
AnimateDiff motion module on the MODEL (AnimateDiff-Evolved), that module is the temporal layer, so Tune on Video
can train its attention projections instead of (or beside) the pack's own temporal layers.

The motion module belongs to another extension: AnimateDiff-Evolved keeps it in its own ModelPatcher and inserts
its modules into the UNet's blocks while the MODEL is loaded; its weights are not the MODEL's, and it is shared by
every MODEL the user applied it to. The pack never writes them. Its tuning is a set of *deltas* on the attention
projections (``to_q``/``to_k``/``to_v``/``to_out.0``), found by their path in the UNet while it runs and added by
forward hooks (``(W + ΔW)·x + b + Δb = W·x + b + ΔW·x + Δb``): during training, and afterwards through a
``DIFFUSION_MODEL`` wrapper on the tuned MODEL's options, which attaches the hooks for each UNet call (every
stage of the pack and stock samplers) and removes them after it. A MODEL without those modules refuses the
tuning clearly.
"""

from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Mapping

import comfy.patcher_extension
import torch
import torch.nn.functional as F

from ..vp2p import SettingsError

MOTION_WRAPPER_KEY = "vp2p_motion_deltas"
_PROJECTION = re.compile(r"\.(to_q|to_k|to_v|to_out\.0)$")


def motion_attention_paths(dm: torch.nn.Module, own_blocks: Mapping[Any, str]) -> list[str]:
    """Paths of the attention projections (Linear ``to_q``/``to_k``/``to_v``/``to_out.0``) in the UNet ``dm`` that are
    not the UNet's own transformer blocks' (``own_blocks``: layer key -> block path): those of modules another
    extension inserted (AnimateDiff's temporal transformers). ``dm`` must be loaded (the modules inserted)."""
    own = tuple(f"{path}.attn{i}." for path in own_blocks.values() for i in (1, 2))
    return [name for name, m in dm.named_modules()
            if isinstance(m, torch.nn.Linear) and _PROJECTION.search(name) and not (name + ".").startswith(own)]


class MotionDeltas:
    """Deltas on a motion module's attention projections, by path: ``<path>.weight`` [out, in] and, for projections with
    a bias, ``<path>.bias`` [out]."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = dict(tensors)
        self._active: set[int] = set()  # ids of the UNets the hooks are attached to now

    @classmethod
    def zeros(cls, dm: torch.nn.Module, paths: list[str], device: Any) -> "MotionDeltas":
        """Trainable zero deltas (fp32, ordinary tensors) for the projections at ``paths``."""
        tensors = {}
        with torch.inference_mode(False):
            for path in paths:
                m = dm.get_submodule(path)
                tensors[f"{path}.weight"] = torch.zeros(m.weight.shape, device=device, dtype=torch.float32, requires_grad=True)
                if m.bias is not None:
                    tensors[f"{path}.bias"] = torch.zeros(m.bias.shape, device=device, dtype=torch.float32, requires_grad=True)
        return cls(tensors)

    def paths(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[0] for name in self.tensors})

    def parameters(self) -> list[torch.Tensor]:
        return list(self.tensors.values())

    def combined(self, other: "MotionDeltas") -> "MotionDeltas":
        """These deltas plus ``other``'s (a tuning of an already tuned MODEL adds to its deltas)."""
        out = {k: v.detach().clone() for k, v in self.tensors.items()}
        for k, v in other.tensors.items():
            out[k] = out[k] + v.detach().to(out[k]) if k in out else v.detach().clone()
        return MotionDeltas(out)

    def _hook(self, path: str) -> Callable:
        weight = self.tensors[f"{path}.weight"]
        bias = self.tensors.get(f"{path}.bias")

        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            return output + F.linear(x, weight.to(x.device, x.dtype), None if bias is None else bias.to(x.device, x.dtype))

        return hook

    @contextmanager
    def attached(self, dm: torch.nn.Module) -> Iterator[None]:
        """The deltas act on the modules at their paths in ``dm`` for the duration (forward hooks, removed after).
        Re-entrant: inside an attachment to the same UNet (a gradient-checkpointed block recomputed during a
        backward pass re-enters it) nothing is added twice."""
        if id(dm) in self._active:
            yield
            return
        handles = []
        self._active.add(id(dm))
        try:
            for path in self.paths():
                try:
                    module = dm.get_submodule(path)
                except AttributeError:
                    module = None
                if not isinstance(module, torch.nn.Linear):
                    raise SettingsError(
                        f"This MODEL was tuned with a motion module's attention (Tune on Video, train_motion_module), but the UNet "
                        f"has no such projection at {path}: the AnimateDiff motion module it was tuned with is not applied to this "
                        "MODEL. Apply the same AnimateDiff model (AnimateDiff-Evolved) before Inflate to T2S, or tune again.")
                handles.append(module.register_forward_hook(self._hook(path)))
            yield
        finally:
            self._active.discard(id(dm))
            for h in handles:
                h.remove()

    def reentry(self, dm: torch.nn.Module) -> Callable[[], Callable[[], Any]]:
        """For gradient checkpointing (``autograd_host``): during a forward, how to re-enter this attachment when the
        block is recomputed in backward, after the UNet call (and its wrapper) ended; nothing when not attached."""
        def provider() -> Callable[[], Any]:
            active = id(dm) in self._active
            return lambda: self.attached(dm) if active else nullcontext()
        return provider


class MotionWrapper:
    """The ``DIFFUSION_MODEL`` wrapper of a tuned MODEL: its motion-module deltas act during each UNet call."""

    def __init__(self, deltas: MotionDeltas) -> None:
        self.deltas = deltas

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        with self.deltas.attached(executor.class_obj):  # the UNet of this call, its motion modules inserted
            return executor(*args, **kwargs)


def apply_motion_deltas(clone: Any, deltas: MotionDeltas) -> None:
    """Make ``clone`` (a MODEL the caller owns) run with ``deltas`` on its motion module's attention in every UNet call
    (replacing deltas an earlier tuning put there)."""
    wrappers = clone.model_options.get("transformer_options", {}).get("wrappers", {})
    wrappers.get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {}).pop(MOTION_WRAPPER_KEY, None)
    if deltas.tensors:
        comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, MOTION_WRAPPER_KEY,
                                                     MotionWrapper(deltas), clone.model_options, is_model_options=True)


def motion_deltas_of(model: Any) -> MotionDeltas:
    """The motion-module deltas a tuned MODEL carries (empty when none)."""
    fns = model.model_options.get("transformer_options", {}).get("wrappers", {}).get(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {}).get(MOTION_WRAPPER_KEY, [])
    for fn in fns:
        if isinstance(fn, MotionWrapper):
            return fn.deltas
    return MotionDeltas({})
