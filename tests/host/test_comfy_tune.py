"""ComfyUI host: Tune on Video on real ComfyUI models."""

from __future__ import annotations

import pytest
import torch

from tests.host.comfy_env import comfy_eps, host_module, inflated, nodes_of

FRAMES = 3


def video(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 4, 8, 8, generator=g)
    latents = base + 0.3 * torch.randn(FRAMES, 4, 8, 8, generator=g)
    cond = torch.randn(1, 7, 768, generator=g)
    return latents, cond


def run_tune(pack, model, steps=3, seed=0, lr=1e-4, progress=None):
    latents, cond = video()
    settings = pack.vp2p.tuning.TuneSettings(steps=steps, learning_rate=lr, seed=seed)
    tune_host = host_module(pack, "tune_host")
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        weights, losses = tune_host.tune_weights(model, [[cond, {}]], latents, settings, progress)
        return (tune_host.apply_tuned(model, weights) if weights is not None else model), losses


def test_tuning_patches_only_to_q_and_leaves_input_untouched(pack, small_models):
    _, base = small_models
    model = inflated(pack, base)
    x, ctx = torch.randn(FRAMES, 4, 8, 8), torch.randn(FRAMES, 7, 768)
    before = comfy_eps(model, x, 500, ctx)
    base_before = comfy_eps(base, x, 500, ctx)
    tuned, losses = run_tune(pack, model, steps=3)
    assert len(losses) == 3 and all(v > 0 for v in losses)
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


def test_tuning_freezes_the_temporal_norm(pack, small_models):
    """As the reference: the temporal attention's q/k/v/out projections train, its LayerNorm does not."""
    _, base = small_models
    model = inflated(pack, base)
    before = {n: p.detach().clone() for n, p in model.get_attachment("vp2p_t2s").bank.named_parameters()}
    tuned, _ = run_tune(pack, model, steps=3, lr=1e-3)
    after = {n: p.detach().cpu() for n, p in tuned.get_attachment("vp2p_t2s").bank.named_parameters()}
    assert set(after) == set(before)
    norms = [n for n in before if ".norm." in n]
    projections = [n for n in before if n.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "to_out")]
    assert norms and len(norms) + len(projections) == len(before)
    for n in norms:
        assert torch.equal(after[n], before[n].cpu()), n
    for n in projections:
        assert not torch.equal(after[n], before[n].cpu()), n
    assert all(p[0][1][0].abs().sum() > 0 for p in tuned.patches.values())  # every to_q delta moved


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
    # a LATENT holds VAE latents; the model trains on them in its latent scale (× 0.18215 for SD1.x), as Tune-A-Video does
    scaled = base.model.latent_format.process_in(latents)
    assert base.model.latent_format.scale_factor == 0.18215
    with DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, True)) as host:
        d_losses = tune_diffusers(host, scaled, cond, sd_alphas_cumprod(), TuneSettings(steps=1, learning_rate=1e-4, seed=2))
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


