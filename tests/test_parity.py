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

What the x_T residual is made of, as far as measured: this random UNet amplifies any tiny
difference about a hundred-fold over ten inversion steps (a random 1e-6 relative change of x0
moves x_T by 1.05e-4, of the text embedding by 4.9e-5, always in the same spatial pattern as the
residual), so 2.2e-3 corresponds to a relative difference of about 2e-5 in what enters the
inversion. Ruled out by measurement (each leaves x_T at 2.21e-3): the reference's global-max
softmax in cross-attention, an fp32 ᾱ schedule, the text encoder of the reference's transformers
4.38.2 (its embeddings equal ours to 2.7e-7). Issue 12 reports a step-by-step recomputation of the
reference's inversion outside its pipeline 2e-4 from the patched pack but 2.2e-3 from the official
file, so the remainder is something in the official run itself that is not found yet. End to end, the ten
denoising steps amplify that 2.2e-3 to 1.07e-2 (source) and 1.45e-2 (edited)
(``bench/bench_parity.py``); the edit stage alone adds 3e-5. A residual above the targets here is
a cause to find, not a tolerance to loosen.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.parity import FIXTURES, PARITY_DIR, fixture_id, relative_l2, run_stagewise

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
