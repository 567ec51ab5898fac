"""ComfyUI host: Tune on Video on real ComfyUI models."""

from __future__ import annotations

import pytest
import torch

from tests.host.comfy_env import comfy_eps

FRAMES = 3


def video(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 4, 8, 8, generator=g)
    latents = base + 0.3 * torch.randn(FRAMES, 4, 8, 8, generator=g)
    cond = torch.randn(1, 7, 768, generator=g)
    return latents, cond


def nodes_of(pack):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


def inflated(pack, model):
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return nodes_of(pack)["VP2P_InflateT2S"].execute(model=model, frame_attention="first_frame", temporal_attention=True).result[0]


def run_tune(pack, model, steps=3, seed=0, lr=1e-4, progress=None):
    latents, cond = video()
    settings = pack.vp2p.tuning.TuneSettings(steps=steps, learning_rate=lr, seed=seed)
    tune_host = __import__(pack.__name__ + ".nodes.tune_host", fromlist=["tune_model"])
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return tune_host.tune_model(model, [[cond, {}]], latents, settings, progress)


def test_tuning_patches_only_to_q_and_leaves_input_untouched(pack, small_models):
    _, base = small_models
    model = inflated(pack, base)
    x, ctx = torch.randn(FRAMES, 4, 8, 8), torch.randn(FRAMES, 7, 768)
    before = comfy_eps(model, x, 500, ctx)
    base_before = comfy_eps(base, x, 500, ctx)
    tuned, losses = run_tune(pack, model, steps=3)
    assert len(losses) == 3 and all(l > 0 for l in losses)
    keys = set(tuned.patches)
    assert keys and all(k.endswith((".attn1.to_q.weight", ".attn2.to_q.weight")) for k in keys)
    state = model.get_attachment("vp2p_t2s")
    assert len(keys) == 2 * len(state.blocks)
    after_tuned = comfy_eps(tuned, x, 500, ctx)
    assert (after_tuned - before).abs().max() > 1e-6
    # the inputs are bit-identical afterwards, and their temporal layers were not trained
    assert torch.equal(comfy_eps(model, x, 500, ctx), before)
    assert torch.equal(comfy_eps(base, x, 500, ctx), base_before)
    assert all(p.abs().sum() == 0 for n, p in state.bank.named_parameters() if "to_out" in n)
    tuned_bank = tuned.get_attachment("vp2p_t2s").bank
    assert any(p.abs().sum() > 0 for n, p in tuned_bank.named_parameters() if "to_out" in n)


def test_same_seed_same_patches(pack, small_models):
    _, base = small_models
    model = inflated(pack, base)
    a, la = run_tune(pack, model, steps=2, seed=5)
    b, lb = run_tune(pack, model, steps=2, seed=5)
    assert la == lb
    for k in a.patches:
        assert torch.equal(a.patches[k][0][1][0], b.patches[k][0][1][0]), k


def test_first_training_loss_matches_the_diffusers_host(pack, small_models):
    """Same weights, data, seed: the first loss (before any update) agrees across hosts."""
    from vp2p import FrameMode, T2SSettings
    from vp2p.diffusers_host import DiffusersT2S, tune_diffusers
    from vp2p.schedule import sd_alphas_cumprod
    from vp2p.tuning import TuneSettings

    unet, base = small_models
    _, comfy_losses = run_tune(pack, inflated(pack, base), steps=1, seed=2)
    latents, cond = video()
    with DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, True)) as host:
        d_losses = tune_diffusers(host, latents, cond, sd_alphas_cumprod(), TuneSettings(steps=1, learning_rate=1e-4, seed=2))
    assert abs(comfy_losses[0] - d_losses[0]) <= 1e-4 * max(1.0, d_losses[0])


def test_interrupt_leaves_no_trace(pack, small_models):
    import comfy.model_management

    _, base = small_models
    model = inflated(pack, base)
    x, ctx = torch.randn(FRAMES, 4, 8, 8), torch.randn(FRAMES, 7, 768)
    before = comfy_eps(model, x, 400, ctx)

    def interrupt(step, total, loss):
        if step == 2:
            comfy.model_management.interrupt_current_processing(True)

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_tune(pack, model, steps=5, progress=interrupt)
    assert torch.equal(comfy_eps(model, x, 400, ctx), before)
    tuned, losses = run_tune(pack, model, steps=1)  # the next run works
    assert len(losses) == 1


def test_bad_inputs(pack, small_models):
    _, base = small_models
    with pytest.raises(ValueError, match="Inflate to T2S"):
        run_tune(pack, base, steps=1)
    model = inflated(pack, base)
    same, losses = run_tune(pack, model, steps=0)
    assert same is model and losses == []
