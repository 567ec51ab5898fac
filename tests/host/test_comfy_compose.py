"""ComfyUI host: the pack composes with what other nodes put on the MODEL.

Another node's attention replace (installed before Inflate, so the pack chains it) must see every row of
every UNet call, also while a P2P, FateZero or guidance controller edits some of them; with the
controller as an identity edit the result equals the other patch's alone. What other nodes put on the
CONDITIONING (a ControlNet) and on the MODEL's options (a model function wrapper, a post-CFG function) reaches
every stage too, and the Video-P2P Guider under the stock SamplerCustomAdvanced is the Decoupled Sampler.
"""

from __future__ import annotations

import pytest
import torch

from tests.host.comfy_env import encode, host_module, inflated, make_clip, nodes_of

FRAMES = 2
STEPS = 3
SOURCE = "a cat running"
BIAS = 0.05


@pytest.fixture(scope="module")
def clip(comfy_path):
    return make_clip(0)


class ForeignPatch:
    """What an IPAdapter-like node installs: a replace on every attn1/attn2 key that adds to the attention.
    Records, per call, the layer and the rows it sees against the rows of the whole UNet call."""

    def __init__(self, frames: int):
        self.frames = frames
        self.calls: list[tuple[str, tuple, int, int]] = []  # (kind, key, rows seen, rows of the whole call)

    def _fn(self, kind: str):
        def replace(q, k, v, extra_options):
            import comfy.ldm.modules.attention as attention

            key = (*extra_options["block"], extra_options["block_index"])
            self.calls.append((kind, key, q.shape[0], int(extra_options["original_shape"][0])))  # the UNet call's batch
            return attention.optimized_attention(q, k, v, extra_options["n_heads"]) + BIAS

        return replace

    def install(self, pack, model):
        self.keys = host_module(pack, "comfy_host").transformer_blocks(model)
        patched = model.clone()
        for key in self.keys:
            patched.set_model_attn1_replace(self._fn("attn1"), key.block, key.id, key.index)
            patched.set_model_attn2_replace(self._fn("attn2"), key.block, key.id, key.index)
        return patched

    def saw_every_row(self) -> bool:
        """Every call had the whole batch, and every attention of every key was called equally often
        (a layer a controller handled alone would be missing)."""
        from collections import Counter

        per_layer = Counter((kind, key) for kind, key, _, _ in self.calls)
        return (bool(self.calls) and all(seen == whole for _, _, seen, whole in self.calls)
                and len(per_layer) == 2 * len(self.keys) and len(set(per_layer.values())) == 1)


def video(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 8, 8, generator=g) + 0.3 * torch.randn(FRAMES, 4, 8, 8, generator=g)) * 5.0


def invert(pack, model, clip, latents, **kw):
    args = dict(steps=STEPS, cfg=7.5, mode="ddim_only", inner_steps=0, early_stop=1e-5, store_attention=False, use_cache=False)
    args.update(kw)
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_NullTextInvert"].execute(
            model=model, positive=encode(clip, SOURCE), negative=encode(clip, ""), latent={"samples": latents}, **args).result[0]


def p2p(pack, clip, target, cross, self_):
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_P2PController"].execute(
            clip=clip, source_prompt=SOURCE, target_prompt=target, edit="auto", cross_replace=cross, self_replace=self_,
            blend_source_words="", blend_target_words="", blend_threshold=0.3, reweight="").result[0]


def sample(pack, model, inv, control, guidance="decoupled"):
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_DecoupledSampler"].execute(model=model, inversion=inv, control=control, cfg=7.5,
                                                              guidance=guidance).result[0]["samples"]