def test_save_load_reproduces_and_cache_skips_training(pack, small_models, tmp_path, monkeypatch):
    import folder_paths

    _, base = small_models
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    folder_paths.folder_names_and_paths.pop("vp2p", None)
    tune_nodes = host_module(pack, "tune_nodes")
    model = inflated(pack, base)
    latents, cond = video()
    settings = pack.vp2p.tuning.TuneSettings(steps=2, learning_rate=1e-4, seed=1)
    steps_run = []
    with torch.inference_mode():
        tuned = tune_nodes.tune_cached(model, [[cond, {}]], latents, settings, lambda *a: steps_run.append(a[0]), save_name="clips/car")
    assert steps_run == [1, 2]
    saved = tmp_path / "vp2p" / "clips" / "car.safetensors"
    assert saved.is_file() and len(list((tmp_path / "vp2p" / "cache").glob("tune_*.safetensors"))) == 1

    # a second identical run is a cache hit: no training step at all, identical model
    steps_run.clear()
    with torch.inference_mode():
        again = tune_nodes.tune_cached(model, [[cond, {}]], latents, settings, lambda *a: steps_run.append(a[0]))
    assert steps_run == []
    x, ctx = torch.randn(FRAMES, 4, 8, 8), torch.randn(FRAMES, 7, 768)
    want = comfy_eps(tuned, x, 500, ctx)
    assert torch.equal(comfy_eps(again, x, 500, ctx), want)

    # Load Tuned T2S reproduces the tuned model exactly
    load = nodes_of(pack)["VP2P_LoadTuned"]
    assert "clips/car.safetensors" in load.INPUT_TYPES()["required"]["tuned_name"][1]["options"]
    with torch.inference_mode():
        loaded = load.execute(model=model, tuned_name="clips/car.safetensors").result[0]
    assert torch.equal(comfy_eps(loaded, x, 500, ctx), want)

    # other inflation settings or another base model are refused clearly
    with torch.inference_mode():
        other_mode = nodes_of(pack)["VP2P_InflateT2S"].execute(model=base, frame_attention="sparse_causal", temporal_attention=True).result[0]
    with pytest.raises(ValueError, match="Inflate to T2S to the same settings"):
        with torch.inference_mode():
            load.execute(model=other_mode, tuned_name="clips/car.safetensors")
    other_base = base.clone()
    key = next(k for k in other_base.model.state_dict() if k.endswith("input_blocks.1.1.proj_in.weight"))
    w = other_base.model.state_dict()[key]
    other_base.add_patches({key: (torch.full_like(w, 1e-3),)}, 1.0)
    with pytest.raises(ValueError, match="different base model"):
        with torch.inference_mode():
            load.execute(model=inflated(pack, other_base), tuned_name="clips/car.safetensors")

    # a damaged cache file is reported and recomputed
    cache_file = next((tmp_path / "vp2p" / "cache").glob("tune_*.safetensors"))
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    steps_run.clear()
    with torch.inference_mode():
        tune_nodes.tune_cached(model, [[cond, {}]], latents, settings, lambda *a: steps_run.append(a[0]))
    assert steps_run == [1, 2]
    with pytest.raises(ValueError, match="save_name"):
        with torch.inference_mode():
            tune_nodes.tune_cached(model, [[cond, {}]], latents, settings, None, save_name="../escape")


def test_clone_of_a_loaded_model_gets_its_own_temporal_layers(pack, small_models):
    """ComfyUI's clone() copies is_injected; a tuned clone made while its parent is loaded must
    still run its own (tuned) temporal layers, and exactly one temporal hook per block."""
    _, base = small_models
    model = inflated(pack, base)
    tuned, _ = run_tune(pack, model, steps=2)
    x, ctx = torch.randn(FRAMES, 4, 8, 8), torch.randn(FRAMES, 7, 768)
    want = comfy_eps(tuned, x, 500, ctx)
    comfy_eps(model, x, 500, ctx)  # the parent is now loaded and injected
    tune_host = host_module(pack, "tune_host")
    weights = pack.vp2p.tuned_file.TunedWeights(
        tuned.get_attachment("vp2p_t2s").settings,
        {ident: tuned.patches[k][0][1][0] for k, ident in tune_host.to_q_weight_keys(model.get_attachment("vp2p_t2s").blocks).items()},
        tuned.get_attachment("vp2p_t2s").bank.state_dict())
    with torch.inference_mode():
        again = tune_host.apply_tuned(model, weights)  # cloned while the parent is injected
    assert torch.equal(comfy_eps(again, x, 500, ctx), want)
    block = again.model.diffusion_model.input_blocks[1][1].transformer_blocks[0]
    assert sum(getattr(f, "_vp2p_temporal", False) for f in block._forward_hooks.values()) == 1


