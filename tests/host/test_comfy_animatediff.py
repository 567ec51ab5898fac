"""ComfyUI host: every stage of the pack with AnimateDiff-Evolved (ADE) active, the real pack.

ADE (the unmodified snapshot in ``../shared/community``) is loaded through ComfyUI's own custom-node loader; its
nodes load a random motion module in ``mm_sd_v15_v2``'s layout (``tests.host.animatediff``) and put it on a random
SD1.5 UNet of the full layout (fp16 weights, as most SD1.5 checkpoints; ComfyUI computes in fp32 on a CPU). Two
frames of 8×8 latents, two steps: the UNet is SD1.5's whole 860 M parameters, so every call counts.

What must hold:
* backward passes (null-text in both modes, Tune on Video, Cross-Attention Guidance) run with the motion module's
  weights inference tensors created by ADE's loader under the executor's inference mode (before: "Inference tensors
  cannot be saved for backward"), and no UNet weight receives a gradient;
* the pack's UNet calls go through the per-step path a KSampler's take: ADE's start/end percent, a scale keyframe
  and effect 0 give the pack's source walk exactly what a stock SamplerCustomAdvanced gives with the same MODEL;
* ADE's context options are refused with a message pointing to frames_per_chunk; frame chunks with a motion module
  are refused at Inflate;
* Inflate to T2S leaves its own temporal layers out when a motion module is on the MODEL; Tune on Video can train
  the motion module's attention (as deltas: ADE's module is untouched), saved and loaded again.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest
import torch

from tests.host.animatediff import ADE_DIR, MOTION_MODULE, community_available, load_pack_module, load_sd15_full, write_motion_module
from tests.host.comfy_env import encode, host_module, inflated, make_clip, nodes_of

pytestmark = pytest.mark.skipif(not community_available(), reason="no ../shared/community (AnimateDiff-Evolved, VideoHelperSuite)")

FRAMES = 2
STEPS = 2
SOURCE = "a cat running"
TARGET = "a dog running"
# one motion module file for the whole run, shared by the test files and workers that need it
MODELS_DIR = Path(tempfile.gettempdir()) / "vp2p-host-models" / "animatediff_models"


@pytest.fixture(scope="module")
def ade(pack):
    module = load_pack_module(ADE_DIR)
    write_motion_module(module, MODELS_DIR)
    return module


@pytest.fixture(scope="module")
def base(comfy_path):
    return load_sd15_full(seed=3)


@pytest.fixture(scope="module")
def clip(comfy_path):
    return make_clip(0)


def video(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 8, 8, generator=g) + 0.3 * torch.randn(FRAMES, 4, 8, 8, generator=g)) * 5.0


def multival(value: float):
    return nodes_of(None)["ADE_MultivalDynamic"]().create_multival(float_val=value)[0]


def with_ade(base, start: float = 0.0, end: float = 1.0, gen: int = 2, context: bool = False, beta_schedule: str = "use existing",
             **optional):
    """``base`` with the motion module applied through ADE's own nodes (gen2: Load → Apply (Adv.) → Use Evolved Sampling;
    gen1: AnimateDiff Loader), as the executor runs them. ``beta_schedule`` "use existing" keeps the checkpoint's noise
    schedule, so that a result with the motion module off equals one without ADE (ADE's "autoselect" would switch to
    AnimateDiff's training schedule)."""
    N = nodes_of(None)
    with torch.inference_mode():
        ctx = N["ADE_StandardStaticContextOptions"]().create_options(context_length=1, context_overlap=0)[0] if context else None
        if gen == 1:
            return N["ADE_AnimateDiffLoaderGen1"]().load_mm_and_inject_params(base, MOTION_MODULE, beta_schedule,
                                                                              context_options=ctx, **optional)[0]
        mm = N["ADE_LoadAnimateDiffModel"]().load_motion_model(MOTION_MODULE)[0]
        m_models = N["ADE_ApplyAnimateDiffModel"]().apply_motion_model(mm, start, end, **optional)[0]
        return N["ADE_UseEvolvedSampling"]().use_evolved_sampling(base, beta_schedule, m_models, context_options=ctx)[0]


def invert(pack, model, clip, latents, mode="ddim_only", **kw):
    args = dict(steps=STEPS, cfg=7.5, mode=mode, inner_steps=2 if "null" in mode else 0, early_stop=1e-9, store_attention=False,
                use_cache=False)
    args.update(kw)
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_NullTextInvert"].execute(
            model=model, positive=encode(clip, SOURCE), negative=encode(clip, ""), latent={"samples": latents}, **args).result[0]


