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


def test_override_replaces_output():
    class Zero(AttentionController):
        def override(self, call, q, k, v):
            return torch.zeros_like(q)

    patch = AttentionPatch(T2SSettings(FrameMode.FIRST_FRAME, False))
    q, k, v = (torch.randn(4, 5, C) for _ in range(3))
    out = patch.attn1(q, k, v, extra_options(("input", 1), 0, HEADS, [0], **{RUN_STATE_KEY: RunState(controller=Zero())}))
    assert out.shape == q.shape and torch.count_nonzero(out) == 0
