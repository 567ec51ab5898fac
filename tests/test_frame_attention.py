"""Frame attention: definitions, hand-written references, memory behaviour."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import extra_options
from vp2p import AttentionPatch, FrameMode, T2SSettings
from vp2p.frame_attention import frame_attention_inputs, source_frames

HEADS, DH = 2, 4
C = HEADS * DH


def reference_frame_attention(q, k, v, videos, frames, mode, sources=None):
    """Per frame, per head: softmax(q·kᵀ/√d) over the keys of the source frames (loops, no tricks);
    ``sources`` (per frame, the frames it reads) overrides the mode's definition."""
    out = torch.empty_like(q)
    src = sources if sources is not None else source_frames(mode, frames)
    for vid in range(videos):
        for f in range(frames):
            r = vid * frames + f
            ks = torch.cat([k[vid * frames + s] for s in src[f]], dim=0)
            vs = torch.cat([v[vid * frames + s] for s in src[f]], dim=0)
            for h in range(HEADS):
                sl = slice(h * DH, (h + 1) * DH)
                w = torch.softmax(q[r][:, sl] @ ks[:, sl].T / DH**0.5, dim=-1)
                out[r][:, sl] = w @ vs[:, sl]
    return out


def run_patch(mode, q, k, v, cond_or_uncond):
    patch = AttentionPatch(T2SSettings(mode, False))
    return patch.attn1(q, k, v, extra_options(("input", 1), 0, HEADS, cond_or_uncond))