def test_p2p_identity_edit_equals_the_other_patch_alone_and_it_sees_every_row(pack, small_models, clip):
    _, base = small_models
    spy = ForeignPatch(FRAMES)
    model = inflated(pack, spy.install(pack, base), "first_frame", temporal=True)
    plain_model = inflated(pack, base, "first_frame", temporal=True)
    latents = video()
    # shared null text: with shared_null guidance both branches walk the same path, so the identity edit is exact
    inv = invert(pack, model, clip, latents, mode="shared_null_text", inner_steps=1)
    spy.calls.clear()
    # cross_replace = self_replace = 1: the controller owns the target's conditional rows at every step
    identity = sample(pack, model, inv, p2p(pack, clip, SOURCE, 1.0, 1.0), guidance="shared_null")
    assert spy.saw_every_row(), spy.calls[:5]
    alone = sample(pack, model, inv, p2p(pack, clip, SOURCE, 0.0, 0.0), guidance="shared_null")  # edits no row
    torch.testing.assert_close(identity, alone, atol=1e-4, rtol=1e-4)
    # the other patch does change the result (it is not silently dropped)
    def quick(m):
        return sample(pack, m, invert(pack, m, clip, latents), p2p(pack, clip, SOURCE, 0.0, 0.0))

    assert not torch.allclose(quick(model), quick(plain_model), atol=1e-3)
    # a real edit: still every row of every call
    spy.calls.clear()
    edited = sample(pack, model, inv, p2p(pack, clip, "a tiger running", 0.6, 0.6))
    assert spy.saw_every_row() and torch.isfinite(edited).all()


def test_fatezero_fusion_leaves_the_other_rows_to_the_other_patch(pack, small_models, clip):
    _, base = small_models
    spy = ForeignPatch(FRAMES)
    model = inflated(pack, spy.install(pack, base), "middle_frame", temporal=False)
    inv = invert(pack, model, clip, video(1), store_attention=True)
    with torch.inference_mode():
        control = nodes_of(pack)["VP2P_FateZeroController"].execute(
            clip=clip, source_prompt=SOURCE, target_prompt="a tiger running", cross_replace=0.8, self_replace=0.8,
            blend_words="", blend_threshold=0.3, reweight="", latent_blend=False).result[0]
    spy.calls.clear()
    edited = sample(pack, model, inv, control)
    assert spy.saw_every_row() and torch.isfinite(edited).all()


def test_guidance_leaves_the_other_rows_to_the_other_patch(pack, small_models, clip):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    _, base = small_models
    spy = ForeignPatch(FRAMES)
    model = inflated(pack, spy.install(pack, base), "first_frame", temporal=False)
    masks = torch.zeros(FRAMES, 64, 64)
    masks[:, :32, :32] = 1
    with torch.inference_mode():
        guider = nodes_of(pack)["VP2P_CrossAttentionGuidance"].execute(
            model=model, positive=encode(clip, "a red ball"), negative=encode(clip, ""), cfg=5.0, clip=clip, prompt="a red ball",
            word="ball", target_masks=masks, strength=20.0, schedule="every_step", layers="all").result[0]
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).cpu()
        spy.calls.clear()
        out = SamplerCustomAdvanced.execute(Noise_RandomNoise(0), guider, comfy.samplers.sampler_object("euler"), sigmas,
                                            {"samples": torch.zeros(FRAMES, 4, 8, 8)}).result[0]["samples"]
    assert guider.energies and spy.saw_every_row() and torch.isfinite(out).all()


# --- ControlNet, MODEL wrappers and post-CFG functions in every stage; the Video-P2P Guider ---------------------------

TARGET = "a tiger running"


@pytest.fixture(scope="module")
def controlnet(comfy_path):
    from tests.host.controlnet import load_random_controlnet

    return load_random_controlnet(levels=2, seed=0)


def hint(seed=0):
    """A random IMAGE [frames, H, W, 3] at the latent's pixel size (8× the 8×8 latent)."""
    return torch.rand(FRAMES, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


def with_controlnet(controlnet, positive, negative, strength=1.0, seed=0):
    import nodes

    with torch.inference_mode():
        return nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, controlnet, hint(seed), strength, 0.0, 1.0)


