"""ComfyUI host: P2P Controller + Decoupled Sampler on real ComfyUI models and a real SD1 CLIP."""

from __future__ import annotations

import pytest
import torch

from tests.host.comfy_env import comfy_eps, encode, host_module, inflated, make_clip, nodes_of
from tests.host.family_checks import controller  # the same P2P Controller settings (source prompt: SOURCE)

FRAMES = 3
STEPS = 3
SOURCE = "a cat running"


@pytest.fixture(scope="module")
def clip(comfy_path):
    return make_clip(0)


def video(seed=0, frames=FRAMES, h=8, w=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, h, w, generator=g) + 0.3 * torch.randn(frames, 4, h, w, generator=g)) * 5.0


def invert(pack, model, clip, latents, mode="shared_null_text"):
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_NullTextInvert"].execute(
            model=model, positive=encode(clip, SOURCE), negative=encode(clip, ""), latent={"samples": latents}, steps=STEPS,
            cfg=7.5, mode=mode, inner_steps=2, early_stop=1e-5, store_attention=False, use_cache=False).result


def sample(pack, model, inv, control, guidance="decoupled", cfg=7.5):
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_DecoupledSampler"].execute(model=model, inversion=inv, control=control, cfg=cfg,
                                                              guidance=guidance).result


@pytest.fixture(scope="module")
def edited_setup(pack, small_models, clip):
    _, base = small_models
    model = inflated(pack, base)
    latents = video()
    inv, _ = invert(pack, model, clip, latents)
    return model, latents, inv


def test_controller_defaults_are_the_official_codes(pack):
    """The P2P Controller's cross_replace/self_replace default to the official run_videop2p.py's 0.2/0.5."""
    node = nodes_of(pack)["VP2P_P2PController"]
    inputs = {i.id: i for i in node.GET_SCHEMA().inputs}
    assert (inputs["cross_replace"].default, inputs["self_replace"].default) == (0.2, 0.5)
    required = node.INPUT_TYPES()["required"]
    assert required["cross_replace"][1]["default"] == 0.2 and required["self_replace"][1]["default"] == 0.5
    assert "0.2" in inputs["cross_replace"].tooltip and "0.5" in inputs["self_replace"].tooltip


def test_edit_end_to_end_and_identity(pack, edited_setup, clip):
    model, latents, inv = edited_setup
    x, ctx = torch.randn(FRAMES, 4, 8, 8), torch.randn(FRAMES, 7, 768)
    before = comfy_eps(model, x, 400, ctx)
    edited, source = sample(pack, model, inv, controller(pack, clip))
    assert edited["samples"].shape == latents.shape and source["samples"].shape == latents.shape
    assert not torch.allclose(edited["samples"], source["samples"], atol=1e-2)
    # the source output is the inversion's reconstruction (its null-text walk)
    walk_end = model.model.latent_format.process_out(inv.source_path[-1] / torch.sqrt(1 + inv.schedule.sigmas[-1] ** 2))
    torch.testing.assert_close(source["samples"], walk_end, atol=1e-4, rtol=1e-4)
    # identity: target == source with shared null reproduces the source
    same, src = sample(pack, model, inv, controller(pack, clip, target=SOURCE), guidance="shared_null")
    torch.testing.assert_close(same["samples"], src["samples"], atol=1e-3, rtol=1e-3)
    assert torch.equal(comfy_eps(model, x, 400, ctx), before)  # the input MODEL is untouched


def test_reuse_equals_full_and_local_blend_is_exact_outside(pack, edited_setup, clip):
    model, latents, inv = edited_setup
    host = host_module(pack, "p2p_host")
    guidance = pack.vp2p.edit.Guidance.DECOUPLED
    edit = controller(pack, clip, blend_source_words="cat", blend_target_words="tiger", blend_threshold=0.99)
    with torch.inference_mode():
        full, blend = host.run_edit(model, inv, edit, 7.5, guidance, reuse=False)
        reused, _ = host.run_edit(model, inv, edit, 7.5, guidance, reuse=True)
    torch.testing.assert_close(reused.edited, full.edited, atol=1e-4, rtol=1e-4)
    # every chunk holds the same branches through calc_cond_batch: 4F rows while the source is read (blending: always)
    assert full.rows == [4 * FRAMES] * STEPS and reused.rows == [4 * FRAMES] * STEPS
    m = blend.last_mask.expand_as(full.edited)
    assert 0 < m.sum() < m.numel()
    assert torch.equal(full.edited[~m.cpu()], full.source[~m.cpu()])
    plain = controller(pack, clip, cross_replace=0.4, self_replace=0.0)
    with torch.inference_mode():
        res, _ = host.run_edit(model, inv, plain, 7.5, guidance, reuse=True)
    assert res.rows == [4 * FRAMES] + [2 * FRAMES] * (STEPS - 1)  # source rows only while cross-attention is replaced