def test_node_refuses_latents_the_unet_cannot_take(pack, small_models):
    _, base = small_models
    model = inflated(pack, base)
    node = nodes_of(pack)["VP2P_TuneOnVideo"]
    cond = [[torch.randn(1, 7, 768), {}]]
    with torch.inference_mode():  # any size passes (the UNet halves 9 to 5 and upsamples back to 9)
        out = node.execute(model=model, positive=cond, latent={"samples": torch.randn(2, 4, 9, 7)}, steps=1, learning_rate=1e-4,
                           seed=0, use_cache=False).result[0]
    assert out is not model
    with pytest.raises(ValueError, match="channels"):
        with torch.inference_mode():
            node.execute(model=model, positive=cond, latent={"samples": torch.randn(2, 16, 8, 8)}, steps=1, learning_rate=1e-4, seed=0)
    with pytest.raises(ValueError, match="LATENT"):
        with torch.inference_mode():
            node.execute(model=model, positive=cond, latent={"samples": torch.randn(0, 4, 8, 8)}, steps=1, learning_rate=1e-4, seed=0)
    with pytest.raises(ValueError, match="Inflate to T2S"):
        with torch.inference_mode():
            node.execute(model=base, positive=cond, latent={"samples": torch.randn(2, 4, 8, 8)}, steps=1, learning_rate=1e-4, seed=0)


def test_frame_window_trains_on_its_rows_and_keys_the_cache(pack, small_models, tmp_path, monkeypatch):
    """frames_per_step=2 on a 5-frame clip: the node finishes and changes the model, ComfyUI's memory
    estimate is asked for the window's rows (not the clip's), and the cache key has the window in it
    (the default's key is unchanged by a stride that does nothing)."""
    import folder_paths

    _, base = small_models
    model = inflated(pack, base)
    comfy_call = host_module(pack, "comfy_call")
    backward = host_module(pack, "autograd_host").BACKWARD_MEMORY
    estimated = []
    real_estimate = comfy_call.estimate_memory_for
    monkeypatch.setattr(comfy_call, "estimate_memory_for",
                        lambda options, rows, per_chunk=0: (estimated.append(rows), real_estimate(options, rows, per_chunk))[1])
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=g) + 0.3 * torch.randn(5, 4, 8, 8, generator=g)
    cond = [[torch.randn(1, 7, 768, generator=g), {}]]
    node = nodes_of(pack)["VP2P_TuneOnVideo"]
    with torch.inference_mode():
        tuned = node.execute(model=model, positive=cond, latent={"samples": latents}, steps=2, learning_rate=1e-4, seed=0,
                             use_cache=False, frames_per_step=2, frame_stride=2).result[0]
    assert estimated == [max(1, round(2 * backward))]
    x, ctx = torch.randn(5, 4, 8, 8), torch.randn(5, 7, 768)
    assert (comfy_eps(tuned, x, 500, ctx) - comfy_eps(model, x, 500, ctx)).abs().max() > 1e-6

    # the cache file each setting would use (no training: the lookup is stopped there)
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    folder_paths.folder_names_and_paths.pop("vp2p", None)
    tune_nodes = host_module(pack, "tune_nodes")

    class Looked(Exception):
        pass

    def stop(path, *args, **kwargs):
        raise Looked(path.name)

    monkeypatch.setattr(pack.vp2p.disk_cache, "load_or_compute", stop)

    def cache_name(**window):
        settings = pack.vp2p.tuning.TuneSettings(steps=2, learning_rate=1e-4, seed=0, **window)
        with pytest.raises(Looked) as looked, torch.inference_mode():
            tune_nodes.tune_cached(model, cond, latents, settings, None)
        return str(looked.value)

    whole = cache_name()
    assert cache_name(frames_per_step=0, frame_stride=3) == whole
    windowed = cache_name(frames_per_step=2)
    assert len({whole, windowed, cache_name(frames_per_step=2, frame_stride=2)}) == 3
