"""ComfyUI host: Box Trajectory Masks and the Cross-Attention Guidance GUIDER with the stock SamplerCustomAdvanced."""

from __future__ import annotations

import pytest
import torch

from tests.host.comfy_env import comfy_eps, encode, inflated, make_clip, nodes_of

FRAMES = 2
PROMPT = "a red ball on a table"


@pytest.fixture(scope="module")
def clip(comfy_path):
    return make_clip(0)


def sample(guider, latent, steps=4, seed=0):
    """Stock SamplerCustomAdvanced with Euler on the model's normal schedule."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    ms = guider.model_patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", steps).cpu()
    with torch.inference_mode():
        out = SamplerCustomAdvanced.execute(Noise_RandomNoise(seed), guider, comfy.samplers.sampler_object("euler"), sigmas,
                                            {"samples": latent}).result[0]
    return out["samples"], sigmas


def guidance_node(pack, model, clip, masks, strength, **kw):
    args = dict(positive=encode(clip, PROMPT), negative=encode(clip, ""), cfg=5.0, clip=clip, prompt=PROMPT, word="ball",
                target_masks=masks, strength=strength, schedule="study", layers="all")
    args.update(kw)
    with torch.inference_mode():
        return nodes_of(pack)["VP2P_CrossAttentionGuidance"].execute(model=model, **args).result[0]


def test_box_trajectory_node(pack):
    with torch.inference_mode():
        (m,) = nodes_of(pack)["VP2P_BoxTrajectory"].execute(
            width=64, height=32, frames=3, start_x=0.0, start_y=0.0, start_w=0.25, start_h=0.5, end_x=0.75, end_y=0.5,
            end_w=0.25, end_h=0.5, shape="box", easing="linear").result
    assert m.shape == (3, 32, 64) and m[0, :16, :16].all() and m[2, 16:, 48:].all() and m[1].sum() == 16 * 16


def test_guider_runs_with_stock_sampler_and_zero_strength_is_exact(pack, small_models, clip):
    from comfy_extras.nodes_custom_sampler import Guider_Basic  # noqa: F401  (ComfyUI's own guiders are importable)

    _, base = small_models
    model = inflated(pack, base)
    latent = torch.zeros(FRAMES, 4, 8, 8)
    masks = torch.zeros(FRAMES, 64, 64)
    masks[:, :32, :32] = 1
    x, ctx = torch.randn(FRAMES, 4, 8, 8), torch.randn(FRAMES, 7, 768)
    before = comfy_eps(model, x, 400, ctx)

    plain = guidance_node(pack, model, clip, masks, 0.0)
    zero, sigmas = sample(plain, latent)
    import comfy.samplers

    stock = comfy.samplers.CFGGuider(model)
    stock.set_conds(encode(clip, PROMPT), encode(clip, ""))
    stock.set_cfg(5.0)
    reference, _ = sample(stock, latent)
    assert torch.equal(zero, reference)  # η = 0 reproduces the unguided sampler exactly
    assert plain.energies == []

    guided = guidance_node(pack, model, clip, masks, 20.0)
    moved, _ = sample(guided, latent)
    assert torch.isfinite(moved).all() and not torch.allclose(moved, reference, atol=1e-4)
    steps = [s for s, _ in guided.energies]
    assert steps == [i for i, on in enumerate(pack.vp2p.guidance.default_guided_steps(len(sigmas) - 1)) if on]
    # the default layers (here the middle block only): a recomputed, checkpointed block must see its own
    # transformer options, not the last block's (ComfyUI rewrites them in place during the forward)
    default = guidance_node(pack, model, clip, masks, 20.0, layers="16x16_8x8_middle")
    sample(default, latent)
    assert default.energies and all(e == e for _, e in default.energies)
    assert torch.equal(comfy_eps(model, x, 400, ctx), before)  # the input MODEL is untouched


def test_bad_inputs(pack, small_models, clip):
    _, base = small_models
    masks = torch.ones(FRAMES, 64, 64)
    with pytest.raises(ValueError, match="not a word of the positive prompt"):
        guidance_node(pack, base, clip, masks, 20.0, word="dog")
    with pytest.raises(ValueError, match="empty"):
        guidance_node(pack, base, clip, torch.zeros(FRAMES, 64, 64), 20.0)
    with pytest.raises(ValueError, match="not the text of the positive"):
        guidance_node(pack, base, clip, masks, 20.0, prompt="a blue ball on a table")
    guider = guidance_node(pack, base, clip, torch.ones(3, 64, 64), 20.0)
    with pytest.raises(ValueError, match="target_masks has 3 frames"):
        sample(guider, torch.zeros(FRAMES, 4, 8, 8))


def test_inputs_beyond_the_documented_ones_are_optional(pack):
    """An API prompt written to the node's first contract (no schedule, no layers) is accepted: both are optional
    with their defaults."""
    info = nodes_of(pack)["VP2P_CrossAttentionGuidance"].INPUT_TYPES()
    assert {"schedule", "layers"} <= set(info.get("optional", {})) and not {"schedule", "layers"} & set(info["required"])
    assert info["optional"]["schedule"][1]["default"] == "study" and info["optional"]["layers"][1]["default"] == "16x16_8x8_middle"
