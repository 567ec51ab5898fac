"""Shared Null-Text Invert: UNet forward/backward counts and wall time per mode, same inputs, one run.

A random T2S UNet (first_frame + temporal layers) on the diffusers host; the counts are
exact (module hooks), the times are CPU wall-clock ratios against ``ddim_only``. With
``--gpu`` on a CUDA machine: an SD1.5-shaped UNet (random weights) in fp16, 8 frames
× 512² (64² latents), 50 steps, and peak GPU memory.

    python bench/bench_invert.py [--frames 4] [--size 16] [--steps 10] [--inner 10]
    python bench/bench_invert.py --gpu --frames 8 --size 64 --steps 50
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("ddim_only", "negative_prompt", "shared_null_text", "per_frame_null_text")


def build(gpu: bool, size: int):
    import torch

    from tests.helpers import init_weights, tiny_unet

    if not gpu:
        return tiny_unet(seed=0, sample_size=size), 32, torch.device("cpu"), torch.float32
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=size, cross_attention_dim=768, attention_head_dim=8)  # SD1.5 shape
    init_weights(unet, 0)
    return unet.to("cuda", torch.float16), 768, torch.device("cuda"), torch.float16


def main() -> None:
    import torch

    from vp2p import FrameMode, T2SSettings
    from vp2p.diffusers_host import DiffusersT2S
    from vp2p.inversion import InversionMode, InversionSettings, ddim_invert, optimise_null_text, reconstruct
    from vp2p.schedule import Schedule, sd_alphas_cumprod

    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--size", type=int, default=16, help="latent size (pixels / 8)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    torch.manual_seed(0)
    unet, dim, device, dtype = build(args.gpu, args.size)
    g = torch.Generator().manual_seed(1)
    latents = (torch.randn(1, 4, args.size, args.size, generator=g) + 0.3 * torch.randn(args.frames, 4, args.size, args.size, generator=g)).to(device)
    cond = torch.randn(1, 77, dim, generator=g).to(device)
    empty = (0.1 * torch.randn(1, 77, dim, generator=g)).to(device)
    schedule = Schedule.reference(args.steps)
    counts = {"forward": 0, "backward": 0}
    unet.register_forward_pre_hook(lambda *a: counts.__setitem__("forward", counts["forward"] + 1))
    unet.conv_in.register_full_backward_pre_hook(lambda *a: counts.__setitem__("backward", counts["backward"] + 1))
    unet.enable_gradient_checkpointing() if args.gpu else None
    rows = []
    with DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, True)) as host:
        den = host.denoiser(sd_alphas_cumprod().to(device))

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        for mode in args.modes.split(","):
            m = InversionMode(mode)
            settings = InversionSettings(steps=args.steps, cfg=7.5 if m.optimises else 1.0, mode=m, inner_steps=args.inner)
            counts.update(forward=0, backward=0)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                traj = ddim_invert(den, latents, cond, schedule)
            result = optimise_null_text(den, traj, cond, empty, schedule, settings)
            sync()
            seconds = time.perf_counter() - t0
            fwd, bwd = counts["forward"], counts["backward"]
            rec = reconstruct(den, traj[0], cond, schedule, 7.5 if m.optimises or m is InversionMode.NEGATIVE_PROMPT else 1.0,
                              result.null_embeddings)
            psnr = float(10 * torch.log10(latents.abs().max() ** 2 / (rec - latents).pow(2).mean()))
            hist: dict[int, int] = {}
            for n in result.iterations:
                hist[n] = hist.get(n, 0) + 1
            row = {"mode": mode, "seconds": round(seconds, 3), "unet_forward": fwd, "unet_backward": bwd,
                   "reconstruction_psnr_db": round(psnr, 2), "early_stop_histogram": dict(sorted(hist.items()))}
            if m is InversionMode.DDIM_ONLY:  # the same inversion sampled at cfg 7.5 with the initial embedding
                plain = reconstruct(den, traj[0], cond, schedule, 7.5, empty.unsqueeze(0).expand(args.steps, -1, -1, -1))
                row["psnr_at_cfg7.5_without_null_text_db"] = round(float(10 * torch.log10(latents.abs().max() ** 2 / (plain - latents).pow(2).mean())), 2)
            if device.type == "cuda":
                row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rows.append(row)
    base = next((r["seconds"] for r in rows if r["mode"] == "ddim_only"), None)
    for r in rows:
        if base:
            r["time_vs_ddim_only"] = round(r["seconds"] / base, 2)
        print(json.dumps(r))


if __name__ == "__main__":
    main()