def p2p(pack, clip, target=TARGET):
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_P2PController"].execute(
            clip=clip, source_prompt=SOURCE, target_prompt=target, edit="auto", cross_replace=0.5, self_replace=0.5,
            blend_source_words="", blend_target_words="", blend_threshold=0.3, reweight="").result[0]


def no_weight_gradients(model) -> bool:
    with_grad = [n for n, p in model.model.named_parameters() if p.grad is not None]
    assert not with_grad, (len(with_grad), with_grad[:5])
    return True


def test_inflate_leaves_its_temporal_layers_to_the_motion_module_and_refuses_chunks(pack, ade, base, caplog):
    host = host_module(pack, "comfy_host")
    model = with_ade(base)
    assert host.motion_modules(model) == [MOTION_MODULE] and host.motion_modules(base) == []
    with caplog.at_level(logging.INFO, logger="VideoP2P"):
        t2s = inflated(pack, model, "first_frame", temporal=True)
    assert host.get_state(t2s).settings.temporal_attention is False and host.get_state(t2s).bank is None
    assert "motion module" in caplog.text and MOTION_MODULE in caplog.text
    with torch.inference_mode():
        both = nodes_of(pack)["VP2P_InflateT2S"].execute(model=model, frame_attention="first_frame", temporal_attention=True,
                                                          temporal_with_motion_module=True).result[0]
    assert host.get_state(both).bank is not None
    assert host.get_state(inflated(pack, base, "first_frame", temporal=True)).bank is not None  # no motion module: as before
    with pytest.raises(pack.vp2p.SettingsError, match="frames_per_chunk.*motion module") as caught:
        with torch.inference_mode():
            nodes_of(pack)["VP2P_InflateT2S"].execute(model=model, frame_attention="first_frame", temporal_attention=False,
                                                       frames_per_chunk=1)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("gen", [2, 1])
def test_null_text_inversion_backpropagates_through_the_motion_module(pack, ade, base, clip, gen):
    """The crash of issue 23 (shared null-text with ADE: inference tensors saved for backward) is gone for ADE's gen1
    and gen2 nodes; the optimised null embeddings differ from those without the motion module (it acts in the
    backward passes), the loss is finite and no UNet weight is given a gradient."""
    latents = video(1)
    model = inflated(pack, with_ade(base, gen=gen, beta_schedule="autoselect"), "first_frame", temporal=True)
    inv = invert(pack, model, clip, latents, mode="shared_null_text")
    plain = invert(pack, inflated(pack, base, "first_frame", temporal=True), clip, latents, mode="shared_null_text")
    assert inv.null_embeddings is not None and torch.isfinite(inv.null_embeddings).all()
    assert not torch.allclose(inv.null_embeddings, plain.null_embeddings, atol=1e-6)
    assert not torch.allclose(inv.z_t, plain.z_t, atol=1e-4)  # the motion module acts in the inversion
    assert no_weight_gradients(model) and no_weight_gradients(base)


def test_every_inversion_mode_fatezero_and_attention_maps_run_with_the_motion_module(pack, ade, base, clip):
    latents = video(2)
    model = inflated(pack, with_ade(base), "middle_frame", temporal=False)
    for mode in ("per_frame_null_text", "negative_prompt"):
        inv = invert(pack, model, clip, latents, mode=mode, inner_steps=1)
        assert torch.isfinite(inv.z_t).all(), mode
    inv = invert(pack, model, clip, latents, store_attention=True)
    assert inv.attention is not None
    with torch.inference_mode():
        control = nodes_of(pack)["VP2P_FateZeroController"].execute(
            clip=clip, source_prompt=SOURCE, target_prompt=TARGET, cross_replace=0.8, self_replace=0.8, blend_words="cat",
            blend_threshold=0.3, reweight="", latent_blend=False).result[0]
        edited = nodes_of(pack)["VP2P_DecoupledSampler"].execute(model=model, inversion=inv, control=control, cfg=7.5,
                                                                 guidance="decoupled").result[0]["samples"]
        maps = nodes_of(pack)["VP2P_AttentionMaps"].execute(model=model, inversion=inv, control=control, source_words="cat",
                                                            target_words="dog", at_step=0.5, threshold=0.3).result
    assert torch.isfinite(edited).all() and edited.shape == latents.shape
    assert maps[0].shape[0] == FRAMES and torch.isfinite(maps[0]).all() and maps[2].shape[0] == FRAMES


