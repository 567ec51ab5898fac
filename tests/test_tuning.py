"""Tune on Video, core loop and diffusers host."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import tiny_unet
from vp2p import FrameMode, T2SSettings
from vp2p.diffusers_host import DiffusersT2S, tune_diffusers
from vp2p.schedule import sd_alphas_cumprod
from vp2p.tuning import TrainingDivergedError, TuneSettings, is_trainable_unet_weight, training_sigmas, tune

AC = sd_alphas_cumprod()


def video(frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 4, 8, 8, generator=g)
    latents = base + 0.3 * torch.randn(frames, 4, 8, 8, generator=g)  # a "video": frames near one image
    cond = torch.randn(1, 7, 32, generator=g)
    return latents, cond


def eval_loss(host, latents, cond, seeds=range(6)):
    """A fixed-noise, fixed-timestep loss to compare before/after (the training loss is noisy)."""
    denoise = host.denoiser(AC)
    sig = training_sigmas(AC)
    total = 0.0
    with torch.no_grad():
        for s in seeds:
            g = torch.Generator().manual_seed(100 + s)
            t = int(torch.randint(50, 950, (1,), generator=g))
            noise = torch.randn(latents.shape, generator=g)
            sigma = sig[t].expand(latents.shape[0])
            x = latents + sig[t] * noise
            eps = (x - denoise(x, sigma, cond.expand(latents.shape[0], -1, -1))) / sig[t]
            total += float(((eps - noise) ** 2).mean())
    return total / len(seeds)


def tuned_host(unet, steps=40, seed=0, lr=2e-3):
    latents, cond = video()
    host = DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, True))
    with host:
        before = eval_loss(host, latents, cond)
        losses = tune_diffusers(host, latents, cond, AC, TuneSettings(steps=steps, learning_rate=lr, seed=seed))
        after = eval_loss(host, latents, cond)
    return host, losses, before, after


def test_trainable_set_names():
    assert is_trainable_unet_weight("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight")
    assert is_trainable_unet_weight("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_q.weight")
    assert not is_trainable_unet_weight("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight")
    assert not is_trainable_unet_weight("input_blocks.1.1.proj_in.weight")


def test_loss_decreases_and_only_intended_tensors_move(unet):
    snapshot = copy.deepcopy(unet.state_dict())
    host, losses, before, after = tuned_host(unet)
    assert len(losses) == 40
    assert after < 0.9 * before, (before, after)
    for name, value in unet.state_dict().items():  # the UNet itself is never written
        assert torch.equal(value, snapshot[name]), name
    assert set(host.deltas) == {(kind, key) for key in host.blocks for kind in ("attn1", "attn2")}
    assert all(d.abs().sum() > 0 for d in host.deltas.values())
    moved = [n for n, p in host.bank.named_parameters() if "to_out" in n and p.abs().sum() > 0]
    assert moved, "temporal output projections did not learn"


def test_tuning_trains_temporal_projections_and_freezes_the_temporal_norm():
    """The reference's trainable set: to_q of attn1/attn2 and the temporal attention's q/k/v/out
    projections; the temporal LayerNorm is not trained (bit-identical afterwards)."""
    latents, cond = video()
    host = DiffusersT2S(tiny_unet(seed=0), T2SSettings(FrameMode.FIRST_FRAME, True))
    before = {n: p.detach().clone() for n, p in host.bank.named_parameters()}
    with host:
        tune_diffusers(host, latents, cond, AC, TuneSettings(steps=6, learning_rate=1e-3, seed=1))
    after = dict(host.bank.named_parameters())
    norms = [n for n in before if ".norm." in n]
    projections = [n for n in before if n.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "to_out")]
    assert norms and len(norms) + len(projections) == len(before)  # weight and bias of every layer's norm
    for n in norms:
        assert torch.equal(after[n], before[n]), n
    for n in projections:
        assert not torch.equal(after[n], before[n]), n
    assert all(d.abs().sum() > 0 for d in host.deltas.values())
    assert not any(p.requires_grad for p in host.bank.parameters())  # frozen again afterwards


def test_same_seed_same_result_other_seed_differs():
    a, la, _, _ = tuned_host(tiny_unet(seed=0), steps=5, seed=3)
    b, lb, _, _ = tuned_host(tiny_unet(seed=0), steps=5, seed=3)
    c, lc, _, _ = tuned_host(tiny_unet(seed=0), steps=5, seed=4)
    assert la == lb and la != lc
    for k in a.deltas:
        assert torch.equal(a.deltas[k], b.deltas[k])
    for (n, p), (_, q) in zip(a.bank.named_parameters(), b.bank.named_parameters()):
        assert torch.equal(p, q), n


def test_zero_steps_change_nothing(unet):
    latents, cond = video()
    with DiffusersT2S(unet, T2SSettings()) as host:
        losses = tune_diffusers(host, latents, cond, AC, TuneSettings(steps=0))
    assert losses == [] and all(d.abs().sum() == 0 for d in host.deltas.values())


def test_non_finite_loss_is_a_clear_error():
    p = torch.zeros(3, requires_grad=True)
    calls = []

    def denoise(x, sigma, cond):
        calls.append(1)
        return x * p.sum() + (float("nan") if len(calls) == 3 else 0.0)

    with pytest.raises(TrainingDivergedError, match="step 3/10"):
        tune(denoise, torch.randn(2, 4, 4, 4), torch.randn(1, 3, 8), [p], AC, TuneSettings(steps=10))


def test_v_prediction_target_is_consistent():
    from vp2p.tuning import prediction_and_target

    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sigma = torch.tensor([0.5, 2.0])
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    for pred in ("eps", "v"):
        p, t = prediction_and_target(x, x0, x0, noise, sigma, pred)  # perfect denoiser
        torch.testing.assert_close(p, t, atol=1e-5, rtol=1e-5)


def test_fingerprint_sees_every_byte_and_memoises_by_version():
    from vp2p.fingerprint import fingerprint

    w = torch.randn(64, 64)
    a = fingerprint([("w", w)], {"s": 1})
    assert a == fingerprint([("w", w.clone())], {"s": 1})
    assert a != fingerprint([("w", w)], {"s": 2})
    w[17, 3] += 1e-6  # in place: a new version must be re-hashed
    assert fingerprint([("w", w)], {"s": 1}) != a


def test_tuned_file_round_trip_and_damage(tmp_path):
    from vp2p import LayerKey
    from vp2p.tuned_file import TunedFileError, TunedWeights, check_compatible, load_tuned, save_tuned

    key = LayerKey("middle", 0, 0)
    w = TunedWeights(T2SSettings(FrameMode.SPARSE_CAUSAL, True), {("attn1", key): torch.randn(4, 4), ("attn2", key): torch.randn(4, 4)},
                     {"layers.middle_0_0.to_out.weight": torch.randn(4, 4)}, {"steps": "3"})
    path = save_tuned(tmp_path / "t.safetensors", w)
    back = load_tuned(path)
    assert back.settings == w.settings and back.metadata["steps"] == "3"
    for k in w.deltas:
        assert torch.equal(back.deltas[k], w.deltas[k])
    assert torch.equal(back.temporal["layers.middle_0_0.to_out.weight"], w.temporal["layers.middle_0_0.to_out.weight"])
    assert not list(tmp_path.glob(".tmp_*"))  # atomic write leaves no temporary file
    # the minimum frame-attention width is an inflation setting too: kept, and a mismatch refused
    narrow = TunedWeights(T2SSettings(FrameMode.SPARSE_CAUSAL, True, frame_attention_min_channels=640), dict(w.deltas))
    back_narrow = load_tuned(save_tuned(tmp_path / "n.safetensors", narrow))
    assert back_narrow.settings == narrow.settings != w.settings
    with pytest.raises(TunedFileError, match="frame_attention_min_channels=640"):
        check_compatible(back_narrow, w.settings, None, {key}, "n.safetensors")
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(TunedFileError, match="truncated"):
        load_tuned(path)
