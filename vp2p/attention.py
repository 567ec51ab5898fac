"""Attention kernels in the host's row convention: ``q, k, v: [B, N, heads·dim_head]``.

``sdpa`` is the fast path (no probability tensor is ever built). The explicit path
(``attention_probabilities`` + ``apply_probabilities``) exists for controllers that
read or edit attention maps; it computes the softmax in fp32.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from einops import rearrange

# (q, k, v, heads, extra_options) -> out; q: [B, Nq, H·D], k/v: [B, Nk, H·D] -> [B, Nq, H·D]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, Optional[Mapping[str, Any]]], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, extra_options: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
    """Multi-head attention through ``F.scaled_dot_product_attention``.

    q: [B, Nq, H·D], k/v: [B, Nk, H·D] -> [B, Nq, H·D].
    """
    qh, kh, vh = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh)
    return rearrange(out, "b h n d -> b n (h d)")


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention maps in fp32: q [B, Nq, H·D], k [B, Nk, H·D] -> [B, H, Nq, Nk]."""
    qh = rearrange(q, "b n (h d) -> b h n d", h=heads).float()
    kh = rearrange(k, "b n (h d) -> b h n d", h=heads).float()
    scale = qh.shape[-1] ** -0.5
    return torch.einsum("bhqd,bhkd->bhqk", qh * scale, kh).softmax(dim=-1)


def apply_probabilities(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Weighted values: probs [B, H, Nq, Nk], v [B, Nk, H·D] -> [B, Nq, H·D] in v's dtype."""
    vh = rearrange(v, "b n (h d) -> b h n d", h=heads)
    out = torch.einsum("bhqk,bhkd->bhqd", probs.to(vh.dtype), vh)
    return rearrange(out, "b h n d -> b n (h d)")