def test_same_edit_as_the_diffusers_host(pack, small_models, edited_setup, clip):
    """The ComfyUI adapter and the diffusers adapter give the same edit on the same weights."""
    import importlib

    unet, _ = small_models
    model, latents, inv = edited_setup
    edit = controller(pack, clip)
    host = host_module(pack, "p2p_host")
    with torch.inference_mode():
        comfy_res, _ = host.run_edit(model, inv, edit, 7.5, pack.vp2p.edit.Guidance.DECOUPLED)
    vp = pack.vp2p
    dh = importlib.import_module(f"{pack.__name__}.vp2p.diffusers_host")
    edit_mod, p2p = vp.edit, importlib.import_module(f"{pack.__name__}.vp2p.p2p")
    with dh.DiffusersT2S(unet, vp.T2SSettings(vp.FrameMode.FIRST_FRAME, True)) as dhost, torch.no_grad():
        den = dhost.denoiser(vp.schedule.sd_alphas_cumprod())
        inputs = edit_mod.EditInputs(inv.z_t, inv.schedule, inv.cond, inv.null_embeddings, inv.negative, inv.cfg, inv.source_path)
        diff_res = edit_mod.decoupled_edit(den, inputs, edit.target_cond, 7.5, edit_mod.Guidance.DECOUPLED,
                                           p2p.P2PController(edit, inv.schedule))
    torch.testing.assert_close(comfy_res.edited.cpu(), diff_res.edited, atol=2e-3, rtol=2e-3)


def test_non_square_odd_frames(pack, small_models, clip):
    _, base = small_models
    model = inflated(pack, base)
    latents = video(3, frames=5, h=12, w=8)  # 5 frames of 96×64
    inv, noise = invert(pack, model, clip, latents, mode="ddim_only")
    edited, source = sample(pack, model, inv, controller(pack, clip, target="a big tiger running", blend_source_words="cat",
                                                            blend_target_words="tiger"), guidance="fast")
    assert edited["samples"].shape == (5, 4, 12, 8) and torch.isfinite(edited["samples"]).all()


