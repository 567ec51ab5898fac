"""ComfyUI host: FateZero — Shared Null-Text Invert with store_attention, the FateZero Controller and the
Decoupled Sampler's target-only fused edit, on real ComfyUI models and a real SD1 CLIP."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.host.comfy_env import comfy_eps, encode, host_module, inflated, make_clip, nodes_of
from tests.host.test_comfy_invert import UNetCalls

FRAMES = 3
STEPS = 4
SOURCE = "a silver jeep driving"


@pytest.fixture(scope="module")
def clip(comfy_path):
    return make_clip(0)


def video(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 8, 8, generator=g) + 0.3 * torch.randn(FRAMES, 4, 8, 8, generator=g)) * 5.0


def invert(pack, model, clip, latents, **kw):
    args = dict(steps=STEPS, cfg=7.5, mode="ddim_only", inner_steps=0, early_stop=1e-5, store_attention=True, use_cache=False)
    args.update(kw)
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_NullTextInvert"].execute(
            model=model, positive=encode(clip, SOURCE), negative=encode(clip, ""), latent={"samples": latents}, **args).result


def fatezero(pack, clip, target="a red jeep driving", **kw):
    args = dict(source_prompt=SOURCE, target_prompt=target, cross_replace=0.75, self_replace=0.75, blend_words="",
                blend_threshold=0.3, reweight="", latent_blend=False)
    args.update(kw)
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_FateZeroController"].execute(clip=clip, **args).result[0]


def sample(pack, model, inv, control, cfg=7.5, guidance="decoupled"):
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_DecoupledSampler"].execute(model=model, inversion=inv, control=control, cfg=cfg,
                                                              guidance=guidance).result


@pytest.fixture(scope="module")
def zero_shot(pack, small_models, clip):
    _, base = small_models
    model = inflated(pack, base, "middle_frame", temporal=False)
    latents = video()
    inv, noise = invert(pack, model, clip, latents)
    return base, model, latents, inv


def test_zero_shot_edit_end_to_end_leaves_the_model_untouched(pack, zero_shot, clip):
    base, model, latents, inv = zero_shot
    store = inv.attention
    assert store is not None and store.spec.stored_steps == 4 and store.spec.frame_mode == "middle_frame"  # 0.8 of 4, rounded up
    assert store.nbytes > 0 and store.record_order == [3, 2, 1, 0]
    x, ctx = torch.randn(FRAMES, 4, 8, 8), torch.randn(FRAMES, 7, 768)
    before = (comfy_eps(base, x, 400, ctx), comfy_eps(model, x, 400, ctx))
    edited, source = sample(pack, model, inv, fatezero(pack, clip))
    assert edited["samples"].shape == latents.shape
    torch.testing.assert_close(source["samples"], latents, atol=1e-4, rtol=1e-4)  # the inverted video itself
    plain, _ = sample(pack, model, inv, fatezero(pack, clip, cross_replace=0.0, self_replace=0.0))
    assert not torch.allclose(edited["samples"], plain["samples"], atol=1e-3)  # fusion changes the edit
    assert torch.isfinite(edited["samples"]).all()
    after = (comfy_eps(base, x, 400, ctx), comfy_eps(model, x, 400, ctx))
    for b, a in zip(before, after):
        assert torch.equal(b, a)
    # blend words and the latent blend run through the same sampler
    local, _ = sample(pack, model, inv, fatezero(pack, clip, blend_words="jeep", blend_threshold=0.6, latent_blend=True,
                                                 latent_blend_target_words="red", latent_blend_start=0.25, latent_blend_end=0.75))
    assert torch.isfinite(local["samples"]).all() and not torch.equal(local["samples"], edited["samples"])


def test_fusion_off_equals_plain_target_ddim_from_the_inverted_noise(pack, zero_shot, clip):
    """cross_replace 0 and self_replace 0: the target prompt's guided DDIM from z_T (here computed
    unbatched, uncond and cond in separate calls: equal up to float noise that cfg amplifies)."""
    _, model, latents, inv = zero_shot
    plain, _ = sample(pack, model, inv, fatezero(pack, clip, cross_replace=0.0, self_replace=0.0))
    host = host_module(pack, "autograd_host")
    target = fatezero(pack, clip).edit.target_cond
    den = host.denoiser(model)
    sig = inv.schedule.sigmas
    x = inv.z_t.clone()
    neg = inv.negative.expand(FRAMES, -1, -1)
    with torch.inference_mode():
        for i in range(STEPS):
            d_u = den(x, sig[i].expand(FRAMES), neg)
            d_c = den(x, sig[i].expand(FRAMES), target.expand(FRAMES, -1, -1))
            d = d_u + 7.5 * (d_c - d_u)
            x = d + sig[i + 1] * (x - d) / sig[i]
    want = model.model.latent_format.process_out(x / torch.sqrt(1 + sig[-1] ** 2))
    torch.testing.assert_close(plain["samples"], want, atol=1e-3, rtol=1e-3)


def test_bad_inputs_are_clear(pack, zero_shot, small_models, clip):
    base, model, latents, inv = zero_shot
    no_store, _ = invert(pack, model, clip, latents, store_attention=False)
    with pytest.raises(ValueError, match="Turn on store_attention"):
        sample(pack, model, no_store, fatezero(pack, clip))
    with pytest.raises(ValueError, match="not in the source prompt|blend_words"):
        fatezero(pack, clip, blend_words="tiger")
    with pytest.raises(ValueError, match="latent_blend .* needs blend_words"):
        fatezero(pack, clip, latent_blend=True)
    short, _ = invert(pack, model, clip, latents, store_steps=0.5)
    with pytest.raises(ValueError, match="stored only 2.*store_steps to at least 0.75"):
        sample(pack, model, short, fatezero(pack, clip))
    with pytest.raises(ValueError, match="Inflate to T2S"):
        invert(pack, base, clip, latents)
    import dataclasses

    stores = pack.vp2p.attention_store
    foreign = stores.AttentionStore.from_tensors(dataclasses.replace(inv.attention.spec, cond_digest="another prompt"),
                                                 inv.attention.tensors())
    with pytest.raises(ValueError, match="recorded with another source prompt"):
        sample(pack, model, dataclasses.replace(inv, attention=foreign), fatezero(pack, clip))
    with pytest.raises(ValueError, match="source prompt .* is not the prompt"):
        sample(pack, model, inv, fatezero(pack, clip, source_prompt="a silver car driving", target_prompt="a red car driving"))
    with pytest.raises(ValueError, match="Start From Noise|has none"):
        with torch.inference_mode():
            noise_inv = nodes_of(pack)["VP2P_NoiseInversion"].execute(seed=0, width=64, height=64, frames=FRAMES,
                                                                     negative=encode(clip, ""), steps=STEPS).result[0]
        sample(pack, model, noise_inv, fatezero(pack, clip))


def test_turning_the_store_on_reuses_the_cached_inversion(pack, zero_shot, clip, tmp_path, caplog):
    _, model, latents, inv = zero_shot
    host = host_module(pack, "invert_host")
    # one inner iteration per step: null-text optimisation runs (twice); its quality is tested elsewhere
    settings = pack.vp2p.inversion.InversionSettings(steps=STEPS, mode=pack.vp2p.inversion.InversionMode.SHARED_NULL_TEXT,
                                                     inner_steps=1)
    positive, negative = encode(clip, SOURCE), encode(clip, "")
    spec = host.store_spec(model, positive, FRAMES, STEPS, 0.8, 1024)
    loc = pack.vp2p.attention_store.StoreLocation
    with torch.inference_mode():
        host.invert_cached(model, positive, negative, latents, settings, tmp_path)  # no store
        with UNetCalls(model) as calls, caplog.at_level(logging.INFO, logger="VideoP2P"):
            added = host.invert_cached(model, positive, negative, latents, settings, tmp_path, None, spec)
        assert calls.count == STEPS  # one call per stored step on the cached trajectory; no new inversion
        assert "recorded the attention store on the cached inversion" in caplog.text
        fresh = host.invert_cached(model, positive, negative, latents, settings, None, None, spec)  # recorded while inverting
        with UNetCalls(model) as calls:
            again = host.invert_cached(model, positive, negative, latents, settings, tmp_path, None, spec)
        assert calls.count == STEPS  # store_location cpu writes nothing: its store is recorded again, the inversion a hit
        assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("inversion_") and p.name != ".locks"] == []
        lazy = host.invert_cached(model, positive, negative, latents, settings, tmp_path, None, spec, loc.DISK)
        with UNetCalls(model) as calls:  # a finished disk store is read into RAM for a cpu store: no UNet call
            hit = host.invert_cached(model, positive, negative, latents, settings, tmp_path, None, spec)
        assert calls.count == 0 and hit.attention.in_memory
    for s in range(STEPS):
        for name, t in fresh.attention.step(s).items():
            torch.testing.assert_close(added.attention.get(s, name), t, atol=0, rtol=0)
            torch.testing.assert_close(again.attention.get(s, name), t, atol=0, rtol=0)
            torch.testing.assert_close(hit.attention.get(s, name), t, atol=0, rtol=0)
    assert not lazy.attention.in_memory and lazy.attention.directory.parent == tmp_path
    control = fatezero(pack, clip, blend_words="jeep", blend_threshold=0.5)
    a, _ = sample(pack, model, hit, control, guidance="shared_null")
    b, _ = sample(pack, model, lazy, control, guidance="shared_null")
    torch.testing.assert_close(a["samples"], b["samples"], atol=0, rtol=0)


def test_save_and_load_keep_the_store(pack, zero_shot, tmp_path):
    _, model, latents, inv = zero_shot
    files = pack.vp2p.inversion_file
    path = files.save_inversion(tmp_path / "fz.safetensors", inv)
    back = files.load_inversion(path)
    assert back.attention is not None and back.attention.spec == inv.attention.spec
    assert back.attention.nbytes == inv.attention.nbytes
    for name, t in inv.attention.step(0).items():
        assert torch.equal(back.attention.get(0, name), t)


def test_attention_maps_show_a_fatezero_controls_blend_words(pack, zero_shot, clip):
    _, model, latents, inv = zero_shot
    control = fatezero(pack, clip, blend_words="jeep", blend_threshold=0.5)
    with torch.inference_mode():
        src, tgt, mask = nodes_of(pack)["VP2P_AttentionMaps"].execute(model=model, inversion=inv, control=control, source_words="",
                                                                      target_words="", at_step=0.5, threshold=0.5).result
    assert src.shape == (FRAMES, 64, 64, 3) and tgt.shape == src.shape and mask.shape == (FRAMES, 64, 64)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and float(mask.mean()) > 0
    assert float(src[..., 0].std()) > 0  # the source word's map is not flat


def test_latent_blend_source_switches_the_inverted_latent_it_keeps(pack, zero_shot, clip):
    """same_level (default) keeps the inverted latent of the level the step reached, one_level_noisier the
    one FateZero's code reads; both run through the sampler and give different edits."""
    _, model, _, inv = zero_shot
    args = dict(blend_words="jeep", blend_threshold=0.95, latent_blend=True, latent_blend_target_words="red",
                latent_blend_start=0.25, latent_blend_end=0.75)  # 4 steps: blends after step 1
    same = fatezero(pack, clip, **args)
    noisier = fatezero(pack, clip, latent_blend_source="one_level_noisier", **args)
    assert same.blend_latent.value == "same_level" and noisier.blend_latent.value == "one_level_noisier"
    a, _ = sample(pack, model, inv, same)
    b, _ = sample(pack, model, inv, noisier)
    assert torch.isfinite(a["samples"]).all() and torch.isfinite(b["samples"]).all()
    assert not torch.allclose(a["samples"], b["samples"], atol=1e-4)
    with pytest.raises(ValueError, match="latent_blend_source"):
        fatezero(pack, clip, latent_blend_source="later", **args)


def test_store_precision_fp32_keeps_what_fp16_rounds(pack, zero_shot, clip):
    """Shared Null-Text Invert's store_precision: fp32 keeps the store as FateZero does (its tensors fp32), fp16 (the
    default) holds exactly their fp16 rounding; the edit follows the store it is given."""
    _, model, latents, inv16 = zero_shot
    inv32, _ = invert(pack, model, clip, latents, store_precision="fp32")
    assert inv16.attention.spec.precision == "fp16" and inv32.attention.spec.precision == "fp32"
    for name, t32 in inv32.attention.step(0).items():
        t16 = inv16.attention.get(0, name)
        assert t32.dtype == torch.float32 and t16.dtype == torch.float16, name
        assert torch.equal(t32.to(torch.float16), t16), name
    control = fatezero(pack, clip)
    assert torch.isfinite(sample(pack, model, inv32, control)[0]["samples"]).all()
