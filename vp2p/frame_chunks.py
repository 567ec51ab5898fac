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
cache one frame per layer (two for ``sparse_causal``). Windows may overlap (``chunk_overlap``): the
frames two windows share are evaluated in both and their outputs blended with a linear ramp, which
smooths what tuned temporal layers see at window borders (exact cases stay exact: a frame's output is
the same in every window).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional

import torch
import torch.utils.checkpoint

from .control import RunState
from .errors import SettingsError
from .frame_attention import AnchorCache, FrameMode, FrameWindow, anchor_frame


def plan_windows(total: int, per_chunk: int, mode: FrameMode, overlap: int = 0) -> list[tuple[int, int]]:
    """The windows ``(start, count)`` of a ``total``-frame video in the order they run, the one holding
    the anchor frame first, the others in frame order. ``overlap`` 0: consecutive windows of ``per_chunk``
    frames (the last may be shorter); ``overlap`` > 0: windows of ``per_chunk`` frames starting every
    ``per_chunk − overlap`` frames, the last one ending at the last frame (``blend_weights`` blends the
    frames two windows share). ``per_chunk`` ≥ total: one window (the whole video)."""
    if per_chunk < 1:
        raise SettingsError(f"frames_per_chunk={per_chunk}: use 0 for the whole video at once, or a number of frames ≥ 1.")
    if not 0 <= overlap < per_chunk:
        raise SettingsError(f"chunk_overlap={overlap} must be ≥ 0 and smaller than frames_per_chunk={per_chunk} (e.g. a quarter of it).")
    if per_chunk >= total:
        return [(0, total)]
    if overlap == 0:
        windows = [(s, min(per_chunk, total - s)) for s in range(0, total, per_chunk)]
    else:
        starts = list(range(0, total - per_chunk, per_chunk - overlap)) + [total - per_chunk]
        windows = [(s, per_chunk) for s in dict.fromkeys(starts)]
    anchor = anchor_frame(mode, total)
    first = next(w for w in windows if w[0] <= anchor < w[0] + w[1])
    return [first] + [w for w in windows if w != first]


def blend_weights(windows: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Per window, a weight per frame [count] for blending the frames windows share: a linear ramp across
    each side shared with the neighbouring window in frame order (as AnimateDiff's context windows blend),
    1 elsewhere. Disjoint windows: all ones."""
    ordered = sorted(windows)
    weights = []
    for start, count in windows:
        i = ordered.index((start, count))
        left = ordered[i - 1][0] + ordered[i - 1][1] - start if i > 0 else 0
        right = start + count - ordered[i + 1][0] if i + 1 < len(ordered) else 0
        j = torch.arange(count, dtype=torch.float32)
        w = torch.ones(count)
        if left > 0:
            w = torch.minimum(w, (j + 1) / (left + 1))
        if right > 0:
            w = torch.minimum(w, (count - j) / (right + 1))
        weights.append(w)
    return weights


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
                        mode: FrameMode, device: Optional[torch.device] = None, overlap: int = 0) -> torch.Tensor:
    """One UNet evaluation of ``videos`` videos of ``total`` frames, window by window.

    ``evaluate(index, window)`` evaluates the call's rows ``index`` (``window_rows``) as the window's
    call and returns their output ``[len(index), …]``; the windows share one ``AnchorCache``. Returns
    the outputs in the call's row order ``[videos·total, …]`` (differentiable); frames that overlapping
    windows share are blended with ``blend_weights``."""
    cache = AnchorCache()
    windows = plan_windows(total, per_chunk, mode, overlap)
    outputs, indices = [], []
    for n, (start, count) in enumerate(windows):
        hand_over = windows[n + 1][0] - 1 if n + 1 < len(windows) else None
        index = window_rows(videos, total, start, count, device)
        window = FrameWindow(start, count, total, cache, hand_over)
        if torch.is_grad_enabled():
            # Under autograd (null-text, tuning, guidance) a window keeps only its inputs and output: its activations
            # are recomputed in the backward pass, so memory stays a window's whatever the length. A later window's
            # gradient still reaches the anchor's window through the cached keys/values (recomputing that window).
            outputs.append(torch.utils.checkpoint.checkpoint(evaluate, index, window, use_reentrant=False))
        else:
            outputs.append(evaluate(index, window))
        indices.append(index)
    order = torch.cat(indices)
    out = torch.cat(outputs)
    if order.numel() == videos * total:  # disjoint windows: every row once
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return out.index_select(0, inverse.to(out.device))
    w = torch.cat([wt.repeat(videos) for wt in blend_weights(windows)]).to(out.device, out.dtype)
    shape = (-1,) + (1,) * (out.dim() - 1)
    order = order.to(out.device)
    total_w = torch.zeros(videos * total, device=out.device, dtype=out.dtype).index_add(0, order, w)
    blended = torch.zeros((videos * total, *out.shape[1:]), device=out.device, dtype=out.dtype).index_add(0, order, out * w.view(shape))
    return blended / total_w.view(shape)


def should_chunk(run: Optional[RunState], frames: int, per_chunk: int) -> bool:
    """Whether a call of ``frames`` frames per video is split (not when it already is a window)."""
    return per_chunk > 0 and frames > per_chunk and (run is None or run.window is None)
