"""Per-frame target masks: a box (or ellipse) moving and resizing from a start box to an end box.

Boxes are normalised ``(x, y, w, h)`` (top-left corner, size; fractions of the frame). The
result is a MASK ``[F, H, W]`` in {0, 1}: usable for cross-attention guidance and on its own.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Sequence

import torch

from .errors import SettingsError, parse_option


class MaskShape(str, Enum):
    BOX = "box"
    ELLIPSE = "ellipse"

    @classmethod
    def parse(cls, value: "str | MaskShape") -> "MaskShape":
        return parse_option(cls, value, "shape", "a mask shape")


class Easing(str, Enum):
    LINEAR = "linear"
    EASE_IN_OUT = "ease_in_out"
    EASE_IN = "ease_in"
    EASE_OUT = "ease_out"

    @classmethod
    def parse(cls, value: "str | Easing") -> "Easing":
        return parse_option(cls, value, "easing", "an easing")

    def __call__(self, t: float) -> float:
        if self is Easing.EASE_IN:
            return t * t
        if self is Easing.EASE_OUT:
            return 1 - (1 - t) ** 2
        if self is Easing.EASE_IN_OUT:
            return 0.5 - 0.5 * math.cos(math.pi * t)
        return t


def _check_box(box: Sequence[float], name: str) -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise SettingsError(f"{name} must be (x, y, w, h), got {tuple(box)}.")
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise SettingsError(f"{name} has width {w} and height {h}; both must be > 0 (fractions of the frame).")
    return x, y, w, h


def box_trajectory(width: int, height: int, frames: int, start: Sequence[float], end: Sequence[float],
                   shape: MaskShape = MaskShape.BOX, easing: Easing = Easing.LINEAR) -> torch.Tensor:
    """[F, H, W] float masks of a box interpolated from ``start`` (frame 0) to ``end`` (last frame)."""
    if width < 1 or height < 1 or frames < 1:
        raise SettingsError(f"width, height and frames must be ≥ 1, got {width}×{height}, {frames} frames.")
    a, b = _check_box(start, "start box"), _check_box(end, "end box")
    yy = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xx = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    out = torch.zeros(frames, height, width)
    for f in range(frames):
        t = easing(f / (frames - 1)) if frames > 1 else 0.0
        x, y, w, h = (p + (q - p) * t for p, q in zip(a, b))
        if shape is MaskShape.ELLIPSE:
            cx, cy = x + w / 2, y + h / 2
            inside = ((xx[None, :] - cx) / (w / 2)) ** 2 + ((yy[:, None] - cy) / (h / 2)) ** 2 <= 1.0
        else:
            inside = (yy[:, None] >= y) & (yy[:, None] < y + h) & (xx[None, :] >= x) & (xx[None, :] < x + w)
        out[f] = inside.float()
    return out
