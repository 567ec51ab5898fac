"""Tune on Video step vs a plain forward+backward of the same UNet on the same batch.

Each variant runs in its own subprocess (so peak memory is its own): time per step
(median after one warm-up step) and peak resident memory above the loaded model.

* plain: the image UNet, every parameter trainable, eps-MSE, AdamW (a standard training step);
* tune:  Tune on Video on the T2S model (first_frame + temporal layers): only to_q of
         attn1/attn2 and the temporal layers train.

    python bench/bench_tune.py [--frames 8] [--size 16] [--steps 6]
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


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(variant: str, frames: int, size: int, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from tests.helpers import tiny_unet
    from vp2p import FrameMode, T2SSettings
    from vp2p.diffusers_host import DiffusersT2S, tune_diffusers
    from vp2p.schedule import sd_alphas_cumprod
    from vp2p.tuning import TuneSettings

    torch.set_num_threads(1)
    unet = tiny_unet(seed=0, sample_size=size)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(frames, 4, size, size, generator=g)
    cond = torch.randn(1, 77, 32, generator=g)
    ac = sd_alphas_cumprod()
    base = rss_mb()
    times: list[float] = []
    if variant == "plain":
        opt = torch.optim.AdamW(unet.parameters(), lr=3e-5, weight_decay=1e-2)
        for _ in range(steps):
            t0 = time.perf_counter()
            t = int(torch.randint(0, 1000, (1,), generator=g))
            noise = torch.randn(latents.shape, generator=g)
            a = ac[t].float()
            x = a.sqrt() * latents + (1 - a).sqrt() * noise
            loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=cond.expand(frames, -1, -1)).sample, noise)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            times.append(time.perf_counter() - t0)
    else:
        host = DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, True))
        stamps: list[float] = [time.perf_counter()]
        with host:
            tune_diffusers(host, latents, cond, ac, TuneSettings(steps=steps, learning_rate=3e-5),
                           on_step=lambda i, loss: stamps.append(time.perf_counter()))
        times = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"variant": variant, "step_ms": statistics.median(times[1:]) * 1e3, "peak_extra_mb": rss_mb() - base}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.frames, args.size, args.steps)))
        return
    rows = {}
    for variant in ("plain", "tune"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--frames", str(args.frames), "--size", str(args.size),
                              "--steps", str(args.steps)], check=True, capture_output=True, text=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    p, t = rows["plain"], rows["tune"]
    print(f"tiny UNet (32/64 ch), CPU fp32, 1 thread, {args.frames} frames, latent {args.size}², median of {args.steps - 1} steps")
    print(f"  plain forward+backward (all params):  {p['step_ms']:8.1f} ms/step   peak +{p['peak_extra_mb']:7.1f} MB")
    print(f"  Tune on Video step (T2S, to_q+temp):  {t['step_ms']:8.1f} ms/step   peak +{t['peak_extra_mb']:7.1f} MB")
    print(f"  ratio tune/plain: time {t['step_ms'] / p['step_ms']:.3f}x, peak memory {t['peak_extra_mb'] / max(p['peak_extra_mb'], 1e-6):.3f}x")


if __name__ == "__main__":
    main()
