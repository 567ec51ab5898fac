"""Frame chunks: a video evaluated window by window equals the whole video where the method allows it."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import randomise_temporal
from vp2p import FrameMode, T2SSettings
from vp2p.control import RunState
from vp2p.errors import LayoutError, SettingsError
from vp2p.frame_attention import AnchorCache, FrameWindow
from vp2p.frame_chunks import plan_windows, take_rows, window_rows
from vp2p.layout import COND, UNCOND, LayoutSpec
from vp2p.video_norm import NormScope

FRAMES = 7


def _host(unet, mode: FrameMode, per_chunk: int, temporal: bool = False, norm: NormScope = NormScope.FRAME, bank=None):
    from vp2p.diffusers_host import DiffusersT2S

    return DiffusersT2S(unet, T2SSettings(mode, temporal, norm, frames_per_chunk=per_chunk), bank=bank)


def _inputs(frames: int = FRAMES, videos: int = 2):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 4, 8, 8, generator=g) + 0.5 * torch.randn(videos * frames, 4, 8, 8, generator=g)
    ctx = torch.randn(videos * frames, 77, 32, generator=g)
    return x, ctx


def _call(host, x, ctx, cond_or_uncond=(UNCOND, COND), run=None):
    with host, torch.no_grad():
        return host(x, 500, ctx, cond_or_uncond=list(cond_or_uncond), sigmas=torch.full((x.shape[0],), 3.0), run=run)


def test_plan_runs_the_anchor_window_first_and_covers_every_frame_once():
    assert plan_windows(10, 4, FrameMode.FIRST_FRAME) == [(0, 4), (4, 4), (8, 2)]
    assert plan_windows(10, 4, FrameMode.SPARSE_CAUSAL) == [(0, 4), (4, 4), (8, 2)]
    assert plan_windows(10, 4, FrameMode.MIDDLE_FRAME) == [(4, 4), (0, 4), (8, 2)]  # frame (10−1)//2 = 4
    assert plan_windows(5, 8, FrameMode.FIRST_FRAME) == [(0, 5)]  # a chunk longer than the clip: the clip
    with pytest.raises(SettingsError, match="frames_per_chunk=0"):
        plan_windows(5, 0, FrameMode.FIRST_FRAME)
    with pytest.raises(SettingsError, match="frames_per_chunk=-2"):
        T2SSettings(frames_per_chunk=-2)
    assert window_rows(2, 5, 3, 2).tolist() == [3, 4, 8, 9]


def test_overlapping_windows_cover_the_clip_and_ramp_where_they_share_frames():
    from vp2p.frame_chunks import blend_weights

    assert plan_windows(10, 4, FrameMode.FIRST_FRAME, overlap=1) == [(0, 4), (3, 4), (6, 4)]
    assert plan_windows(11, 4, FrameMode.SPARSE_CAUSAL, overlap=2) == [(0, 4), (2, 4), (4, 4), (6, 4), (7, 4)]
    assert plan_windows(10, 4, FrameMode.MIDDLE_FRAME, overlap=1)[0] == (3, 4)  # frame 4 first
    w = blend_weights([(0, 4), (3, 4), (6, 4)])
    assert w[0].tolist() == [1, 1, 1, 0.5] and w[1].tolist() == [0.5, 1, 1, 0.5] and w[2].tolist() == [0.5, 1, 1, 1]
    with pytest.raises(SettingsError, match="chunk_overlap=4"):
        plan_windows(10, 4, FrameMode.FIRST_FRAME, overlap=4)
    with pytest.raises(SettingsError, match="chunk_overlap=3"):
        T2SSettings(frames_per_chunk=2, chunk_overlap=3)


@pytest.mark.parametrize("mode", [FrameMode.FIRST_FRAME, FrameMode.SPARSE_CAUSAL, FrameMode.MIDDLE_FRAME])
def test_overlapping_chunks_equal_whole_where_chunks_are_exact(unet, mode):
    from vp2p.diffusers_host import DiffusersT2S

    x, ctx = _inputs(9, 2)
    whole = _call(_host(unet, mode, 0), x, ctx)
    overlapped = _call(DiffusersT2S(unet, T2SSettings(mode, False, NormScope.FRAME, frames_per_chunk=4, chunk_overlap=2)), x, ctx)
    assert float((whole - overlapped).abs().max()) < 2e-5


def test_take_rows_reaches_nested_per_row_tensors_only():
    idx = torch.tensor([1, 3])
    control = {"input": [torch.arange(4.0).view(4, 1), None], "middle": [torch.ones(1, 2)]}
    out = take_rows(control, idx, 4)
    assert out["input"][0].flatten().tolist() == [1.0, 3.0] and out["input"][1] is None
    assert out["middle"][0].shape == (1, 2)  # not per row: kept


@pytest.mark.parametrize("mode", list(FrameMode))
@pytest.mark.parametrize("per_chunk", [1, 3])
def test_chunked_equals_whole_for_every_frame_mode(unet, mode, per_chunk):
    """Temporal layers untuned (exact identity), per-frame GroupNorm: chunks change nothing."""
    x, ctx = _inputs()
    whole = _call(_host(unet, mode, 0, temporal=True), x, ctx)
    chunked = _call(_host(unet, mode, per_chunk, temporal=True), x, ctx)
    diff = float((whole - chunked).abs().max())
    assert diff < 2e-5, f"{mode.value}, {per_chunk} frames per chunk: max diff {diff}"
    # the test can fail: a window that read its own first frame as the anchor would differ
    if mode is not FrameMode.NONE:
        wrong = torch.cat([_call(_host(unet, mode, 0), x[s:s + 3], ctx[s:s + 3], (COND,)) for s in (0, 3)]
                          + [_call(_host(unet, mode, 0), x[6:7], ctx[6:7], (COND,))])
        assert float((wrong - whole[:FRAMES]).abs().max()) > 1e-3


def test_chunked_explicit_layout_with_roles(unet):
    """An edit's call (roles per video, two branches) through windows equals the whole call."""
    x, ctx = _inputs(FRAMES, 4)
    spec = LayoutSpec(FRAMES, 2, ((UNCOND, 0), (UNCOND, 1), (COND, 0), (COND, 1)))
    kinds = [UNCOND, UNCOND, COND, COND]
    whole = _call(_host(unet, FrameMode.MIDDLE_FRAME, 0), x, ctx, kinds, RunState(None, spec))
    chunked = _call(_host(unet, FrameMode.MIDDLE_FRAME, 2), x, ctx, kinds, RunState(None, spec))
    assert float((whole - chunked).abs().max()) < 2e-5


