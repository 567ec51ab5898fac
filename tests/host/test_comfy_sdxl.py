"""ComfyUI host: every node on an SDXL-family MODEL that ComfyUI's own loader detects (Segmind_Vega: an SDXL
subclass with pooled + size conditioning and SDXL's latent format; Vega's depths at 320 channels on every level,
see tests/host/model_zoo.make_detected_sdxl) with ComfyUI's SDXL CLIP-L + CLIP-G text encoder and tokenizer."""

from __future__ import annotations

import pytest
import torch

from tests.host import family_checks as fc
from tests.host.comfy_env import encode, inflated
from tests.host.model_zoo import make_clip_sdxl, make_detected_sdxl, make_sdxl

SIZE = 16  # a 16×16 latent: the coarsest cross-attention maps (latent/4) are 4×4, enough for a LocalBlend mask


@pytest.fixture(scope="module")
def sdxl(comfy_path):
    return make_detected_sdxl(0)


@pytest.fixture(scope="module")
def clip(comfy_path):
    return make_clip_sdxl(0)


def test_the_model_is_sdxl_family_with_pooled_and_size_conditioning(sdxl, clip):
    import comfy.latent_formats
    import comfy.model_base

    assert isinstance(sdxl.model, comfy.model_base.SDXL) and type(sdxl.model.model_config).__name__ == "Segmind_Vega"
    assert isinstance(sdxl.model.latent_format, comfy.latent_formats.SDXL)
    cond = encode(clip, fc.SOURCE)
    assert cond[0][0].shape[-1] == 2048 and cond[0][1]["pooled_output"].shape == (1, 1280)


def test_edit_identity_blend_and_untouched_model(pack, sdxl, clip):
    fc.edit_checks(pack, "sdxl", sdxl, clip, SIZE)


def test_fatezero(pack, sdxl, clip):
    fc.fatezero_checks(pack, "sdxl", sdxl, clip, SIZE)


def test_cross_attention_guidance(pack, sdxl, clip):
    fc.guidance_checks(pack, "sdxl", sdxl, clip, SIZE)


def test_tune_and_start_from_noise_use_the_models_latent_format(pack, sdxl, clip):
    fc.tune_and_noise_checks(pack, "sdxl", sdxl, clip, SIZE)


def test_each_branch_gets_its_own_pooled_output(pack, sdxl, clip):
    """The target branch's y holds the target prompt's pooled output: another pooled output changes the edit, not the source."""
    from dataclasses import replace

    from tests.host.comfy_env import host_module

    model = inflated(pack, sdxl)
    inv, _ = fc.invert(pack, model, clip, fc.video(h=SIZE, w=SIZE), mode="ddim_only")
    edit = fc.controller(pack, clip)
    host = host_module(pack, "p2p_host")
    guidance = pack.vp2p.edit.Guidance.DECOUPLED
    with torch.inference_mode():
        a, _ = host.run_edit(model, inv, edit, 7.5, guidance, reuse=False)
        b, _ = host.run_edit(model, inv, replace(edit, target_pooled=torch.zeros_like(edit.target_pooled)), 7.5, guidance, reuse=False)
    assert torch.equal(a.source, b.source) and not torch.allclose(a.edited, b.edited, atol=1e-4)


def test_an_edit_without_pooled_outputs_is_refused_clearly(pack, sdxl, clip):
    from dataclasses import replace

    model = inflated(pack, sdxl)
    inv, _ = fc.invert(pack, model, clip, fc.video(h=SIZE, w=SIZE), mode="ddim_only")
    with pytest.raises(ValueError, match="SDXL-family"):
        fc.sample(pack, model, replace(inv, negative_pooled=None), fc.controller(pack, clip))


def test_inpainting_unet_is_refused_with_what_works(pack, comfy_path):
    with pytest.raises(ValueError, match="9 input channels.*What works"):
        inflated(pack, make_sdxl(1, in_channels=9))