@pytest.mark.parametrize("mode", list(FrameMode))
def test_one_frame_equals_plain_self_attention(mode):
    q, k, v = (torch.randn(1, 6, C) for _ in range(3))
    plain = reference_frame_attention(q, k, v, 1, 1, FrameMode.NONE)
    torch.testing.assert_close(run_patch(mode, q, k, v, [0]), plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", list(FrameMode))
@pytest.mark.parametrize("frames", [2, 5])
def test_each_mode_matches_hand_written_reference(mode, frames):
    videos = 2  # uncond + cond, batched together
    q, k, v = (torch.randn(videos * frames, 6, C) for _ in range(3))
    want = reference_frame_attention(q, k, v, videos, frames, mode)
    got = run_patch(mode, q, k, v, [1, 0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sources_are_as_defined():
    assert source_frames(FrameMode.FIRST_FRAME, 3) == [[0], [0], [0]]
    assert source_frames(FrameMode.MIDDLE_FRAME, 5) == [[2]] * 5
    assert source_frames(FrameMode.SPARSE_CAUSAL, 4) == [[0, 0], [0, 0], [0, 1], [0, 2]]
    assert source_frames(FrameMode.NONE, 2) == [[0], [1]]


# FateZero's code reads frame (F − 1) // 2: the lower middle of an even count (frame 3 of 8).
FATEZERO_MIDDLE = {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2, 7: 3, 8: 3, 9: 4}


@pytest.mark.parametrize("frames", sorted(FATEZERO_MIDDLE))
def test_middle_frame_is_fatezeros_lower_middle(frames):
    middle = FATEZERO_MIDDLE[frames]
    assert source_frames(FrameMode.MIDDLE_FRAME, frames) == [[middle]] * frames
    q, k, v = (torch.randn(2 * frames, 6, C) for _ in range(3))
    want = reference_frame_attention(q, k, v, 2, frames, FrameMode.MIDDLE_FRAME, sources=[[middle]] * frames)
    torch.testing.assert_close(run_patch(FrameMode.MIDDLE_FRAME, q, k, v, [1, 0]), want, atol=1e-5, rtol=1e-5)
    if frames % 2 == 0:  # the upper middle F // 2 gives another output
        upper = reference_frame_attention(q, k, v, 2, frames, FrameMode.MIDDLE_FRAME, sources=[[frames // 2]] * frames)
        assert not torch.allclose(want, upper, atol=1e-3)


def test_first_frame_output_of_frame0_ignores_other_frames():
    frames = 4
    q, k, v = (torch.randn(frames, 6, C) for _ in range(3))
    a = run_patch(FrameMode.FIRST_FRAME, q, k, v, [0])
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[1:] += 1.0
    k2[1:] -= 2.0
    v2[1:] *= 3.0
    b = run_patch(FrameMode.FIRST_FRAME, q2, k2, v2, [0])
    assert torch.equal(a[0], b[0])
    assert not torch.allclose(a[1:], b[1:])


@pytest.mark.parametrize("mode", [FrameMode.FIRST_FRAME, FrameMode.MIDDLE_FRAME])
def test_single_source_modes_copy_no_keys(mode):
    """Single-source modes regroup by views: memory grows with the frames, not frames²."""
    frames = 6
    q, k, v = (torch.randn(2 * frames, 10, C) for _ in range(3))
    inputs = frame_attention_inputs(q, k, v, 2, frames, mode)
    assert inputs.k.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert inputs.q.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
    assert inputs.k.shape == (2, 10, C) and inputs.q.shape == (2, frames * 10, C)


def test_sparse_causal_keys_grow_linearly():
    for frames in (2, 4, 8):
        q, k, v = (torch.randn(frames, 10, C) for _ in range(3))
        inputs = frame_attention_inputs(q, k, v, 1, frames, FrameMode.SPARSE_CAUSAL)
        assert inputs.k.numel() == 2 * k.numel()


def test_min_channels_leaves_narrow_blocks_per_frame():
    """FateZero's least_sc_channel: a block narrower than the minimum keeps plain self-attention."""
    from vp2p import LayerKey
    from vp2p.errors import RegistrationError, SettingsError

    frames = 4
    q, k, v = (torch.randn(2 * frames, 6, C) for _ in range(3))
    narrow, wide = LayerKey("input", 1, 0), LayerKey("middle", 0, 0)
    settings = T2SSettings(FrameMode.MIDDLE_FRAME, False, frame_attention_min_channels=640)
    patch = AttentionPatch(settings, block_widths={narrow: 320, wide: 640})
    assert patch.frame_mode(narrow) is FrameMode.NONE and patch.frame_mode(wide) is FrameMode.MIDDLE_FRAME
    out_narrow = patch.attn1(q, k, v, extra_options(("input", 1), 0, HEADS, [1, 0]))
    out_wide = patch.attn1(q, k, v, extra_options(("middle", 0), 0, HEADS, [1, 0]))
    plain = AttentionPatch(T2SSettings(FrameMode.NONE, False)).attn1(q, k, v, extra_options(("input", 1), 0, HEADS, [1, 0]))
    assert torch.equal(out_narrow, plain)
    torch.testing.assert_close(out_wide, reference_frame_attention(q, k, v, 2, frames, FrameMode.MIDDLE_FRAME), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_wide, plain, atol=1e-3)
    # the default (0) gives every block frame attention, whatever its width
    every = AttentionPatch(T2SSettings(FrameMode.MIDDLE_FRAME, False), block_widths={narrow: 320, wide: 640})
    assert torch.equal(every.attn1(q, k, v, extra_options(("input", 1), 0, HEADS, [1, 0])), out_wide)
    assert "frame_attention_min_channels=640" in settings.describe()
    assert "min_channels" not in T2SSettings(FrameMode.MIDDLE_FRAME, False).describe()  # default fingerprints unchanged
    with pytest.raises(SettingsError, match="block_widths"):
        AttentionPatch(settings)
    with pytest.raises(SettingsError, match="≥ 0"):
        T2SSettings(FrameMode.MIDDLE_FRAME, False, frame_attention_min_channels=-1)
    with pytest.raises(RegistrationError, match="not among"):
        patch.attn1(q, k, v, extra_options(("output", 3), 0, HEADS, [1, 0]))


def test_bad_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="first_frame"):
        FrameMode.parse("last_frame")