def _stock_walk(model, inv, positive) -> torch.Tensor:
    """The source walk as a stock SamplerCustomAdvanced runs it: CFGGuider at cfg 1 with the source prompt, euler (= DDIM)
    on the inversion's sigmas from z_T, noise disabled; in the pack's scale (model space, data scale)."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_EmptyNoise, SamplerCustomAdvanced

    schedule = inv.schedule
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    fmt = model.model.latent_format
    with torch.inference_mode():
        out = SamplerCustomAdvanced.execute(Noise_EmptyNoise(), guider, comfy.samplers.sampler_object("euler"),
                                            schedule.sigmas.float().cpu(), {"samples": fmt.process_out(inv.z_t.float().cpu())})
    x = fmt.process_in(out.result[0]["samples"].float())
    sigma = float(schedule.sigmas[-1])
    return x / (1.0 + sigma**2) ** 0.5


def _pack_walk(pack, model, inv, clip) -> torch.Tensor:
    """The source branch the pack walks beside the target in the same UNet calls (fast guidance: cfg 1 for the source)."""
    host = host_module(pack, "p2p_host")
    with torch.inference_mode():
        result, _ = host.run_edit(model, inv, p2p(pack, clip), 7.5, pack.vp2p.edit.Guidance.FAST, reuse=False)
    return result.source.float().cpu()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_ade_schedule_applies_to_the_pack_as_to_a_ksampler(pack, ade, base, clip):
    """ADE applies its per-step schedule in its replacement of ComfyUI's sampling function. Through it, the pack's
    source walk equals a stock sampler's with the same MODEL for: start/end percent 0/0 (AnimateDiff off at every step:
    also equal to the walk without ADE), effect 0, and keyframes (scale 1 from the start, effect 0 from 50% of the steps
    on: the result differs from both the plain motion module and no motion module). Before, the pack's stages ignored all three (the fully-on result)."""
    latents = video(3)
    pos = encode(clip, SOURCE)
    plain_model = inflated(pack, base, "first_frame", temporal=False)
    inv = invert(pack, plain_model, clip, latents)
    without_ade = _pack_walk(pack, plain_model, inv, clip)
    N = nodes_of(pack)
    with torch.inference_mode():  # full scale for the first half of the steps, the motion module off from 50% on
        first = N["ADE_AnimateDiffKeyframe"]().load_keyframe(start_percent=0.0, scale_multival=multival(1.0))[0]
        keyframes = N["ADE_AnimateDiffKeyframe"]().load_keyframe(start_percent=0.5, prev_ad_keyframes=first,
                                                                  effect_multival=multival(0.0))[0]
    cases = {"on": with_ade(base), "start=end=0": with_ade(base, 0.0, 0.0), "effect 0": with_ade(base, effect_multival=multival(0.0)),
             "keyframes": with_ade(base, ad_keyframes=keyframes)}
    walks = {}
    for name, ade_model in cases.items():
        model = inflated(pack, ade_model, "first_frame", temporal=False)
        walks[name] = pack_walk = _pack_walk(pack, model, inv, clip)
        assert torch.isfinite(pack_walk).all()
        if name != "on":
            stock = _stock_walk(model, inv, pos)
            assert _relative(pack_walk, stock) < 1e-4, (name, _relative(pack_walk, stock))
    assert _relative(walks["on"], without_ade) > 1e-2  # the motion module acts
    assert _relative(walks["start=end=0"], without_ade) < 1e-5
    assert _relative(walks["effect 0"], without_ade) < 1e-5
    assert _relative(walks["keyframes"], walks["on"]) > 1e-3 and _relative(walks["keyframes"], without_ade) > 1e-3


def test_context_options_are_refused_with_what_to_use_instead(pack, ade, base, clip):
    model = inflated(pack, with_ade(base, context=True), "first_frame", temporal=False)
    with pytest.raises(pack.vp2p.SettingsError, match="context options.*frames_per_chunk") as caught:
        invert(pack, model, clip, video(4))
    assert isinstance(caught.value, ValueError)


