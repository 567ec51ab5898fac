"""The SD1.5 invariants of the host tests, run on another model family (SD2.x, SDXL): every node runs, the
identity edit is exact, the input MODEL is untouched, the LocalBlend edit equals the source outside its mask."""

from __future__ import annotations

import time

import torch

from tests.host.comfy_env import encode, host_module, inflated, nodes_of

FRAMES = 2
STEPS = 2
SOURCE = "a cat running"
TIMINGS: dict[str, dict[str, float]] = {}


def timed(family: str, stage: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    TIMINGS.setdefault(family, {})[stage] = time.perf_counter() - t0
    return out


def video(seed=0, frames=FRAMES, h=8, w=8, channels=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, channels, h, w, generator=g) + 0.3 * torch.randn(frames, channels, h, w, generator=g)) * 5.0


def controller(pack, clip, target="a tiger running", **kw):
    args = dict(source_prompt=SOURCE, target_prompt=target, edit="auto", cross_replace=0.4, self_replace=0.4,
                blend_source_words="", blend_target_words="", blend_threshold=0.3, reweight="")
    args.update(kw)
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_P2PController"].execute(clip=clip, **args).result[0]


def invert(pack, model, clip, latents, mode="shared_null_text", **kw):
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_NullTextInvert"].execute(
            model=model, positive=encode(clip, SOURCE), negative=encode(clip, ""), latent={"samples": latents}, steps=STEPS,
            cfg=7.5, mode=mode, inner_steps=2, early_stop=1e-5, use_cache=False, **{"store_attention": False, **kw}).result


def sample(pack, model, inv, control, guidance="decoupled", cfg=7.5):
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_DecoupledSampler"].execute(model=model, inversion=inv, control=control, cfg=cfg,
                                                              guidance=guidance).result


def weights_digest(model) -> float:
    return float(sum(p.double().sum() for p in model.model.diffusion_model.state_dict().values()))


def edit_checks(pack, family: str, base, clip, size: int = 8) -> None:
    """Inflate, invert, edit (decoupled, identity), LocalBlend exactness, input MODEL untouched, Attention Maps."""
    before = weights_digest(base)
    patches = dict(base.model_options.get("transformer_options", {}).get("patches_replace", {}))
    model = timed(family, "inflate", inflated, pack, base)
    latents = video(h=size, w=size)
    inv, noise = timed(family, "invert (null-text)", invert, pack, model, clip, latents)
    assert noise["samples"].shape == latents.shape
    edited, source = timed(family, "edit (decoupled)", sample, pack, model, inv, controller(pack, clip))
    assert edited["samples"].shape == latents.shape and torch.isfinite(edited["samples"]).all()
    assert not torch.allclose(edited["samples"], source["samples"], atol=1e-2)
    walk_end = model.model.latent_format.process_out(inv.source_path[-1] / torch.sqrt(1 + inv.schedule.sigmas[-1] ** 2))
    torch.testing.assert_close(source["samples"], walk_end, atol=1e-4, rtol=1e-4)
    same, src = sample(pack, model, inv, controller(pack, clip, target=SOURCE), guidance="shared_null")
    torch.testing.assert_close(same["samples"], src["samples"], atol=1e-3, rtol=1e-3)
    host = host_module(pack, "p2p_host")
    edit = controller(pack, clip, blend_source_words="cat", blend_target_words="tiger", blend_threshold=0.99)
    with torch.inference_mode():
        full, blend = host.run_edit(model, inv, edit, 7.5, pack.vp2p.edit.Guidance.DECOUPLED, reuse=False)
    m = blend.last_mask.expand_as(full.edited)
    assert 0 < m.sum() < m.numel(), (m.sum(), m.numel())
    assert torch.equal(full.edited[~m.cpu()], full.source[~m.cpu()])
    node = nodes_of(pack)["VP2P_AttentionMaps"]
    with torch.inference_mode():
        smap, _, mask = timed(family, "attention maps", node.execute, model=model, inversion=inv, control=edit, source_words="",
                              target_words="", at_step=0.5, threshold=0.99).result
    assert smap.shape[0] == FRAMES and 0 < float(mask.mean()) < 1
    assert weights_digest(base) == before  # the input MODEL is untouched
    assert dict(base.model_options.get("transformer_options", {}).get("patches_replace", {})) == patches


