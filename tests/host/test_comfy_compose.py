"""ComfyUI host: the pack composes with what other nodes put on the MODEL.

Another node's attention replace (installed before Inflate, so the pack chains it) must see every row of
every UNet call, also while a P2P, FateZero or guidance controller edits some of them; with the
controller as an identity edit the result equals the other patch's alone.
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
