"""Prompt-to-prompt editing core: the controller against hand-written references, LocalBlend,
the decoupled sampler's rows, identity, and reuse == full (diffusers host, random weights)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import extra_options, randomise_temporal
from vp2p import COND, UNCOND, AttentionCall, BatchLayout, FrameMode, LayerKey, LayoutSpec, T2SSettings
from vp2p.attention import apply_probabilities, attention_probabilities, sdpa
from vp2p.clip_vocab import find_vocab_source
from vp2p.edit import EditInputs, Guidance, decoupled_edit
from vp2p.inversion import InversionSettings, ddim_invert, optimise_null_text
from vp2p.local_blend import LocalBlend, LocalBlendSpec, grid_of
from vp2p.p2p import P2PController, P2PEdit, SelfReplace
from vp2p.prompt_align import EditKind, reweight_vector
from vp2p.schedule import Schedule, sd_alphas_cumprod

pytestmark = pytest.mark.skipif(find_vocab_source() is None, reason="no CLIP vocabulary (pip install --no-deps open_clip_torch)")

DIM = 32  # the tiny UNet's text width
STEPS = 5


def embed(p, seed=0):
    """A stand-in text encoder: one fixed random vector per token id (+ position), so equal
    tokens at equal positions embed equally, as prompt-to-prompt assumes."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(50000, DIM, generator=g)
    pos = 0.1 * torch.randn(77, DIM, generator=g)
    ids = [49406, *p.ids, 49407] + [49407] * (77 - p.end - 1)
    return (table[ids] + pos).unsqueeze(0)


def make_edit(prompt, src="a cat running", tgt="a tiger running", **kw):
    s, t = prompt(src), prompt(tgt)
    kind = kw.pop("kind", EditKind.REPLACE if len(s.words) == len(t.words) else EditKind.REFINE)
    return P2PEdit(s, t, embed(s), embed(t), kind, **kw)


# -- the controller on small tensors ----------------------------------------------------------

def call_for(kind, roles, frames, sigma, heads=2, key=None, mode=FrameMode.NONE):
    key = key or LayerKey("input", 1, 0)
    layout = BatchLayout.resolve(len(roles) * frames, [r[0] for r in roles], LayoutSpec(frames, 2, tuple(roles)))
    eo = extra_options((key.block, key.id), key.index, heads, [r[0] for r in roles], sigmas=torch.full((len(roles) * frames,), sigma))
    return AttentionCall(kind, key, heads, layout, mode, eo)


def test_cross_attention_replace_reweight_vs_hand_reference(prompt):
    sched = Schedule.reference(10)
    edit = make_edit(prompt, "a cat running", "a snowleopard running", cross_replace=0.5)
    edit.reweight = reweight_vector(edit.target, {"snowleopard": 2.0})
    ctl = P2PController(edit, sched)
    roles = [(UNCOND, 1), (COND, 0), (COND, 1)]
    frames, heads, n, d = 2, 2, 6, 4
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3 * frames, n, heads * d, generator=g)
    k = torch.randn(3 * frames, 77, heads * d, generator=g)
    v = torch.randn(3 * frames, 77, heads * d, generator=g)
    src, tgt = slice(2, 4), slice(4, 6)
    for step, replaced in ((0, True), (4, True), (5, False), (9, False)):
        out = ctl.override(call_for("attn2", roles, frames, float(sched.sigmas[step])), q, k, v)
        p_src = attention_probabilities(q[src], k[src], heads)
        p_tgt = attention_probabilities(q[tgt], k[tgt], heads)
        m = torch.zeros(77, 77)
        m[0, 0] = m[1, 1] = 1
        m[2, 2] = m[2, 3] = 0.5  # cat -> snow, leopard (2 tokens)
        m[3, 4] = 1
        for j in range(72):
            m[4 + j, 5 + j] = 1
        w = torch.ones(77)
        w[2:4] = 2.0
        want_p = (p_src @ m) * w if replaced else p_tgt
        if out is None:  # nothing to do at this step: the default path runs
            assert not replaced
            continue
        assert set(out) == {2}, "the controller returns the conditional target only; the patch computes the rest"
        torch.testing.assert_close(out[2], apply_probabilities(want_p, v[tgt], heads))


