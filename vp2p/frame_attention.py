"""Frame attention: the self-attention of a text-to-set (T2S) model.

Each frame's queries attend to keys/values taken from other frames of the same
video instead of (only) its own:

* ``first_frame``  (Video-P2P): frame 0;
* ``sparse_causal`` (Tune-A-Video): frame 0 and the previous frame (frame 0 uses
  frame 0 twice, which gives exactly its own self-attention);
* ``middle_frame`` (FateZero): frame ``(F − 1) // 2`` (frame 3 of 8, as FateZero's code picks it);
* ``none``: plain per-frame self-attention (the image model).

With one frame every mode is plain self-attention. For the single-source modes the
queries of a whole video are attended against one frame's keys in one call
(``[videos, F·N, C]`` against ``[videos, N, C]``), so no key/value copies are made and
memory grows linearly in the number of frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Optional

import torch
from einops import rearrange

from .errors import LayoutError, parse_option


class FrameMode(str, Enum):
    FIRST_FRAME = "first_frame"
    SPARSE_CAUSAL = "sparse_causal"
    MIDDLE_FRAME = "middle_frame"
    NONE = "none"

    @classmethod
    def parse(cls, value: "str | FrameMode") -> "FrameMode":
        return parse_option(cls, value, "frame_attention", "a frame attention mode")


def middle_frame(frames: int) -> int:
    """The frame ``middle_frame`` attention reads: ``(F − 1) // 2``, the lower middle for an even
    count (frame 3 of 8), which is the frame FateZero's code attends to."""
    return (frames - 1) // 2


def anchor_frame(mode: FrameMode, frames: int) -> int:
    """The frame every frame reads in a single-source mode (sparse_causal: frame 0, which every frame reads)."""
    return middle_frame(frames) if mode is FrameMode.MIDDLE_FRAME else 0


