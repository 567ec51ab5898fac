"""The attention patch: layouts, controller paths, chaining."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import extra_options
from vp2p import AttentionController, AttentionPatch, FrameMode, LayoutError, LayoutSpec, RunState, T2SSettings
from vp2p.control import RUN_STATE_KEY
from vp2p.layout import BatchLayout

HEADS, C = 2, 8


class ExplicitMaps(AttentionController):
    """Forces the explicit-probabilities path and records what it saw."""

    def __init__(self):
        self.calls = []

    def needs_probabilities(self, call):
        return True

    def edit_probabilities(self, call, probs):
        self.calls.append((call.kind, call.key, tuple(probs.shape)))
        return probs


@pytest.mark.parametrize("mode", list(FrameMode))
@pytest.mark.parametrize("kind", ["attn1", "attn2"])
def test_sdpa_path_equals_explicit_probabilities(mode, kind):
    frames = 3
    q = torch.randn(2 * frames, 10, C)
    k = torch.randn(2 * frames, 10 if kind == "attn1" else 7, C)
    v = torch.randn_like(k)
    patch = AttentionPatch(T2SSettings(mode, False))
    fn = getattr(patch, kind)
    fast = fn(q, k, v, extra_options(("output", 3), 0, HEADS, [1, 0]))
    ctrl = ExplicitMaps()
    slow = fn(q, k, v, extra_options(("output", 3), 0, HEADS, [1, 0], **{RUN_STATE_KEY: RunState(controller=ctrl)}))
    assert ctrl.calls, "the explicit path did not run"
    assert (fast - slow).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", list(FrameMode))
def test_cond_uncond_together_and_apart_give_same_rows(mode):
    frames = 4
    q, k, v = (torch.randn(2 * frames, 9, C) for _ in range(3))
    patch = AttentionPatch(T2SSettings(mode, False))
    together = patch.attn1(q, k, v, extra_options(("input", 1), 0, HEADS, [1, 0]))
    uncond = patch.attn1(q[:frames], k[:frames], v[:frames], extra_options(("input", 1), 0, HEADS, [1]))
    cond = patch.attn1(q[frames:], k[frames:], v[frames:], extra_options(("input", 1), 0, HEADS, [0]))
    torch.testing.assert_close(together, torch.cat([uncond, cond]), atol=1e-6, rtol=1e-6)


def test_explicit_layout_with_branches():
    frames, branches = 2, 2
    rows = 2 * branches * frames
    q, k, v = (torch.randn(rows, 5, C) for _ in range(3))
    patch = AttentionPatch(T2SSettings(FrameMode.FIRST_FRAME, False))
    eo = extra_options(("input", 1), 0, HEADS, [1, 0], **{RUN_STATE_KEY: RunState(layout=LayoutSpec(frames, branches))})
    out = patch.attn1(q, k, v, eo)
    # every (chunk, branch) video attends to its own first frame: equal to running the videos one by one
    for vid in range(rows // frames):
        sl = slice(vid * frames, (vid + 1) * frames)
        one = patch.attn1(q[sl], k[sl], v[sl], extra_options(("input", 1), 0, HEADS, [0]))
        torch.testing.assert_close(out[sl], one, atol=1e-6, rtol=1e-6)
    with pytest.raises(LayoutError, match="rows"):
        patch.attn1(q[:-1], k[:-1], v[:-1], eo)


def test_layout_rejects_uneven_chunks():
    with pytest.raises(LayoutError, match="cond_or_uncond"):
        BatchLayout.resolve(7, [1, 0])
    layout = BatchLayout.resolve(8, [1, 0], LayoutSpec(frames=2, branches=2))
    assert layout.video_slice(1, 1) == slice(6, 8)
    assert layout.chunk_positions(0) == [1]


def test_previous_replace_is_chained_with_row_aligned_inputs():
    frames = 3
    q, k, v = (torch.randn(frames, 4, C) for _ in range(3))
    seen = {}

    def previous(q_, k_, v_, eo):
        seen["shapes"] = (q_.shape, k_.shape)
        return torch.full_like(q_, 7.0)

    from vp2p import LayerKey
    patch = AttentionPatch(T2SSettings(FrameMode.FIRST_FRAME, False), previous={("attn1", LayerKey("input", 1, 0)): previous})
    out = patch.attn1(q, k, v, extra_options(("input", 1), 0, HEADS, [0]))
    assert torch.equal(out, torch.full_like(q, 7.0))
    assert seen["shapes"] == (q.shape, k.shape)
    # the chained function sees first-frame keys for every row
    captured = {}

    def spy(q_, k_, v_, eo):
        captured["k"] = k_
        return q_

    patch = AttentionPatch(T2SSettings(FrameMode.FIRST_FRAME, False), previous={("attn1", LayerKey("input", 1, 0)): spy})
    patch.attn1(q, k, v, extra_options(("input", 1), 0, HEADS, [0]))
    for f in range(frames):
        assert torch.equal(captured["k"][f], k[0])
    # other keys are not chained
    plain = patch.attn1(q, k, v, extra_options(("input", 2), 0, HEADS, [0]))
    assert not torch.equal(plain, q)


ROLES = ((1, 1), (0, 0), (0, 1))  # uncond target, cond source, cond target (the decoupled sampler's)


class OwnsTarget(AttentionController):
    """Owns the conditional target (video 2): its output is ``fill``, or the plain attention."""

    def __init__(self, fill=None):
        self.fill = fill

    def override(self, call, q, k, v):
        rows = call.video_rows(2, q)
        out = call.attend(q[rows], k[rows], v[rows]) if self.fill is None else torch.full_like(q[rows], self.fill)
        return {2: out}


class CountingKernel:
    """A host attention kernel that records how many attention rows it was called with."""

    def __init__(self):
        self.rows = []

    def __call__(self, q, k, v, heads, extra_options=None):
        from vp2p.attention import sdpa
        self.rows.append(q.shape[0])
        return sdpa(q, k, v, heads)


def _edit_options(frames, controller, key=("input", 1)):
    spec = LayoutSpec(frames, 2, ROLES)
    return extra_options(key, 0, HEADS, [r[0] for r in ROLES], **{RUN_STATE_KEY: RunState(controller, spec)})


@pytest.mark.parametrize("mode", list(FrameMode))
@pytest.mark.parametrize("kind", ["attn1", "attn2"])
def test_controller_returns_only_its_rows_the_host_kernel_computes_the_rest(mode, kind):
    frames = 3
    q = torch.randn(3 * frames, 4, C)
    k = torch.randn(3 * frames, 4 if kind == "attn1" else 7, C)
    v = torch.randn_like(k)
    kernel = CountingKernel()
    patch = AttentionPatch(T2SSettings(mode, False), attention_fn=kernel)
    fn = getattr(patch, kind)
    plain = fn(q, k, v, extra_options(("input", 1), 0, HEADS, [1, 0, 0], **{RUN_STATE_KEY: RunState(layout=LayoutSpec(frames, 2, ROLES))}))
    kernel.rows.clear()
    out = fn(q, k, v, _edit_options(frames, OwnsTarget(fill=5.0)))
    assert torch.equal(out[2 * frames:], torch.full_like(out[2 * frames:], 5.0))
    torch.testing.assert_close(out[:2 * frames], plain[:2 * frames], atol=0, rtol=0)
    # the two videos the controller leaves alone go through the host's kernel in one call, and only they
    per = 1 if kind == "attn1" and mode in (FrameMode.FIRST_FRAME, FrameMode.MIDDLE_FRAME) and frames > 1 else frames
    assert kernel.rows == [2 * per]


def test_controller_reaches_the_host_kernel_for_its_own_sdpa():
    frames = 2
    q, k, v = (torch.randn(3 * frames, 4, C) for _ in range(3))
    kernel = CountingKernel()
    patch = AttentionPatch(T2SSettings(FrameMode.NONE, False), attention_fn=kernel)
    out = patch.attn2(q, k, v, _edit_options(frames, OwnsTarget()))
    assert sorted(kernel.rows) == [frames, 2 * frames]  # the controller's video, then the other two together
    torch.testing.assert_close(out, patch.attn2(q, k, v, extra_options(("input", 1), 0, HEADS, [1, 0, 0])), atol=1e-6, rtol=1e-6)


def test_a_bad_controller_output_is_refused_with_a_clear_error():
    class Wrong(AttentionController):
        def override(self, call, q, k, v):
            return {5: q}

    from vp2p.errors import RegistrationError
    q, k, v = (torch.randn(6, 4, C) for _ in range(3))
    with pytest.raises(RegistrationError, match="video 5"):
        AttentionPatch(T2SSettings(FrameMode.NONE, False)).attn2(q, k, v, _edit_options(2, Wrong()))


@pytest.mark.parametrize("mode", [FrameMode.FIRST_FRAME, FrameMode.SPARSE_CAUSAL, FrameMode.NONE])
@pytest.mark.parametrize("kind", ["attn1", "attn2"])
def test_another_nodes_patch_sees_every_row_under_an_active_controller(mode, kind):
    """A chained replace (here: plain attention + 3) is called with all rows and the call's own options;
    an identity edit then equals the other patch alone, and on an edited video the other patch's
    contribution is added to the controller's output."""
    from vp2p import LayerKey
    from vp2p.attention import sdpa

    frames = 3
    q = torch.randn(3 * frames, 4, C)
    k = torch.randn(3 * frames, 4 if kind == "attn1" else 7, C)
    v = torch.randn_like(k)
    seen = []

    def plus_three(q_, k_, v_, eo):
        seen.append((q_.shape[0], list(eo["cond_or_uncond"])))
        return sdpa(q_, k_, v_, eo["n_heads"]) + 3.0

    patch = AttentionPatch(T2SSettings(mode, False), previous={(kind, LayerKey("input", 1, 0)): plus_three})
    fn = getattr(patch, kind)
    alone = fn(q, k, v, extra_options(("input", 1), 0, HEADS, [1, 0, 0], **{RUN_STATE_KEY: RunState(layout=LayoutSpec(frames, 2, ROLES))}))
    identity = fn(q, k, v, _edit_options(frames, OwnsTarget()))
    torch.testing.assert_close(identity, alone, atol=1e-5, rtol=1e-5)
    edited = fn(q, k, v, _edit_options(frames, OwnsTarget(fill=5.0)))
    torch.testing.assert_close(edited[:2 * frames], alone[:2 * frames], atol=0, rtol=0)
    torch.testing.assert_close(edited[2 * frames:], torch.full_like(edited[2 * frames:], 8.0), atol=1e-5, rtol=1e-5)
    assert seen == [(3 * frames, [1, 0, 0])] * 3
