"""One UNet forward of the inflated T2S model vs the plain image model, same inputs, one run.

CPU (anywhere): a tiny random UNet, reports time ratios (target ≤ 1.10×).
GPU (when CUDA is present): additionally the SD1.5 shape at 8 frames × 512² in fp16
(target ≤ 1.05×), with absolute times and peak memory.

    python bench/bench_inflate.py [--frames 8] [--size 32] [--repeats 15] [--sd15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import init_weights, randomise_temporal, tiny_unet  # noqa: E402
from vp2p import FrameMode, T2SSettings  # noqa: E402
from vp2p.diffusers_host import DiffusersT2S  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


@torch.no_grad()
def compare(unet, x, t, ctx, device, repeats: int, label: str) -> None:
    plain = lambda: unet(x, t, encoder_hidden_states=ctx)
    variants = {"plain": None}
    for mode in (FrameMode.FIRST_FRAME, FrameMode.SPARSE_CAUSAL):
        for temporal in (False, True):
            variants[f"{mode.value}{'+temporal' if temporal else ''}"] = T2SSettings(mode, temporal)
    variants["first_frame+temporal(tuned)"] = T2SSettings(FrameMode.FIRST_FRAME, True)
    hosts = {k: DiffusersT2S(unet, s) for k, s in variants.items() if s is not None}
    for k, h in hosts.items():
        if h.bank is not None:
            h.bank.to(device, x.dtype)
            if k.endswith("(tuned)"):  # non-zero output projections: the layers really run
                randomise_temporal(h.bank, seed=0)
    # warm-up, then interleave rounds so drift hits every variant alike
    for _ in range(2):
        plain()
        for h in hosts.values():
            with h:
                h(x, t, ctx, cond_or_uncond=[1, 0])
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        times["plain"] += timed(plain, device, 1)
        for k, h in hosts.items():
            with h:
                times[k] += timed(lambda h=h: h(x, t, ctx, cond_or_uncond=[1, 0]), device, 1)
    base = statistics.median(times["plain"])
    print(f"\n{label}: median of {repeats} (ms), ratio to plain")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"  {k:28s} {m * 1e3:9.2f} ms   {m / base:5.3f}x   (min {min(v) / min(times['plain']):5.3f}x)")
    if device.type == "cuda":
        for k in ("plain", "first_frame+temporal"):
            torch.cuda.reset_peak_memory_stats()
            if k == "plain":
                plain()
            else:
                with hosts[k]:
                    hosts[k](x, t, ctx, cond_or_uncond=[1, 0])
            print(f"  peak memory {k}: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=32, help="latent side of the tiny CPU run")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--sd15", action="store_true", help="also run the SD1.5 shape (needs CUDA)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1 gives the steadiest ratios on a small machine)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    cpu = torch.device("cpu")
    unet = tiny_unet(seed=0, sample_size=args.size)
    f = args.frames
    x = torch.randn(2 * f, 4, args.size, args.size)
    ctx = torch.randn(2 * f, 77, 32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    compare(unet, x, 500, ctx, cpu, args.repeats, f"tiny UNet (32/64 ch), CPU fp32, {f} frames x2 (cfg), latent {args.size}²")

    if args.sd15 and torch.cuda.is_available():
        from diffusers import UNet2DConditionModel

        dev = torch.device("cuda")
        with torch.device(dev):
            big = UNet2DConditionModel()  # SD1.x shape
        big = init_weights(big, 0).to(dev, torch.float16).eval()
        xb = torch.randn(2 * f, 4, 64, 64, device=dev, dtype=torch.float16)
        cb = torch.randn(2 * f, 77, 768, device=dev, dtype=torch.float16)
        compare(big, xb, 500, cb, dev, args.repeats, f"SD1.5-shaped UNet, {torch.cuda.get_device_name()} fp16, {f} frames x2 (cfg) at 512²")
    elif args.sd15:
        print("\nSD1.5 GPU run skipped: no CUDA device here.")


if __name__ == "__main__":
    main()
