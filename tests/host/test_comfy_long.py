"""ComfyUI host: long videos in frame chunks (Inflate to T2S's ``frames_per_chunk``).

On a full-depth narrow SD1.5 UNet (ComfyUI's SD15 class) with per-frame GroupNorms and untuned temporal
layers, every stage run in chunks equals the same stage run whole; no UNet call holds more than a chunk of
each video's frames; a 128-frame clip goes through tune, invert, P2P and FateZero with at most a chunk per call.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from tests.host.comfy_env import encode, make_clip, make_narrow_sd15, nodes_of

SOURCE = "a cat running"
TARGET = "a tiger running"
H = W = 8  # latent 8×8 (64 px): the narrow UNet's levels 8, 4, 2, 1


@pytest.fixture(scope="module")
def clip(comfy_path):
    return make_clip(0)


@pytest.fixture(scope="module")
def base(pack, comfy_path):
    return make_narrow_sd15(seed=5)


def inflate(pack, base, mode: str, per_chunk: int, group_norm: str = "frame", overlap: int = 0):
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_InflateT2S"].execute(model=base, frame_attention=mode, temporal_attention=True,
                                                         frame_attention_min_channels=0, group_norm=group_norm,
                                                         frames_per_chunk=per_chunk, chunk_overlap=overlap).result[0]


def video(frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, H, W, generator=g) + 0.3 * torch.randn(frames, 4, H, W, generator=g)) * 5.0


@contextmanager
def unet_rows(model):
    """The batch size of every UNet (diffusion model) call while the block runs."""
    seen: list[int] = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        seen.append(int(x.shape[0]))

    handle = model.model.diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def run_stages(pack, model, clip, latents, mode="ddim_only", inner_steps=0, steps=2, store_location="cpu", keep=None):
    """Invert (with FateZero's store), a P2P edit with a LocalBlend (decoupled guidance), a FateZero edit with its
    latent blend; returns (noise, P2P edited, FateZero edited)."""
    reg = nodes_of(pack)
    with torch.inference_mode():
        inv, noise = reg["VP2P_NullTextInvert"].execute(
            model=model, positive=encode(clip, SOURCE), negative=encode(clip, ""), latent={"samples": latents}, steps=steps,
            cfg=7.5, mode=mode, inner_steps=inner_steps, early_stop=0.0, store_attention=True, use_cache=False,
            store_steps=1.0, store_location=store_location).result
        if keep is not None:
            keep.append(inv)
        p2p = reg["VP2P_P2PController"].execute(
            clip=clip, source_prompt=SOURCE, target_prompt=TARGET, edit="auto", cross_replace=0.5, self_replace=0.5,
            blend_source_words="cat", blend_target_words="tiger", blend_threshold=0.5, reweight="").result[0]
        edited, _ = reg["VP2P_DecoupledSampler"].execute(model=model, inversion=inv, control=p2p, cfg=7.5,
                                                        guidance="decoupled" if mode != "ddim_only" else "fast").result
        fz = reg["VP2P_FateZeroController"].execute(
            clip=clip, source_prompt=SOURCE, target_prompt=TARGET, cross_replace=0.5, self_replace=0.5,
            blend_words="cat", blend_threshold=0.3, reweight="", latent_blend=True).result[0]
        fz_edited, _ = reg["VP2P_DecoupledSampler"].execute(model=model, inversion=inv, control=fz, cfg=7.5, guidance="fast").result
    return noise["samples"], edited["samples"], fz_edited["samples"]


@pytest.mark.parametrize("mode, per_chunk, overlap", [("first_frame", 4, 0), ("middle_frame", 2, 0), ("sparse_causal", 3, 0),
                                                     ("sparse_causal", 4, 2)])
def test_every_stage_in_chunks_equals_the_whole_clip(pack, base, clip, mode, per_chunk, overlap):
    frames = 7
    latents = video(frames)
    whole = run_stages(pack, inflate(pack, base, mode, 0), clip, latents)
    chunked_model = inflate(pack, base, mode, per_chunk, overlap=overlap)
    with unet_rows(chunked_model) as rows:
        chunked = run_stages(pack, chunked_model, clip, latents)
    for name, a, b in zip(("noise", "P2P", "FateZero"), whole, chunked):
        diff = float((a - b).abs().max())
        assert diff < 2e-3 * max(1.0, float(a.abs().max())), f"{mode}/{per_chunk}/{overlap}: {name} differs by {diff}"
    assert rows and max(rows) <= 4 * per_chunk, rows  # an edit call holds 4 videos (uncond/cond × source/target)
    assert float((whole[1] - whole[2]).abs().max()) > 1e-3  # the two edits are not the same computation


def test_null_text_inversion_in_chunks_equals_whole(pack, base, clip):
    """Null-text optimisation backpropagates through the windows (a later window's loss reaches the anchor)."""
    latents = video(5, seed=1)
    whole = run_stages(pack, inflate(pack, base, "first_frame", 0), clip, latents, mode="shared_null_text", inner_steps=2)
    chunked = run_stages(pack, inflate(pack, base, "first_frame", 2), clip, latents, mode="shared_null_text", inner_steps=2)
    for a, b in zip(whole, chunked):
        assert float((a - b).abs().max()) < 2e-3 * max(1.0, float(a.abs().max()))


def test_a_stock_sampler_on_a_chunked_model_equals_the_whole_clip(pack, base, clip):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    outs = []
    for per_chunk in (0, 3):
        model = inflate(pack, base, "sparse_causal", per_chunk)
        with torch.inference_mode(), unet_rows(model) as rows:
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(encode(clip, TARGET), encode(clip, ""))
            guider.set_cfg(5.0)
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3).cpu()
            out = SamplerCustomAdvanced.execute(Noise_RandomNoise(3), guider, comfy.samplers.sampler_object("euler"), sigmas,
                                                {"samples": torch.zeros(8, 4, H, W)}).result[0]["samples"]
        outs.append((out, max(rows)))
    (whole, rows_whole), (chunked, rows_chunked) = outs
    assert float((whole - chunked).abs().max()) < 2e-3 * max(1.0, float(whole.abs().max()))
    assert rows_whole == 16 and rows_chunked == 6  # cond + uncond of 8 frames, then of 3


def test_video_norm_in_chunks_stays_close_to_whole(pack, base, clip):
    """group_norm=video pools a chunk's frames: close to the whole clip's result, not equal (docs/long-videos.md: measured)."""
    latents = video(6, seed=2)
    whole = run_stages(pack, inflate(pack, base, "first_frame", 0, "video"), clip, latents)
    chunked = run_stages(pack, inflate(pack, base, "first_frame", 3, "video"), clip, latents)
    rel = float((whole[0] - chunked[0]).abs().max() / whole[0].abs().max())
    assert 0 < rel < 0.5, rel


def test_core_context_windows_are_refused_by_the_packs_stages(pack, base, clip):
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode

    model = inflate(pack, base, "first_frame", 0)
    with torch.inference_mode():
        windowed = ContextWindowsManualNode.execute(model=model, context_length=4, context_overlap=1, context_schedule="standard_static",
                                                    context_stride=1, closed_loop=False, fuse_method="pyramid", dim=0,
                                                    freenoise=False).result[0]
    with pytest.raises(Exception, match="context windows .* frames_per_chunk on Inflate to T2S"):
        run_stages(pack, windowed, clip, video(6))


def test_a_128_frame_clip_through_tune_invert_p2p_and_fatezero_a_chunk_at_a_time(pack, base, clip, monkeypatch):
    frames, per_chunk = 128, 8
    latents = video(frames, seed=4)
    model = inflate(pack, base, "first_frame", per_chunk)
    reg = nodes_of(pack)
    with unet_rows(model) as rows, torch.inference_mode():
        tuned = reg["VP2P_TuneOnVideo"].execute(model=model, positive=encode(clip, SOURCE), latent={"samples": latents}, steps=1,
                                                learning_rate=1e-4, seed=0, use_cache=False, frames_per_step=per_chunk).result[0]
    assert max(rows) <= per_chunk
    # store_location auto puts a store above VP2P_STORE_DISK_ABOVE_GB on disk, read back a step at a time
    monkeypatch.setenv("VP2P_STORE_DISK_ABOVE_GB", "0.001")
    kept = []
    with unet_rows(tuned) as rows:
        noise, edited, fz_edited = run_stages(pack, tuned, clip, latents, mode="shared_null_text", inner_steps=1, store_location="auto",
                                              keep=kept)
    for out in (noise, edited, fz_edited):
        assert out.shape == (frames, 4, H, W) and torch.isfinite(out).all()
    assert max(rows) <= 4 * per_chunk, max(rows)
    store = kept[0].attention
    assert not store.in_memory and (store.directory / "spec.json").is_file() and store.nbytes > 1e6
    assert store.spec.frames == frames


def test_store_location_auto_keeps_a_small_store_in_ram(pack, base, clip):
    kept = []
    run_stages(pack, inflate(pack, base, "middle_frame", 0), clip, video(3), store_location="auto", keep=kept)
    assert kept[0].attention.in_memory and kept[0].attention.directory is None


def test_guidance_and_attention_maps_in_chunks_equal_whole(pack, base, clip):
    """Cross-Attention Guidance's energy (word maps gathered window by window, gradients through the anchor) and
    Attention Maps (LocalBlend's maps window by window) equal the whole clip's."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    reg = nodes_of(pack)
    frames = 6
    latents = video(frames, seed=6)
    results = []
    for per_chunk in (0, 4):
        model = inflate(pack, base, "first_frame", per_chunk)
        with torch.inference_mode():
            masks = reg["VP2P_BoxTrajectory"].execute(width=W * 8, height=H * 8, frames=frames, start_x=0.1, start_y=0.2, start_w=0.4,
                                                      start_h=0.4, end_x=0.5, end_y=0.2, end_w=0.4, end_h=0.4, shape="ellipse",
                                                      easing="linear").result[0]
            guider = reg["VP2P_CrossAttentionGuidance"].execute(
                model=model, positive=encode(clip, "a red ball"), negative=encode(clip, ""), cfg=5.0, clip=clip, prompt="a red ball",
                word="ball", target_masks=masks, strength=5.0).result[0]
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 2).cpu()
            guided = SamplerCustomAdvanced.execute(Noise_RandomNoise(1), guider, comfy.samplers.sampler_object("euler"), sigmas,
                                                   {"samples": torch.zeros(frames, 4, H, W)}).result[0]["samples"]
            inv, _ = reg["VP2P_NullTextInvert"].execute(
                model=model, positive=encode(clip, SOURCE), negative=encode(clip, ""), latent={"samples": latents}, steps=2,
                cfg=7.5, mode="ddim_only", inner_steps=0, early_stop=0.0, store_attention=False, use_cache=False).result
            p2p = reg["VP2P_P2PController"].execute(
                clip=clip, source_prompt=SOURCE, target_prompt=TARGET, edit="auto", cross_replace=0.5, self_replace=0.5,
                blend_source_words="cat", blend_target_words="tiger", blend_threshold=0.5, reweight="").result[0]
            src_maps, tgt_maps, mask = reg["VP2P_AttentionMaps"].execute(model=model, inversion=inv, control=p2p, source_words="",
                                                                         target_words="", at_step=0.5, threshold=0.3).result
        results.append((guided, [e for _, e in guider.energies], src_maps, tgt_maps))
    (g0, e0, s0, t0), (g1, e1, s1, t1) = results
    assert float((g0 - g1).abs().max()) < 2e-3 * max(1.0, float(g0.abs().max()))
    assert len(e0) == len(e1) > 0 and all(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(e0, e1)), (e0, e1)
    assert float((s0 - s1).abs().max()) < 1e-3 and float((t0 - t1).abs().max()) < 1e-3


def test_tune_on_a_chunked_model_trains_on_chunk_sized_windows(pack, base, clip):
    model = inflate(pack, base, "sparse_causal", 4)
    with unet_rows(model) as rows, torch.inference_mode():
        tuned = nodes_of(pack)["VP2P_TuneOnVideo"].execute(model=model, positive=encode(clip, SOURCE), latent={"samples": video(10)},
                                                           steps=2, learning_rate=1e-3, seed=0, use_cache=False).result[0]
    # the default frames_per_step=0 trains on chunk-sized windows: one UNet call of 4 rows per step (the whole
    # 10-frame clip would take three chunked calls per step)
    assert rows == [4, 4], rows
    assert tuned is not model


def test_controlnet_residuals_follow_the_chunks(pack, small_models, clip):
    """A ControlNet with one hint per frame: its residuals (computed by ComfyUI for the whole batch) are cut to each
    chunk's rows, so a stock sampler and a DDIM inversion with it give the whole clip's result."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    import nodes
    from tests.host.controlnet import load_random_controlnet

    _, base2 = small_models
    frames = 5
    control = load_random_controlnet(levels=2, seed=0)
    hints = torch.rand(frames, H * 8, W * 8, 3, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(encode(clip, SOURCE), encode(clip, ""), control, hints, 1.0, 0.0, 1.0)
    outs = []
    for per_chunk in (0, 2):
        model = inflate(pack, base2, "first_frame", per_chunk)
        with torch.inference_mode():
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(pos, neg)
            guider.set_cfg(5.0)
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 2).cpu()
            sampled = SamplerCustomAdvanced.execute(Noise_RandomNoise(2), guider, comfy.samplers.sampler_object("euler"), sigmas,
                                                    {"samples": torch.zeros(frames, 4, H, W)}).result[0]["samples"]
            _, noise = nodes_of(pack)["VP2P_NullTextInvert"].execute(
                model=model, positive=pos, negative=neg, latent={"samples": video(frames, seed=3)}, steps=2, cfg=7.5,
                mode="ddim_only", inner_steps=0, early_stop=0.0, store_attention=False, use_cache=False).result
        outs.append((sampled, noise["samples"]))
    (s0, n0), (s1, n1) = outs
    assert float((s0 - s1).abs().max()) < 2e-3 * max(1.0, float(s0.abs().max()))
    assert float((n0 - n1).abs().max()) < 2e-3 * max(1.0, float(n0.abs().max()))
    # the hints matter: the same run with other hints differs
    with torch.inference_mode():
        pos2, neg2 = nodes.ControlNetApplyAdvanced().apply_controlnet(encode(clip, SOURCE), encode(clip, ""), control, hints.flip(0), 1.0,
                                                                      0.0, 1.0)
        _, noise2 = nodes_of(pack)["VP2P_NullTextInvert"].execute(
            model=inflate(pack, base2, "first_frame", 2), positive=pos2, negative=neg2, latent={"samples": video(frames, seed=3)}, steps=2,
            cfg=7.5, mode="ddim_only", inner_steps=0, early_stop=0.0, store_attention=False, use_cache=False).result
    assert float((noise2["samples"][0] - n1[0]).abs().max()) > 1e-4
