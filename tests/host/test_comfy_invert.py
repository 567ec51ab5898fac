"""ComfyUI host: Shared Null-Text Invert, its disk cache, Save/Load Inversion."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.host.comfy_env import comfy_eps, host_module, inflated, nodes_of

FRAMES = 3
STEPS = 4


def video(seed=0, frames=FRAMES):
    """VAE-scale latents (SD1.5's scale factor makes them ~unit variance in model space) and a prompt."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 4, 8, 8, generator=g)
    latents = (base + 0.3 * torch.randn(frames, 4, 8, 8, generator=g)) * 5.0
    cond = torch.randn(1, 7, 768, generator=g)
    empty = torch.randn(1, 7, 768, generator=g) * 0.1
    return latents, [[cond, {}]], [[empty, {}]]


def invert_node(pack, model, latents, positive, negative, **kw):
    args = dict(steps=STEPS, cfg=7.5, mode="shared_null_text", inner_steps=5, early_stop=1e-5, store_attention=False, use_cache=False)
    args.update(kw)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return nodes_of(pack)["VP2P_NullTextInvert"].execute(model=model, positive=positive, negative=negative,
                                                             latent={"samples": latents}, **args).result


def psnr(a, b):
    return float(10 * torch.log10(b.abs().max() ** 2 / (a - b).pow(2).mean()))


def reconstruction_psnr(pack, model, inv, latents):
    inversion = pack.vp2p.inversion
    den = host_module(pack, "autograd_host").denoiser(model)
    with torch.inference_mode():
        x = inversion.reconstruct(den, inv.z_t, inv.cond, inv.schedule, inv.cfg, inv.null_embeddings)
    return psnr(x, model.model.latent_format.process_in(latents))


class UNetCalls:
    """Counts forwards of the UNet (a hook on the shared module, removed on exit)."""

    def __init__(self, model):
        self.module = model.model.diffusion_model
        self.count = 0

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(lambda *a: setattr(self, "count", self.count + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_modes_shapes_and_shared_null_text_beats_ddim_only(pack, small_models, record_property):
    _, base = small_models
    model = inflated(pack, base)
    latents, positive, negative = video()
    x, ctx = torch.randn(FRAMES, 4, 8, 8), torch.randn(FRAMES, 7, 768)
    before = comfy_eps(model, x, 400, ctx)
    results = {}
    for mode in ("shared_null_text", "per_frame_null_text", "ddim_only", "negative_prompt"):
        inner = {"shared_null_text": 10, "per_frame_null_text": 1}.get(mode, 0)
        inv, noise = invert_node(pack, model, latents, positive, negative, mode=mode, inner_steps=inner,
                                 cfg=7.5 if mode != "ddim_only" else 1.0)
        assert inv.trajectory.shape == (STEPS + 1, FRAMES, 4, 8, 8) and inv.trajectory.device.type == "cpu"
        assert torch.allclose(noise["samples"], model.model.latent_format.process_out(inv.z_t))
        # the trajectory ends at the video itself (model space, at the final sigma)
        final = inv.trajectory[-1] / torch.sqrt(1 + inv.schedule.sigmas[-1] ** 2)
        assert torch.allclose(final, model.model.latent_format.process_in(latents), atol=1e-5)
        results[mode] = inv
    assert results["shared_null_text"].null_embeddings.shape == (STEPS, 1, 7, 768)  # one for all frames
    assert results["per_frame_null_text"].null_embeddings.shape == (STEPS, FRAMES, 7, 768)
    assert results["ddim_only"].null_embeddings is None
    assert torch.equal(results["negative_prompt"].null_embeddings[0], positive[0][0])
    assert torch.equal(results["shared_null_text"].negative, negative[0][0])
    assert not torch.equal(results["shared_null_text"].null_embeddings[-1, 0], negative[0][0])  # it was optimised

    # at cfg 7.5 the optimised null embeddings reconstruct clearly better than plain DDIM inversion
    shared = reconstruction_psnr(pack, model, results["shared_null_text"], latents)
    plain = results["ddim_only"]
    plain.cfg, plain.null_embeddings = 7.5, negative[0][0].unsqueeze(0).expand(STEPS, 1, 7, 768)
    unrepaired = reconstruction_psnr(pack, model, plain, latents)
    record_property("psnr_shared_vs_plain_cfg7.5", (shared, unrepaired))
    logging.getLogger("VideoP2P").info("ComfyUI host PSNR at cfg 7.5: shared null-text %.2f dB, plain DDIM %.2f dB", shared, unrepaired)
    assert shared > unrepaired + 2.0, (shared, unrepaired)  # measured: 6.65 dB -> see the closing note

    # the input MODEL computes exactly what it did, and its temporal layers hold no gradient
    assert torch.equal(comfy_eps(model, x, 400, ctx), before)
    bank = model.get_attachment("vp2p_t2s").bank
    assert all(p.grad is None and not p.requires_grad for p in bank.parameters())


def test_plain_model_and_trajectory_matches_the_diffusers_host(pack, small_models):
    """Any SD MODEL inverts (not only inflated ones), and the trajectory equals the diffusers host's."""
    unet, base = small_models
    latents, positive, negative = video(1)
    inv, _ = invert_node(pack, base, latents, positive, negative, mode="ddim_only", cfg=1.0)
    import importlib

    vp2p = pack.vp2p
    diffusers_host = importlib.import_module(f"{pack.__name__}.vp2p.diffusers_host")
    image_model = vp2p.T2SSettings(vp2p.FrameMode.NONE, False, importlib.import_module(f"{pack.__name__}.vp2p.video_norm").NormScope.FRAME)
    with diffusers_host.DiffusersT2S(unet, image_model) as host, torch.no_grad():
        den = host.denoiser(vp2p.schedule.sd_alphas_cumprod())
        want = vp2p.inversion.ddim_invert(den, latents * 0.18215, positive[0][0], inv.schedule)
    assert torch.allclose(inv.trajectory, want, atol=2e-4, rtol=1e-4), (inv.trajectory - want).abs().max()


def test_the_unet_sees_the_current_latent_at_the_destination_timestep(pack, small_models):
    """As the references' inversion: timesteps 1, 251, 501, 751 at 4 steps (1, 21, …, 981 at 50), each on the
    latent one level lower (the first on the clean video), through ComfyUI's own model sampling."""
    _, base = small_models
    latents, positive, negative = video(3)
    seen = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        t = kwargs.get("timesteps", args[1] if len(args) > 1 else None)
        seen.append((t.float().cpu().clone(), x.float().cpu().clone()))

    handle = base.model.diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        inv, _ = invert_node(pack, base, latents, positive, negative, mode="ddim_only", cfg=1.0)
    finally:
        handle.remove()
    assert [round(float(t[0])) for t, _ in seen] == [1, 251, 501, 751]
    assert all(torch.allclose(t, t[0].expand_as(t), atol=1e-3) for t, _ in seen)
    sig = inv.schedule.sigmas
    for n, (_, x_in) in enumerate(seen):
        i = STEPS - 1 - n  # the call at sigmas[i] sees trajectory[i+1], in the UNet's (DDPM) scale
        torch.testing.assert_close(x_in, inv.trajectory[i + 1] / torch.sqrt(1 + sig[i + 1] ** 2), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(seen[0][1], base.model.latent_format.process_in(latents), atol=1e-4, rtol=1e-4)


def test_cache_hit_is_bit_identical_with_zero_unet_calls_and_misses_on_change(pack, small_models, tmp_path, caplog):
    _, base = small_models
    model = inflated(pack, base)
    host = host_module(pack, "invert_host")
    # The fewest steps and inner iterations that still run null-text optimisation: this test inverts four
    # times and checks caching, not inversion quality (the CI time budget is shared by all host tests).
    settings = pack.vp2p.inversion.InversionSettings(steps=2, inner_steps=1)
    latents, positive, negative = video(2)
    with torch.inference_mode(), UNetCalls(model) as calls:
        first = host.invert_cached(model, positive, negative, latents, settings, tmp_path)
    assert calls.count >= settings.steps * 2 and len(list(tmp_path.glob("inversion_*.safetensors"))) == 1
    with torch.inference_mode(), UNetCalls(model) as calls:
        again = host.invert_cached(model, positive, negative, latents, settings, tmp_path)
    assert calls.count == 0
    for name, t in first.tensors().items():
        assert torch.equal(again.tensors()[name], t), name

    # a changed latent, or a model with other weights, misses (a new file, UNet calls)
    other_latents = latents.clone()
    other_latents[0, 0, 0, 0] += 0.01
    other_base = base.clone()
    key = next(k for k in other_base.model.state_dict() if k.endswith("input_blocks.1.1.proj_in.weight"))
    other_base.add_patches({key: (torch.full_like(other_base.model.state_dict()[key], 1e-3),)}, 1.0)
    for m, lat in ((model, other_latents), (inflated(pack, other_base), latents)):
        with torch.inference_mode(), UNetCalls(m) as calls:
            host.invert_cached(m, positive, negative, lat, settings, tmp_path)
        assert calls.count > 0
    assert len(list(tmp_path.glob("inversion_*.safetensors"))) == 3

    # a damaged cache file is reported, recomputed and rewritten
    cached = host.cache_key(host.model_fingerprint(model), latents, positive, negative, settings)[:40]
    path = tmp_path / f"inversion_{cached}.safetensors"
    path.write_bytes(path.read_bytes()[:300])
    with caplog.at_level(logging.WARNING, logger="VideoP2P"), torch.inference_mode(), UNetCalls(model) as calls:
        repaired = host.invert_cached(model, positive, negative, latents, settings, tmp_path)
    assert calls.count > 0 and "damaged cache file" in caplog.text
    assert torch.equal(repaired.trajectory, first.trajectory)
    assert pack.vp2p.inversion_file.load_inversion(path).trajectory.shape == first.trajectory.shape


def test_inputs_a_mode_does_not_use_do_not_invalidate_its_cache(pack, small_models, tmp_path):
    """ddim_only uses none of cfg, inner_steps, early_stop: changing them re-uses the cached inversion (no UNet
    call), which then reports the cfg asked for; changing the steps does not."""
    _, base = small_models
    model = inflated(pack, base)
    host = host_module(pack, "invert_host")
    inversion = pack.vp2p.inversion
    latents, positive, negative = video(3)
    plain = inversion.InversionSettings(steps=2, cfg=7.5, mode=inversion.InversionMode.DDIM_ONLY, inner_steps=10)
    other = inversion.InversionSettings(steps=2, cfg=5.0, mode=inversion.InversionMode.DDIM_ONLY, inner_steps=3, early_stop=1e-3)
    with torch.inference_mode():
        first = host.invert_cached(model, positive, negative, latents, plain, tmp_path)
        with UNetCalls(model) as calls:
            again = host.invert_cached(model, positive, negative, latents, other, tmp_path)
        assert calls.count == 0 and torch.equal(again.trajectory, first.trajectory) and again.cfg == 5.0
        more = inversion.InversionSettings(steps=3, mode=inversion.InversionMode.DDIM_ONLY)
        with UNetCalls(model) as calls:
            host.invert_cached(model, positive, negative, latents, more, tmp_path)
        assert calls.count == 3
    # a null-text mode keys everything it uses
    assert plain.key() == other.key() and inversion.InversionSettings(cfg=5.0).key() != inversion.InversionSettings().key()


def test_interrupt_leaves_the_model_untouched(pack, small_models):
    import comfy.model_management

    _, base = small_models
    model = inflated(pack, base)
    latents, positive, negative = video(3)
    x, ctx = torch.randn(FRAMES, 4, 8, 8), torch.randn(FRAMES, 7, 768)
    before = comfy_eps(model, x, 400, ctx)
    host = host_module(pack, "invert_host")
    settings = pack.vp2p.inversion.InversionSettings(steps=STEPS, inner_steps=3)
    seen = []

    def progress(done, total, text):
        seen.append(text)
        if "null-text step 1/" in text:
            comfy.model_management.interrupt_current_processing(True)

    with pytest.raises(comfy.model_management.InterruptProcessingException), torch.inference_mode():
        host.invert_cached(model, positive, negative, latents, settings, None, progress)
    assert any("DDIM inversion" in t for t in seen)
    assert torch.equal(comfy_eps(model, x, 400, ctx), before)


def test_bad_inputs_are_clear(pack, small_models):
    _, base = small_models
    model = inflated(pack, base)
    latents, positive, negative = video(4)
    cases = [
        (dict(positive=[[torch.randn(2, 7, 768), {}]]), "batch of 2 but the video has 3 frames"),
        (dict(cfg=1.0), "nothing for null-text optimisation to fix"),
        (dict(steps=1), "steps must be ≥ 2"),
        (dict(latents=torch.randn(0, 4, 8, 8)), "LATENT"),
        (dict(negative=[[torch.randn(3, 7, 768), {}]]), "per_frame_null_text"),
        (dict(positive=[]), "positive CONDITIONING is empty"),
    ]
    for change, message in cases:
        args = dict(latents=latents, positive=positive, negative=negative)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            invert_node(pack, model, args.pop("latents"), args.pop("positive"), args.pop("negative"), **args)


def test_save_and_load_inversion(pack, small_models, tmp_path, monkeypatch):
    import folder_paths

    _, base = small_models
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "vp2p_inversions", raising=False)
    model = inflated(pack, base)
    latents, positive, negative = video(5)
    inv, noise = invert_node(pack, model, latents, positive, negative, mode="negative_prompt")
    registry = nodes_of(pack)
    with torch.inference_mode():
        registry["VP2P_SaveInversion"].execute(inversion=inv, name="clips/cat")
    assert (tmp_path / "vp2p_inversions" / "clips" / "cat.safetensors").is_file()
    load = registry["VP2P_LoadInversion"]
    assert "clips/cat.safetensors" in load.INPUT_TYPES()["required"]["inversion_name"][1]["options"]
    with torch.inference_mode():
        back, back_noise = load.execute(model=model, inversion_name="clips/cat.safetensors", latent={"samples": latents}).result
    for name, t in inv.tensors().items():
        assert torch.equal(back.tensors()[name], t), name
    assert torch.equal(back_noise["samples"], noise["samples"])
    with pytest.raises(ValueError, match="latent shape"), torch.inference_mode():
        load.execute(model=model, inversion_name="clips/cat.safetensors", latent={"samples": latents[:2]})
    with pytest.raises(ValueError, match="different model"), torch.inference_mode():
        load.execute(model=inflated(pack, base, "sparse_causal"), inversion_name="clips/cat.safetensors")
    with pytest.raises(ValueError, match="No inversion named"), torch.inference_mode():
        load.execute(model=model, inversion_name="nope.safetensors")
