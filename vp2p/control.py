"""The controller interface and the per-run state.

Everything that reads or changes attention during a run (stores, prompt-to-prompt
edits, FateZero fusion, guidance energies) is an ``AttentionController``. The one
attention patch calls it for every attention of every transformer block; a
controller overrides only the hooks it needs. The per-run state travels in the
host's transformer options under ``RUN_STATE_KEY``, so nothing about a run is kept
in module globals or in the patched model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from .attention import AttentionFn, sdpa
from .frame_attention import FrameMode, FrameWindow
from .keys import LayerKey
from .layout import BatchLayout, LayoutSpec

RUN_STATE_KEY = "vp2p_run"
ATTN1, ATTN2, TEMPORAL = "attn1", "attn2", "temporal"


@dataclass(frozen=True)
class AttentionCall:
    """Everything a controller may need to know about one attention evaluation.

    ``kind``: ``attn1`` (frame/self attention), ``attn2`` (cross attention with the
    text) or ``temporal``. ``frame_mode`` is this layer's frame attention (``none`` in a
    block narrower than ``frame_attention_min_channels``) and says how attn1 rows were regrouped:
    with ``first_frame``/``middle_frame`` the attention batch is ``videos`` and the
    queries of a video's F frames are concatenated (Nq = F·N); otherwise the
    attention batch is ``videos·F`` (attn1/attn2) or ``videos·N`` (temporal, Nq = F).
    """

    kind: str
    key: LayerKey
    heads: int
    layout: BatchLayout
    frame_mode: FrameMode
    extra_options: Mapping[str, Any] = field(repr=False, compare=False)
    attention_fn: AttentionFn = field(default=sdpa, repr=False, compare=False)
    window: Optional[FrameWindow] = field(default=None, compare=False)  # the call holds these frames of a longer video

    @property
    def frame_slice(self) -> slice:
        """The frames of the whole video this call's ``layout.frames`` rows per video are."""
        return self.window.frames if self.window is not None else slice(0, self.layout.frames)

    @property
    def total_frames(self) -> int:
        """The whole video's frame count (``layout.frames`` unless the call is a window of it)."""
        return self.window.total if self.window is not None else self.layout.frames

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The host's configured attention kernel (ComfyUI's optimized attention, SDPA under
        autograd): q [A, Nq, H·D], k/v [A, Nk, H·D] -> [A, Nq, H·D]. What a controller uses for the
        rows it owns when it needs no maps."""
        return self.attention_fn(q, k, v, self.heads, self.extra_options)

    def per_video(self, q: torch.Tensor) -> int:
        """Attention rows per video of this call (1 for grouped frame attention, F for per-frame
        attention, N for temporal attention)."""
        return q.shape[0] // self.layout.videos

    def video_rows(self, video: int, q: torch.Tensor) -> slice:
        """The attention rows of video ``video`` (an index into ``layout.video_roles``)."""
        per = self.per_video(q)
        return slice(video * per, (video + 1) * per)

    @property
    def sigmas(self) -> Optional[torch.Tensor]:
        """The noise levels of this call's rows (ComfyUI's ``transformer_options['sigmas']``)."""
        return self.extra_options.get("sigmas")

    def frame_tokens(self, q: torch.Tensor) -> int:
        """Query tokens per frame of this call (q as the controller receives it)."""
        grouped = self.kind == ATTN1 and self.frame_mode in (FrameMode.FIRST_FRAME, FrameMode.MIDDLE_FRAME)
        return q.shape[1] // self.layout.frames if grouped else q.shape[1]

    @property
    def latent_shape(self) -> Optional[list[int]]:
        """Shape of the UNet input ``[rows, C, h, w]`` where the host provides it."""
        shape = self.extra_options.get("original_shape")
        return list(shape) if shape is not None else None


# What ``AttentionController.override`` returns: video index -> that video's output [per_video, Nq, H·D].
VideoOutputs = Mapping[int, torch.Tensor]


class AttentionController:
    """Identity controller: a subclass overrides what it needs.

    Order per attention call: ``override`` returns the outputs of the videos it edits
    (``{video: out}``, e.g. the target's rows as SDPA over source queries/keys and target
    values); every other video is computed by what would have run without the controller
    (a replace function another node chained on the key, else the host's kernel), so a
    controller never computes rows it does not own. When ``override`` edits nothing and
    ``needs_probabilities`` is true, the maps of every row are computed explicitly and passed
    through ``edit_probabilities`` (a controller that owns all rows: tests, diagnostics).
    """

    def needs_probabilities(self, call: AttentionCall) -> bool:
        return False

    def edit_probabilities(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        """probs: [A, H, Nq, Nk] fp32 -> same shape."""
        return probs

    # -- the step lifecycle (prompt-to-prompt's): what a sampler asks its controller ----------------
    def needs_source(self, step: int) -> bool:
        """Whether the source branch's conditional rows must be in the UNet call of ``step``."""
        return False

    def end_step(self, step: int, x_target: torch.Tensor, source_at: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """After ``step``'s DDIM step: the target latent x_target [F, C, h, w] (σ-space at sigmas[step+1]),
        possibly changed (a latent blend); ``source_at(j)`` is the source latent at sigmas[j]."""
        return x_target

    def override(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[VideoOutputs]:
        """q: [A, Nq, H·D], k/v: [A, Nk, H·D] (A = videos × ``call.per_video(q)``) -> the outputs of
        the videos this controller edits, ``{video: [per_video, Nq, H·D]}``; ``None`` or ``{}``: none."""
        return None


@dataclass
class RunState:
    """Per-run settings a sampler places in the transformer options."""

    controller: Optional[AttentionController] = None
    layout: Optional[LayoutSpec] = None
    # the frames of a longer video this call holds (``vp2p.frame_chunks``); None: the whole video
    window: Optional[FrameWindow] = None
