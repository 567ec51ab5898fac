"""The diffusers host: the same properties through real diffusers UNets."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import randomise_temporal
from vp2p import AttentionController, FrameMode, RunState, T2SSettings
from vp2p.diffusers_host import DiffusersT2S
from vp2p.keys import LayerKey
from vp2p.video_norm import NormScope

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
    with DiffusersT2S(unet, T2SSettings(FrameMode.NONE, False, NormScope.FRAME)) as host:  # the image model
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
    """The frame-attention property, with video-level GroupNorm off (its statistics mix every frame)."""
    x, ctx = inputs()
    with DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, True, NormScope.FRAME)) as host:
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


@torch.no_grad()
def test_min_channels_keeps_narrow_blocks_plain_through_the_unet(unet):
    """FateZero's least_sc_channel on a real UNet: every attn1 of a block narrower than the minimum
    is exactly plain self-attention of its own input; the wider (middle) block keeps frame attention."""
    from vp2p.attention import sdpa
    from vp2p.frame_attention import middle_frame

    x, ctx = inputs(chunks=2)
    seen: dict[LayerKey, tuple[torch.Tensor, torch.Tensor]] = {}
    modes: dict[LayerKey, FrameMode] = {}

    def capture(key):
        def hook(module, args, kwargs, output):
            seen[key] = (args[0] if args else kwargs["hidden_states"], output)
        return hook

    class Modes(AttentionController):
        def needs_probabilities(self, call):
            if call.kind == "attn1":
                modes[call.key] = call.frame_mode
            return False

    host = DiffusersT2S(unet, T2SSettings(FrameMode.MIDDLE_FRAME, False, frame_attention_min_channels=64))
    widths = {k: shape.dim for k, (_, shape) in host.blocks.items()}
    assert sorted(set(widths.values())) == [32, 64]  # the tiny UNet: 32-wide input/output blocks, a 64-wide middle
    handles = [unet.get_submodule(path).attn1.register_forward_hook(capture(k), with_kwargs=True)
               for k, (path, _) in host.blocks.items()]
    try:
        with host:
            narrowed = host(x, 500, ctx, cond_or_uncond=[1, 0], run=RunState(controller=Modes()))
    finally:
        for h in handles:
            h.remove()
    assert modes == {k: FrameMode.NONE if w < 64 else FrameMode.MIDDLE_FRAME for k, w in widths.items()}
    for key, (path, _) in host.blocks.items():
        attn = unet.get_submodule(path).attn1
        h, out = seen[key]
        q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
        plain = attn.to_out[1](attn.to_out[0](sdpa(q, k, v, attn.heads)))
        if widths[key] < 64:
            assert torch.equal(out, plain), key
        else:  # frame attention on the middle frame (F − 1) // 2 of each video
            m = middle_frame(FRAMES)
            km, vm = (t.reshape(2, FRAMES, *t.shape[1:])[:, m] for t in (k, v))
            framed = sdpa(q.reshape(2, FRAMES * q.shape[1], q.shape[2]), km, vm, attn.heads).reshape(q.shape)
            torch.testing.assert_close(out, attn.to_out[1](attn.to_out[0](framed)), atol=1e-5, rtol=1e-5)
            assert not torch.allclose(out, plain, atol=1e-4), key
    with DiffusersT2S(unet, T2SSettings(FrameMode.MIDDLE_FRAME, False)) as every:  # the default, 0: every block
        everywhere = every(x, 500, ctx, cond_or_uncond=[1, 0])
    assert not torch.allclose(narrowed, everywhere, atol=1e-4)


@torch.no_grad()
def test_sdxl_style_added_cond_follows_each_videos_role():
    """A text_time UNet gets each video's pooled output (by its (kind, branch) role in the call's explicit layout)
    and the size ids: one composed call equals the plain UNet run per video; without an AddedCond it is refused."""
    from diffusers import UNet2DConditionModel

    from tests.helpers import TINY_UNET_CONFIG, init_weights
    from vp2p.diffusers_host import AddedCond, sdxl_time_ids
    from vp2p.errors import SettingsError
    from vp2p.layout import COND, SOURCE, TARGET, UNCOND, LayoutSpec

    cfg = dict(TINY_UNET_CONFIG, addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16)
    unet = init_weights(UNet2DConditionModel(**cfg), 3).eval()
    g = torch.Generator().manual_seed(5)
    roles = ((UNCOND, TARGET), (COND, SOURCE), (COND, TARGET))
    pooled = {role: torch.randn(1, 16, generator=g) for role in roles}
    ids = sdxl_time_ids(64, 48, (8, 0))
    assert ids.tolist() == [[64.0, 48.0, 8.0, 0.0, 64.0, 48.0]]
    x, ctx = inputs(frames=2, chunks=3)
    run = RunState(None, LayoutSpec(2, 2, roles))
    with DiffusersT2S(unet, T2SSettings(FrameMode.NONE, False, NormScope.FRAME), added_cond=AddedCond(pooled, ids)) as host:
        got = host(x, 500, ctx, cond_or_uncond=[k for k, _ in roles], run=run)
    for n, role in enumerate(roles):
        rows = slice(2 * n, 2 * n + 2)
        want = unet(x[rows], 500, encoder_hidden_states=ctx[rows],
                    added_cond_kwargs={"text_embeds": pooled[role].expand(2, -1), "time_ids": ids.expand(2, -1)}).sample
        assert (got[rows] - want).abs().max() <= 1e-5, role
        other = unet(x[rows], 500, encoder_hidden_states=ctx[rows],
                     added_cond_kwargs={"text_embeds": pooled[roles[(n + 1) % 3]].expand(2, -1), "time_ids": ids.expand(2, -1)}).sample
        assert (other - want).abs().max() > 1e-3  # the pooled output matters
    with DiffusersT2S(unet, T2SSettings(FrameMode.NONE, False, NormScope.FRAME)) as host:
        with pytest.raises(SettingsError, match="text_time"):
            host(x, 500, ctx, cond_or_uncond=[k for k, _ in roles], run=run)
