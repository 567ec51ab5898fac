"""Parity with the official Video-P2P code (../shared/parity): every tensor of every fixture file,
stage by stage (as tests/test_parity.py) and end to end from x0, plus the per-frame-GroupNorm
variant (what the pack computed before its T2S model normalised each video as a whole).

    .venv/bin/python bench/bench_parity.py [--variants]

CPU, fp32; about 2.5 minutes per run on 2 cores (3 runs with --variants).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.parity import (FIXTURES, PARITY_DIR, PROJECT_FIXTURE_DIR, load_model, read_fixture, relative_l2,  # noqa: E402
                          run_end_to_end, run_stagewise)

CONTIGUOUS = PROJECT_FIXTURE_DIR / "reference_fast_contiguous_input.safetensors"
from vp2p.video_norm import NormScope  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", action="store_true", help="also run end to end with per-frame GroupNorm")
    args = ap.parse_args()
    if not FIXTURES:
        print(f"no parity fixture at {PARITY_DIR}")
        return 1
    c = load_model()
    runs = [("stage by stage", run_stagewise, {}), ("end to end", run_end_to_end, {})]
    if args.variants:
        runs.append(("end to end, per-frame GroupNorm", run_end_to_end, {"group_norm": NormScope.FRAME}))
    for fixture in FIXTURES:
        for name, run, changes in runs:
            t0 = time.perf_counter()
            ours, ref = run(fixture, c, **changes)
            cells = ", ".join(f"{k} {relative_l2(ours[k], ref[k]):.2e}" for k in ("x_T", "null_embeddings", "source", "edited")
                              if k in ours and k in ref)
            print(f"{fixture.stem:24s} {name:34s} {cells}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            if run is run_end_to_end and fixture.name == "video_p2p_fast.safetensors" and CONTIGUOUS.is_file() and not changes:
                # the official code given its input contiguous: the pack's distance without the reference's layout rounding
                contiguous, _ = read_fixture(CONTIGUOUS)
                cells = ", ".join(f"{k} {relative_l2(ours[k], contiguous[k]):.2e}" for k in ("x_T", "source", "edited"))
                spread = ", ".join(f"{k} {relative_l2(contiguous[k], ref[k]):.2e}" for k in ("x_T", "source", "edited"))
                print(f"{'':24s} {'  vs the official run, input contiguous':34s} {cells}")
                print(f"{'':24s} {'  (that run vs the official file)':34s} {spread}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    raise SystemExit(main())
