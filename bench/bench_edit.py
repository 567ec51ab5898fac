"""Decoupled Sampler: edit wall time and UNet rows per step, full path vs reuse of the
inversion's source walk, same inputs, one run.

A random T2S UNet (first_frame + temporal layers) on the diffusers host, a real
prompt-to-prompt edit (word swap, cross 0.4, self 0.4, local blend). With ``--gpu`` on a
CUDA machine: an SD1.5-shaped UNet (random weights) in fp16, 8 frames × 512² (64² latents),
50 steps, and peak GPU memory.

    python bench/bench_edit.py [--frames 4] [--size 16] [--steps 10]
    python bench/bench_edit.py --gpu --frames 8 --size 64 --steps 50
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from bench.bench_invert import build
    from vp2p import FrameMode, T2SSettings
    from vp2p.clip_vocab import clip_tokenizer
    from vp2p.diffusers_host import DiffusersT2S
    from vp2p.edit import EditInputs, Guidance, decoupled_edit
    from vp2p.inversion import InversionSettings, ddim_invert, optimise_null_text
    from vp2p.local_blend import LocalBlend, LocalBlendSpec
    from vp2p.p2p import P2PController, P2PEdit
    from vp2p.prompt_align import EditKind, hf_encoder, tokenize_prompt
    from vp2p.schedule import Schedule, sd_alphas_cumprod

    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    unet, dim, device, dtype = build(args.gpu, args.size)
    enc = hf_encoder(clip_tokenizer())
    src, tgt = tokenize_prompt("a cat is running on the grass", enc, 77), tokenize_prompt("a tiger is running on the grass", enc, 77)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50000, dim, generator=g)

    def embed(p):
        ids = [49406, *p.ids, 49407] + [49407] * (77 - p.end - 1)
        return table[ids].unsqueeze(0).to(device)

    latents = (torch.randn(1, 4, args.size, args.size, generator=g) + 0.3 * torch.randn(args.frames, 4, args.size, args.size, generator=g)).to(device)
    empty = (0.1 * torch.randn(1, 77, dim, generator=g)).to(device)
    sched = Schedule.reference(args.steps)
    with DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, True)) as host:
        den = host.denoiser(sd_alphas_cumprod().to(device))
        cond = embed(src)
        with torch.no_grad():
            traj = ddim_invert(den, latents, cond, sched)
        inv = optimise_null_text(den, traj, cond, empty, sched, InversionSettings(steps=args.steps, inner_steps=1))
        inputs = EditInputs(traj[0], sched, cond, inv.null_embeddings, empty, 7.5, inv.source_path)
        spec = LocalBlendSpec(tuple(src.positions("cat")), tuple(tgt.positions("tiger")))
        edit = P2PEdit(src, tgt, cond.cpu(), embed(tgt).cpu(), EditKind.REPLACE, cross_replace=0.4, self_replace=0.4, blend=spec)
        for blend_on in (True, False):
            edit.blend = spec if blend_on else None
            times: dict[str, list[float]] = {"full": [], "reuse": []}
            results, rows = {}, {}
            for _ in range(args.repeat):
                for name, reuse in (("full", False), ("reuse", True)):
                    blend = LocalBlend(spec, args.frames, (args.size, args.size), args.steps) if blend_on else None
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        res = decoupled_edit(den, inputs, edit.target_cond.to(device), 7.5, Guidance.DECOUPLED,
                                             P2PController(edit, sched, blend), reuse=reuse)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - t0)
                    results[name], rows[name] = res, res.rows
            diff = float((results["full"].edited - results["reuse"].edited).abs().max())
            row = {"local_blend": blend_on, "frames": args.frames, "steps": args.steps,
                   "full_s": round(min(times["full"]), 3), "reuse_s": round(min(times["reuse"]), 3),
                   "reuse_vs_full": round(min(times["reuse"]) / min(times["full"]), 3),
                   "full_rows_per_step": sorted(set(rows["full"])), "reuse_rows_per_step": rows["reuse"],
                   "max_abs_difference": diff}
            if device.type == "cuda":
                row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            print(json.dumps(row))


if __name__ == "__main__":
    main()
