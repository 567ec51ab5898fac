"""Layer keys from module names, and step identity from sigmas."""

from __future__ import annotations

import pytest
import torch

from vp2p import LayerKey, SettingsError
from vp2p.keys import comfy_transformer_keys, diffusers_transformer_keys
from vp2p.schedule import Schedule, ddim_sample, sd_alphas_cumprod

SD15_KEYS = [LayerKey("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [LayerKey("middle", 0, 0)] + [LayerKey("output", i, 0) for i in range(3, 12)]


def test_sd15_diffusers_names_map_to_comfy_keys():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel()  # the default config is SD1.x's
    keys = diffusers_transformer_keys([n for n, _ in unet.named_modules()], unet.config.layers_per_block)
    assert sorted(keys) == sorted(SD15_KEYS)
    assert keys[LayerKey("middle", 0, 0)] == "mid_block.attentions.0.transformer_blocks.0"
    assert keys[LayerKey("output", 11, 0)] == "up_blocks.3.attentions.2.transformer_blocks.0"
    assert keys[LayerKey("input", 8, 0)] == "down_blocks.2.attentions.1.transformer_blocks.0"


def test_comfy_names_parse_including_middle():
    names = [
        "input_blocks.1.1.transformer_blocks.0", "input_blocks.1.1.transformer_blocks.0.attn1",
        "middle_block.1.transformer_blocks.0", "output_blocks.5.1.transformer_blocks.1",
        "output_blocks.5.1.transformer_blocks",
    ]
    keys = comfy_transformer_keys(names)
    assert keys == {
        LayerKey("input", 1, 0): "input_blocks.1.1.transformer_blocks.0",
        LayerKey("middle", 0, 0): "middle_block.1.transformer_blocks.0",
        LayerKey("output", 5, 1): "output_blocks.5.1.transformer_blocks.1",
    }


def test_key_slug_round_trip_and_extra_options():
    k = LayerKey("output", 11, 0)
    assert LayerKey.from_slug(k.slug) == k
    assert LayerKey.from_extra_options({"block": ("middle", 0), "block_index": 0}) == LayerKey("middle", 0, 0)


def test_reference_schedule_and_step_identity():
    s = Schedule.reference(50)
    assert s.timesteps[0] == 981 and s.timesteps[-1] == 1 and s.steps == 50
    ac = sd_alphas_cumprod()
    assert float(s.sigmas[-1]) == pytest.approx(float(((1 - ac[0]) / ac[0]).sqrt()), rel=1e-5)
    for i in (0, 17, 49):
        assert s.step_index(s.sigmas[i]) == i
        assert s.step_index(torch.full((4,), float(s.sigmas[i]))) == i
    with pytest.raises(SettingsError, match="not a step"):
        s.step_index(float(s.sigmas[3]) * 1.01)


def test_ddim_with_exact_denoiser_lands_on_data():
    x0 = torch.randn(2, 4, 3, 3)
    s = Schedule.reference(10)
    noise = torch.randn_like(x0)
    x = x0 + s.sigmas[0] * noise
    out = ddim_sample(lambda x_, i: x0, x, s)
    # the reference's output: x at the final sigma, scaled to data: √ᾱ0·x0 + √(1−ᾱ0)·eps
    sf = s.sigmas[-1]
    want = (x0 + sf * noise) / torch.sqrt(1 + sf**2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