def test_refine_and_per_word_windows(prompt):
    sched = Schedule.reference(10)
    edit = make_edit(prompt, "a cat running", "a big cat running", cross_replace=0.2, cross_words={2: 0.0})
    alpha = edit.cross_alpha(10)
    assert alpha[:2].sum(1).tolist() == [76.0, 76.0] and alpha[:, 2].sum() == 0 and alpha[2:].sum() == 0
    ctl = P2PController(edit, sched)
    roles = [(COND, 0), (COND, 1)]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 5, 8, generator=g), torch.randn(2, 77, 8, generator=g), torch.randn(2, 77, 8, generator=g))
    out = ctl.override(call_for("attn2", roles, 1, float(sched.sigmas[0])), q, k, v)
    p_src, p_tgt = attention_probabilities(q[:1], k[:1], 2), attention_probabilities(q[1:], k[1:], 2)
    mapper, alphas = edit.mapper, edit.alphas
    refined = p_src[..., mapper] * alphas + p_tgt * (1 - alphas)
    a = alpha[0]
    want = refined * a + p_tgt * (1 - a)
    assert set(out) == {1}
    torch.testing.assert_close(out[1], apply_probabilities(want, v[1:], 2))
    assert torch.equal(want[..., 2], p_tgt[..., 2])  # "big" is new and its window is closed


def test_self_replace_temporal_by_default_frame_on_request(prompt):
    sched = Schedule.reference(10)
    roles = [(UNCOND, 1), (COND, 0), (COND, 1)]
    g = torch.Generator().manual_seed(2)
    n = 4  # temporal rows: videos × tokens, each a sequence over frames
    q, k, v = (torch.randn(3 * n, 3, 8, generator=g) for _ in range(3))
    ctl = P2PController(make_edit(prompt, self_replace=0.3), sched)
    out = ctl.override(call_for("temporal", roles, 3, float(sched.sigmas[2])), q, k, v)
    assert set(out) == {2}
    torch.testing.assert_close(out[2], sdpa(q[4:8], k[4:8], v[8:12], 2))  # the source's maps, the target's values
    assert ctl.override(call_for("temporal", roles, 3, float(sched.sigmas[3])), q, k, v) is None  # window over
    assert ctl.override(call_for("attn1", roles, 1, float(sched.sigmas[0])), q, k, v) is None  # frame attention untouched
    frame = P2PController(make_edit(prompt, self_replace=0.3, self_attention=SelfReplace.FRAME), sched)
    q1, k1, v1 = (torch.randn(3, 16, 8, generator=g) for _ in range(3))  # one frame per video, 4×4 tokens
    out = frame.override(call_for("attn1", roles, 1, float(sched.sigmas[0])), q1, k1, v1)
    assert set(out) == {2}
    torch.testing.assert_close(out[2], sdpa(q1[1:2], k1[1:2], v1[2:3], 2))
    big = torch.randn(3, 17 * 17, 8, generator=g)  # more than 16² tokens per frame: left alone, as prompt-to-prompt does
    assert frame.override(call_for("attn1", roles, 1, float(sched.sigmas[0])), big, big, big) is None
    assert frame.override(call_for("temporal", roles, 3, float(sched.sigmas[0])), q, k, v) is None


# -- LocalBlend -------------------------------------------------------------------------------------

def test_token_grids_follow_the_unet_at_any_size():
    """grid_of gives, at each level, the size a stride-2 convolution with padding 1 (the UNet's downsampler) gives:
    e.g. 512×288 → latent 64×36 → 32×18 → 16×9 → 8×5, and 448×320 → 56×40 → … → 7×5."""
    conv = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)
    for hw in [(36, 64), (40, 56), (9, 7), (64, 64), (5, 3)]:
        x = torch.zeros(1, 1, *hw)
        for factor in (1, 2, 4, 8):
            h, w = x.shape[-2:]
            assert grid_of(h * w, hw) == (factor, h, w), (hw, factor)
            x = conv(x)
    assert grid_of(16 * 9, (36, 64)) == (4, 9, 16) and grid_of(8 * 5, (36, 64)) == (8, 5, 8)


