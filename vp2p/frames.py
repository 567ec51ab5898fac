"""Which frames of a clip a video edit uses: a start, a stride and a cap (as video loaders offer).

A stride keeps motion per frame larger at the same frame count (the research code edits 8 frames
taken at a sampling rate); the edited clip plays at its real speed at ``fps / stride``.
"""

from __future__ import annotations

from .errors import SettingsError


def frame_indices(total: int, start: int = 0, stride: int = 1, cap: int = 0) -> list[int]:
    """Indices into a clip of ``total`` frames: ``start``, ``start + stride``, … at most ``cap``
    of them (0: every one to the end). A cap beyond the clip gives what the clip has."""
    if total < 1:
        raise SettingsError("The clip has no frames. Check the video file (Load Video) or the frames connected.")
    if stride < 1:
        raise SettingsError(f"stride={stride}: it must be 1 or more (1 = every frame, 2 = every other frame, …).")
    if cap < 0:
        raise SettingsError(f"cap={cap}: it must be 0 (all frames) or a frame count.")
    if not 0 <= start < total:
        raise SettingsError(f"start={start} but the clip has {total} frames (0…{total - 1}). Pick an earlier start frame.")
    picked = list(range(start, total, stride))
    return picked[:cap] if cap else picked


def played_fps(fps: float, stride: int) -> float:
    """The frame rate at which frames taken every ``stride`` frames of an ``fps`` clip play at its real speed."""
    if fps <= 0:
        raise SettingsError(f"fps={fps}: a clip's frame rate must be positive.")
    return fps / stride
