"""Backward cross-attention guidance (Motamed et al., §3.4): move and resize an object by
pulling a word's cross-attention towards per-frame target masks.

At a guided step the conditional rows are evaluated with gradients on; the word's
cross-attention maps of the chosen layers ``A`` (heads and the word's tokens averaged,
per frame) are soft-thresholded at the midpoint of each map's min and max,
``shape(A) = sigmoid(k·(A − mid)/(max − min))``, and compared with the target masks
resampled to each layer's resolution:

    E = Σ_layers Σ_frames mean‖shape(A) − M‖²

and the latent moves down the gradient with the study's scale δ_t² = (1−ᾱ_t)/ᾱ_t. In
ComfyUI's σ-space (x = z·√(1+σ²), σ² = (1−ᾱ)/ᾱ) the same update of z reads
``x ← x − η·σ²·(1+σ²)·∇ₓE``. Then the normal guided step follows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .attention import apply_probabilities, attention_probabilities
from .control import ATTN2, AttentionCall, AttentionController, VideoOutputs
from .errors import SettingsError
from .keys import LayerKey
from .layout import COND
from .local_blend import grid_of

DEFAULT_SHARPNESS = 10.0


def default_guided_steps(steps: int) -> list[bool]:
    """The study's schedule: every step for the first quarter of the steps, then every other step."""
    quarter = max(1, steps // 4)
    return [i < quarter or (i - quarter) % 2 == 1 for i in range(steps)]


def soft_shape(maps: torch.Tensor, sharpness: float = DEFAULT_SHARPNESS) -> torch.Tensor:
    """Soft threshold at the midpoint of each map's min and max: maps [..., h, w] -> same, in (0, 1)."""
    flat = maps.flatten(-2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    mid, span = (lo + hi) / 2, (hi - lo).clamp_min(1e-8)
    return torch.sigmoid(sharpness * (flat - mid) / span).view_as(maps)


def resample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """masks [F, H, W] -> [F, h, w] (area average, so a box keeps its coverage at any resolution)."""
    return F.interpolate(masks[:, None].float(), size=size, mode="area")[:, 0]


def energy(maps: dict[LayerKey, torch.Tensor], masks: torch.Tensor, sharpness: float = DEFAULT_SHARPNESS) -> torch.Tensor:
    """E over recorded word maps {layer: [F, h, w]} against masks [F, H, W] (one per frame)."""
    if not maps:
        raise SettingsError("No cross-attention map of the chosen layers was recorded; check the layers option.")
    total = torch.zeros((), device=next(iter(maps.values())).device)
    for a in maps.values():
        target = resample_masks(masks.to(a.device), tuple(a.shape[-2:]))
        total = total + (soft_shape(a, sharpness) - target).pow(2).mean(dim=(-2, -1)).sum()
    return total


@dataclass
class WordMapRecorder(AttentionController):
    """Records, with gradients, the mean cross-attention of ``positions`` on the conditional rows of
    the layers whose token grid is one of ``factors`` (latent/factor; e.g. 4 and 8 = 16² and 8²
    at 64² latents), plus the middle block when ``include_middle``."""

    positions: tuple[int, ...]
    latent_hw: tuple[int, int]
    factors: tuple[int, ...] = (4, 8)
    include_middle: bool = True
    maps: dict[LayerKey, torch.Tensor] = field(default_factory=dict)
    _windows: dict[LayerKey, dict[int, torch.Tensor]] = field(default_factory=dict, repr=False)

    def _grid(self, call: AttentionCall, tokens: int) -> Optional[tuple[int, int]]:
        if call.kind != ATTN2:
            return None
        g = grid_of(tokens, self.latent_hw)
        if g is None:
            return None
        middle = call.key.block == "middle"
        # the middle block is taken whatever its resolution when asked (the study found it essential)
        return (g[1], g[2]) if (middle and self.include_middle) or (not middle and g[0] in self.factors) else None

    def override(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[VideoOutputs]:
        """The conditional videos' outputs from explicit (differentiable) maps; other rows are the host's."""
        grid = self._grid(call, q.shape[1])
        if grid is None:
            return None
        videos = [i for i, (kind, _) in enumerate(call.layout.video_roles) if kind == COND]
        if not videos:
            return None
        outputs: dict[int, torch.Tensor] = {}
        words = []
        for video in videos:
            rows = call.video_rows(video, q)
            probs = attention_probabilities(q[rows], k[rows], call.heads)  # [per, H, N, T], differentiable
            words.append(probs[..., list(self.positions)].mean(-1).mean(1))  # [F, N]
            outputs[video] = apply_probabilities(probs, v[rows], call.heads)
        word = torch.cat(words)
        word = word.reshape(word.shape[0], *grid)
        if call.window is None:
            self.maps[call.key] = word
            return outputs
        # a window of a chunked evaluation: each video's frames placed where they belong (frames that overlapping
        # windows share: the later window's, the same maps where chunks are exact), differentiably
        parts = self._windows.setdefault(call.key, {})
        parts[call.window.start] = word.reshape(len(videos), call.window.count, *grid)
        full = word.new_zeros(len(videos), call.window.total, *grid)
        for start in sorted(parts):
            full[:, start:start + parts[start].shape[1]] = parts[start]
        self.maps[call.key] = full.reshape(-1, *grid)
        return outputs


def guided_update(x: torch.Tensor, sigma: float, masks: torch.Tensor, eta: float,
                  evaluate: Callable[[torch.Tensor, WordMapRecorder], None], recorder: WordMapRecorder,
                  sharpness: float = DEFAULT_SHARPNESS) -> tuple[torch.Tensor, float]:
    """One backward-guidance update of x [F, C, h, w] (σ-space); ``evaluate(x, recorder)`` runs the
    conditional rows with the recorder installed. Returns (new x, the energy before the update)."""
    if eta == 0:
        return x, float("nan")
    recorder.maps.clear()
    recorder._windows.clear()
    with torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        evaluate(x_in, recorder)
        e = energy(recorder.maps, masks, sharpness)
        (grad,) = torch.autograd.grad(e, x_in)
    recorder.maps.clear()
    recorder._windows.clear()
    return (x - eta * sigma**2 * (1 + sigma**2) * grad.to(x.dtype)).detach(), float(e.detach())
