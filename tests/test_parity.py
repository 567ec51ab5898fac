"""Parity with the official Video-P2P code on identical weights (../shared/parity, see its README).

Each ``video_p2p_<mode>.safetensors`` holds what the official code (dvlab-research/Video-P2P,
``run_videop2p.py``) computed, in fp32 on a CPU, on the fixture's tiny random model for 8 frames
of 512² at 10 DDIM steps: the video latents x0, the inverted noise x_T, the optimised null
embeddings (null-text mode) and the final source and edited latents. This test runs the pack's
own pipeline (diffusers host, ``vp2p.diffusers_pipeline.edit_video``) on the same model and x0
with the file's settings and compares, as relative L2 distances:

* x_T ≤ 3e-3;
* null embeddings, source and edited latents ≤ 1e-2.

What the residual is made of: float error of two different but equivalent computations (SDPA vs
the reference's explicit softmax, σ-space vs DDPM-scale arithmetic, fp64 vs fp32 schedules),
amplified by ten DDIM steps of a random-weight UNet (whose ε is far less smooth in x and t than
a trained model's). ``MEASURED`` below is what this test printed when it was written; a
residual above the targets is a cause to find, not a tolerance to loosen.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.parity import FIXTURES, PARITY_DIR, relative_l2, run_fixture

pytestmark = pytest.mark.skipif(not FIXTURES, reason=f"no parity fixture at {PARITY_DIR} (../shared/parity)")

TARGETS = {"x_T": 3e-3, "null_embeddings": 1e-2, "source": 1e-2, "edited": 1e-2}


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.stem for f in FIXTURES])
def test_the_pack_computes_what_the_official_video_p2p_code_computes(fixture: Path, record_property):
    t0 = time.perf_counter()
    ours, reference = run_fixture(fixture)
    distances = {name: relative_l2(ours[name], reference[name]) for name in reference if name in TARGETS}
    record_property("parity", json.dumps(distances))
    record_property("seconds", round(time.perf_counter() - t0, 1))
    print(f"\n{fixture.name}: " + ", ".join(f"{k} {v:.2e}" for k, v in distances.items()))
    assert set(distances) >= {"x_T", "source", "edited"}
    failed = {k: v for k, v in distances.items() if v > TARGETS[k]}
    assert not failed, f"parity with the official code exceeds the targets: {failed} (targets {TARGETS})"