def test_tune_trains_the_motion_module_attention_as_deltas_saved_and_loaded(pack, ade, base, clip, tmp_path, monkeypatch):
    """Tune on Video with train_motion_module: deltas on every attention projection of the motion module (ADE's module and
    its weights untouched), non-zero after training, acting in stock and pack UNet calls of the tuned MODEL, saved in the
    tuned file and applied again by Load Tuned T2S (same outputs); the file refused on a MODEL without a motion module."""
    import comfy.model_management
    import folder_paths

    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    folder_paths.folder_names_and_paths.pop("vp2p", None)
    model = inflated(pack, with_ade(base), "first_frame", temporal=True)
    mm_patcher = model.additional_models["ADE"][0]
    before = {k: v.clone() for k, v in mm_patcher.model.state_dict().items() if "attention_blocks" in k and "to_q" in k}
    with torch.inference_mode():
        tuned = nodes_of(pack)["VP2P_TuneOnVideo"].execute(model=model, positive=encode(clip, SOURCE), latent={"samples": video(5)},
                                                           steps=2, learning_rate=1e-3, seed=0, save_name="mm_tuned", use_cache=False,
                                                           train_motion_module=True).result[0]
    deltas = host_module(pack, "motion_tuning").motion_deltas_of(tuned)
    n_projections = sum(1 for k in mm_patcher.model.state_dict() if k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight",
                                                                                  ".to_out.0.weight")))
    assert len(deltas.paths()) == n_projections > 0
    assert max(float(t.abs().max()) for t in deltas.tensors.values()) > 0
    after = {k: v for k, v in mm_patcher.model.state_dict().items() if k in before}
    assert all(torch.equal(before[k], after[k]) for k in before)  # ADE's motion module is not written
    assert no_weight_gradients(model) and not any(p.grad is not None for p in mm_patcher.model.parameters())

    latents = video(6)
    outputs = {}
    for name, m in (("input", model), ("tuned", tuned)):
        outputs[name] = _stock_walk(m, invert(pack, m, clip, latents), encode(clip, SOURCE))
    assert _relative(outputs["tuned"], outputs["input"]) > 1e-4
    saved = tmp_path / "vp2p" / "mm_tuned.safetensors"
    assert saved.is_file()
    with torch.inference_mode():
        loaded = nodes_of(pack)["VP2P_LoadTuned"].execute(model=model, tuned_name="mm_tuned.safetensors").result[0]
    assert torch.equal(_stock_walk(loaded, invert(pack, tuned, clip, latents), encode(clip, SOURCE)),
                       _stock_walk(tuned, invert(pack, tuned, clip, latents), encode(clip, SOURCE)))
    with pytest.raises(ValueError, match="motion module"):
        with torch.inference_mode():
            nodes_of(pack)["VP2P_LoadTuned"].execute(model=inflated(pack, base, "first_frame", temporal=True),
                                                     tuned_name="mm_tuned.safetensors")
    comfy.model_management.cleanup_models()


def test_guidance_and_generation_on_an_animatediff_model(pack, ade, base, clip):
    """The T2V study on a T2V model: Start From Noise → P2P word swap, and Cross-Attention Guidance (backward through the
    motion module) pulling a word's attention into a box, on SD1.5 + an AnimateDiff motion module (the study's numbers are
    measured in ``bench/bench_animatediff.py``)."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    N = nodes_of(pack)
    model = inflated(pack, with_ade(base), "first_frame", temporal=False)
    with torch.inference_mode():
        inv = N["VP2P_NoiseInversion"].execute(seed=0, width=64, height=64, frames=FRAMES, negative=encode(clip, ""), steps=STEPS,
                                               model=model).result[0]
        edited = N["VP2P_DecoupledSampler"].execute(model=model, inversion=inv, control=p2p(pack, clip), cfg=7.5,
                                                    guidance="decoupled").result
    assert torch.isfinite(edited[0]["samples"]).all() and not torch.allclose(edited[0]["samples"], edited[1]["samples"])

    with torch.inference_mode():
        masks = N["VP2P_BoxTrajectory"].execute(width=64, height=64, frames=FRAMES, start_x=0.0, start_y=0.0, start_w=0.5,
                                                start_h=0.5, end_x=0.5, end_y=0.5, end_w=0.5, end_h=0.5, shape="box",
                                                easing="linear").result[0]
        guider = N["VP2P_CrossAttentionGuidance"].execute(model=model, positive=encode(clip, SOURCE), negative=encode(clip, ""),
                                                          cfg=7.5, clip=clip, prompt=SOURCE, word="cat", target_masks=masks,
                                                          strength=20.0, schedule="every_step").result[0]
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).cpu()
        out = SamplerCustomAdvanced.execute(Noise_RandomNoise(0), guider, comfy.samplers.sampler_object("euler"), sigmas,
                                            {"samples": torch.zeros(FRAMES, 4, 8, 8)}).result[0]["samples"]
    assert torch.isfinite(out).all() and guider.energies and all(e == e for _, e in guider.energies)