@dataclass
class AnchorCache:
    """Keys/values the windows of one UNet evaluation share, per layer (a hashable layer key):

    * ``anchor``: the anchor frame's k/v of every video of the call, ``[videos, N, C]`` each
      (``first_frame``/``middle_frame``: the frame every frame reads; ``sparse_causal``: frame 0);
    * ``last``: ``sparse_causal`` only — ``(layer, frame) -> (k, v)``: the frame a window left for the next one
      (the previous frame of the next window's first frame). Kept while the evaluation may be recomputed
      (autograd: windows are recomputed in the backward pass, last first); dropped once read otherwise.

    Copies of single frames, so a window's other keys/values are freed with it. Under autograd they keep
    their graph, so a later window's gradient reaches the frame's own window."""

    anchor: dict[Any, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    last: dict[tuple[Any, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class FrameWindow:
    """The frames ``start … start+count−1`` of a ``total``-frame video that one UNet call holds (every
    video of the call: the same frames), and the ``AnchorCache`` its evaluation shares with the other
    windows. Windows of one evaluation run the anchor's window first (``vp2p.frame_chunks.plan_windows``).
    ``hand_over``: the frame whose keys/values ``sparse_causal`` leaves for the next window (the frame before
    the next window's first; default: this window's last)."""

    start: int
    count: int
    total: int
    cache: AnchorCache = field(default_factory=AnchorCache, compare=False, repr=False)
    hand_over: Optional[int] = None

    def __post_init__(self) -> None:
        if self.count < 1 or self.start < 0 or self.start + self.count > self.total:
            raise LayoutError(f"A frame window {self.start}…{self.start + self.count - 1} does not fit a video of {self.total} frames.")

    @property
    def frames(self) -> slice:
        return slice(self.start, self.start + self.count)

    def holds(self, frame: int) -> bool:
        return self.start <= frame < self.start + self.count

    def anchor_kv(self, key: Any, kf: torch.Tensor, vf: torch.Tensor, frame: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The anchor ``frame``'s k/v [videos, N, C] at layer ``key``: taken from this window's own
        ``kf``/``vf`` [videos, count, N, C] (and cached) when it holds the frame, else from the cache."""
        if self.holds(frame):
            kv = (kf[:, frame - self.start], vf[:, frame - self.start])
            self.cache.anchor[key] = (kv[0].clone(), kv[1].clone())
            return kv
        if key not in self.cache.anchor:
            raise LayoutError(f"Frames {self.start}…{self.start + self.count - 1} were evaluated before the window holding anchor frame "
                              f"{frame} at layer {key}: run the anchor's window first (vp2p.frame_chunks.plan_windows).")
        return self.cache.anchor[key]

    def previous_kv(self, key: Any, kf: torch.Tensor, vf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sparse_causal``: the previous frame's k/v of each of this window's frames, [videos, count, N, C]
        (frame 0 reads itself); leaves the ``hand_over`` frame for the next window."""
        if self.start == 0:
            kp, vp = torch.cat([kf[:, :1], kf[:, :-1]], dim=1), torch.cat([vf[:, :1], vf[:, :-1]], dim=1)
        else:
            held = self.cache.last.get((key, self.start - 1))
            if held is None:
                raise LayoutError(f"sparse_causal frame attention reads the previous frame: the window holding frame {self.start - 1} "
                                  f"must run right before frames {self.start}…{self.start + self.count - 1} (layer {key}).")
            if not torch.is_grad_enabled():
                del self.cache.last[(key, self.start - 1)]
            k_last, v_last = held
            kp = torch.cat([k_last[:, None], kf[:, :-1]], dim=1)
            vp = torch.cat([v_last[:, None], vf[:, :-1]], dim=1)
        keep = self.hand_over if self.hand_over is not None else self.start + self.count - 1
        if self.holds(keep):
            self.cache.last[(key, keep)] = (kf[:, keep - self.start].clone(), vf[:, keep - self.start].clone())
        return kp, vp


def source_frames(mode: FrameMode, frames: int) -> list[list[int]]:
    """For each frame, the frames whose keys/values it attends to (the definition, for docs and tests)."""
    if mode is FrameMode.FIRST_FRAME:
        return [[0] for _ in range(frames)]
    if mode is FrameMode.MIDDLE_FRAME:
        return [[middle_frame(frames)] for _ in range(frames)]
    if mode is FrameMode.SPARSE_CAUSAL:
        return [[0, max(i - 1, 0)] for i in range(frames)]
    return [[i] for i in range(frames)]


@dataclass(frozen=True)
class FrameAttentionInputs:
    """q/k/v regrouped for frame attention plus the way back to per-frame rows.

    ``q``: [A, Nq', C], ``k``/``v``: [A, Nk', C] where A is the attention batch:
    ``videos`` for single-source modes (Nq' = F·N), ``videos·F`` otherwise.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    rows: int
    tokens: int
    queries_grouped: bool

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        """[A, Nq', C] -> [videos·F, N, C]."""
        if self.queries_grouped:
            return out.reshape(self.rows, self.tokens, out.shape[-1])
        return out


def frame_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, videos: int, frames: int, mode: FrameMode,
                           window: Optional[FrameWindow] = None, key: Any = None) -> FrameAttentionInputs:
    """Regroup self-attention inputs ``[videos·F, N, C]`` for the frame attention ``mode``.

    With a ``window`` the rows hold ``frames = window.count`` frames of a ``window.total``-frame video:
    the anchor frame's and (sparse_causal) the previous window's last frame's keys/values come from
    the window's ``AnchorCache`` under the layer ``key``, so the result equals the whole video's rows."""
    rows, tokens, _ = q.shape
    total = window.total if window is not None else frames
    if mode is FrameMode.NONE or total == 1:
        return FrameAttentionInputs(q, k, v, rows, tokens, False)
    kf = rearrange(k, "(v f) n c -> v f n c", v=videos, f=frames)
    vf = rearrange(v, "(v f) n c -> v f n c", v=videos, f=frames)
    if mode in (FrameMode.FIRST_FRAME, FrameMode.MIDDLE_FRAME):
        src = anchor_frame(mode, total)
        ka, va = (kf[:, src], vf[:, src]) if window is None else window.anchor_kv(key, kf, vf, src)
        qg = rearrange(q, "(v f) n c -> v (f n) c", v=videos, f=frames)
        return FrameAttentionInputs(qg, ka, va, rows, tokens, True)
    # sparse_causal: keys of frame 0 then of the previous frame, per frame.
    if window is None:
        prev = torch.clamp(torch.arange(frames, device=k.device) - 1, min=0)
        k0, v0, kp, vp = kf[:, :1], vf[:, :1], kf[:, prev], vf[:, prev]
    else:
        k0, v0 = (t[:, None] for t in window.anchor_kv(key, kf, vf, 0))
        kp, vp = window.previous_kv(key, kf, vf)
    k2 = torch.cat([k0.expand(-1, frames, -1, -1), kp], dim=2)
    v2 = torch.cat([v0.expand(-1, frames, -1, -1), vp], dim=2)
    return FrameAttentionInputs(q, rearrange(k2, "v f n c -> (v f) n c"), rearrange(v2, "v f n c -> (v f) n c"), rows, tokens, False)


def per_row_keys(inputs: FrameAttentionInputs, frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs with one key/value set per row (``[videos·F, ·, C]``), for chained patches
    written for ordinary row-aligned self-attention."""
    if not inputs.queries_grouped:
        return inputs.q, inputs.k, inputs.v
    q = inputs.q.reshape(inputs.rows, inputs.tokens, inputs.q.shape[-1])
    expand: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.repeat_interleave(frames, dim=0)
    return q, expand(inputs.k), expand(inputs.v)


def key_frames(mode: FrameMode, frames: int) -> int:
    """How many frames' keys a video's frame attention reads (what a store keeps per video)."""
    if frames == 1 or mode in (FrameMode.FIRST_FRAME, FrameMode.MIDDLE_FRAME):
        return 1
    if mode is FrameMode.SPARSE_CAUSAL:
        return frames - 1  # frame 0 and every previous frame; the last frame is nobody's previous
    return frames


def compact_keys(k: torch.Tensor, mode: FrameMode, frames: int) -> torch.Tensor:
    """The distinct keys of one video's regrouped frame attention, for storing.

    k: the regrouped keys of one video as ``frame_attention_inputs`` made them —
    ``[1, N, C]`` (first/middle frame), ``[F, 2N, C]`` (sparse_causal), ``[F, N, C]`` (none)
    -> ``[key_frames, N, C]``. ``expand_keys`` inverts it exactly.
    """
    if mode is FrameMode.SPARSE_CAUSAL and frames > 1:
        n = k.shape[1] // 2
        return k[1:, n:]  # row f holds frame 0's keys then frame f−1's: rows 1… hold frames 0…F−2
    return k


def expand_keys(compact: torch.Tensor, mode: FrameMode, frames: int) -> torch.Tensor:
    """Inverse of ``compact_keys``: ``[key_frames, N, C]`` -> the regrouped keys of one video (every frame's window)."""
    return window_keys(compact, mode, frames, slice(0, frames))


def window_keys(compact: torch.Tensor, mode: FrameMode, frames: int, window: slice) -> torch.Tensor:
    """The regrouped keys of one video's frames ``window`` (of ``frames``) from its compact keys
    ``[key_frames, N, C]``, built for the window only (frame f of sparse_causal reads frames 0 and max(f−1, 0))."""
    if mode is FrameMode.SPARSE_CAUSAL and frames > 1:
        prev = torch.clamp(torch.arange(window.start, window.stop, device=compact.device) - 1, min=0)
        return torch.cat([compact[:1].expand(len(prev), -1, -1), compact[prev]], dim=1)
    if mode is FrameMode.NONE or frames == 1:
        return compact[window]
    return compact
