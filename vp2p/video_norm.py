"""Video-level GroupNorm: the normalisation of the references' text-to-set (3-D) UNet.

Tune-A-Video's inflated UNet (which Video-P2P uses) and FateZero's apply the ResNet blocks'
GroupNorms and the final output norm to the 5-D video tensor ``[b, c, f, h, w]``, so their mean
and variance pool every frame of a video; the transformer blocks' GroupNorm sees ``(b f)`` rows
and stays per frame. A 2-D UNet equals the reference's T2S model only with the same pooling
(measured on the parity fixture's model: one UNet call differs by 14% with per-frame statistics,
by 1e-6 with video-level ones).

Statistics are pooled per *video* of the call's explicit ``BatchLayout`` — never across the
source and target videos of an edit, nor across cond and uncond. A host tells ``VideoNorm`` the
options of the UNet call in progress (``VideoNorm.call``); outside a call, or with one frame per
video, the norms are the image model's, bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from enum import Enum
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from .control import RUN_STATE_KEY, RunState
from .errors import parse_option
from .layout import BatchLayout


class NormScope(str, Enum):
    """Over what a T2S model's ResNet GroupNorms take their statistics."""

    VIDEO = "video"  # all frames of a video together (the references' 3-D UNet)
    FRAME = "frame"  # each frame alone (the image model)

    @classmethod
    def parse(cls, value: "str | NormScope") -> "NormScope":
        return parse_option(cls, value, "group_norm", "a GroupNorm scope")


def video_norm_paths(named_modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """Paths of the GroupNorms a 3-D UNet applies to the whole video: every ``nn.GroupNorm`` of
    the UNet except those inside spatial transformers (modules that hold ``transformer_blocks``).

    For SD1.x these are the ResNet blocks' two norms and the final output norm (45 for SD1.5;
    ComfyUI: ``…in_layers.0``, ``…out_layers.0``, ``out.0``; diffusers: ``…norm1``, ``…norm2``,
    ``conv_norm_out``)."""
    modules = list(named_modules)
    transformers = [name for name, m in modules if hasattr(m, "transformer_blocks")]
    return [name for name, m in modules if isinstance(m, nn.GroupNorm)
            and not any(name.startswith(f"{t}.") for t in transformers)]


def video_group_norm(norm: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, videos: int, frames: int) -> torch.Tensor:
    """Apply a GroupNorm ``norm`` with statistics over all frames of each video.

    x: [videos·F, C, h, w] -> [videos·F, C, h, w]. The module's own forward runs on the video
    laid out as ``[videos, C, F·h, w]`` (GroupNorm pools all positions after the channels), so
    its weights, casts and kernels are ComfyUI's/diffusers' own."""
    rows, c, h, w = x.shape
    grouped = x.view(videos, frames, c, h, w).transpose(1, 2).reshape(videos, c, frames * h, w)
    out = norm(grouped)
    return out.view(videos, c, frames, h, w).transpose(1, 2).reshape(rows, c, h, w)


class VideoNorm:
    """Makes a set of GroupNorm modules video-level while a host's UNet call is in progress.

    ``install`` shadows each module's ``forward`` with an instance attribute (the module object,
    its parameters and its state-dict names stay as they are); ``remove`` deletes it. The call's
    options (``cond_or_uncond`` and the run state's ``LayoutSpec``, as in ComfyUI's
    ``transformer_options``) are set for the duration of one UNet call by ``call``.
    """

    def __init__(self) -> None:
        self._options: Optional[Mapping[str, Any]] = None
        self._modules: list[nn.Module] = []

    @contextmanager
    def call(self, options: Mapping[str, Any]) -> Iterator[None]:
        """Set the options of the UNet call in progress (cleared afterwards, also on errors)."""
        previous, self._options = self._options, options
        try:
            yield
        finally:
            self._options = previous

    def reentry(self) -> Callable[[], ContextManager[None]]:
        """A way back into the call in progress: a block that gradient checkpointing recomputes during backward
        runs after its UNet call ended, and must see that call's options again."""
        options = self._options
        return lambda: self.call(options) if options is not None else nullcontext()

    def layout(self, rows: int) -> Optional[BatchLayout]:
        """The explicit layout of the call in progress (None outside a call)."""
        if self._options is None:
            return None
        run = self._options.get(RUN_STATE_KEY)
        spec = run.layout if isinstance(run, RunState) else None
        return BatchLayout.resolve(rows, self._options.get("cond_or_uncond"), spec)

    def install(self, modules: Iterable[nn.Module]) -> None:
        for m in modules:
            original = m.forward

            def forward(x: torch.Tensor, *args: Any, _orig: Callable = original, **kwargs: Any) -> torch.Tensor:
                layout = self.layout(x.shape[0]) if x.dim() == 4 and not args and not kwargs else None
                if layout is None or layout.frames == 1:
                    return _orig(x, *args, **kwargs)
                return video_group_norm(_orig, x, layout.videos, layout.frames)

            m.forward = forward  # an instance attribute shadows the class method until remove()
            self._modules.append(m)

    def remove(self) -> None:
        for m in self._modules:
            if "forward" in m.__dict__:
                del m.forward
        self._modules.clear()
