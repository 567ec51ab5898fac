"""ComfyUI host: every node takes every frame size a stock KSampler takes (any multiple of 8 pixels).

An SD1.5 UNet of the full depth (narrow, for a CPU) halves three times with ceil, so 512×288 (latent 64×36 → 32×18 → 16×9 → 8×5)
and 448×320 (56×40 → … → 7×5) reach odd grids whose upsampling must match the skip connections, and
whose token grids the masks (LocalBlend, FateZero, guidance, Attention Maps) must find.
"""

from __future__ import annotations

import pytest
import torch

from tests.host.comfy_env import encode, host_module, inflated, make_clip, make_narrow_sd15, nodes_of

FRAMES = 2
STEPS = 2
SOURCE = "a cat running"
SIZES = {"512x288": (36, 64), "448x320": (40, 56)}  # latent (h, w)


@pytest.fixture(scope="module")
def clip(comfy_path):
    return make_clip(0)


@pytest.fixture(scope="module")
def model(pack, comfy_path):
    return inflated(pack, make_narrow_sd15(seed=3))


def video(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, h, w, generator=g) + 0.3 * torch.randn(FRAMES, 4, h, w, generator=g)) * 5.0


def test_edit_nodes_at_512x288(pack, model, clip):
    """Invert (with FateZero's store), P2P with a LocalBlend, FateZero with its latent blend, Attention Maps and Start
    From Noise: the masks find the 16×9 grid (latent/4), the store and the fusion the odd 8×5 level."""
    h, w = SIZES["512x288"]
    reg = nodes_of(pack)
    latents = video(h, w)
    with torch.inference_mode():
        inv, noise = reg["VP2P_NullTextInvert"].execute(
            model=model, positive=encode(clip, SOURCE), negative=encode(clip, ""), latent={"samples": latents}, steps=STEPS,
            cfg=7.5, mode="ddim_only", inner_steps=0, early_stop=1e-5, store_attention=True, use_cache=False).result
        p2p = reg["VP2P_P2PController"].execute(
            clip=clip, source_prompt=SOURCE, target_prompt="a tiger running", edit="auto", cross_replace=0.5, self_replace=0.5,
            blend_source_words="cat", blend_target_words="tiger", blend_threshold=0.6, reweight="").result[0]
        edited, source = reg["VP2P_DecoupledSampler"].execute(model=model, inversion=inv, control=p2p, cfg=7.5,
                                                             guidance="fast").result
        fz = reg["VP2P_FateZeroController"].execute(
            clip=clip, source_prompt=SOURCE, target_prompt="a tiger running", cross_replace=0.5, self_replace=0.5,
            blend_words="cat", blend_threshold=0.3, reweight="", latent_blend=True).result[0]
        fz_edited, _ = reg["VP2P_DecoupledSampler"].execute(model=model, inversion=inv, control=fz, cfg=7.5, guidance="fast").result
        src_maps, tgt_maps, mask = reg["VP2P_AttentionMaps"].execute(model=model, inversion=inv, control=p2p, source_words="",
                                                                     target_words="", at_step=0.5, threshold=0.3).result
        start, start_noise = reg["VP2P_NoiseInversion"].execute(seed=0, width=w * 8, height=h * 8, frames=FRAMES,
                                                                negative=encode(clip, ""), steps=STEPS).result
    assert noise["samples"].shape == start_noise["samples"].shape == (FRAMES, 4, h, w)
    for out in (edited["samples"], source["samples"], fz_edited["samples"]):
        assert out.shape == (FRAMES, 4, h, w) and torch.isfinite(out).all()
    assert src_maps.shape == tgt_maps.shape == (FRAMES, h * 8, w * 8, 3) and mask.shape == (FRAMES, h * 8, w * 8)
    assert 0.0 <= float(src_maps.min()) and float(src_maps.max()) <= 1.0
    # the store's size, predicted and logged before recording, from the odd grids of this model (16×9, 8×5, …)
    host = host_module(pack, "invert_host")
    assert host.predicted_store_bytes(model, inv.attention.spec, (h, w), 77) == inv.attention.nbytes > 0


def test_a_disk_store_that_would_not_fit_is_refused_before_recording(pack, model, clip, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    h, w = SIZES["512x288"]
    host = host_module(pack, "invert_host")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))  # 1 kB free
    spec = host.store_spec(model, encode(clip, SOURCE), FRAMES, STEPS, 1.0, 1024)
    settings = host.InversionSettings(steps=STEPS, cfg=7.5, mode=host.InversionMode.DDIM_ONLY, inner_steps=0, early_stop=1e-5)
    with pytest.raises(ValueError, match=r"the attention store needs .* GB but the disk of .* has 0.00 GB free"):
        with torch.inference_mode():
            host.invert_cached(model, encode(clip, SOURCE), encode(clip, ""), video(h, w), settings, None, None, spec,
                               host.StoreLocation.DISK, tmp_path)
    assert not any(tmp_path.iterdir()), "nothing is written for a refused store"


def test_tune_box_and_guidance_at_448x320(pack, model, clip):
    """Tune on Video (one step) and Cross-Attention Guidance with Box Trajectory Masks: the guidance energy reads the
    14×10 (latent/4), 7×5 (latent/8) and middle maps."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    h, w = SIZES["448x320"]
    reg = nodes_of(pack)
    with torch.inference_mode():
        tuned = reg["VP2P_TuneOnVideo"].execute(model=model, positive=encode(clip, SOURCE), latent={"samples": video(h, w)},
                                                steps=1, learning_rate=1e-4, seed=0, use_cache=False).result[0]
        masks = reg["VP2P_BoxTrajectory"].execute(width=w * 8, height=h * 8, frames=FRAMES, start_x=0.1, start_y=0.2, start_w=0.3,
                                                  start_h=0.4, end_x=0.5, end_y=0.2, end_w=0.3, end_h=0.4, shape="ellipse",
                                                  easing="linear").result[0]
        guider = reg["VP2P_CrossAttentionGuidance"].execute(
            model=tuned, positive=encode(clip, "a red ball"), negative=encode(clip, ""), cfg=5.0, clip=clip, prompt="a red ball",
            word="ball", target_masks=masks, strength=5.0).result[0]
        ms = guider.model_patcher.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(ms, "normal", STEPS).cpu()
        guided = SamplerCustomAdvanced.execute(Noise_RandomNoise(0), guider, comfy.samplers.sampler_object("euler"), sigmas,
                                               {"samples": torch.zeros(FRAMES, 4, h, w)}).result[0]["samples"]
    assert masks.shape == (FRAMES, h * 8, w * 8)
    assert guided.shape == (FRAMES, 4, h, w) and torch.isfinite(guided).all()
    assert guider.energies and all(e == e and e > 0 for _, e in guider.energies), guider.energies
