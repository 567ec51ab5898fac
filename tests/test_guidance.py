"""Backward cross-attention guidance core and box trajectory masks (tiny random UNet, diffusers host)."""

from __future__ import annotations

import pytest
import torch

from vp2p import FrameMode, LayoutSpec, RunState, T2SSettings
from vp2p.guidance import WordMapRecorder, default_guided_steps, energy, guided_update, resample_masks, soft_shape
from vp2p.masks import Easing, MaskShape, box_trajectory
from vp2p.schedule import Schedule, sd_alphas_cumprod


def test_box_trajectory_moves_resizes_and_eases():
    m = box_trajectory(20, 10, 3, (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 0.5, 0.5))
    assert m.shape == (3, 10, 20) and set(m.unique().tolist()) == {0.0, 1.0}
    assert m[0, :5, :10].all() and m[0].sum() == 50 and m[2, 5:, 10:].all() and m[2].sum() == 50
    assert m[1, 2:7, 5:15].all() and m[1].sum() == 50  # halfway
    grow = box_trajectory(20, 20, 2, (0.4, 0.4, 0.2, 0.2), (0.2, 0.2, 0.6, 0.6), MaskShape.ELLIPSE)
    assert grow[1].sum() > 5 * grow[0].sum() and grow[0, 10, 10] == 1 and grow[0, 0, 0] == 0
    eased = box_trajectory(40, 4, 5, (0.0, 0.0, 0.1, 1.0), (0.9, 0.0, 0.1, 1.0), easing=Easing.EASE_IN_OUT)
    linear = box_trajectory(40, 4, 5, (0.0, 0.0, 0.1, 1.0), (0.9, 0.0, 0.1, 1.0))
    left = lambda mm: int(mm[0].nonzero()[0, 0]) if mm.any() else -1
    assert left(eased[1]) < left(linear[1]) and left(eased[2]) == left(linear[2])
    assert box_trajectory(8, 8, 1, (0, 0, 0.5, 0.5), (0.5, 0.5, 0.5, 0.5))[0, 0, 0] == 1  # one frame: the start box
    with pytest.raises(ValueError, match="must be > 0"):
        box_trajectory(8, 8, 2, (0, 0, 0, 0.5), (0, 0, 0.5, 0.5))


def test_schedule_guides_the_intended_steps():
    assert default_guided_steps(8) == [True, True, False, True, False, True, False, True]
    s = default_guided_steps(50)
    assert all(s[:12]) and s[12:16] == [False, True, False, True] and sum(s) == 12 + 19


def test_soft_shape_and_resampling():
    a = torch.tensor([[[0.0, 1.0], [0.5, 0.25]]])
    s = soft_shape(a)
    assert s[0, 0, 1] > 0.99 and s[0, 0, 0] < 0.01 and abs(float(s[0, 1, 0]) - 0.5) < 1e-6
    masks = box_trajectory(16, 16, 2, (0, 0, 0.5, 0.5), (0.5, 0.5, 0.5, 0.5))
    small = resample_masks(masks, (4, 4))
    assert small.shape == (2, 4, 4) and small[0, :2, :2].eq(1).all() and small[0].sum() == 4


@pytest.fixture(scope="module")
def host(unet):
    from vp2p.diffusers_host import DiffusersT2S

    h = DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, False)).install()
    yield h
    h.remove()


def test_one_guided_update_lowers_the_energy_and_eta_zero_is_exact(host):
    frames = 2
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 77, 32, generator=g)
    sched = Schedule.reference(10)
    i = 3
    sigma = float(sched.sigmas[i])
    x = torch.randn(frames, 4, 8, 8, generator=g) * (1 + sigma**2) ** 0.5
    den = host.denoiser(sd_alphas_cumprod())
    masks = box_trajectory(64, 64, frames, (0.0, 0.0, 0.4, 0.4), (0.6, 0.6, 0.4, 0.4))
    # the tiny UNet's cross-attention sits at 8×8 (input/output) and 4×4 (middle): factors 1 and 2
    rec = WordMapRecorder(positions=(2, 3), latent_hw=(8, 8), factors=(1, 2))

    def evaluate(xx, recorder):
        den(xx, torch.full((frames,), sigma), cond.expand(frames, -1, -1), [0], RunState(recorder, LayoutSpec(frames)))

    def e_of(xx):
        with torch.no_grad():
            evaluate(xx, rec)
        e = float(energy(rec.maps, masks))
        shapes = {tuple(a.shape) for a in rec.maps.values()}
        rec.maps.clear()
        return e, shapes

    before, shapes = e_of(x)
    assert shapes == {(frames, 8, 8), (frames, 4, 4)}  # every chosen layer, masks resampled to each resolution
    new, e0 = guided_update(x, sigma, masks, 5.0, evaluate, rec)
    assert abs(e0 - before) < 1e-4 * max(1.0, before)
    after, _ = e_of(new)
    assert after < before, (before, after)
    assert not torch.equal(new, x)
    same, _ = guided_update(x, sigma, masks, 0.0, evaluate, rec)
    assert same is x  # η = 0: exactly the unguided latent, no UNet call
    # no chosen layer -> a clear error rather than a silent no-op
    none = WordMapRecorder(positions=(2,), latent_hw=(8, 8), factors=(16,), include_middle=False)
    with pytest.raises(ValueError, match="No cross-attention map"):
        guided_update(x, sigma, masks, 1.0, evaluate, none)
    middle_only = WordMapRecorder(positions=(2,), latent_hw=(8, 8), factors=(16,))  # the middle block is always taken
    with torch.no_grad():
        evaluate(x, middle_only)
    assert [k.block for k in middle_only.maps] == ["middle"]


def test_gradient_reaches_the_latent_only_through_the_recorded_maps(host):
    """∇ₓE equals the vector-Jacobian product of the recorded maps with ∂E/∂A: nothing else of the
    forward pass enters the energy."""
    frames = 2
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(1, 77, 32, generator=g)
    sigma = float(Schedule.reference(10).sigmas[4])
    den = host.denoiser(sd_alphas_cumprod())
    masks = box_trajectory(64, 64, frames, (0.1, 0.1, 0.3, 0.3), (0.5, 0.5, 0.3, 0.3))
    rec = WordMapRecorder(positions=(2,), latent_hw=(8, 8), factors=(1,), include_middle=True)
    with torch.enable_grad():
        x = (torch.randn(frames, 4, 8, 8, generator=g) * 2).requires_grad_(True)
        den(x, torch.full((frames,), sigma), cond.expand(frames, -1, -1), [0], RunState(rec, LayoutSpec(frames)))
        maps = list(rec.maps.values())
        e = energy(rec.maps, masks)
        de_da = torch.autograd.grad(e, maps, retain_graph=True)
        (direct,) = torch.autograd.grad(e, x, retain_graph=True)
        (through_maps,) = torch.autograd.grad(maps, x, grad_outputs=de_da)
    assert len(maps) >= 2 and direct.abs().sum() > 0
    torch.testing.assert_close(direct, through_maps)
