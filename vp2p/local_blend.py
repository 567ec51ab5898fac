"""LocalBlend (prompt-to-prompt / Video-P2P): keep the target latent equal to the source
latent outside the region the blend words attend to.

Masks are per frame, from cross-attention maps of the conditional rows (the source's, and the
target's after the controller's edit, as the reference):
for each prompt, the blend words' maps are summed over their tokens, averaged over heads
and layers (the layers of one resolution: the 16×16-token maps of a 512² SD1.5 video,
i.e. latent/4; on a model without that resolution, the coarsest non-middle one), by
default averaged over the steps so far (the reference's behaviour; ``average=False`` uses
the current step only), 3×3 max-pooled, upsampled (nearest) to the latent, divided by the
per-(prompt, frame) maximum and thresholded; the source and target masks are united.
From ``start`` of the steps on (until ``end``), after each step: ``x_tgt ← x_src + M·(x_tgt − x_src)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .keys import LayerKey

PREFERRED_FACTOR = 4  # latent/4: the reference's 16×16 maps at 64² latents


@dataclass(frozen=True)
class LocalBlendSpec:
    source_positions: tuple[int, ...]
    target_positions: tuple[int, ...]
    threshold: float = 0.3
    start: float = 0.2
    average: bool = True
    end: float = 1.0  # blending stops at this fraction of the steps (FateZero's latent blend: 0.8)


def grid_of(tokens: int, latent_hw: tuple[int, int]) -> Optional[tuple[int, int, int]]:
    """(factor, h, w) of a layer with ``tokens`` spatial tokens for a latent of ``latent_hw``
    (each level halves with ceil, as stride-2 convolutions with padding 1 do)."""
    h, w = latent_hw
    factor = 1
    while h * w >= tokens:
        if h * w == tokens:
            return factor, h, w
        if h == 1 and w == 1:
            break
        h, w, factor = math.ceil(h / 2), math.ceil(w / 2), factor * 2
    return None


def blend_factor(factors: "set[int] | list[int]") -> int:
    """The resolution the masks use among the recorded non-middle layers' downsampling factors:
    latent/4 (the reference's 16² maps at 64² latents) or the closest finer one, else the coarsest."""
    preferred = [f for f in factors if f <= PREFERRED_FACTOR]
    return max(preferred) if preferred else min(factors)


def normalised_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """maps [P, F, h, w] -> [P, F, *size]: 3×3 max-pool, nearest upsampling, divided by each
    (prompt, frame)'s maximum — what the masks threshold."""
    maps = F.max_pool2d(maps, kernel_size=3, stride=1, padding=1)
    maps = F.interpolate(maps, size=size, mode="nearest")
    return maps / maps.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None]


class WordMaps:
    """Records the blend words' cross-attention maps of a step, per frame, at one resolution (the
    first step's ``blend_factor``; the middle block never): the blend words' tokens summed, heads and
    layers averaged. ``LocalBlend`` and FateZero's latent blend differ only in how steps combine."""

    def __init__(self, spec: LocalBlendSpec, frames: int, latent_hw: tuple[int, int], steps: int) -> None:
        self.spec = spec
        self.frames = frames
        self.latent_hw = latent_hw
        self.steps = steps
        self.factor: Optional[int] = None  # chosen after the first step
        self._current: dict[int, dict[LayerKey, torch.Tensor]] = {}  # factor -> layer -> maps [2, F, h, w] of this step
        self.last_mask: Optional[torch.Tensor] = None  # [F, 1, H, W] bool, for tests and previews

    def wants(self, key: LayerKey, tokens: int) -> bool:
        """Whether maps of this cross-attention layer are recorded."""
        if key.block == "middle":
            return False
        g = grid_of(tokens, self.latent_hw)
        return g is not None and (self.factor is None or g[0] == self.factor)

    def record(self, key: LayerKey, p_source: torch.Tensor, p_target: torch.Tensor, frames: Optional[slice] = None) -> None:
        """p_*: [F', H, N, T] fp32 probabilities of the conditional rows of each prompt, for the video's
        ``frames`` (a window of a chunked evaluation; default: all F frames)."""
        g = grid_of(p_source.shape[2], self.latent_hw)
        if g is None:
            return
        factor, h, w = g
        count = p_source.shape[0]
        maps = torch.stack([p[..., list(pos)].sum(-1).mean(1).reshape(count, h, w)  # [F', h, w]
                            for p, pos in ((p_source, self.spec.source_positions), (p_target, self.spec.target_positions))])
        layers = self._current.setdefault(factor, {})
        if frames is None or count == self.frames:
            layers[key] = maps
            return
        if key not in layers:
            layers[key] = maps.new_zeros(2, self.frames, h, w)
        layers[key][:, frames] = maps

    def applies(self, step: int) -> bool:
        """Whether the latents are blended after ``step`` (a subclass's window)."""
        raise NotImplementedError

    def mask(self) -> Optional[torch.Tensor]:
        """[F, 1, h, w] bool: where the target keeps its own latent (None before any map)."""
        raise NotImplementedError

    def blend(self, step: int, x_source: torch.Tensor, x_target: torch.Tensor) -> torch.Tensor:
        """x_*: [F, C, h, w]; the target inside the mask, the source outside (unchanged outside the window)."""
        if not self.applies(step):
            return x_target
        m = self.mask()
        if m is None:
            return x_target
        self.last_mask = m
        return torch.where(m.to(x_target.device), x_target, x_source)

    def _close_step(self) -> Optional[torch.Tensor]:
        """The step's map [2 (source, target), F, h, w], averaged over its layers (None if none was
        recorded); the first step with maps fixes the resolution used."""
        if not self._current:
            return None
        if self.factor is None:
            self.factor = blend_factor(list(self._current))
        layer_maps = list(self._current.get(self.factor, {}).values())
        self._current = {}
        return torch.stack(layer_maps).mean(0) if layer_maps else None


class LocalBlend(WordMaps):
    """Collects the blend words' maps during the steps (the target's as the controller edited them)
    and blends latents after each step."""

    def __init__(self, spec: LocalBlendSpec, frames: int, latent_hw: tuple[int, int], steps: int) -> None:
        super().__init__(spec, frames, latent_hw, steps)
        self._total: Optional[torch.Tensor] = None  # sum over steps of the per-step map [2, F, h, w]
        self._count = 0

    def end_step(self) -> None:
        """Close a step's recording: the steps' maps averaged (``spec.average``), or the last one."""
        step_map = self._close_step()
        if step_map is None:
            return
        if self.spec.average:
            self._total = step_map if self._total is None else self._total + step_map
            self._count += 1
        else:
            self._total, self._count = step_map, 1

    def maps(self) -> Optional[torch.Tensor]:
        """[2 (source, target), F, h, w]: the normalised maps the masks threshold (None before any map)."""
        if self._total is None:
            return None
        return normalised_maps(self._total / self._count, self.latent_hw)  # [2, F, h, w]

    def mask(self) -> Optional[torch.Tensor]:
        """[F, 1, h, w] bool: union of the thresholded source and target masks (None before any map)."""
        maps = self.maps()
        return None if maps is None else (maps > self.spec.threshold).any(0).unsqueeze(1)

    def applies(self, step: int) -> bool:
        return int(self.spec.start * self.steps) <= step < int(self.spec.end * self.steps)
