"""The diffusers host: the same properties through real diffusers UNets."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import randomise_temporal
from vp2p import AttentionController, FrameMode, RunState, T2SSettings
from vp2p.diffusers_host import DiffusersT2S
from vp2p.keys import LayerKey

FRAMES = 4


def inputs(frames=FRAMES, chunks=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(chunks * frames, 4, 8, 8, generator=g)
    ctx = torch.randn(chunks * frames, 7, 32, generator=g)
    return x, ctx


class Recorder(AttentionController):
    def __init__(self, explicit=False):
        self.seen = set()
        self.explicit = explicit

    def needs_probabilities(self, call):
        self.seen.add((call.kind, call.key))
        return self.explicit


@torch.no_grad()
def test_plain_settings_reproduce_the_unet(unet):
    x, ctx = inputs()
    base = unet(x, 500, encoder_hidden_states=ctx).sample
    with DiffusersT2S(unet, T2SSettings(FrameMode.NONE, False)) as host:
        got = host(x, 500, ctx)
    assert (got - base).abs().max() <= 1e-5
    # removal restores the original processors
    again = unet(x, 500, encoder_hidden_states=ctx).sample
    assert torch.equal(again, base)


@torch.no_grad()
@pytest.mark.parametrize("mode", list(FrameMode))
def test_one_frame_equals_image_model(unet, mode):
    x, ctx = inputs(frames=1)
    base = unet(x, 300, encoder_hidden_states=ctx).sample
    with DiffusersT2S(unet, T2SSettings(mode, True)) as host:
        got = host(x, 300, ctx)
    assert (got - base).abs().max() <= 1e-5


@torch.no_grad()
def test_every_key_fires_for_attn1_attn2_and_temporal(unet):
    x, ctx = inputs()
    rec = Recorder()
    with DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, True)) as host:
        host(x, 500, ctx, run=RunState(controller=rec))
        keys = set(host.blocks)
    want = {LayerKey("input", 1, 0), LayerKey("input", 2, 0), LayerKey("middle", 0, 0),
            LayerKey("output", 3, 0), LayerKey("output", 4, 0), LayerKey("output", 5, 0)}
    assert keys == want
    assert rec.seen == {(kind, k) for k in want for kind in ("attn1", "attn2", "temporal")}


@torch.no_grad()
def test_temporal_at_init_is_exactly_identity(unet):
    x, ctx = inputs()
    with DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, False)) as host:
        without = host(x, 500, ctx)
    with DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, True)) as host:
        with_temporal = host(x, 500, ctx)
    assert torch.equal(without, with_temporal)


@torch.no_grad()
def test_first_frame_output_of_frame0_ignores_other_frames(unet):
    x, ctx = inputs()
    with DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, True)) as host:
        a = host(x, 500, ctx)
        x2 = x.clone()
        x2[1:] = torch.randn_like(x2[1:])
        b = host(x2, 500, ctx)
    assert (a[0] - b[0]).abs().max() <= 1e-6
    assert (a[1:] - b[1:]).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("mode", [FrameMode.FIRST_FRAME, FrameMode.SPARSE_CAUSAL])
def test_cond_uncond_together_and_apart(unet, mode):
    x, ctx = inputs(chunks=2)
    with DiffusersT2S(unet, T2SSettings(mode, True)) as host:
        randomise_temporal(host.bank, seed=5)
        together = host(x, 400, ctx, cond_or_uncond=[1, 0])
        apart = torch.cat([host(x[:FRAMES], 400, ctx[:FRAMES], cond_or_uncond=[1]),
                           host(x[FRAMES:], 400, ctx[FRAMES:], cond_or_uncond=[0])])
    assert (together - apart).abs().max() <= 1e-5


@torch.no_grad()
def test_sdpa_equals_explicit_path_through_the_unet(unet):
    x, ctx = inputs()
    with DiffusersT2S(unet, T2SSettings(FrameMode.SPARSE_CAUSAL, True)) as host:
        randomise_temporal(host.bank, seed=6)
        fast = host(x, 500, ctx)
        slow = host(x, 500, ctx, run=RunState(controller=Recorder(explicit=True)))
    assert (fast - slow).abs().max() <= 1e-5


@torch.no_grad()
def test_temporal_layers_act_once_trained(unet):
    x, ctx = inputs()
    with DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, True)) as host:
        before = host(x, 500, ctx)
        randomise_temporal(host.bank, seed=7)
        after = host(x, 500, ctx)
    assert (before - after).abs().max() > 1e-4


def test_not_installed_is_a_clear_error(unet):
    host = DiffusersT2S(unet, T2SSettings())
    x, ctx = inputs()
    with pytest.raises(RuntimeError, match="not installed"):
        host(x, 500, ctx)


@torch.no_grad()
@pytest.mark.parametrize("mode", [FrameMode.FIRST_FRAME, FrameMode.SPARSE_CAUSAL, FrameMode.MIDDLE_FRAME])
def test_odd_frame_count_and_non_square_latent(unet, mode):
    g = torch.Generator().manual_seed(3)
    frames = 5
    x = torch.randn(2 * frames, 4, 12, 8, generator=g)  # 96×64 pixels at 8×
    ctx = torch.randn(2 * frames, 7, 32, generator=g)
    with DiffusersT2S(unet, T2SSettings(mode, True)) as host:
        randomise_temporal(host.bank, seed=8)
        out = host(x, 500, ctx, cond_or_uncond=[1, 0])
        one = host(x[frames:], 500, ctx[frames:], cond_or_uncond=[0])
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out[frames:] - one).abs().max() <= 1e-5


def test_long_video_temporal_path_matches_reference():
    """Beyond CPU_MATMUL_MAX_FRAMES the CPU fast path switches to SDPA; both agree."""
    from vp2p import BlockShape, LayerKey, TemporalBank
    from vp2p.attention import sdpa
    from vp2p.temporal import CPU_MATMUL_MAX_FRAMES

    key = LayerKey("input", 1, 0)
    bank = randomise_temporal(TemporalBank({key: BlockShape(16, 2, 8)}), seed=1)
    frames = CPU_MATMUL_MAX_FRAMES + 4
    x = torch.randn(frames, 3, 16)
    with torch.no_grad():
        fast = bank[key](x, 1, frames)
        ref = bank[key](x, 1, frames, attend=sdpa)
    assert (fast - ref).abs().max() <= 1e-5