def test_what_chunks_change_video_norm_and_tuned_temporal_layers(unet):
    """Video-level GroupNorm pools a window's frames; tuned temporal layers attend within a window:
    the chunked result differs from the whole one (measured in bench/bench_long.py), and stays close."""
    x, ctx = _inputs()
    for kw in ({"norm": NormScope.VIDEO}, {"temporal": True}):
        bank = None
        if kw.get("temporal"):
            bank = randomise_temporal(_host(unet, FrameMode.FIRST_FRAME, 0, temporal=True).bank, 4)
        whole = _call(_host(unet, FrameMode.FIRST_FRAME, 0, bank=bank, **kw), x, ctx)
        chunked = _call(_host(unet, FrameMode.FIRST_FRAME, 3, bank=bank, **kw), x, ctx)
        rel = float((whole - chunked).abs().max() / whole.abs().max())
        assert 1e-6 < rel < 0.5, (kw, rel)


def test_windows_out_of_order_are_refused():
    from vp2p.frame_attention import frame_attention_inputs

    q = k = v = torch.randn(2, 4, 8)
    cache = AnchorCache()
    with pytest.raises(LayoutError, match="anchor"):
        frame_attention_inputs(q, k, v, 1, 2, FrameMode.FIRST_FRAME, FrameWindow(2, 2, 6, cache), "layer")
    with pytest.raises(LayoutError, match="previous frame"):
        frame_attention_inputs(q, k, v, 1, 2, FrameMode.SPARSE_CAUSAL, FrameWindow(0, 2, 6, cache), "layer")
        frame_attention_inputs(q, k, v, 1, 2, FrameMode.SPARSE_CAUSAL, FrameWindow(4, 2, 6, cache), "layer")


def test_chunked_gradients_equal_whole_gradients(unet):
    """Under autograd a later window's gradient reaches the anchor through the cache (null-text, tuning)."""
    x, ctx = _inputs(5, 1)
    grads = []
    for per in (0, 2):
        host = _host(unet, FrameMode.SPARSE_CAUSAL, per)
        c = ctx.clone().requires_grad_(True)
        with host:  # chunks under autograd are recomputed in the backward pass: the host must still be installed
            out = host(x, 500, c, cond_or_uncond=[UNCOND], sigmas=torch.full((5,), 3.0))
            out.square().mean().backward()
        grads.append(c.grad)
    assert float((grads[0] - grads[1]).abs().max()) < 1e-6 * max(1.0, float(grads[0].abs().max())) * 100
    assert float(grads[0].abs().max()) > 0


# -- the method's stages, chunked: the same results ------------------------------------------------------

