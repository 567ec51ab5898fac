"""Parity with the official Video-P2P code on identical weights (../shared/parity, see its README).

Each ``video_p2p_<mode>.safetensors`` holds what the official code (dvlab-research/Video-P2P,
``run_videop2p.py``) computed, in fp32 on a CPU, on the fixture's tiny random model for 8 frames
of 512² at 10 DDIM steps (the null-text fixture, made in this project with ``../shared/parity/tools/official_vp2p.py
--steps 5``: 5), the video latents x0, the inverted noise x_T, the optimised null
embeddings (null-text mode) and the final source and edited latents. This test runs the pack's
own pipeline stages (diffusers host: T2S inflation with video-level GroupNorm, DDIM inversion,
null-text optimisation, P2P controller, LocalBlend, decoupled sampler) on the same model with the
file's settings, each stage on the official input of that stage (``tests.parity.run_stagewise``),
and compares, as relative L2 distances:

* x_T inverted from x0: ≤ 3e-3 (measured 2.21e-3 in fast mode at 10 steps, 6.2e-4 in the null-text fixture's 5);
* null embeddings optimised from x0: ≤ 1e-2 (null-text fixture, kept in the project:
  ``tests/fixtures/parity/video_p2p_null_text.safetensors``, 5 DDIM steps × 10 inner steps; measured 6.2e-5 for
  the first step, which CI checks, and 3.2e-3 over all five, per step 6.2e-5, 1.0e-3, 2.8e-3, 4.3e-3, 4.9e-3 —
  each step's target is the pack's own inversion latent, which drifts from the official one as x_T does);
* source and edited latents sampled from the official x_T (and null embeddings): ≤ 1e-3 (measured 1.8e-5 and
  3.2e-5 in fast mode, 2.2e-5 and 2.2e-5 in null-text mode),
  ten times tighter than the issue's end-to-end 1e-2.

What the x_T residual is made of (docs/fidelity.md): the official run hands its 3-D UNet a strided
(per-frame channels-last) view of its latents, and PyTorch's CPU kernels round differently on that layout; the
official code given the same latents contiguous lands 2.20e-3 from its own file (x_T; 1.06e-2 source, 1.44e-2
edited end to end), and the pack is 2.0e-4 (x_T) from that contiguous-input run. The end-to-end test below pins both.
A residual above the targets here is a cause to find, not a tolerance to loosen.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.parity import FIXTURES, PARITY_DIR, PROJECT_FIXTURE_DIR, fixture_id, read_fixture, relative_l2, run_end_to_end, run_stagewise

# runs_long: ~13 min for the null-text fixture on one thread; collected first so a worker starts it first.
pytestmark = [pytest.mark.skipif(not FIXTURES, reason=f"no parity fixture at {PARITY_DIR} (../shared/parity)"), pytest.mark.runs_long]

TARGETS = {"x_T": 3e-3, "null_embeddings": 1e-2, "source": 1e-3, "edited": 1e-3}
# Null-text fixtures: the null embeddings of the first NULL_STEPS DDIM steps are optimised and compared (a prefix is
# exactly the full run's first steps). One step (10 inner steps through the 8-frame 64² UNet) takes ~13 min of one CPU
# thread with the rest of the test; all five (VP2P_PARITY_NULL_STEPS=5) about three times that, which CI cannot spend.
NULL_STEPS = int(os.environ.get("VP2P_PARITY_NULL_STEPS", "1"))


@pytest.mark.parametrize("fixture", FIXTURES, ids=[fixture_id(f) for f in FIXTURES])
def test_the_pack_computes_what_the_official_video_p2p_code_computes(fixture: Path, record_property):
    t0 = time.perf_counter()
    ours, reference = run_stagewise(fixture, null_steps=NULL_STEPS)
    distances = {name: relative_l2(ours[name], reference[name]) for name in TARGETS if name in reference}
    record_property("parity", json.dumps(distances))
    record_property("seconds", round(time.perf_counter() - t0, 1))
    print(f"\n{fixture.name}: " + ", ".join(f"{k} {v:.2e}" for k, v in distances.items()))
    assert set(distances) >= {"x_T", "source", "edited"}
    if "null_embeddings" in reference:
        assert "null_embeddings" in ours and ours["null_embeddings"].shape == reference["null_embeddings"].shape
    failed = {k: v for k, v in distances.items() if v > TARGETS[k]}
    assert not failed, f"parity with the official code exceeds the targets: {failed} (targets {TARGETS})"


# The official run inverts its VAE latents as its rearrange leaves them: a strided (per-frame channels-last) view.
# The same run given the same latents contiguous (and nothing else changed) lands 2.20e-3 (x_T), 1.06e-2 (source) and
# 1.44e-2 (edited) from its own file: PyTorch's CPU kernels round differently on the two layouts, and this random UNet
# amplifies that (its ε at t=1 moves by 9.6e-5). The pack meets 1e-2 end to end against that contiguous-input run.
CONTIGUOUS_REFERENCE = PROJECT_FIXTURE_DIR / "reference_fast_contiguous_input.safetensors"
FAST = PARITY_DIR / "video_p2p_fast.safetensors"


@pytest.mark.skipif(not FAST.is_file() or not CONTIGUOUS_REFERENCE.is_file(), reason="no fast-mode fixture")
def test_end_to_end_the_pack_is_as_close_to_the_official_file_as_the_official_code_is_to_itself(record_property):
    """The whole pipeline from x0 (``bench/bench_parity.py``'s end to end): ≤ 1e-2 from the official code given the
    same input layout, and as far from the official file as the official code itself moves with the layout."""
    ours, official = run_end_to_end(FAST)
    contiguous, _ = read_fixture(CONTIGUOUS_REFERENCE)
    names = ("x_T", "source", "edited")
    to_contiguous = {k: relative_l2(ours[k], contiguous[k]) for k in names}
    to_official = {k: relative_l2(ours[k], official[k]) for k in names}
    reference_spread = {k: relative_l2(contiguous[k], official[k]) for k in names}
    record_property("end_to_end", json.dumps({"to_contiguous": to_contiguous, "to_official": to_official,
                                              "reference_spread": reference_spread}))
    print("\nend to end vs the contiguous-input official run:", to_contiguous, "\nvs the official file:", to_official,
          "\nthe official code's own layout spread:", reference_spread)
    assert max(to_contiguous.values()) <= 1e-2, to_contiguous  # measured 2.0e-4, 9.8e-4, 1.3e-3
    assert to_contiguous["x_T"] <= 1e-3
    for k in names:  # the residual against the official file is the reference's own: within 10 % of it
        assert abs(to_official[k] - reference_spread[k]) <= 0.1 * reference_spread[k], (k, to_official[k], reference_spread[k])
