"""Video-level GroupNorm (the references' 3-D UNet normalises each video as a whole): the math, which
norms, per video of the explicit layout, one frame = the image model (diffusers host, random weights)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import tiny_unet
from vp2p import COND, UNCOND, FrameMode, LayoutSpec, RunState, T2SSettings
from vp2p.diffusers_host import DiffusersT2S
from vp2p.video_norm import NormScope, VideoNorm, video_group_norm, video_norm_paths


def test_video_group_norm_equals_group_norm_of_the_5d_video():
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(norm.weight, generator=g)
    torch.nn.init.normal_(norm.bias, generator=g)
    videos, frames = 3, 5
    x = torch.randn(videos * frames, 16, 6, 7, generator=g) * torch.linspace(0.2, 3, videos * frames).view(-1, 1, 1, 1)
    ours = video_group_norm(norm, x, videos, frames)
    # the reference's formulation: nn.GroupNorm on [b, c, f, h, w]
    five_d = x.view(videos, frames, 16, 6, 7).permute(0, 2, 1, 3, 4)
    ref = F.group_norm(five_d, 4, norm.weight, norm.bias, norm.eps).permute(0, 2, 1, 3, 4).reshape_as(x)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (ours - norm(x)).abs().max() > 1e-2  # per-frame statistics are something else
    # one video's statistics never see another video's frames
    alone = video_group_norm(norm, x[frames:2 * frames], 1, frames)
    torch.testing.assert_close(ours[frames:2 * frames], alone, atol=1e-6, rtol=0)


def test_the_norms_are_the_resnet_and_output_norms_not_the_transformers():
    from diffusers import UNet2DConditionModel

    sd15 = UNet2DConditionModel(block_out_channels=(32, 32, 32, 32), norm_num_groups=8, cross_attention_dim=16,
                                attention_head_dim=2, layers_per_block=2, sample_size=8)
    paths = video_norm_paths(sd15.named_modules())
    # SD1.5's layout: 8 down + 2 mid + 12 up ResNet blocks, two norms each, and conv_norm_out: 45 (as the issue measured)
    assert len(paths) == 45
    assert "conv_norm_out" in paths and "down_blocks.0.resnets.0.norm1" in paths and "mid_block.resnets.1.norm2" in paths
    assert not any(".attentions." in p for p in paths)  # the transformer blocks' GroupNorm stays per frame


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=2)


def run(unet, x, ctx, settings, cond_or_uncond=None, layout=None):
    with DiffusersT2S(unet, settings) as host, torch.no_grad():
        return host(x, 500, ctx, cond_or_uncond=cond_or_uncond, run=RunState(None, layout))


def test_one_frame_is_the_image_model_bit_for_bit(unet):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        image = unet(x, 500, encoder_hidden_states=ctx).sample
    # two one-frame videos (uncond, cond)
    out = run(unet, x, ctx, T2SSettings(FrameMode.FIRST_FRAME, True, NormScope.VIDEO), [UNCOND, COND])
    assert torch.equal(out, image)


def test_statistics_pool_each_video_of_the_layout_and_nothing_else(unet):
    g = torch.Generator().manual_seed(2)
    frames = 3
    x, ctx = torch.randn(4 * frames, 4, 8, 8, generator=g), torch.randn(4 * frames, 7, 32, generator=g)
    video = T2SSettings(FrameMode.FIRST_FRAME, False, NormScope.VIDEO)
    roles = ((UNCOND, 0), (UNCOND, 1), (COND, 0), (COND, 1))
    together = run(unet, x, ctx, video, [r[0] for r in roles], LayoutSpec(frames, 2, roles))
    for n in range(4):  # each video alone gives its rows of the batched call
        rows = slice(n * frames, (n + 1) * frames)
        alone = run(unet, x[rows], ctx[rows], video, [roles[n][0]])
        torch.testing.assert_close(together[rows], alone, atol=1e-5, rtol=1e-5)
    per_frame = run(unet, x, ctx, T2SSettings(FrameMode.FIRST_FRAME, False, NormScope.FRAME), [r[0] for r in roles],
                    LayoutSpec(frames, 2, roles))
    assert (together - per_frame).abs().max() > 1e-3


def test_installing_and_removing_leaves_the_modules_as_they_were(unet):
    norms = [unet.get_submodule(p) for p in video_norm_paths(unet.named_modules())]
    vn = VideoNorm()
    vn.install(norms)
    assert all("forward" in m.__dict__ for m in norms)
    x = torch.randn(4, norms[0].num_channels, 4, 4)
    torch.testing.assert_close(norms[0](x), torch.nn.GroupNorm.forward(norms[0], x))  # outside a call: per frame
    vn.remove()
    assert not any("forward" in m.__dict__ for m in norms)
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 7, 32, generator=g)
    with torch.no_grad():
        before = unet(x, 500, encoder_hidden_states=ctx).sample
    run(unet, x, ctx, T2SSettings(FrameMode.FIRST_FRAME, True, NormScope.VIDEO))
    with torch.no_grad():
        after = unet(x, 500, encoder_hidden_states=ctx).sample
    assert torch.equal(before, after)
