"""FateZero core: the attention store (what it holds, its size, its order, its files) and fusion
(no fusion = plain target DDIM; mask thresholds at the extremes = full / no replacement; the latent
blend; the store read by sigma in the reverse of the recording order). Diffusers host, random weights."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.test_edit import DIM, embed, make_edit
from vp2p import COND, FrameMode, LayoutSpec, T2SSettings
from vp2p.attention_store import (
    DEFAULT_MAX_TOKENS,
    AttentionStore,
    AttentionStoreError,
    StorePrecision,
    StoreRecorder,
    StoreSpec,
    entry,
    parse_entry,
    record_missing_steps,
    store_nbytes,
)
from vp2p.clip_vocab import find_vocab_source
from vp2p.control import AttentionController, RunState
from vp2p.edit import EditInputs, Guidance, fused_edit
from vp2p.errors import SettingsError
from vp2p.fatezero import BlendLatent, FateZeroController, FateZeroEdit, FateZeroLatentBlend, latent_blend_steps
from vp2p.frame_attention import compact_keys, expand_keys, frame_attention_inputs, key_frames
from vp2p.inversion import ddim_invert, inversion_input
from vp2p.keys import LayerKey
from vp2p.layout import TARGET
from vp2p.local_blend import LocalBlendSpec
from vp2p.schedule import Schedule, sd_alphas_cumprod
from vp2p.video_norm import NormScope

pytestmark = pytest.mark.skipif(find_vocab_source() is None, reason="no CLIP vocabulary (pip install --no-deps open_clip_torch)")

STEPS = 5
FRAMES = 3


@pytest.mark.parametrize("mode", list(FrameMode))
def test_compact_keys_round_trip_every_frame_mode(mode):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2 * 4, 6, 8, generator=g) for _ in range(3))
    inputs = frame_attention_inputs(q, k, v, videos=2, frames=4, mode=mode)
    per = inputs.k.shape[0] // 2
    one_video = inputs.k[per:]  # the second video's regrouped keys
    compact = compact_keys(one_video, mode, 4)
    assert compact.shape[0] == key_frames(mode, 4)
    assert torch.equal(expand_keys(compact, mode, 4), one_video)


class Host:
    """A tiny middle-frame T2S UNet, a video's DDIM inversion with a store, and the edit's inputs."""

    def __init__(self, unet, prompt, mode=FrameMode.MIDDLE_FRAME, fraction=1.0, max_tokens=DEFAULT_MAX_TOKENS, directory=None,
                 in_memory=True, min_channels=0, frames=FRAMES, per_chunk=0, norm=NormScope.VIDEO, precision="fp16"):
        from vp2p.diffusers_host import DiffusersT2S

        self.frames = frames
        settings = T2SSettings(mode, False, norm, frame_attention_min_channels=min_channels, frames_per_chunk=per_chunk)
        self.host = DiffusersT2S(unet, settings).install()
        self.den = self.host.denoiser(sd_alphas_cumprod())
        g = torch.Generator().manual_seed(3)
        self.latents = torch.randn(1, 4, 8, 8, generator=g) + 0.5 * torch.randn(frames, 4, 8, 8, generator=g)
        self.src = prompt("a cat running")
        self.cond = embed(self.src)
        self.empty = 0.1 * torch.randn(1, 77, DIM, generator=g)
        self.sched = Schedule.reference(STEPS)
        spec = StoreSpec.for_fraction(STEPS, fraction, max_tokens, frames, mode, "test", min_channels, precision)
        self.store = AttentionStore(spec, directory, in_memory)
        self.calls = 0
        with torch.no_grad():
            self.traj = ddim_invert(self.recording(), self.latents, self.cond, self.sched)
        self.store.finish()
        self.inputs = EditInputs(self.traj[0], self.sched, self.cond, None, self.empty, 7.5)

    def recording(self, store=None):
        rec = StoreRecorder(store or self.store, self.sched)

        def den(x, sigma, cond, kinds=None, run=None):
            self.calls += 1
            return self.den(x, sigma, cond, [COND], RunState(rec, LayoutSpec(self.frames)))

        return den

    def edit(self, fz=None, target=None, blend=None, store=None):
        ctl = FateZeroController(fz, store or self.store, self.sched, (8, 8), blend) if fz is not None else None
        tgt = target if target is not None else fz.edit.target_cond
        with torch.no_grad():
            return fused_edit(self.den, self.inputs, self.traj, tgt, 7.5, Guidance.DECOUPLED, ctl), ctl

    def close(self):
        self.host.remove()


@pytest.fixture(scope="module")
def host(unet, prompt):
    h = Host(unet, prompt)
    yield h
    h.close()


def fz_edit(prompt, cross=0.8, self_=0.8, words=(), threshold=0.3, src="a cat running", tgt="a tiger running", blend=None):
    e = make_edit(prompt, src, tgt, cross_replace=cross, self_replace=self_)
    e.blend = blend
    return FateZeroEdit(e, tuple(p for w in words for p in e.source.positions(w)), threshold)


def test_store_holds_the_stored_steps_and_layers_in_half_precision(host):
    spec = host.store.spec
    assert spec.stored_steps == STEPS
    # the inversion's own calls (at sigmas[S−1]…sigmas[0], as FateZero's) record every step: no extra call
    assert host.calls == STEPS
    assert record_missing_steps(host.recording(), host.traj, host.cond, host.sched, host.store, None) == 0
    names = host.store.names(0)
    kinds = {parse_entry(n)[0] for n in names}
    assert kinds == {"attn1", "attn2"}  # temporal attention is never stored
    layers = {parse_entry(n)[1] for n in names}
    assert LayerKey("middle", 0, 0) in layers and len(layers) == 6  # input 1,2 · middle · output 3,4,5 of the tiny UNet
    for s in range(STEPS):
        for t in host.store.step(s).values():
            assert t.dtype == torch.float16 and t.device.type == "cpu"
    q = host.store.get(0, entry("attn1", LayerKey("input", 1, 0), "q"))
    k = host.store.get(0, entry("attn1", LayerKey("input", 1, 0), "k"))
    assert q.shape[:2] == (1, FRAMES * 64) and k.shape[:2] == (1, 64)  # middle frame: one frame's keys per video
    p = host.store.get(0, entry("attn2", LayerKey("input", 1, 0), "p"))
    assert p.shape == (FRAMES, 8, 64, 77)  # [F, heads, N, T]
    torch.testing.assert_close(p.float().sum(-1), torch.ones(FRAMES, 8, 64), atol=2e-3, rtol=0)


def stored_layers(store):
    """(tokens per frame N, channels C, heads H) of every layer in a store."""
    layers = []
    for n in store.names(0):
        kind, key, part = parse_entry(n)
        if kind == "attn2":
            p = store.get(0, n)
            q = store.get(0, entry("attn1", key, "q"))
            layers.append((p.shape[2], q.shape[-1], p.shape[1]))
    return layers


def test_store_bytes_equal_the_formula(host, unet):
    want = store_nbytes(FRAMES, stored_layers(host.store), FrameMode.MIDDLE_FRAME, 77, STEPS)
    assert host.store.nbytes == want
    assert sum(t.numel() * 2 for t in host.store.tensors().values()) == want


def sd15_layers(h: int, w: int) -> list[tuple[int, int, int]]:
    """(tokens per frame, channels, heads) of SD1.5's 16 transformer blocks at a latent of h×w."""
    levels = [(h * w, 320), ((h // 2) * (w // 2), 640), ((h // 4) * (w // 4), 1280)]
    mid = [((h // 8) * (w // 8), 1280)]
    down = [lv for lv in levels for _ in range(2)]
    up = [lv for lv in reversed(levels) for _ in range(3)]
    return [(n, c, 8) for n, c in down + mid + up]


def test_sd15_store_for_8_frames_512_at_50_steps_is_under_8_gb():
    layers = sd15_layers(64, 64)
    assert len(layers) == 16
    full = store_nbytes(8, layers, FrameMode.MIDDLE_FRAME, 77, 50)
    default = store_nbytes(8, layers, FrameMode.MIDDLE_FRAME, 77, 40)  # store_steps 0.8 (FateZero's fractions)
    shape = store_nbytes(8, layers, FrameMode.SPARSE_CAUSAL, 77, 40)
    assert full <= 8e9 and default <= 8e9 and shape <= 8.6e9, (full, default, shape)
    # FateZero's reference keeps every probability map of the same layers in fp32 (for comparison):
    reference = sum((8 * 8 * n * n + 8 * 8 * n * 77) * 4 for n, c, h in layers if n <= 1024) * 50
    assert reference > 10 * full


def test_fp32_store_holds_what_the_fp16_store_rounds(unet, prompt, host):
    """``precision=fp32`` (FateZero's precision in its fp32 runs): the store holds the very tensors the default fp16
    store rounds, twice the bytes (the formula follows), and says so in its description (the default stays out of
    it, so earlier stores keep theirs); fusing it moves the edit by the rounding only."""
    h = Host(copy.deepcopy(unet), prompt, precision="fp32")  # the same weights; the module's host stays installed on unet
    try:
        spec = h.store.spec
        assert spec.dtype == torch.float32 and StoreSpec.from_json(spec.to_json()) == spec and '"precision": "fp32"' in spec.to_json()
        assert host.store.spec.dtype == torch.float16 and "precision" not in host.store.spec.to_json()
        for s in range(STEPS):
            assert sorted(h.store.names(s)) == sorted(host.store.names(s))
            for name, t in h.store.step(s).items():
                assert t.dtype == torch.float32 and torch.equal(t.to(torch.float16), host.store.get(s, name)), name
        want = store_nbytes(FRAMES, stored_layers(h.store), FrameMode.MIDDLE_FRAME, 77, STEPS, precision=StorePrecision.FP32)
        assert h.store.nbytes == want == 2 * host.store.nbytes
        rounded = AttentionStore.from_tensors(host.store.spec, h.store.tensors())  # an fp16 spec rounds on the way in
        assert all(torch.equal(t, host.store.get(s, n)) for s in range(STEPS) for n, t in rounded.step(s).items())
        fz = fz_edit(prompt, cross=0.8, self_=0.8, words=("cat",), threshold=0.9)
        exact, _ = h.edit(fz)
        half, _ = h.edit(fz, store=host.store)
        assert not torch.equal(exact.edited, half.edited)
        assert float((exact.edited - half.edited).norm() / exact.edited.norm()) < 1e-4  # measured 2.0e-5
    finally:
        h.close()
    with pytest.raises(SettingsError, match="store_precision"):
        StoreSpec.for_fraction(STEPS, 1.0, 64, FRAMES, FrameMode.MIDDLE_FRAME, "t", precision="bf16")


def test_self_blend_values_are_what_the_self_attention_mask_thresholds(host, prompt):
    """``self_blend_values`` (FateZero's ``SpatialBlender.get_mask`` before its threshold): the blend words' stored
    source cross-attention of the step, summed over their tokens, averaged over heads and the non-middle layers of
    the blend resolution, 3×3 max-pooled, nearest-resized to the layer, divided by each frame's maximum; the mask
    the fusion uses is exactly these values above the threshold, at every step and layer size."""
    fz = fz_edit(prompt, cross=0.0, self_=1.0, words=("cat",), threshold=0.9)
    ctl = FateZeroController(fz, host.store, host.sched, (8, 8))
    pos = list(fz.mask_positions)
    for step in range(STEPS):
        maps = [host.store.get(step, n).float() for n in host.store.names(step)
                if parse_entry(n)[0] == "attn2" and parse_entry(n)[1].block != "middle"]  # the tiny UNet: all 8×8 (latent/1)
        word = torch.cat([p[..., pos].sum(-1) for p in maps], dim=1).mean(1).reshape(FRAMES, 1, 8, 8)  # heads × layers
        pooled = torch.nn.functional.max_pool2d(word, 3, 1, 1)
        for size in ((8, 8), (4, 4), (2, 2)):
            v = ctl.self_blend_values(step, size)
            want = torch.nn.functional.interpolate(pooled, size=size)[:, 0]
            want = want / want.flatten(1).amax(-1)[:, None, None]
            assert v.shape == (FRAMES, *size) and v.dtype == torch.float32
            torch.testing.assert_close(v, want, atol=1e-6, rtol=1e-6)
            assert torch.equal(v > 0.9, ctl.self_mask(step, size[0] * size[1]).reshape(FRAMES, *size))
    assert 0 < ctl.last_self_mask.sum() < ctl.last_self_mask.numel()


def test_fusion_off_is_plain_target_ddim_from_the_inverted_noise(host, prompt):
    fz = fz_edit(prompt, cross=0.0, self_=0.0)
    res, _ = host.edit(fz)
    sig = host.sched.sigmas
    x = host.traj[0].clone()
    tgt = fz.edit.target_cond.expand(FRAMES, -1, -1)
    with torch.no_grad():
        for i in range(STEPS):
            d = host.den(torch.cat([x, x]), sig[i].expand(2 * FRAMES), torch.cat([host.empty.expand(FRAMES, -1, -1), tgt]),
                         [1, 0], RunState())
            d = d[:FRAMES] + 7.5 * (d[FRAMES:] - d[:FRAMES])
            x = d + sig[i + 1] * (x - d) / sig[i]
    torch.testing.assert_close(res.edited, x / torch.sqrt(1 + sig[-1] ** 2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(res.source, host.latents, atol=1e-5, rtol=1e-5)  # the inverted video itself
    assert host.store.read_order == [] or set(host.store.read_order) <= set(range(STEPS))


def test_mask_threshold_extremes_are_full_and_no_replacement(host, prompt):
    full, _ = host.edit(fz_edit(prompt, cross=0.0, self_=1.0))  # no blend words: every self-attention replaced
    none, _ = host.edit(fz_edit(prompt, cross=0.0, self_=0.0))
    top, ctl_top = host.edit(fz_edit(prompt, cross=0.0, self_=1.0, words=("cat",), threshold=1.0))
    zero, ctl_zero = host.edit(fz_edit(prompt, cross=0.0, self_=1.0, words=("cat",), threshold=0.0))
    torch.testing.assert_close(top.edited, full.edited, atol=0, rtol=0)
    torch.testing.assert_close(zero.edited, none.edited, atol=0, rtol=0)
    assert not ctl_top.last_self_mask.any() and ctl_zero.last_self_mask.all()
    assert not torch.allclose(full.edited, none.edited, atol=1e-4)  # replacement does something
    mid, ctl_mid = host.edit(fz_edit(prompt, cross=0.0, self_=1.0, words=("cat",), threshold=0.9))
    m = ctl_mid.last_self_mask
    assert 0 < m.sum() < m.numel()  # a partial mask …
    assert not torch.allclose(mid.edited, full.edited, atol=1e-5) and not torch.allclose(mid.edited, none.edited, atol=1e-5)


def test_the_edit_reads_each_step_by_sigma_in_the_reverse_of_the_recording_order(host, prompt, unet):
    # recorded while inverting (sigma rising: steps S−1 … 0); read while denoising (0 … S−1)
    assert host.store.record_order == list(range(STEPS - 1, -1, -1))
    store = AttentionStore.from_tensors(host.store.spec, host.store.tensors())
    host.edit(fz_edit(prompt, cross=1.0, self_=1.0), store=store)
    assert store.read_order == list(range(STEPS))
    # entry i is the source's attention at sigmas[i] on the inverted latent one level lower, trajectory[i+1]
    # (the inversion's step up to sigmas[i]): recompute step 2 alone, bit for bit
    alone = AttentionStore(StoreSpec.for_fraction(STEPS, 1.0, DEFAULT_MAX_TOKENS, FRAMES, FrameMode.MIDDLE_FRAME, "t"))
    sig = host.sched.sigmas
    with torch.no_grad():
        host.recording(alone)(inversion_input(host.traj[3], sig[3], sig[2]), sig[2].expand(FRAMES), host.cond.expand(FRAMES, -1, -1))
    assert alone.record_order == [2]
    for name, t in alone.step(2).items():
        torch.testing.assert_close(t, host.store.get(2, name), atol=0, rtol=0)
    # and the order matters: the same store with its steps reversed gives another edit
    steps = host.store.spec.stored_steps
    flipped = AttentionStore.from_tensors(host.store.spec, {f"{steps - 1 - int(k.split('/')[0])}/{k.split('/', 1)[1]}": v
                                                             for k, v in host.store.tensors().items()})
    a, _ = host.edit(fz_edit(prompt, cross=1.0, self_=1.0), store=store)
    b, _ = host.edit(fz_edit(prompt, cross=1.0, self_=1.0), store=flipped)
    assert not torch.allclose(a.edited, b.edited, atol=1e-4)


def test_identity_fusion_reproduces_the_recorded_call(host, prompt):
    """With target = source and everything replaced, a UNet call on exactly the latent and sigma where
    step 0 was recorded (the inversion's last call: trajectory[1] at sigmas[0]) agrees with the unfused
    call up to fp16 rounding, while a real edit moves it much further. (The edit's own step 0 runs on
    z_T, one level above what the store saw — in FateZero too, which records at the inversion's calls.)"""
    sig = host.sched.sigmas
    x = inversion_input(host.traj[1], sig[1], sig[0])
    out = {}
    for name, fz in (("fused", fz_edit(prompt, cross=1.0, self_=1.0, tgt="a cat running")),
                     ("plain", fz_edit(prompt, cross=0.0, self_=0.0, tgt="a cat running")),
                     ("edit", fz_edit(prompt, cross=0.0, self_=0.0, tgt="a tiger running"))):
        ctl = FateZeroController(fz, host.store, host.sched, (8, 8))
        with torch.no_grad():
            out[name] = host.den(x, sig[0].expand(FRAMES), fz.edit.target_cond.expand(FRAMES, -1, -1), [COND],
                                 RunState(ctl, LayoutSpec(FRAMES, 2, ((COND, TARGET),))))
    same = float((out["fused"] - out["plain"]).abs().max())
    edited = float((out["edit"] - out["plain"]).abs().max())
    assert same < 1e-2 * edited, (same, edited)


@pytest.mark.parametrize("level", list(BlendLatent))
def test_latent_blend_keeps_the_inverted_latent_outside_its_mask(host, prompt, level):
    """After each blended step the target equals, outside the mask, the inversion's latent at the
    level the step reached (same_level) or one level noisier (one_level_noisier, FateZero's code)."""
    spec = LocalBlendSpec(tuple(make_edit(prompt).source.positions("cat")), tuple(make_edit(prompt).target.positions("tiger")),
                          threshold=0.95, start=0.0, end=1.0)
    blend = FateZeroLatentBlend(spec, FRAMES, (8, 8), STEPS, level)
    assert list(blend.window) == list(range(STEPS - 1))  # FateZero's window: the last step is never blended
    checked = []

    def after(i, x):
        if blend.applies(i):
            m = blend.last_mask.expand_as(x)
            assert 0 < m.sum() < m.numel()
            want = host.traj[i + 1 if level is BlendLatent.SAME_LEVEL else i]
            assert torch.equal(x[~m], want.to(x)[~m]), i
            checked.append(i)

    fz = fz_edit(prompt, cross=0.8, self_=0.8, blend=spec)
    fz.blend_latent = level
    ctl = FateZeroController(fz, host.store, host.sched, (8, 8), blend)
    with torch.no_grad():
        fused_edit(host.den, host.inputs, host.traj, fz.edit.target_cond, 7.5, Guidance.DECOUPLED, ctl, on_step=after)
    assert checked == list(range(STEPS - 1))


@pytest.mark.parametrize("steps,start,end,first,last", [(50, 0.2, 0.8, 10, 38), (10, 0.2, 0.8, 2, 6), (4, 0.25, 0.75, 1, 1),
                                                        (50, 0.0, 1.0, 0, 48)])
def test_latent_blend_window_is_fatezeros(steps, start, end, first, last, prompt):
    """FateZero's code blends while start·S < (steps done) < end·S: after steps 10…38 of 50."""
    spec = LocalBlendSpec((1,), (1,), start=start, end=end)
    window = latent_blend_steps(spec, steps)
    assert (window[0], window[-1]) == (first, last) and len(window) == last - first + 1
    blend = FateZeroLatentBlend(spec, 1, (8, 8), steps)
    assert [s for s in range(steps) if blend.applies(s)] == list(window)
    assert [s for s in range(steps) if blend.records(s)] == list(range(last + 1))  # maps from step 0 on
    assert fz_edit(prompt, cross=0.0, self_=0.0, blend=spec).reads_until(steps) == last + 1


def test_latent_blend_mask_unites_the_steps_source_map_with_the_targets_maps_so_far():
    """Source: the stored map of the current step only; target: its maps summed from step 0 on
    (also before the window). Blobs on a 4×4 layer of an 8×8 latent make each rule visible."""
    frames, steps = 1, 6
    spec = LocalBlendSpec((1,), (2,), threshold=0.5, start=0.5, end=1.0)  # window: steps 3…4
    blend = FateZeroLatentBlend(spec, frames, (8, 8), steps)
    key = LayerKey("input", 4, 0)

    def maps(spot, word):
        """[F, H=2, N=16, T=4] probabilities: ``word`` attends to the 4×4 cell ``spot`` only."""
        p = torch.full((frames, 2, 16, 4), 0.25)
        p[..., word] = 0.0
        if spot is not None:
            p[:, :, spot[0] * 4 + spot[1], word] = 1.0
        return p

    src_spots = [(0, 0), (0, 0), (0, 0), (3, 3)]  # the source map moves at step 3
    tgt_spots = [(0, 3), None, None, None]  # the target attends to a cell at step 0 only
    for step in range(4):
        assert blend.records(step)
        blend.record(key, maps(src_spots[step], 1), maps(tgt_spots[step], 2))
        blend.end_step()
    m = blend.mask()[0, 0]  # [8, 8]
    # 3×3 max-pool then ×2 nearest upsampling: a cell's blob covers the 2×2 latent pixels of its neighbours
    assert m[6:, 6:].all()  # the source map of step 3
    assert not m[0:2, 0:2].any()  # not the source map of steps 0–2
    assert m[0:2, 6:].all()  # the target's map of step 0, before the window, still counts
    assert not m[3:5, 0:2].any()
    x_src, x_tgt = torch.zeros(frames, 4, 8, 8), torch.ones(frames, 4, 8, 8)
    assert torch.equal(blend.blend(2, x_src, x_tgt), x_tgt)  # before the window: untouched
    out = blend.blend(3, x_src, x_tgt)
    assert torch.equal(out, torch.where(m, x_tgt, x_src)) and torch.equal(blend.last_mask[0, 0], m)


def test_same_level_blend_changes_nothing_on_the_samplers_own_path():
    """On a trajectory the sampler itself walked (an exact inversion) a blend that keeps the inverted
    latent everywhere must change nothing: same_level does exactly that; FateZero's one level
    noisier latent moves the kept video (exact Gaussian denoiser, 50 steps, window 0.2–0.8)."""
    from tests.analytic import GaussianDenoiser, video

    den = GaussianDenoiser()
    latents, cond, empty = video(frames=3)
    sched = Schedule.reference(50)
    sig = sched.sigmas
    z_t = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2)) * torch.sqrt(1 + sig[0] ** 2)
    inputs = EditInputs(z_t, sched, cond, None, empty, 1.0)
    spec = LocalBlendSpec((0,), (0,))
    zeros = torch.zeros(3, 1, 16, cond.shape[1])  # no attention on the blend words: an empty mask

    def run(source_latents, blend=None):
        path = [z_t]

        def denoise(x, sigma, context, cond_or_uncond, run_state):
            if blend is not None:
                blend.record(LayerKey("input", 4, 0), zeros, zeros)
            return den(x, sigma, context)

        class BlendOnly(AttentionController):
            """The latent blend's end of step, without any attention fusion."""

            def end_step(self, step, x, source_at):
                blend.end_step()
                return blend.blend(step, source_at(blend.source_index(step)).to(x), x)

        res = fused_edit(denoise, inputs, source_latents, cond, 1.0, Guidance.DECOUPLED, BlendOnly() if blend is not None else None,
                         on_step=lambda i, x: path.append(x.clone()))
        return res.edited, torch.stack(path)

    plain, walk = run(torch.zeros(51, *latents.shape))  # the sampler's own walk with the source prompt
    same, _ = run(walk, FateZeroLatentBlend(spec, 3, (4, 4), 50, BlendLatent.SAME_LEVEL))
    fatezero = FateZeroLatentBlend(spec, 3, (4, 4), 50, BlendLatent.ONE_LEVEL_NOISIER)
    noisier, _ = run(walk, fatezero)
    assert fatezero.last_mask is not None and not fatezero.last_mask.any()  # it did blend, keeping everything
    assert torch.equal(same, plain)
    error = float((noisier - plain).norm() / plain.norm())
    assert error > 1e-2, error  # measured: 3.4e-2 (8.9e-2 at 20 steps, 1.9e-1 at 10)


def test_store_on_disk_round_trip_and_step_by_step_reading(unet, prompt, tmp_path):
    d = Host(unet, prompt, directory=tmp_path / "store", in_memory=False)
    try:
        assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["spec.json"] + [f"step_{i:04d}.safetensors" for i in range(STEPS)]
        mem = AttentionStore.open(tmp_path / "store", in_memory=True)
        lazy = AttentionStore.open(tmp_path / "store", in_memory=False)
        assert mem.nbytes == d.store.nbytes == lazy.nbytes > 0
        fz = fz_edit(prompt, cross=0.8, self_=0.8, words=("cat",), threshold=0.9)
        a, _ = d.edit(fz, store=mem)
        b, _ = d.edit(fz, store=lazy)
        torch.testing.assert_close(a.edited, b.edited, atol=0, rtol=0)
        assert len(lazy._steps) <= 1  # one step in memory at a time
        (tmp_path / "store" / "step_0002.safetensors").write_bytes(b"broken")
        with pytest.raises(AttentionStoreError, match="unreadable"):
            AttentionStore.open(tmp_path / "store", in_memory=True)
        (tmp_path / "store" / "spec.json").unlink()
        with pytest.raises(AttentionStoreError, match="not a finished attention store"):
            AttentionStore.open(tmp_path / "store", in_memory=False)
    finally:
        d.close()


def test_partial_store_and_small_layers(unet, prompt):
    h = Host(unet, prompt, fraction=0.4, max_tokens=16)
    try:
        assert h.store.spec.stored_steps == 2 and h.store.record_order == [1, 0]
        assert {parse_entry(n)[1] for n in h.store.names(0)} == {LayerKey("middle", 0, 0)}
        with pytest.raises(AttentionStoreError, match="stored only 2"):
            FateZeroController(fz_edit(prompt, cross=0.8, self_=0.2), h.store, h.sched, (8, 8))
        res, _ = h.edit(fz_edit(prompt, cross=0.4, self_=0.4))  # within the stored steps: runs
        assert torch.isfinite(res.edited).all()
        with pytest.raises(AttentionStoreError, match="no cross-attention map outside the middle block"):
            h.edit(fz_edit(prompt, cross=0.4, self_=0.4, words=("cat",)))
    finally:
        h.close()


@pytest.mark.parametrize("mode", [FrameMode.SPARSE_CAUSAL, FrameMode.FIRST_FRAME, FrameMode.NONE])
def test_other_frame_modes_fuse_from_their_compact_keys(unet, prompt, mode):
    h = Host(unet, prompt, mode=mode, fraction=0.6)
    try:
        k = h.store.get(0, entry("attn1", LayerKey("input", 1, 0), "k"))
        assert k.shape[0] == key_frames(mode, FRAMES)
        res, _ = h.edit(fz_edit(prompt, cross=0.6, self_=0.6, words=("cat",), threshold=0.9))
        off, _ = h.edit(fz_edit(prompt, cross=0.0, self_=0.0))
        assert torch.isfinite(res.edited).all() and not torch.allclose(res.edited, off.edited, atol=1e-4)
    finally:
        h.close()


def test_min_channels_store_keeps_every_frame_in_narrow_blocks(unet, prompt, host):
    """With FateZero's least_sc_channel the narrow blocks' attn1 is per frame: the store keeps
    their keys of every frame (the wide middle block: the middle frame's), the formula follows,
    fusion reads each layer by its own mode, and a model inflated otherwise is refused."""
    h = Host(unet, prompt, fraction=0.6, min_channels=64)  # the tiny UNet: 32-wide blocks, a 64-wide middle
    try:
        spec = h.store.spec
        assert spec.frame_attention_min_channels == 64 and StoreSpec.from_json(spec.to_json()) == spec
        assert "frame_attention_min_channels" not in host.store.spec.to_json()  # the default: earlier stores' description
        narrow = h.store.get(0, entry("attn1", LayerKey("input", 1, 0), "k"))
        wide = h.store.get(0, entry("attn1", LayerKey("middle", 0, 0), "k"))
        assert narrow.shape[0] == FRAMES and wide.shape[0] == 1
        assert h.store.get(0, entry("attn1", LayerKey("input", 1, 0), "q")).shape[0] == FRAMES  # per-frame rows
        layers = stored_layers(h.store)
        want = store_nbytes(FRAMES, layers, FrameMode.MIDDLE_FRAME, 77, spec.stored_steps, frame_attention_min_channels=64)
        assert h.store.nbytes == want > store_nbytes(FRAMES, layers, FrameMode.MIDDLE_FRAME, 77, spec.stored_steps)
        fz = fz_edit(prompt, cross=0.6, self_=0.6, words=("cat",), threshold=0.9)
        res, _ = h.edit(fz)
        off, _ = h.edit(fz_edit(prompt, cross=0.0, self_=0.0))
        assert torch.isfinite(res.edited).all() and not torch.allclose(res.edited, off.edited, atol=1e-4)
        store = h.store
    finally:
        h.close()
    with pytest.raises(AttentionStoreError, match="does not fit"):
        host.edit(fz_edit(prompt, cross=0.6, self_=0.6), store=store)  # frame attention in every block
