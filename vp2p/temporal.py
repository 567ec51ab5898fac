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

# Up to this many frames the CPU fast path builds the F×F maps explicitly (faster than
# CPU SDPA for tiny maps); beyond it SDPA keeps memory linear in the frames.
CPU_MATMUL_MAX_FRAMES = 16
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
        self._zero_cache: tuple[tuple[int, ...], bool] = ((), False)

    def is_identity(self) -> bool:
        """Whether the output projection is exactly zero (an untuned layer), so the layer is
        the identity. Cached per tensor version: no device sync on every call."""
        w, b = self.to_out.weight, self.to_out.bias
        if w.is_inference() or b.is_inference():  # no version counter: check directly
            return not bool(w.any()) and not bool(b.any())
        stamp = (w.data_ptr(), w._version, b.data_ptr(), b._version)
        if self._zero_cache[0] != stamp:
            self._zero_cache = (stamp, not bool(w.detach().any()) and not bool(b.detach().any()))
        return self._zero_cache[1]

    def forward(self, x: torch.Tensor, videos: int, frames: int, attend: Optional[TemporalAttend] = None) -> torch.Tensor:
        """x: [videos·F, N, C] -> [videos·F, N, C].

        ``attend`` (q, k, v: [videos·N, F, H·D]) lets a controller see or edit the temporal
        maps; without it the fast path runs: one fused q/k/v projection and SDPA on
        strided views, with no regrouping copies.
        """
        if attend is None and self.is_identity() and not (torch.is_grad_enabled() and self.to_out.weight.requires_grad):
            # Exact (x + 0). A controller (attend) still sees the maps; training still runs
            # the layer so that the zero output projection gets its gradient.
            return x
        h = F.layer_norm(x, self.norm.normalized_shape, _cast(self.norm.weight, x), _cast(self.norm.bias, x), self.norm.eps)
        w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        qkv = F.linear(h, _cast(w, h))  # [v·f, n, 3·H·D]
        n = x.shape[1]
        d = qkv.shape[-1] // (3 * self.heads)
        if attend is None:
            t = qkv.view(videos, frames, n, 3, self.heads, d)
            q = t[:, :, :, 0].permute(0, 2, 3, 1, 4)  # [v, n, H, f, D] strided views, no copies
            v = t[:, :, :, 2].permute(0, 2, 3, 1, 4)
            if x.device.type == "cpu" and frames <= CPU_MATMUL_MAX_FRAMES:
                # CPU SDPA pays per (position, head) problem; for F×F maps two batched
                # matmuls with the scale folded into q and kᵀ read as a view are ~1.4×
                # faster (bench/bench_inflate.py), and the maps are tiny.
                kt = t[:, :, :, 1].permute(0, 2, 3, 4, 1)  # [v, n, H, D, f]
                out = torch.matmul(torch.matmul(q * d**-0.5, kt).softmax(dim=-1), v)
            else:
                out = F.scaled_dot_product_attention(q, t[:, :, :, 1].permute(0, 2, 3, 1, 4), v)
            out = out.permute(0, 3, 1, 2, 4).reshape(videos * frames, n, self.heads * d)
        else:
            q, k, v = (rearrange(t, "(v f) n c -> (v n) f c", v=videos, f=frames) for t in qkv.chunk(3, dim=-1))
            out = rearrange(attend(q, k, v, self.heads), "(v n) f c -> (v f) n c", v=videos, f=frames)
        return x + F.linear(out, _cast(self.to_out.weight, out), _cast(self.to_out.bias, out))


class TemporalBank(nn.Module):
    """One ``TemporalAttention`` per transformer block, addressed by ``LayerKey``."""

    def __init__(self, shapes: Mapping[LayerKey, BlockShape], seed: int = 0) -> None:
        super().__init__()
        self.shapes = dict(shapes)
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleDict({key.slug: TemporalAttention(shape, g) for key, shape in sorted(shapes.items())})
        # Frozen unless a tuner says otherwise: a backward pass for something else (null-text,
        # guidance) must neither accumulate gradients here nor stop untuned layers being skipped.
        self.requires_grad_(False)

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
