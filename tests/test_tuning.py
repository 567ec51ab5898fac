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


def recording_denoiser(calls: list):
    """A denoiser that records what each step sees: (x [n, C, h, w], σ [n], cond [n, T, D]); x0 = 0·x keeps a graph."""
    p = torch.zeros(3, requires_grad=True)

    def denoise(x, sigma, cond):
        calls.append((x.detach().clone(), sigma.detach().clone(), cond.detach().clone()))
        return x * p.sum()

    return denoise, p


def frame_indexed(frames=9):
    """Latents and a per-frame cond whose rows carry their frame index (cond[i] == i)."""
    latents = torch.randn(frames, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    cond = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1).expand(frames, 3, 8).clone()
    return latents, cond


def test_default_whole_clip_draws_exactly_as_before():
    """Default settings (no window) draw one timestep then one noise of the clip's shape per step from the
    seeded generator, nothing else: the inputs of every step are the old code path's, bit for bit."""
    latents, cond = frame_indexed(5)
    calls = []
    denoise, p = recording_denoiser(calls)
    tune(denoise, latents, cond, [p], AC, TuneSettings(steps=6, seed=11))
    gen, sig = torch.Generator().manual_seed(11), training_sigmas(AC)
    for x, sigma, c in calls:
        t = int(torch.randint(0, sig.shape[0], (1,), generator=gen))
        noise = torch.randn(latents.shape, generator=gen)
        assert torch.equal(sigma, sig[t].expand(5))
        assert torch.equal(x, latents + sig[t] * noise) and torch.equal(c, cond)


def test_window_is_seeded_inside_the_clip_and_strided():
    from vp2p.tuning import draw_window

    latents, cond = frame_indexed(9)
    settings = TuneSettings(steps=40, seed=2, frames_per_step=3, frame_stride=2)

    def windows(s):
        calls = []
        denoise, p = recording_denoiser(calls)
        tune(denoise, latents, cond, [p], AC, s)
        return calls, [tuple(int(v) for v in c[:, 0, 0]) for _, _, c in calls]

    calls, rows = windows(settings)
    assert all(len(r) == 3 and r[1] - r[0] == 2 and r[2] - r[1] == 2 and 0 <= r[0] and r[2] <= 8 for r in rows)
    assert {r[0] for r in rows} == {0, 1, 2, 3, 4}  # every start that fits is drawn over 40 steps
    assert windows(settings)[1] == rows  # deterministic by seed
    assert windows(TuneSettings(steps=40, seed=3, frames_per_step=3, frame_stride=2))[1] != rows
    # the latent rows follow the window, with noise of the window's shape from the same generator
    gen, sig = torch.Generator().manual_seed(2), training_sigmas(AC)
    for x, sigma, _ in calls:
        t = int(torch.randint(0, sig.shape[0], (1,), generator=gen))
        idx = draw_window(gen, 9, (3, 2))
        noise = torch.randn((3, 4, 4, 4), generator=gen)
        assert torch.equal(sigma, sig[t].expand(3)) and torch.equal(x, latents[idx] + sig[t] * noise)


def test_window_as_long_as_the_clip_or_longer_is_the_whole_clip(caplog):
    """frames_per_step ≥ the clip's frames trains exactly as the default (same losses, same tuned tensors),
    and a longer window says so in the log."""
    results = []
    for n in (0, 3, 10):
        latents, cond = video()
        host = DiffusersT2S(tiny_unet(seed=0), T2SSettings(FrameMode.FIRST_FRAME, True))
        with caplog.at_level("INFO", logger="VideoP2P"):
            caplog.clear()
            with host:
                losses = tune_diffusers(host, latents, cond, AC, TuneSettings(steps=4, learning_rate=1e-3, seed=7, frames_per_step=n))
        results.append((losses, host))
        assert ("longer than the clip" in caplog.text) == (n == 10)
    (l0, h0), *others = results
    for losses, host in others:
        assert losses == l0
        for k in h0.deltas:
            assert torch.equal(host.deltas[k], h0.deltas[k])
        for (name, a), (_, b) in zip(h0.bank.named_parameters(), host.bank.named_parameters()):
            assert torch.equal(a, b), name


def test_window_tunes_a_real_model_on_its_frames():
    latents, cond = video(frames=5)
    host = DiffusersT2S(tiny_unet(seed=0), T2SSettings(FrameMode.FIRST_FRAME, True))
    with host:
        losses = tune_diffusers(host, latents, cond, AC, TuneSettings(steps=3, learning_rate=1e-3, seed=1, frames_per_step=2))
    assert len(losses) == 3 and all(d.abs().sum() > 0 for d in host.deltas.values())


def test_stride_reaching_past_the_clip_is_lowered(caplog):
    from vp2p.tuning import resolve_window, window_rows

    with caplog.at_level("INFO", logger="VideoP2P"):
        assert resolve_window(TuneSettings(frames_per_step=3, frame_stride=4), 5) == (3, 2)
    assert "stride is lowered to 2" in caplog.text
    assert resolve_window(TuneSettings(frames_per_step=2, frame_stride=4), 5) == (2, 4)
    assert resolve_window(TuneSettings(frames_per_step=1, frame_stride=9), 5) == (1, 9)
    assert resolve_window(TuneSettings(), 5) is None and resolve_window(TuneSettings(frames_per_step=5), 5) is None
    assert [window_rows(TuneSettings(frames_per_step=n), 5) for n in (0, 2, 5, 8)] == [5, 2, 5, 5]


def test_bad_windows_are_refused_and_the_default_key_is_unchanged():
    from vp2p.errors import SettingsError

    with pytest.raises(SettingsError, match="frames_per_step must be ≥ 0"):
        TuneSettings(frames_per_step=-1)
    with pytest.raises(SettingsError, match="frame_stride must be ≥ 1"):
        TuneSettings(frames_per_step=2, frame_stride=0)
    # the cache key text of earlier versions (repr of the old dataclass), so existing cached tunings stay valid
    assert TuneSettings(steps=300, seed=4).describe() == "TuneSettings(steps=300, learning_rate=3e-05, weight_decay=0.01, max_grad_norm=1.0, seed=4)"
    assert TuneSettings(steps=300, seed=4, frame_stride=3).describe() == TuneSettings(steps=300, seed=4).describe()
    windowed = TuneSettings(steps=300, seed=4, frames_per_step=4, frame_stride=2).describe()
    assert windowed != TuneSettings(steps=300, seed=4).describe() and "frames_per_step=4" in windowed and "frame_stride=2" in windowed