def tune_node(pack, model, positive, latents, steps=2):
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_TuneOnVideo"].execute(model=model, positive=positive, latent={"samples": latents}, steps=steps,
                                                          learning_rate=1e-3, seed=0, use_cache=False).result[0]


def tuned_tensors(pack, tuned) -> list[torch.Tensor]:
    """The tuned to_q deltas and temporal weights of a tuned MODEL, in a fixed order."""
    deltas = [tuned.patches[k][0][1][0].float().cpu() for k in sorted(tuned.patches)]
    bank = tuned.get_attachment("vp2p_t2s").bank.state_dict()
    return deltas + [bank[k].float().cpu() for k in sorted(bank)]


def invert_with(pack, model, positive, negative, latents, **kw):
    args = dict(steps=STEPS, cfg=7.5, mode="ddim_only", inner_steps=0, early_stop=1e-5, store_attention=False, use_cache=False)
    args.update(kw)
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_NullTextInvert"].execute(
            model=model, positive=positive, negative=negative, latent={"samples": latents}, **args).result[0]


def sample_with(pack, model, inv, control, positive=None, negative=None, guidance="decoupled"):
    extra = {} if positive is None else dict(positive=positive, negative=negative)
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_DecoupledSampler"].execute(model=model, inversion=inv, control=control, cfg=7.5,
                                                              guidance=guidance, **extra).result[0]["samples"]


def fatezero_control(pack, clip, target="a red cat running"):
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_FateZeroController"].execute(
            clip=clip, source_prompt=SOURCE, target_prompt=target, cross_replace=0.8, self_replace=0.8,
            blend_words="", blend_threshold=0.3, reweight="", latent_blend=False).result[0]


