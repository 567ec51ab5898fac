"""Cross-attention guidance inside ComfyUI: peak memory growth and time of guided sampling with the
GUIDER's gradient checkpointing vs without it (each variant in its own subprocess).

Needs a ComfyUI checkout (``COMFYUI_PATH``) and its Python environment. A random 2-level SD1.5-format
UNet (ComfyUI's own loader), a random SD1 CLIP, Euler, every step guided.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_guidance_comfy.py [--frames 4] [--size 32] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(variant: str, frames: int, size: int, steps: int) -> dict:
    import torch

    from tests.host.comfy_env import encode, find_comfyui, host_module, import_comfy, load_pack, make_clip, make_models

    import_comfy(find_comfyui())
    pack = load_pack()
    _, model = make_models(levels=2, seed=0)
    clip = make_clip(0)
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    gh = host_module(pack, "guidance_host")
    prompt = "a red ball on a table"
    masks = torch.zeros(frames, size * 8, size * 8)
    masks[:, : size * 4, : size * 4] = 1
    mp = gh.guided_model(model)
    if variant == "no_checkpointing":
        mp.remove_injections("vp2p_grad_checkpoint")
    positive, negative = encode(clip, prompt), encode(clip, "")
    guider = gh.CrossAttentionGuider(mp, positive[0][0], (4,), masks, 20.0 if variant != "unguided" else 0.0,
                                     "16x16_8x8_middle", "every_step")
    guider.set_conds(positive, negative)
    guider.set_cfg(7.5)
    sigmas = comfy.samplers.calculate_sigmas(mp.get_model_object("model_sampling"), "normal", steps).cpu()
    latent = torch.zeros(frames, 4, size, size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    with torch.inference_mode():
        SamplerCustomAdvanced.execute(Noise_RandomNoise(0), guider, comfy.samplers.sampler_object("euler"), sigmas, {"samples": latent})
    return {"variant": variant, "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_growth_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before, 1),
            "guided_steps": len(guider.energies)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.frames, args.size, args.steps)))
        return
    for variant in ("unguided", "checkpointing", "no_checkpointing"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--frames", str(args.frames), "--size", str(args.size),
                              "--steps", str(args.steps)], capture_output=True, text=True)
        if out.returncode:
            print(json.dumps({"variant": variant, "error": out.stderr.strip().splitlines()[-1]}))
            continue
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
