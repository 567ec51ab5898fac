"""Cross-attention guidance: cost of a guided step vs an unguided one, and the peak memory growth of
each (every variant in its own subprocess). Gradient checkpointing is the ComfyUI host's (the GUIDER
samples with an autograd clone); the diffusers host keeps its per-call options only during the call,
so its blocks cannot be recomputed and this bench measures the backward pass without checkpointing.

A random T2S UNet (first_frame) on the diffusers host; an unguided step is one CFG evaluation
(cond + uncond rows); a guided step adds one forward with the word-map recorder and one backward.

    python bench/bench_guidance.py [--frames 4] [--size 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(variant: str, frames: int, size: int, repeat: int) -> dict:
    import torch

    from tests.helpers import tiny_unet
    from vp2p import FrameMode, LayoutSpec, RunState, T2SSettings
    from vp2p.diffusers_host import DiffusersT2S
    from vp2p.guidance import WordMapRecorder, guided_update
    from vp2p.layout import COND, UNCOND
    from vp2p.masks import box_trajectory
    from vp2p.schedule import Schedule, sd_alphas_cumprod

    torch.set_num_threads(1)
    unet = tiny_unet(seed=0, sample_size=size)
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    sigma = float(Schedule.reference(50).sigmas[10])
    x = torch.randn(frames, 4, size, size, generator=g) * (1 + sigma**2) ** 0.5
    masks = box_trajectory(size * 8, size * 8, frames, (0.1, 0.3, 0.3, 0.3), (0.6, 0.3, 0.3, 0.3))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    with DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, False)) as host:
        den = host.denoiser(sd_alphas_cumprod())

        def cfg_step(xx):
            with torch.no_grad():
                ctx = torch.cat([uncond.expand(frames, -1, -1), cond.expand(frames, -1, -1)])
                d = den(torch.cat([xx, xx]), torch.full((2 * frames,), sigma), ctx, [UNCOND, COND], RunState())
            return d

        def evaluate(xx, rec):
            den(xx, torch.full((frames,), sigma), cond.expand(frames, -1, -1), [COND], RunState(rec, LayoutSpec(frames)))

        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            xx = x
            if variant != "unguided":
                rec = WordMapRecorder(positions=(2, 3), latent_hw=(size, size), factors=(2,), include_middle=True)
                xx, _ = guided_update(x, sigma, masks, 20.0, evaluate, rec)
            cfg_step(xx)
            times.append(time.perf_counter() - t0)
    return {"variant": variant, "step_ms": round(statistics.median(times[1:]) * 1e3, 1),
            "peak_rss_growth_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.frames, args.size, args.repeat)))
        return
    rows = []
    for variant in ("unguided", "guided"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--frames", str(args.frames), "--size", str(args.size),
                              "--repeat", str(args.repeat)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["step_ms"]
    for r in rows:
        r["vs_unguided"] = round(r["step_ms"] / base, 2)
        print(json.dumps(r))


if __name__ == "__main__":
    main()
