"""Temporal attention layers of the T2S model (Tune-A-Video / Video-P2P).

After the feed-forward of every transformer block, each spatial position attends
over the frame axis of its own video: ``x + to_out(attn(norm(x)))``. ``to_out`` is
zero-initialised, so an inflated model starts exactly equal to the image model.
The layers live in a ``TemporalBank`` keyed by ``LayerKey`` that hosts attach with
forward hooks; the base model's modules are never changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .keys import LayerKey

# (q, k, v, heads) -> out, all [A, F, H·D]
TemporalAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class BlockShape:
    """What a temporal layer must match: the block's width and head layout."""

    dim: int
    heads: int
    dim_head: int


def _cast(t: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    # The bank may sit in fp32 while the UNet runs in half precision: cast on use.
    return None if t is None else t.to(device=like.device, dtype=like.dtype)


class TemporalAttention(nn.Module):
    """Attention over frames at every spatial position, residual, zero-initialised output."""

    def __init__(self, shape: BlockShape, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        inner = shape.heads * shape.dim_head
        self.heads = shape.heads
        self.norm = nn.LayerNorm(shape.dim)
        self.to_q = nn.Linear(shape.dim, inner, bias=False)
        self.to_k = nn.Linear(shape.dim, inner, bias=False)
        self.to_v = nn.Linear(shape.dim, inner, bias=False)
        self.to_out = nn.Linear(inner, shape.dim)
        for lin in (self.to_q, self.to_k, self.to_v):
            # PyTorch's default Linear init, drawn from an explicit generator so that an
            # inflation is reproducible (same bank on every run and on every host).
            nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor, videos: int, frames: int, attend: TemporalAttend) -> torch.Tensor:
        """x: [videos·F, N, C] -> [videos·F, N, C]."""
        h = F.layer_norm(x, self.norm.normalized_shape, _cast(self.norm.weight, x), _cast(self.norm.bias, x), self.norm.eps)
        h = rearrange(h, "(v f) n c -> (v n) f c", v=videos, f=frames)
        q = F.linear(h, _cast(self.to_q.weight, h))
        k = F.linear(h, _cast(self.to_k.weight, h))
        v = F.linear(h, _cast(self.to_v.weight, h))
        out = attend(q, k, v, self.heads)
        out = F.linear(out, _cast(self.to_out.weight, out), _cast(self.to_out.bias, out))
        return x + rearrange(out, "(v n) f c -> (v f) n c", v=videos, f=frames)


class TemporalBank(nn.Module):
    """One ``TemporalAttention`` per transformer block, addressed by ``LayerKey``."""

    def __init__(self, shapes: Mapping[LayerKey, BlockShape], seed: int = 0) -> None:
        super().__init__()
        self.shapes = dict(shapes)
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleDict({key.slug: TemporalAttention(shape, g) for key, shape in sorted(shapes.items())})

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def __getitem__(self, key: LayerKey) -> TemporalAttention:
        return self.layers[key.slug]  # type: ignore[return-value]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, LayerKey) and key.slug in self.layers

    def keys(self) -> list[LayerKey]:
        return [LayerKey.from_slug(s) for s in self.layers.keys()]

    def copy(self) -> "TemporalBank":
        """An independent bank with the same weights (for tuning a copy)."""
        twin = TemporalBank(self.shapes, self.seed).to(self.device)
        twin.load_state_dict(self.state_dict())
        return twin