@pytest.mark.parametrize("mode", [FrameMode.MIDDLE_FRAME, FrameMode.SPARSE_CAUSAL, FrameMode.NONE])
def test_fatezero_store_and_edit_chunked_equal_whole(unet, prompt, mode):
    """The store recorded window by window holds what the whole recording holds, and the fused edit
    (cross replace, masked self-attention from stored q/k, latent blend) reads it back window by window."""
    from tests.test_fatezero import Host, fz_edit
    from vp2p.fatezero import FateZeroLatentBlend
    from vp2p.local_blend import LocalBlendSpec

    runs = []
    for per in (0, 2):  # one host at a time: both install on the same UNet
        h = Host(unet, prompt, mode=mode, frames=5, per_chunk=per, norm=NormScope.FRAME)
        try:
            stored = {(s, n): h.store.get(s, n).float() for s in range(h.store.spec.stored_steps) for n in h.store.names(s)}
            fz = fz_edit(prompt, cross=0.8, self_=0.8, words=("cat",), threshold=0.5)
            fz.edit.blend = LocalBlendSpec(tuple(fz.edit.source.positions("cat")), tuple(fz.edit.target.positions("tiger")),
                                           start=0.0, end=1.0)
            lb = FateZeroLatentBlend(fz.edit.blend, 5, (8, 8), h.sched.steps)
            res, ctl = h.edit(fz, blend=lb)
            runs.append((h.store.spec, h.store.nbytes, stored, h.traj, res.edited, lb.last_mask, ctl.last_self_mask))
        finally:
            h.close()
    (spec0, bytes0, st0, traj0, ed0, m0, sm0), (spec1, bytes1, st1, traj1, ed1, m1, sm1) = runs
    assert spec0 == spec1 and bytes0 == bytes1 and sorted(st0) == sorted(st1)
    for name, a in st0.items():
        assert a.shape == st1[name].shape and float((a - st1[name]).abs().max()) < 2e-3, name
    torch.testing.assert_close(traj0, traj1, atol=1e-4, rtol=0)
    diff = float((ed0 - ed1).abs().max())
    assert diff < 5e-4, diff
    assert m0 is not None and torch.equal(m0, m1) and torch.equal(sm0, sm1)


@pytest.mark.parametrize("mode", [FrameMode.FIRST_FRAME, FrameMode.SPARSE_CAUSAL])
def test_p2p_edit_with_local_blend_chunked_equals_whole(unet, prompt, mode):
    """Video-P2P's decoupled edit (null-text inversion, cross/self replace, LocalBlend) chunked by 2."""
    from tests.test_edit import embed, make_edit
    from vp2p.diffusers_host import DiffusersT2S
    from vp2p.edit import EditInputs, Guidance, decoupled_edit
    from vp2p.inversion import InversionSettings, ddim_invert, optimise_null_text
    from vp2p.local_blend import LocalBlend, LocalBlendSpec
    from vp2p.p2p import P2PController
    from vp2p.schedule import Schedule, sd_alphas_cumprod

    frames, steps = 5, 4
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 8, 8, generator=g) + 0.3 * torch.randn(frames, 4, 8, 8, generator=g)
    empty = 0.1 * torch.randn(1, 77, 32, generator=g)
    out = []
    for per in (0, 2):
        host = DiffusersT2S(unet, T2SSettings(mode, True, NormScope.FRAME, frames_per_chunk=per)).install()
        try:
            den = host.denoiser(sd_alphas_cumprod())
            src = prompt("a cat running")
            cond = embed(src)
            sched = Schedule.reference(steps)
            with torch.no_grad():
                traj = ddim_invert(den, latents, cond, sched)
            res = optimise_null_text(den, traj, cond, empty, sched, InversionSettings(steps=steps, inner_steps=2))
            edit = make_edit(prompt, cross_replace=0.5, self_replace=0.5)
            spec = LocalBlendSpec(tuple(edit.source.positions("cat")), tuple(edit.target.positions("tiger")), start=0.0)
            edit.blend = spec
            blend = LocalBlend(spec, frames, (8, 8), steps)
            inputs = EditInputs(traj[0], sched, cond, res.null_embeddings, empty, 7.5, res.source_path)
            with torch.no_grad():
                ed = decoupled_edit(den, inputs, edit.target_cond, 7.5, Guidance.DECOUPLED, P2PController(edit, sched, blend))
            out.append((traj, res.null_embeddings, ed.edited, blend.last_mask))
        finally:
            host.remove()
    (t0, n0, e0, m0), (t1, n1, e1, m1) = out
    assert float((t0 - t1).abs().max()) < 1e-4
    assert float((n0 - n1).abs().max()) < 1e-3
    assert float((e0 - e1).abs().max()) < 1e-3, float((e0 - e1).abs().max())
    assert m0 is not None and torch.equal(m0, m1)


def test_auto_store_location_goes_to_disk_above_its_size(monkeypatch):
    from vp2p.attention_store import AttentionStoreError, StoreLocation, auto_location

    assert auto_location(3_000_000_000) is StoreLocation.CPU and auto_location(5_000_000_000) is StoreLocation.DISK  # 4 GB
    assert auto_location(2_000, above_gb=1e-6) is StoreLocation.DISK
    monkeypatch.setenv("VP2P_STORE_DISK_ABOVE_GB", "0.5")
    assert auto_location(600_000_000) is StoreLocation.DISK and auto_location(400_000_000) is StoreLocation.CPU
    monkeypatch.setenv("VP2P_STORE_DISK_ABOVE_GB", "lots")
    with pytest.raises(AttentionStoreError, match="VP2P_STORE_DISK_ABOVE_GB='lots'"):
        auto_location(1)
