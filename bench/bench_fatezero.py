"""FateZero: the attention store's size and cost, and the fused edit's time, side by side in one run.

A random T2S UNet (middle_frame, no temporal layers) on the diffusers host: DDIM inversion with
and without recording the store, the store's bytes against ``store_nbytes`` and against what the
reference keeps (every probability map of the same layers, fp32), then the edit: the fused
target-only edit (cross 0.8, self 0.8, blend words), the same run with fusion off (plain
target DDIM), and a P2P decoupled edit of the same prompts for comparison. ``--sd15`` uses an
SD1.5-shaped UNet (random weights) on any device; with ``--gpu`` (CUDA) it runs in fp16 and
reports peak GPU memory.

    python bench/bench_fatezero.py [--frames 4] [--size 16] [--steps 10]
    python bench/bench_fatezero.py --sd15 --frames 2 --size 16 --steps 4
    python bench/bench_fatezero.py --gpu --frames 8 --size 64 --steps 50
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

    from tests.helpers import init_weights, tiny_unet
    from vp2p import FrameMode, LayoutSpec, T2SSettings
    from vp2p.attention_store import DEFAULT_MAX_TOKENS, AttentionStore, StoreRecorder, StoreSpec, entry, parse_entry, store_nbytes
    from vp2p.clip_vocab import clip_tokenizer
    from vp2p.control import RunState
    from vp2p.diffusers_host import DiffusersT2S
    from vp2p.edit import EditInputs, Guidance, decoupled_edit, fused_edit
    from vp2p.fatezero import FateZeroController, FateZeroEdit
    from vp2p.inversion import ddim_invert
    from vp2p.p2p import P2PController, P2PEdit
    from vp2p.prompt_align import EditKind, hf_encoder, tokenize_prompt
    from vp2p.schedule import Schedule, sd_alphas_cumprod

    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--size", type=int, default=16, help="latent size (pixels / 8)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sd15", action="store_true", help="an SD1.5-shaped UNet (random weights)")
    ap.add_argument("--gpu", action="store_true", help="CUDA, fp16, SD1.5 shape")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.float16 if args.gpu else torch.float32
    if args.gpu or args.sd15:
        from diffusers import UNet2DConditionModel

        unet = init_weights(UNet2DConditionModel(sample_size=args.size, cross_attention_dim=768, attention_head_dim=8), 0)
        dim = 768
    else:
        unet, dim = tiny_unet(seed=0, sample_size=args.size), 32
    unet = unet.to(device, dtype).eval()

    enc = hf_encoder(clip_tokenizer())
    src = tokenize_prompt("a silver jeep driving down a curvy road", enc, 77)
    tgt = tokenize_prompt("a red jeep driving down a curvy road", enc, 77)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50000, dim, generator=g)

    def embed(p):
        ids = [49406, *p.ids, 49407] + [49407] * (77 - p.end - 1)
        return table[ids].unsqueeze(0)

    f, s = args.frames, args.size
    latents = (torch.randn(1, 4, s, s, generator=g) + 0.3 * torch.randn(f, 4, s, s, generator=g)).to(device)
    empty = (0.1 * torch.randn(1, 77, dim, generator=g)).to(device)
    cond, target = embed(src).to(device), embed(tgt).to(device)
    sched = Schedule.reference(args.steps)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with DiffusersT2S(unet, T2SSettings(FrameMode.MIDDLE_FRAME, False)) as host:
        den = host.denoiser(sd_alphas_cumprod().to(device))
        spec = StoreSpec.for_fraction(args.steps, 0.8, DEFAULT_MAX_TOKENS, f, FrameMode.MIDDLE_FRAME, "bench")
        times = {"plain": [], "store": []}
        for _ in range(args.repeat):
            for name in ("plain", "store"):
                store = AttentionStore(spec) if name == "store" else None
                rec = StoreRecorder(store, sched) if store is not None else None
                run = None if rec is None else RunState(rec, LayoutSpec(f))
                sync()
                t0 = time.perf_counter()
                with torch.no_grad():
                    traj = ddim_invert(den, latents, cond, sched, run=run)
                    if store is not None:
                        store.finish()
                sync()
                times[name].append(time.perf_counter() - t0)
                if store is not None:
                    kept = store
        layers = []
        for n in kept.names(0):
            kind, key, _ = parse_entry(n)
            if kind == "attn2":
                p, q = kept.get(0, n), kept.get(0, entry("attn1", key, "q"))
                layers.append((p.shape[2], q.shape[-1], p.shape[1]))
        reference = sum((f * h * n * n + f * h * n * 77) * 4 for n, c, h in layers) * args.steps
        print(json.dumps({"what": "inversion", "frames": f, "latent": s, "steps": args.steps,
                          "ddim_s": round(min(times["plain"]), 3), "ddim_with_store_s": round(min(times["store"]), 3),
                          "store_overhead": round(min(times["store"]) / min(times["plain"]) - 1, 3),
                          "store_steps": spec.stored_steps, "store_gb": round(kept.nbytes / 1e9, 4),
                          "formula_gb": round(store_nbytes(f, layers, FrameMode.MIDDLE_FRAME, 77, spec.stored_steps) / 1e9, 4),
                          "reference_all_maps_fp32_gb": round(reference / 1e9, 4)}))

        inputs = EditInputs(traj[0], sched, cond, None, empty, 7.5)
        p2p = P2PEdit(src, tgt, cond.cpu(), target.cpu(), EditKind.REPLACE, cross_replace=0.8, self_replace=0.8)
        fz = FateZeroEdit(p2p, tuple(src.positions("jeep")), 0.3)
        off = FateZeroEdit(P2PEdit(src, tgt, cond.cpu(), target.cpu(), EditKind.REPLACE, cross_replace=0.0, self_replace=0.0))
        runs = {
            "fused": lambda: fused_edit(den, inputs, traj, target, 7.5, Guidance.DECOUPLED,
                                        FateZeroController(fz, kept, sched, (s, s))),
            "fusion_off": lambda: fused_edit(den, inputs, traj, target, 7.5, Guidance.DECOUPLED,
                                             FateZeroController(off, kept, sched, (s, s))),
            "p2p_decoupled": lambda: decoupled_edit(den, inputs, target, 7.5, Guidance.FAST, P2PController(p2p, sched)),
        }
        edit_times: dict[str, list[float]] = {k: [] for k in runs}
        peak = {}
        for _ in range(args.repeat):
            for name, run in runs.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync()
                t0 = time.perf_counter()
                with torch.no_grad():
                    run()
                sync()
                edit_times[name].append(time.perf_counter() - t0)
                if device.type == "cuda":
                    peak[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row = {"what": "edit", **{f"{k}_s": round(min(v), 3) for k, v in edit_times.items()},
               "fused_vs_fusion_off": round(min(edit_times["fused"]) / min(edit_times["fusion_off"]), 3),
               "fused_vs_p2p": round(min(edit_times["fused"]) / min(edit_times["p2p_decoupled"]), 3)}
        if peak:
            row["peak_gpu_gb"] = peak
        print(json.dumps(row))


if __name__ == "__main__":
    main()
