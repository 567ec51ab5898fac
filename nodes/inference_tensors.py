"""Backward passes through modules other nodes put into the UNet.

ComfyUI runs nodes under ``torch.inference_mode()``, so every tensor a node creates there is an *inference
tensor*: the checkpoint's weights, but also the weights of modules other extensions insert into the UNet
while it runs (AnimateDiff-Evolved's motion modules, injected at load time from their own ModelPatcher),
IPAdapter-style patches' projections, hook keyframes' tensors. Autograd refuses to save an inference
tensor for backward ("Inference tensors cannot be saved for backward"). The pack's autograd clone
(``autograd_host``) covers the UNet's own weights with ComfyUI weight wrappers; it cannot reach modules
owned by another patcher, and it cannot know what other extensions will insert.

``OrdinaryTensors`` covers the rest: a ``TorchFunctionMode`` under which an inference tensor that meets
an operation autograd records (grad enabled, some other argument requiring grad) is replaced by an
ordinary copy for that operation. Nothing is written back: the module keeps its inference tensor, the
copy lives as long as autograd needs it (as ComfyUI's own per-forward weight casts do). In-place
operations are passed through unchanged (an in-place update of an inference tensor outside inference mode
is an error either way). The mode costs one Python call per
operation while it is entered, so it is entered only where autograd records (``ordinary_tensors``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch.overrides import TorchFunctionMode


def _is_inplace(func: Callable) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__")


def _tensors(values: Any) -> Iterator[torch.Tensor]:
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (t for t in v if isinstance(t, torch.Tensor))


def _ordinary(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        # detached: a module's parameter may carry requires_grad=True (ComfyUI's do); nothing the pack trains is
        # an inference tensor, and a gradient into it would only be computed and kept in its .grad
        return value.detach().clone() if value.is_inference() else value
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) and v.is_inference() for v in value):
        return type(value)(_ordinary(v) for v in value)
    return value


class OrdinaryTensors(TorchFunctionMode):
    """Inference tensors that meet an autograd-recorded operation become ordinary copies for it.

    An operation is recorded when one of its tensors is an ordinary tensor that requires grad (an inference
    tensor may carry ``requires_grad`` — ComfyUI's parameters do — but autograd never records through it).
    Attribute reads (``tensor.device``, ``.shape`` …) and in-place operations pass unchanged. ``copies``
    counts the tensors copied (for tests and logs)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__" or _is_inplace(func):
            return func(*args, **kwargs)
        with torch._C.DisableTorchFunction():  # the checks below read tensor attributes: not through this mode again
            tensors = list(_tensors(args)) + list(_tensors(kwargs.values()))
            recorded = (torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
                        and any(t.requires_grad and not t.is_inference() for t in tensors))
            if recorded and any(t.is_inference() for t in tensors):
                new_args = tuple(_ordinary(a) for a in args)
                new_kwargs = {k: _ordinary(v) for k, v in kwargs.items()}
                self.copies += sum(a is not b for a, b in zip(args, new_args)) + sum(new_kwargs[k] is not kwargs[k] for k in kwargs)
                args, kwargs = new_args, new_kwargs
        return func(*args, **kwargs)


def ordinary_tensors() -> ContextManager:
    """``OrdinaryTensors`` while autograd records (grad enabled, outside inference mode); else nothing. Entered
    around every UNet evaluation of the pack's backward passes and around each gradient-checkpointed block's
    recomputation, whatever other nodes put into the model (their weights may not be modules of the UNet at
    all: an attention replace holding its own projections)."""
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return nullcontext()
    return OrdinaryTensors()