def test_bad_inputs_are_clear(pack, small_models, edited_setup, clip):
    model, latents, inv = edited_setup
    cases = [
        (dict(edit="replace", target_prompt="a big tiger running"), "refine"),
        (dict(blend_source_words="dog"), "not a word of the source prompt"),
        (dict(blend_target_words="cat"), "not a word of the target prompt"),
        (dict(reweight="tiger=2"), "word:number"),
        (dict(reweight="cat:2"), "not a word of the target prompt"),
        (dict(target_prompt=" ".join(["tiger"] * 80)), "75"),
        (dict(target_prompt="a (tiger:1.2) running", reweight="cat:2"), "not a word of the target prompt"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            controller(pack, clip, **change)
    with pytest.raises(ValueError, match="not the prompt the video was inverted with"):
        sample(pack, model, inv, controller(pack, clip, source_prompt="a dog running", target_prompt="a tiger running"))
    _, base = small_models
    other = inflated(pack, base, "sparse_causal")
    with pytest.raises(ValueError, match="different model"):
        sample(pack, other, inv, controller(pack, clip))
    with pytest.raises(ValueError, match="P2P Controller"):
        sample(pack, model, inv, "not a control")


def test_weighted_prompts_keep_their_weights_and_align_on_the_words(pack, clip):
    """'(tiger:1.3)' is the word 'tiger' at weight 1.3: the alignment is the plain prompt's, the embedding
    exactly CLIP Text Encode's of the same text (not the plain text's)."""
    words = dict(reweight="tiger:2", blend_source_words="cat", blend_target_words="tiger", cross_replace_words="tiger:0.5")
    plain = controller(pack, clip, "a tiger running", **words)
    weighted = controller(pack, clip, "a ((tiger:1.3)) running", source_prompt="(a cat:0.9) running", **words)
    for a, b in ((weighted.source, plain.source), (weighted.target, plain.target)):
        assert (a.words, a.ids, a.spans) == (b.words, b.ids, b.spans)
    assert weighted.kind == plain.kind and torch.equal(weighted.mapper, plain.mapper)
    assert torch.equal(weighted.reweight, plain.reweight) and weighted.cross_words == plain.cross_words
    assert weighted.blend.source_positions == plain.blend.source_positions == (2,)
    assert weighted.target.weights == (1.0, 1.3, 1.0) and weighted.source.weights == (0.9, 0.9, 1.0) and plain.target.weights == ()
    for edit, source, target in ((weighted, "(a cat:0.9) running", "a ((tiger:1.3)) running"), (plain, SOURCE, "a tiger running")):
        assert torch.equal(edit.source_cond, encode(clip, source)[0][0].float().cpu())
        assert torch.equal(edit.target_cond, encode(clip, target)[0][0].float().cpu())
    assert (weighted.target_cond - plain.target_cond).abs().max() > 1e-3
    refine = controller(pack, clip, "a (big:1.2) tiger running")
    assert refine.kind.value == "refine" and refine.target.words == ("a", "big", "tiger", "running")


def test_embeddings_in_prompts(pack, tmp_path):
    """'embedding:name' is a word whose span is the embedding's vectors; the same embedding pairs in both
    prompts; a missing one is refused by name (CLIP Text Encode would drop it silently)."""
    import comfy.sd
    from safetensors.torch import save_file

    from tests.host.checkpoint import _clip_state_dict

    save_file({"clip_l": torch.randn(2, 768, generator=torch.Generator().manual_seed(3))}, str(tmp_path / "mystyle.safetensors"))
    with torch.inference_mode():
        eclip = comfy.sd.load_text_encoder_state_dicts([_clip_state_dict(0)], embedding_directory=str(tmp_path),
                                                       clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    source, target = "a cat running, embedding:mystyle", "a tiger running, (embedding:mystyle:1.2)"
    edit = controller(pack, eclip, target, source_prompt=source, reweight="embedding:mystyle:1.5")
    assert edit.kind.value == "replace" and edit.target.words[-1] == "embedding:mystyle"
    assert edit.target.spans[-1] == (5, 7) and edit.target.ids[-2:] == edit.source.ids[-2:] and min(edit.target.ids) < 0
    assert edit.target.weights[-2:] == (1.2, 1.2) and edit.reweight[5:7].tolist() == [1.5, 1.5]
    assert torch.equal(edit.target_cond, encode(eclip, target)[0][0].float().cpu())
    refine = controller(pack, eclip, "a big tiger running, embedding:mystyle", source_prompt=source)
    assert refine.kind.value == "refine" and refine.mapper[6:8].tolist() == [5, 6]  # the embedding's vectors pair
    with pytest.raises(ValueError, match="'embedding:nothere'.*embeddings folder"):
        controller(pack, eclip, "a tiger running embedding:nothere")


def test_attention_maps_node(pack, edited_setup, clip):
    model, latents, inv = edited_setup
    control = controller(pack, clip, blend_source_words="cat", blend_target_words="tiger")
    node = nodes_of(pack)["VP2P_AttentionMaps"]
    with torch.inference_mode():
        src, tgt, mask = node.execute(model=model, inversion=inv, control=control, source_words="", target_words="",
                                      at_step=0.5, threshold=0.99).result
        other, _, _ = node.execute(model=model, inversion=inv, control=control, source_words="running", target_words="",
                                   at_step=0.5, threshold=0.99).result
    assert src.shape == (FRAMES, 64, 64, 3) and tgt.shape == src.shape and mask.shape == (FRAMES, 64, 64)
    assert 0 <= float(src.min()) and float(src.max()) <= 1 and float(src[..., 0].max()) == 1.0  # normalised per frame
    assert 0 < float(mask.mean()) < 1
    assert not torch.equal(src, other)  # another word, other maps
    with pytest.raises(ValueError, match="not a word of the source prompt"), torch.inference_mode():
        node.execute(model=model, inversion=inv, control=control, source_words="dog", target_words="", at_step=0.5, threshold=0.3)


def test_sampler_interrupts_cleanly(pack, edited_setup, clip):
    import comfy.model_management

    model, latents, inv = edited_setup
    host = host_module(pack, "p2p_host")
    x, ctx = torch.randn(FRAMES, 4, 8, 8), torch.randn(FRAMES, 7, 768)
    before = comfy_eps(model, x, 400, ctx)
    steps = []

    def on_step(i, latent):
        steps.append(i)
        comfy.model_management.interrupt_current_processing(True)

    with pytest.raises(comfy.model_management.InterruptProcessingException), torch.inference_mode():
        host.run_edit(model, inv, controller(pack, clip), 7.5, pack.vp2p.edit.Guidance.DECOUPLED, callback=on_step)
    assert steps == [0]  # stopped before the second step
    assert torch.equal(comfy_eps(model, x, 400, ctx), before)
    edited, _ = sample(pack, model, inv, controller(pack, clip))  # the next run works
    assert torch.isfinite(edited["samples"]).all()


def test_start_from_noise_with_identical_prompts_reproduces_plain_generation(pack, small_models, clip):
    _, base = small_models
    model = inflated(pack, base)
    with torch.inference_mode():
        inv, noise = nodes_of(pack)["VP2P_NoiseInversion"].execute(seed=3, width=64, height=64, frames=FRAMES,
                                                                   negative=encode(clip, ""), steps=STEPS).result
    assert inv.generated and inv.z_t.shape == (FRAMES, 4, 8, 8)
    same, source = sample(pack, model, inv, controller(pack, clip, target=SOURCE), guidance="decoupled", cfg=6.0)
    torch.testing.assert_close(same["samples"], source["samples"], atol=1e-4, rtol=1e-4)
    # the source branch is plain cfg-guided DDIM from the noise with the source prompt
    den = host_module(pack, "autograd_host").denoiser(model)
    with torch.inference_mode():
        plain = pack.vp2p.inversion.reconstruct(den, inv.z_t, encode(clip, SOURCE)[0][0], inv.schedule, 6.0, inv.null_embeddings)
    torch.testing.assert_close(source["samples"], model.model.latent_format.process_out(plain), atol=1e-3, rtol=1e-3)
    edited, _ = sample(pack, model, inv, controller(pack, clip), guidance="decoupled", cfg=6.0)
    assert not torch.allclose(edited["samples"], source["samples"], atol=1e-2)