def test_local_blend_masks_are_per_frame_and_keep_the_source_outside():
    assert grid_of(12 * 8, (12, 8)) == (1, 12, 8) and grid_of(6 * 4, (12, 8)) == (2, 6, 4) and grid_of(7, (12, 8)) is None
    frames, h, w = 2, 8, 8
    blend = LocalBlend(LocalBlendSpec((2,), (2,), threshold=0.3, start=0.0), frames, (h, w), steps=4)
    p = torch.full((frames, 1, h * w, 77), 1e-3)
    grid = p[:, 0, :, 2].view(frames, h, w)
    grid[0, :2, :2] = 1.0  # frame 0 attends its top-left corner with the blend word
    grid[1, -2:, -2:] = 1.0  # frame 1 its bottom-right corner
    blend.record(LayerKey("input", 1, 0), p, p)
    blend.end_step()
    m = blend.mask()
    assert m.shape == (frames, 1, h, w)
    assert m[0, 0, :3, :3].all() and not m[0, 0, 4:, 4:].any()  # 3×3 max-pool widens by one
    assert m[1, 0, -3:, -3:].all() and not m[1, 0, :4, :4].any()
    x_src, x_tgt = torch.randn(frames, 4, h, w), torch.randn(frames, 4, h, w)
    out = blend.blend(0, x_src, x_tgt)
    assert torch.equal(out[~m.expand_as(out)], x_src[~m.expand_as(out)])
    assert torch.equal(out[m.expand_as(out)], x_tgt[m.expand_as(out)])
    late = LocalBlend(LocalBlendSpec((2,), (2,), start=0.5), frames, (h, w), steps=4)
    assert torch.equal(late.blend(1, x_src, x_tgt), x_tgt)  # before 50% of the steps: no blending


# -- the sampler on a random UNet ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def edit_setup(unet, prompt):
    from vp2p.diffusers_host import DiffusersT2S

    host = DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, True)).install()
    randomise_temporal(host.bank, 3)
    den = host.denoiser(sd_alphas_cumprod())
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 8, 8, generator=g) + 0.3 * torch.randn(3, 4, 8, 8, generator=g)
    src = prompt("a cat running")
    cond, empty = embed(src), 0.1 * torch.randn(1, 77, DIM, generator=g)
    sched = Schedule.reference(STEPS)
    with torch.no_grad():
        traj = ddim_invert(den, latents, cond, sched)
    res = optimise_null_text(den, traj, cond, empty, sched, InversionSettings(steps=STEPS, inner_steps=3))
    inputs = EditInputs(traj[0], sched, cond, res.null_embeddings, empty, 7.5, res.source_path)
    yield den, inputs, latents
    host.remove()


def run_edit(den, inputs, edit=None, guidance=Guidance.DECOUPLED, reuse=True, blend=None, target=None, record=None):
    ctl = P2PController(edit, inputs.schedule, blend) if edit is not None else None

    def denoise(x, sigma, context, cond_or_uncond, run):
        if record is not None:
            record.append((run.layout.roles, context))
        return den(x, sigma, context, cond_or_uncond, run)

    tgt = target if target is not None else (edit.target_cond if edit is not None else inputs.cond)
    with torch.no_grad():
        return decoupled_edit(denoise, inputs, tgt, 7.5, guidance, ctl, reuse=reuse)


