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
from typing import Any, Mapping, Optional

import torch

from .frame_attention import FrameMode
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


class AttentionController:
    """Identity controller: a subclass overrides what it needs.

    Order per attention call: ``override`` (return a tensor to replace the attention
    output outright, e.g. an SDPA over source queries/keys and target values);
    otherwise, if ``needs_probabilities`` is true, the maps are computed explicitly
    and passed through ``edit_probabilities``; otherwise the fast SDPA path runs.
    """

    def needs_probabilities(self, call: AttentionCall) -> bool:
        return False

    def edit_probabilities(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        """probs: [A, H, Nq, Nk] fp32 -> same shape."""
        return probs

    def override(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
        """q: [A, Nq, H·D], k/v: [A, Nk, H·D] -> [A, Nq, H·D] or ``None`` for the default path."""
        return None


@dataclass
class RunState:
    """Per-run settings a sampler places in the transformer options."""

    controller: Optional[AttentionController] = None
    layout: Optional[LayoutSpec] = None