def fatezero_checks(pack, family: str, base, clip, size: int = 8) -> None:
    """FateZero: the store recorded while inverting and fused while editing, with and without a blend mask."""
    model = inflated(pack, base, "middle_frame")
    latents = video(seed=1, h=size, w=size)
    with torch.inference_mode():
        inv, _ = timed(family, "invert (ddim + store)", nodes_of(pack)["VP2P_NullTextInvert"].execute,
                       model=model, positive=encode(clip, SOURCE), negative=encode(clip, ""), latent={"samples": latents}, steps=STEPS,
                       cfg=7.5, mode="ddim_only", inner_steps=0, early_stop=1e-5, store_attention=True, use_cache=False).result
    assert inv.attention is not None
    # the size logged before recording is the size recorded (layer grids and widths read from this model)
    predict = host_module(pack, "invert_host").predicted_store_bytes
    context = encode(clip, SOURCE)[0][0].shape[1]
    assert predict(model, inv.attention.spec, (size, size), context) == inv.attention.nbytes > 0

    def fz(target, **kw):
        args = dict(source_prompt=SOURCE, target_prompt=target, cross_replace=0.75, self_replace=0.75, blend_words="",
                    blend_threshold=0.3, reweight="", latent_blend=False)
        args.update(kw)
        with torch.inference_mode():
            return nodes_of(pack)["VP2P_FateZeroController"].execute(clip=clip, **args).result[0]

    edited, source = timed(family, "edit (FateZero)", sample, pack, model, inv, fz("a tiger running"))
    assert torch.isfinite(edited["samples"]).all() and not torch.allclose(edited["samples"], source["samples"], atol=1e-2)
    blended, _ = sample(pack, model, inv, fz("a tiger running", blend_words="cat", blend_threshold=0.3))
    assert torch.isfinite(blended["samples"]).all()


def guidance_checks(pack, family: str, base, clip, size: int = 8) -> None:
    """Cross-Attention Guidance with ComfyUI's SamplerCustomAdvanced: strength 0 equals the plain sampler, strength > 0 moves it."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_Basic, Noise_RandomNoise, SamplerCustomAdvanced  # noqa: F401

    model = inflated(pack, base)
    latent = torch.zeros(FRAMES, 4, size, size)
    masks = torch.zeros(FRAMES, size * 8, size * 8)
    masks[:, : size * 4, : size * 4] = 1

    def run(strength):
        with torch.inference_mode():
            guider = nodes_of(pack)["VP2P_CrossAttentionGuidance"].execute(
                model=model, positive=encode(clip, "a red ball"), negative=encode(clip, ""), cfg=5.0, clip=clip, prompt="a red ball",
                word="ball", target_masks=masks, strength=strength, schedule="study", layers="all").result[0]
            sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", STEPS).cpu()
            return SamplerCustomAdvanced.execute(Noise_RandomNoise(0), guider, comfy.samplers.sampler_object("euler"), sigmas,
                                                 {"samples": latent}).result[0]["samples"]

    zero = run(0.0)
    moved = timed(family, "guidance (backward)", run, 50.0)
    assert torch.isfinite(moved).all() and not torch.allclose(zero, moved, atol=1e-4)


def tune_and_noise_checks(pack, family: str, base, clip, size: int = 8) -> None:
    """Tune on Video (one step) and Start From Noise with the MODEL's latent format: identical prompts give the source."""
    model = inflated(pack, base)
    with torch.inference_mode():
        tuned = timed(family, "tune (1 step)", nodes_of(pack)["VP2P_TuneOnVideo"].execute, model=model, positive=encode(clip, SOURCE),
                      latent={"samples": video(h=size, w=size)}, steps=1, learning_rate=1e-4, seed=0).result[0]
        inv, noise = nodes_of(pack)["VP2P_NoiseInversion"].execute(seed=3, width=size * 8, height=size * 8, frames=FRAMES,
                                                                  negative=encode(clip, ""), steps=STEPS, model=tuned).result
    torch.testing.assert_close(noise["samples"], tuned.model.latent_format.process_out(inv.z_t))
    same, source = sample(pack, tuned, inv, controller(pack, clip, target=SOURCE), cfg=6.0)
    torch.testing.assert_close(same["samples"], source["samples"], atol=1e-4, rtol=1e-4)
    edited, _ = sample(pack, tuned, inv, controller(pack, clip), cfg=6.0)
    assert not torch.allclose(edited["samples"], source["samples"], atol=1e-2)