def test_identity_edit_reproduces_the_source(edit_setup, prompt):
    den, inputs, _ = edit_setup
    same = make_edit(prompt, "a cat running", "a cat running", cross_replace=1.0, self_replace=1.0)
    for guidance in (Guidance.SHARED_NULL, Guidance.DECOUPLED):
        for reuse in (True, False):
            res = run_edit(den, inputs, same if guidance is Guidance.SHARED_NULL else None, guidance, reuse, target=inputs.cond)
            if guidance is Guidance.SHARED_NULL:
                # computed side by side (the source by the host's kernel, the target from explicit maps) or reused
                # from the inversion's walk (computed unbatched there): equal up to float noise amplified by cfg 7.5
                tol = 1e-4
                torch.testing.assert_close(res.edited, res.source, atol=tol, rtol=tol)
    # the source branch is the inversion's walk, computed or reused
    full = run_edit(den, inputs, same, Guidance.SHARED_NULL, reuse=False, target=inputs.cond)
    scale = torch.sqrt(1 + inputs.schedule.sigmas[-1] ** 2)
    torch.testing.assert_close(full.source, inputs.source_path[-1] / scale, atol=1e-4, rtol=1e-4)


def test_rows_carry_the_null_embeddings_each_guidance_prescribes(edit_setup, prompt):
    den, inputs, _ = edit_setup
    edit = make_edit(prompt)
    frames = inputs.z_t.shape[0]
    nulls, neg = inputs.null_embeddings, inputs.negative
    for guidance, want in (
        (Guidance.DECOUPLED, {(UNCOND, 0): "null", (UNCOND, 1): "neg", (COND, 0): "src", (COND, 1): "tgt"}),
        (Guidance.SHARED_NULL, {(UNCOND, 0): "null", (UNCOND, 1): "null", (COND, 0): "src", (COND, 1): "tgt"}),
        # fast: the source's uncond rows are sent (every chunk holds both branches) but not used
        (Guidance.FAST, {(UNCOND, 0): "neg", (UNCOND, 1): "neg", (COND, 0): "src", (COND, 1): "tgt"}),
    ):
        record = []
        run_edit(den, inputs, edit, guidance, reuse=False, record=record)
        assert len(record) == STEPS
        for i, (roles, context) in enumerate(record):
            assert {r: None for r in roles}.keys() == want.keys(), (guidance, roles)
            expect = {"null": nulls[i, 0], "neg": neg[0], "src": inputs.cond[0], "tgt": edit.target_cond[0]}
            for n, role in enumerate(roles):
                for f in range(frames):
                    assert torch.equal(context[n * frames + f], expect[want[role]]), (guidance, i, role)


def test_reuse_equals_the_full_path_with_fewer_rows(edit_setup, prompt):
    den, inputs, latents = edit_setup
    frames = latents.shape[0]
    edit = make_edit(prompt, cross_replace=0.4, self_replace=0.4)
    full = run_edit(den, inputs, edit, reuse=False)
    reused = run_edit(den, inputs, edit, reuse=True)
    torch.testing.assert_close(reused.edited, full.edited, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reused.source, full.source, atol=1e-4, rtol=1e-4)
    assert full.rows == [4 * frames] * STEPS
    # the source's rows only while the controller reads them (cross/self windows: 2 of 5 steps)
    assert reused.rows == [4 * frames] * 2 + [2 * frames] * 3
    assert not torch.allclose(full.edited, full.source, atol=1e-3)  # the edit did something


def test_local_blend_keeps_the_source_outside_the_mask_end_to_end(edit_setup, prompt):
    den, inputs, latents = edit_setup
    frames = latents.shape[0]
    edit = make_edit(prompt, cross_replace=0.4, self_replace=0.4)
    spec = LocalBlendSpec(tuple(edit.source.positions("cat")), tuple(edit.target.positions("tiger")), threshold=0.99)
    blend = LocalBlend(spec, frames, (8, 8), STEPS)
    edit.blend = spec
    res = run_edit(den, inputs, edit, reuse=False, blend=blend)
    m = blend.last_mask.expand_as(res.edited)
    assert 0 < m.sum() < m.numel()  # a real partial mask (random weights: near-uniform maps, hence the high threshold)
    assert torch.equal(res.edited[~m], res.source[~m])  # bit-exact outside
    assert not torch.allclose(res.edited[m], res.source[m])
    # reuse gives the same result with blending too
    blend2 = LocalBlend(spec, frames, (8, 8), STEPS)
    again = run_edit(den, inputs, edit, reuse=True, blend=blend2)
    torch.testing.assert_close(again.edited, res.edited, atol=1e-4, rtol=1e-4)
    assert again.rows == [4 * frames] * STEPS  # blending reads the source maps at every step (all chunks × both branches)


