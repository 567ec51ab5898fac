"""Frame chunks: a long video through the UNet a few frames at a time.

A T2S model couples the frames of a video in three places: frame attention (each frame reads the
keys/values of an anchor frame — frame 0, the middle frame — and, for ``sparse_causal``, its
previous frame), the temporal layers (attention over all frames at each position) and, with
``group_norm=video``, the ResNet GroupNorms' statistics. Frame attention needs nothing of the
other frames but those keys/values, so a video can be evaluated in *windows* of frames: the
window holding the anchor runs first and leaves the anchor's keys/values of every layer in an
``AnchorCache`` that the later windows of the same evaluation read (``sparse_causal`` windows run
in order, each leaving its last frame for the next). With the temporal layers off or untuned
(an exact identity) and ``group_norm=frame`` a chunked evaluation equals the whole one to float
rounding; tuned temporal layers attend within a window, and video-level GroupNorms pool a
window's frames (both measured in ``bench/bench_long.py``).

Memory then grows with the window, not the video: the UNet's activations are a window's, the
cache one frame per layer (two for ``sparse_causal``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional

import torch

from .control import RunState
from .errors import SettingsError
from .frame_attention import AnchorCache, FrameMode, FrameWindow, anchor_frame


def plan_windows(total: int, per_chunk: int, mode: FrameMode) -> list[tuple[int, int]]:
    """The windows ``(start, count)`` of a ``total``-frame video in the order they run: consecutive
    windows of ``per_chunk`` frames (the last may be shorter), the one holding the anchor frame
    first, the others in frame order. ``per_chunk`` ≥ total: one window (the whole video)."""
    if per_chunk < 1:
        raise SettingsError(f"frames_per_chunk={per_chunk}: use 0 for the whole video at once, or a number of frames ≥ 1.")
    if per_chunk >= total:
        return [(0, total)]
    windows = [(s, min(per_chunk, total - s)) for s in range(0, total, per_chunk)]
    anchor = anchor_frame(mode, total)
    first = next(w for w in windows if w[0] <= anchor < w[0] + w[1])
    return [first] + [w for w in windows if w != first]


def window_rows(videos: int, total: int, start: int, count: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Row indices [videos·count] of frames ``start … start+count−1`` of every video of a call whose
    rows are ``videos`` consecutive videos of ``total`` frames."""
    frames = torch.arange(start, start + count, device=device)
    return (torch.arange(videos, device=device)[:, None] * total + frames[None]).reshape(-1)


def take_rows(obj: Any, index: torch.Tensor, rows: int) -> Any:
    """``obj`` with every tensor whose first dimension is the call's ``rows`` reduced to the rows
    ``index`` (through lists, tuples and dicts, e.g. a ControlNet's residuals); anything else as it is."""
    if torch.is_tensor(obj):
        return obj.index_select(0, index.to(obj.device)) if obj.dim() > 0 and obj.shape[0] == rows else obj
    if isinstance(obj, dict):
        return {k: take_rows(v, index, rows) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(take_rows(v, index, rows) for v in obj)
    return obj


def window_run(run: Optional[RunState], window: FrameWindow) -> RunState:
    """The run state of one window's call: the same controller, the layout with the window's frames."""
    run = run or RunState()
    layout = replace(run.layout, frames=window.count) if run.layout is not None else None
    return RunState(run.controller, layout, window)


def evaluate_in_windows(evaluate: Callable[[torch.Tensor, FrameWindow], torch.Tensor], videos: int, total: int, per_chunk: int,
                        mode: FrameMode, device: Optional[torch.device] = None) -> torch.Tensor:
    """One UNet evaluation of ``videos`` videos of ``total`` frames, window by window.

    ``evaluate(index, window)`` evaluates the call's rows ``index`` (``window_rows``) as the window's
    call and returns their output ``[len(index), …]``; the windows share one ``AnchorCache``. Returns
    the outputs in the call's row order ``[videos·total, …]`` (differentiable)."""
    cache = AnchorCache()
    outputs, indices = [], []
    for start, count in plan_windows(total, per_chunk, mode):
        index = window_rows(videos, total, start, count, device)
        outputs.append(evaluate(index, FrameWindow(start, count, total, cache)))
        indices.append(index)
    order = torch.cat(indices)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    out = torch.cat(outputs)
    return out.index_select(0, inverse.to(out.device))


def should_chunk(run: Optional[RunState], frames: int, per_chunk: int) -> bool:
    """Whether a call of ``frames`` frames per video is split (not when it already is a window)."""
    return per_chunk > 0 and frames > per_chunk and (run is None or run.window is None)
