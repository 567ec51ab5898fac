"""Temporal attention layers."""

from __future__ import annotations

import torch

from tests.helpers import randomise_temporal
from vp2p import AttentionPatch, BlockShape, FrameMode, LayerKey, T2SSettings, TemporalBank
from vp2p.attention import sdpa

KEY = LayerKey("input", 1, 0)
SHAPE = BlockShape(dim=16, heads=2, dim_head=8)


def bank() -> TemporalBank:
    return TemporalBank({KEY: SHAPE})


def attend(q, k, v, heads):
    return sdpa(q, k, v, heads)


def test_zero_initialised_layer_is_exactly_identity():
    x = torch.randn(2 * 5, 12, 16)
    out = bank()[KEY](x, videos=2, frames=5, attend=attend)
    assert torch.equal(out, x)


def test_temporal_attention_matches_reference_over_frames():
    b = randomise_temporal(bank(), seed=1)
    layer = b[KEY]
    videos, frames, n = 2, 3, 4
    x = torch.randn(videos * frames, n, 16)
    got = layer(x, videos, frames, attend)
    want = x.clone()
    for vid in range(videos):
        for p in range(n):
            seq = x[vid * frames:(vid + 1) * frames, p]  # [F, C]
            h = layer.norm(seq)
            q, k, v = layer.to_q(h), layer.to_k(h), layer.to_v(h)
            outs = []
            for hd in range(SHAPE.heads):
                sl = slice(hd * 8, (hd + 1) * 8)
                w = torch.softmax(q[:, sl] @ k[:, sl].T / 8**0.5, -1)
                outs.append(w @ v[:, sl])
            want[vid * frames:(vid + 1) * frames, p] += layer.to_out(torch.cat(outs, -1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    fast = layer(x, videos, frames)  # no attend callback: the fused, copy-free path
    torch.testing.assert_close(fast, want, atol=1e-5, rtol=1e-5)


def test_patch_runs_temporal_layer_with_layout_from_cond_or_uncond():
    b = randomise_temporal(bank(), seed=2)
    patch = AttentionPatch(T2SSettings(FrameMode.FIRST_FRAME, True), temporal=b)
    x = torch.randn(2 * 4, 6, 16)
    together = patch.temporal_block(KEY, x, {"cond_or_uncond": [1, 0]})
    apart = torch.cat([patch.temporal_block(KEY, x[:4], {"cond_or_uncond": [1]}),
                       patch.temporal_block(KEY, x[4:], {"cond_or_uncond": [0]})])
    torch.testing.assert_close(together, apart, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(together, x)
    # a layer the bank does not hold is left alone
    assert torch.equal(patch.temporal_block(LayerKey("output", 3, 0), x, {"cond_or_uncond": [1, 0]}), x)


def test_bank_copy_is_independent():
    a = randomise_temporal(bank(), seed=3)
    c = a.copy()
    with torch.no_grad():
        c[KEY].to_out.weight.add_(1.0)
    assert not torch.equal(a[KEY].to_out.weight, c[KEY].to_out.weight)


def test_bank_init_is_reproducible():
    a, b = bank(), bank()
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    c = TemporalBank({KEY: SHAPE}, seed=1)
    assert not torch.equal(a[KEY].to_q.weight, c[KEY].to_q.weight)


def test_untuned_layer_is_skipped_but_still_trains():
    layer = bank()[KEY]
    x = torch.randn(2 * 3, 4, 16)
    calls = []
    with torch.no_grad():
        assert torch.equal(layer(x, 2, 3), x)  # identity, nothing computed
        out = layer(x, 2, 3, attend=lambda *a: calls.append(1) or sdpa(*a))
    assert torch.equal(out, x) and calls  # a controller still sees the temporal maps
    # a bank is frozen until a tuner unfreezes it: a backward pass for something else
    # (null-text) skips the untuned layer and leaves no gradient in it
    x.requires_grad_(True)
    assert not any(p.requires_grad for p in layer.parameters())
    assert torch.equal(layer(x, 2, 3), x) and layer.to_out.weight.grad is None
    # unfrozen with gradients on, the layer runs so that the zero output projection can learn
    layer.requires_grad_(True)
    y = layer(x, 2, 3)
    y.pow(2).sum().backward()
    assert layer.to_out.weight.grad is not None and layer.to_out.weight.grad.abs().sum() > 0
    # once trained (in place: a new tensor version), it acts
    with torch.no_grad():
        layer.to_out.weight.add_(0.1)
        assert not layer.is_identity()
        assert not torch.equal(layer(x.detach(), 2, 3), x.detach())