class RecordingBlend(LocalBlend):
    """A LocalBlend that keeps what the controller hands it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def record(self, key, p_source, p_target, frames=None):
        self.seen.append((p_source.clone(), p_target.clone()))
        super().record(key, p_source, p_target)


def test_local_blend_reads_the_targets_maps_after_the_edit(edit_setup, prompt):
    """As the reference (whose store holds the maps it then edits in place): inside the cross-replace
    window the target's blend maps are the replaced ones (source maps @ mapper), outside its own."""
    den, inputs, latents = edit_setup
    frames = latents.shape[0]
    for cross in (1.0, 0.0):
        edit = make_edit(prompt, cross_replace=cross, self_replace=0.0)
        spec = LocalBlendSpec(tuple(edit.source.positions("cat")), tuple(edit.target.positions("tiger")), start=1.0)
        blend = RecordingBlend(spec, frames, (8, 8), STEPS)
        edit.blend = spec
        run_edit(den, inputs, edit, reuse=False, blend=blend)
        assert blend.seen
        for p_src, p_tgt in blend.seen:
            replaced = p_src @ edit.mapper
            if cross == 1.0:
                torch.testing.assert_close(p_tgt, replaced, atol=1e-6, rtol=0)
            else:
                assert (p_tgt - replaced).abs().max() > 1e-3  # the target's own maps


@pytest.mark.parametrize("steps", [10, 20, 25, 30, 50])
def test_cross_replace_window_rounds_as_the_reference(prompt, steps):
    """The reference's per-step table has S+1 rows: a window of f covers int(f·(S+1)) steps (the self
    window int(f·S)), e.g. 0.75 of 50 steps is 38 cross steps and 37 self steps."""
    for f in [i / 100 for i in range(0, 101)]:
        edit = make_edit(prompt, cross_replace=f, self_replace=f, cross_words={2: f})
        alpha = edit.cross_alpha(steps)
        want = min(steps, int(f * (steps + 1)))
        assert int(alpha[:, 1].sum()) == want and int(alpha[:, 2].sum()) == want, (f, steps)
        assert edit.self_steps(steps) == int(f * steps)
    assert make_edit(prompt, cross_replace=0.75).cross_alpha(50)[:, 1].sum() == 38


def test_non_square_odd_frame_video_edits_end_to_end(unet, prompt):
    from vp2p.diffusers_host import DiffusersT2S

    g = torch.Generator().manual_seed(9)
    latents = torch.randn(5, 4, 12, 8, generator=g)  # 5 frames of 96×64 pixels
    src = prompt("a cat running")
    cond, empty = embed(src), 0.1 * torch.randn(1, 77, DIM, generator=g)
    sched = Schedule.reference(3)
    with DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, True)) as host:
        den = host.denoiser(sd_alphas_cumprod())
        with torch.no_grad():
            traj = ddim_invert(den, latents, cond, sched)
        res = optimise_null_text(den, traj, cond, empty, sched, InversionSettings(steps=3, inner_steps=1))
        inputs = EditInputs(traj[0], sched, cond, res.null_embeddings, empty, 7.5, res.source_path)
        edit = make_edit(prompt, "a cat running", "a big tiger running")  # refine
        spec = LocalBlendSpec(tuple(edit.source.positions("cat")), tuple(edit.target.positions("tiger")))
        edit.blend = spec
        out = run_edit(den, inputs, edit, blend=LocalBlend(spec, 5, (12, 8), 3))
    assert out.edited.shape == (5, 4, 12, 8) and torch.isfinite(out.edited).all()