def differs(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return bool(torch.isfinite(a).all() and torch.isfinite(b).all() and (a - b).norm() > rel * b.norm())


def test_controlnet_reaches_every_stage(pack, small_models, clip, controlnet, caplog, tmp_path):
    """A ControlNet applied (stock Apply ControlNet, strength 1) to the positive and negative CONDITIONING changes
    Tune on Video, Shared Null-Text Invert, and the Decoupled Sampler (given it as its positive/negative) with a P2P
    and with a FateZero control; at strength 0 ComfyUI hands back the very same CONDITIONING, and the sampler given a
    plain CONDITIONING equals the sampler given none."""
    import logging

    _, base = small_models
    latents = video(2)
    pos, neg = encode(clip, SOURCE), encode(clip, "")
    cn_pos, cn_neg = with_controlnet(controlnet, pos, neg)
    assert cn_pos is not pos and "control" in cn_pos[0][1] and "control" in cn_neg[0][1]
    # strength 0: ComfyUI returns its inputs unchanged (no ControlNet at all)
    off_pos, off_neg = with_controlnet(controlnet, pos, neg, strength=0.0)
    assert off_pos is pos and off_neg is neg

    # Decoupled Sampler, P2P: one inversion; only the sampler's conditioning differs
    model = inflated(pack, base, "first_frame", temporal=True)
    inv = invert_with(pack, model, pos, neg, latents)
    control = p2p(pack, clip, TARGET, 0.4, 0.4)
    tpos, tneg = encode(clip, TARGET), encode(clip, "")
    tcn_pos, tcn_neg = with_controlnet(controlnet, tpos, tneg)
    plain = sample_with(pack, model, inv, control)
    assert differs(sample_with(pack, model, inv, control, tcn_pos, tcn_neg), plain)
    # a CONDITIONING without extras (what strength 0 gives) changes nothing: its text rows are the controller's
    same = sample_with(pack, model, inv, control, *with_controlnet(controlnet, tpos, tneg, strength=0.0))
    torch.testing.assert_close(same, plain, atol=1e-6, rtol=0)

    # Attention Maps: its one UNet call honours the positive's ControlNet too
    def maps(**extra):
        with torch.inference_mode():
            return nodes_of(pack)["VP2P_AttentionMaps"].execute(model=model, inversion=inv, control=control, source_words="cat",
                                                                target_words="tiger", at_step=0.5, threshold=0.3, **extra).result[0]

    assert differs(maps(positive=with_controlnet(controlnet, pos, neg)[0]), maps())

    # Decoupled Sampler, FateZero: an inversion that stored attention, zero-shot inflation
    fz_model = inflated(pack, base, "middle_frame", temporal=False)
    fz_inv = invert_with(pack, fz_model, pos, neg, latents, store_attention=True)
    fz = fatezero_control(pack, clip)
    fz_tpos = encode(clip, "a red cat running")
    fz_cn_pos, fz_cn_neg = with_controlnet(controlnet, fz_tpos, tneg)
    fz_plain = sample_with(pack, fz_model, fz_inv, fz)
    assert differs(sample_with(pack, fz_model, fz_inv, fz, fz_cn_pos, fz_cn_neg), fz_plain)
    fz_same = sample_with(pack, fz_model, fz_inv, fz, *with_controlnet(controlnet, fz_tpos, tneg, strength=0.0))
    torch.testing.assert_close(fz_same, fz_plain, atol=1e-6, rtol=0)

    # Tune on Video: same seed, same data; the ControlNet's residuals change the losses and the tuned weights
    with caplog.at_level(logging.INFO, logger="VideoP2P"):
        caplog.clear()
        plain_tuned = tune_node(pack, model, pos, latents)
        plain_log = [r.getMessage() for r in caplog.records if "loss" in r.getMessage()]
        caplog.clear()
        cn_tuned = tune_node(pack, model, cn_pos, latents)
        cn_log = [r.getMessage() for r in caplog.records if "loss" in r.getMessage()]
    assert plain_log and cn_log and plain_log != cn_log, (plain_log, cn_log)
    a, b = tuned_tensors(pack, plain_tuned), tuned_tensors(pack, cn_tuned)
    assert len(a) == len(b) and any(not torch.equal(x, y) for x, y in zip(a, b))
    again = tuned_tensors(pack, tune_node(pack, model, off_pos, latents))  # strength 0 = no ControlNet, bit for bit
    assert all(torch.equal(x, y) for x, y in zip(a, again))

    # Shared Null-Text Invert: the DDIM trajectory (z_T) and the optimised null embeddings change
    plain_inv = invert_with(pack, model, pos, neg, latents, mode="shared_null_text", inner_steps=1)
    cn_inv = invert_with(pack, model, cn_pos, cn_neg, latents, mode="shared_null_text", inner_steps=1)
    assert differs(cn_inv.z_t, plain_inv.z_t) and differs(cn_inv.trajectory, plain_inv.trajectory)
    assert differs(cn_inv.null_embeddings, plain_inv.null_embeddings, rel=1e-7)

    # a cache key cannot capture a ControlNet: its inversion is computed, never served from the plain one's file
    host = host_module(pack, "invert_host")
    inversion = pack.vp2p.inversion
    settings = inversion.InversionSettings(steps=STEPS, mode=inversion.InversionMode.DDIM_ONLY, inner_steps=0)
    with torch.inference_mode():
        cached_plain = host.invert_cached(model, pos, neg, latents, settings, tmp_path)
        cached_cn = host.invert_cached(model, cn_pos, cn_neg, latents, settings, tmp_path)
    assert len(list(tmp_path.glob("inversion_*.safetensors"))) == 1
    assert differs(cached_cn.z_t, cached_plain.z_t)


class Counting:
    """A MODEL's ``model_function_wrapper`` and a post-CFG function, counting their calls."""

    def __init__(self):
        self.wrapper = 0
        self.post_cfg = 0

    def wrap(self, apply_model, args):
        self.wrapper += 1
        return apply_model(args["input"], args["timestep"], **args["c"])

    def post(self, args):
        self.post_cfg += 1
        return args["denoised"]

    def install(self, model):
        patched = model.clone()
        patched.set_model_unet_function_wrapper(self.wrap)
        patched.set_model_sampler_post_cfg_function(self.post)
        return patched

    def during(self, run):
        """(wrapper calls, post-CFG calls, result) of ``run()``."""
        w, p = self.wrapper, self.post_cfg
        result = run()
        return self.wrapper - w, self.post_cfg - p, result


def test_model_function_wrapper_and_post_cfg_run_in_every_stage(pack, small_models, clip):
    """A ``model_function_wrapper`` and a post-CFG function set on the MODEL before Inflate run in the pack's stages.

    The wrapper wraps every UNet evaluation, so it runs in every stage: Tune on Video, DDIM inversion, null-text
    optimisation, the Decoupled Sampler (P2P and FateZero) and Attention Maps. The post-CFG function runs where
    cond and uncond are combined by guidance — the null-text optimisation, the P2P edit and the FateZero edit — and
    in no other stage: not in tuning (conditional noise prediction only), not in a DDIM-only inversion (conditional
    only), not in Attention Maps (one conditional call)."""
    _, base = small_models
    spy = Counting()
    wrapped = spy.install(base)
    latents = video(3)
    pos, neg = encode(clip, SOURCE), encode(clip, "")
    model = inflated(pack, wrapped, "first_frame", temporal=True)
    assert model.model_options.get("model_function_wrapper") == spy.wrap  # Inflate keeps the MODEL's options

    w, p, tuned = spy.during(lambda: tune_node(pack, model, pos, latents, steps=1))
    assert w >= 1 and p == 0, (w, p)
    w, p, inv = spy.during(lambda: invert_with(pack, tuned, pos, neg, latents, mode="shared_null_text", inner_steps=1))
    assert w > STEPS and p >= 1, (w, p)  # DDIM's STEPS calls, then the null-text optimisation's guided calls
    w, p, _ = spy.during(lambda: invert_with(pack, tuned, pos, neg, latents))
    assert w == STEPS and p == 0, (w, p)
    control = p2p(pack, clip, TARGET, 0.4, 0.4)
    w, p, edited = spy.during(lambda: sample_with(pack, tuned, inv, control))
    assert w >= STEPS and p >= STEPS and torch.isfinite(edited).all(), (w, p)
    with torch.inference_mode():
        maps = nodes_of(pack)["VP2P_AttentionMaps"].execute
        w, p, _ = spy.during(lambda: maps(model=tuned, inversion=inv, control=control, source_words="cat", target_words="tiger",
                                          at_step=0.5, threshold=0.3))
    assert w >= 1 and p == 0, (w, p)

    fz_model = inflated(pack, wrapped, "middle_frame", temporal=False)
    w, p, fz_inv = spy.during(lambda: invert_with(pack, fz_model, pos, neg, latents, store_attention=True))
    assert w == STEPS and p == 0, (w, p)
    w, p, fz_edited = spy.during(lambda: sample_with(pack, fz_model, fz_inv, fatezero_control(pack, clip)))
    assert w >= STEPS and p >= STEPS and torch.isfinite(fz_edited).all(), (w, p)


def test_guider_with_sampler_custom_advanced_equals_the_sampler_node(pack, small_models, clip):
    """The Video-P2P Guider's outputs under the stock SamplerCustomAdvanced (Disable Noise, euler) give the Decoupled
    Sampler's edited latent exactly, for a P2P and a FateZero control; sigmas that are not the inversion's are
    refused with a SettingsError (a ValueError) naming the inversion's steps."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_EmptyNoise, SamplerCustomAdvanced

    _, base = small_models
    latents = video(4)
    pos, neg = encode(clip, SOURCE), encode(clip, "")

    def guided(model, inv, control, sigmas=None):
        with torch.inference_mode():
            guider, own_sigmas, start = nodes_of(pack)["VP2P_Guider"].execute(model=model, inversion=inv, control=control, cfg=7.5,
                                                                              guidance="decoupled").result
            out = SamplerCustomAdvanced.execute(Noise_EmptyNoise(), guider, comfy.samplers.sampler_object("euler"),
                                                own_sigmas if sigmas is None else sigmas, start)
        return out.result[0]["samples"]

    model = inflated(pack, base, "first_frame", temporal=True)
    inv = invert_with(pack, model, pos, neg, latents, mode="shared_null_text", inner_steps=1)
    control = p2p(pack, clip, TARGET, 0.4, 0.4)
    p2p_guided = guided(model, inv, control)
    assert torch.isfinite(p2p_guided).all() and torch.equal(p2p_guided, sample_with(pack, model, inv, control))

    fz_model = inflated(pack, base, "middle_frame", temporal=False)
    fz_inv = invert_with(pack, fz_model, pos, neg, latents, store_attention=True)
    fz = fatezero_control(pack, clip)
    fz_guided = guided(fz_model, fz_inv, fz)
    assert torch.isfinite(fz_guided).all() and torch.equal(fz_guided, sample_with(pack, fz_model, fz_inv, fz))

    other = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).cpu()
    assert other.shape == inv.schedule.sigmas.shape and not torch.allclose(other, inv.schedule.sigmas.float().cpu())
    for sigmas in (other, inv.schedule.sigmas.float().cpu()[1:]):  # other values; fewer steps
        with pytest.raises(pack.vp2p.SettingsError, match=f"inversion's {STEPS} steps") as caught:
            guided(model, inv, control, sigmas)
        assert isinstance(caught.value, ValueError)


def test_stages_ask_comfyui_for_the_memory_of_the_rows_they_run(pack, small_models, clip, monkeypatch):
    """ComfyUI's model loading estimates for 2 × the noise batch (cond + uncond of one latent); each stage
    tells it its real rows: the edit 4F (both branches, both kinds), the null-text inversion F rows with
    backward passes (×2 allowance), a DDIM-only inversion F."""
    import comfy.sampler_helpers

    seen: list[int] = []
    original = comfy.sampler_helpers.estimate_memory

    def spy(model, noise_shape, conds):
        seen.append(int(noise_shape[0]))
        return original(model, noise_shape, conds)

    monkeypatch.setattr(comfy.sampler_helpers, "estimate_memory", spy)
    _, base = small_models
    model = inflated(pack, base, "first_frame", temporal=True)
    latents = video(3)
    inv = invert(pack, model, clip, latents)  # ddim_only: F rows per call
    assert seen == [(FRAMES + 1) // 2]
    seen.clear()
    invert(pack, model, clip, latents, mode="shared_null_text", inner_steps=1)
    assert seen == [FRAMES]  # F rows × 2 for the backward passes
    seen.clear()
    sample(pack, model, inv, p2p(pack, clip, "a tiger running", 0.4, 0.4))
    assert seen == [2 * FRAMES]  # 4F rows


def test_backward_passes_never_compute_in_half_precision(pack):
    """fp16 gradients overflow or vanish without loss scaling: backward passes use bf16 where the device
    has it, else fp32."""
    autograd_host = host_module(pack, "autograd_host")
    assert autograd_host.backward_dtype("cpu", torch.float16) == torch.float32
    assert autograd_host.backward_dtype("cpu", torch.float32) == torch.float32


def test_a_patch_put_on_after_inflate_is_chained_not_a_silent_loss_of_the_pack(pack, small_models, clip):
    """Another node's attention replace put on the inflated MODEL replaces the pack's patch on those keys; every
    stage installs the pack's patch again on a clone and chains it: the same result as with the patch put on
    before Inflate, and the foreign patch still sees every row."""
    _, base = small_models
    before = ForeignPatch(FRAMES)
    model_before = inflated(pack, before.install(pack, base), "first_frame", temporal=False)
    after = ForeignPatch(FRAMES)
    model_after = after.install(pack, inflated(pack, base, "first_frame", temporal=False))
    latents = video(4)
    control = p2p(pack, clip, "a tiger running", 0.6, 0.6)
    a = sample(pack, model_before, invert(pack, model_before, clip, latents), control)
    after.calls.clear()
    b = sample(pack, model_after, invert(pack, model_after, clip, latents), control)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert after.saw_every_row()


def test_caches_are_skipped_for_a_model_another_node_wrapped(pack, small_models, clip, tmp_path):
    """A model_function_wrapper changes what the UNet computes, not the weights a cache key fingerprints: such a
    MODEL's inversion is computed, never served from (or written to) the cache."""
    _, base = small_models
    counting = Counting()
    model = inflated(pack, base, "first_frame", temporal=False)
    wrapped = counting.install(model)
    host = host_module(pack, "invert_host")
    inversion = pack.vp2p.inversion
    settings = inversion.InversionSettings(steps=STEPS, mode=inversion.InversionMode.DDIM_ONLY, inner_steps=0)
    latents = video(5)
    pos, neg = encode(clip, SOURCE), encode(clip, "")
    with torch.inference_mode():
        host.invert_cached(model, pos, neg, latents, settings, tmp_path)
        assert len(list(tmp_path.glob("inversion_*.safetensors"))) == 1
        calls, _, _ = counting.during(lambda: host.invert_cached(wrapped, pos, neg, latents, settings, tmp_path))
    assert calls == STEPS and len(list(tmp_path.glob("inversion_*.safetensors"))) == 1


class ProjectingPatch:
    """What an IPAdapter-style node brings: an attn2 replace with its own projection weights, created (as ComfyUI's
    loaders create everything) under inference mode, so they are inference tensors that also carry requires_grad."""

    def __init__(self, dim: int = 320):
        with torch.inference_mode():
            self.proj = torch.nn.Linear(dim, dim)
            torch.nn.init.normal_(self.proj.weight, std=0.02)
        assert self.proj.weight.is_inference() and self.proj.weight.requires_grad

    def replace(self, q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention

        out = attention.optimized_attention(q, k, v, extra_options["n_heads"])
        return out + torch.nn.functional.linear(out, self.proj.weight[: out.shape[-1], : out.shape[-1]])

    def install(self, pack, model):
        patched = model.clone()
        for key in host_module(pack, "comfy_host").transformer_blocks(model):
            patched.set_model_attn2_replace(self.replace, key.block, key.id, key.index)
        return patched


def test_backward_passes_run_through_another_nodes_inference_tensors(pack, small_models, clip):
    """Null-text optimisation and tuning through an attention patch whose weights are inference tensors (before:
    "Inference tensors cannot be saved for backward"); the patch acts (the result differs from the MODEL without it)
    and neither its weights nor any UNet weight receives a gradient."""
    _, base = small_models
    foreign = ProjectingPatch(1280)
    model = inflated(pack, foreign.install(pack, base), "first_frame", temporal=True)
    latents = video(7)
    inv = invert(pack, model, clip, latents, mode="shared_null_text", inner_steps=2, early_stop=1e-9)
    plain = invert(pack, inflated(pack, base, "first_frame", temporal=True), clip, latents, mode="shared_null_text", inner_steps=2,
                   early_stop=1e-9)
    assert torch.isfinite(inv.null_embeddings).all() and not torch.allclose(inv.null_embeddings, plain.null_embeddings)
    with torch.inference_mode():
        tuned = nodes_of(pack)["VP2P_TuneOnVideo"].execute(model=model, positive=encode(clip, SOURCE), latent={"samples": latents},
                                                           steps=2, learning_rate=1e-3, seed=0, use_cache=False).result[0]
    assert tuned is not model
    assert foreign.proj.weight.grad is None
    assert all(p.grad is None for p in base.model.parameters())
