"""Time per stage on each model family the pack supports, at the same latent size, inside ComfyUI (CPU).

The reduced random models the host tests use, each detected by ComfyUI's own loader: SD1.5 (2 levels),
SD2.x v-prediction (2 levels, 5 res blocks), SDXL family (Segmind_Vega depths at 320 channels), with random
CLIPs of their kinds. Stages: DDIM inversion with FateZero's store, the P2P edit (fast guidance), the FateZero
edit, Cross-Attention Guidance sampling, one tuning step. The numbers compare the pack's overhead across
families; they are not the real checkpoints' speeds (the models are reduced differently).

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_families.py [--frames 2] [--size 16] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(frames: int, size: int, steps: int) -> dict:
    import torch

    from tests.host.comfy_env import encode, find_comfyui, import_comfy, inflated, load_pack, make_clip, make_models, nodes_of

    import_comfy(find_comfyui())
    pack = load_pack()
    from tests.host.model_zoo import make_clip_sd2, make_clip_sdxl, make_detected_sdxl, make_sd2

    families = {
        "SD1.5 (2 levels)": (lambda: make_models(levels=2, seed=0)[1], lambda: make_clip(0)),
        "SD2.x v (2 levels)": (lambda: make_sd2(True, 0), lambda: make_clip_sd2(0)),
        "SDXL family (Vega depths, 320 ch)": (lambda: make_detected_sdxl(0), lambda: make_clip_sdxl(0)),
    }
    reg = nodes_of(pack)
    src, tgt = "a cat running", "a tiger running"
    out: dict = {}
    for name, (make_model, make_text) in families.items():
        base, clip = make_model(), make_text()
        params = sum(p.numel() for p in base.model.diffusion_model.parameters())
        g = torch.Generator().manual_seed(0)
        latents = (torch.randn(1, 4, size, size, generator=g) + 0.3 * torch.randn(frames, 4, size, size, generator=g)) * 5.0
        times: dict[str, float] = {}

        def timed(stage: str, fn, times=times, **kw):
            t0 = time.perf_counter()
            with torch.inference_mode():
                result = fn(**kw).result
            times[stage] = round(time.perf_counter() - t0, 2)
            return result

        model = inflated(pack, base, "middle_frame")
        inv, _ = timed("invert (ddim + store)", reg["VP2P_NullTextInvert"].execute, model=model, positive=encode(clip, src),
                       negative=encode(clip, ""), latent={"samples": latents}, steps=steps, cfg=7.5, mode="ddim_only", inner_steps=0,
                       early_stop=1e-5, store_attention=True, use_cache=False)
        p2p = reg["VP2P_P2PController"].execute(clip=clip, source_prompt=src, target_prompt=tgt, edit="auto", cross_replace=0.5,
                                                self_replace=0.5, blend_source_words="cat", blend_target_words="tiger",
                                                blend_threshold=0.3, reweight="").result[0]
        timed("P2P edit (fast)", reg["VP2P_DecoupledSampler"].execute, model=model, inversion=inv, control=p2p, cfg=7.5, guidance="fast")
        fz = reg["VP2P_FateZeroController"].execute(clip=clip, source_prompt=src, target_prompt=tgt, cross_replace=0.5, self_replace=0.5,
                                                    blend_words="cat", blend_threshold=0.3, reweight="", latent_blend=False).result[0]
        timed("FateZero edit", reg["VP2P_DecoupledSampler"].execute, model=model, inversion=inv, control=fz, cfg=7.5, guidance="fast")
        timed("tune (1 step)", reg["VP2P_TuneOnVideo"].execute, model=inflated(pack, base), positive=encode(clip, src),
              latent={"samples": latents}, steps=1, learning_rate=1e-4, seed=0, use_cache=False)
        masks = torch.zeros(frames, size * 8, size * 8)
        masks[:, : size * 4, : size * 4] = 1
        guider = reg["VP2P_CrossAttentionGuidance"].execute(model=inflated(pack, base), positive=encode(clip, src),
                                                            negative=encode(clip, ""), cfg=5.0, clip=clip, prompt=src, word="cat",
                                                            target_masks=masks, strength=5.0, schedule="every_step").result[0]
        import comfy.samplers
        from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

        sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", steps).cpu()
        t0 = time.perf_counter()
        with torch.inference_mode():
            SamplerCustomAdvanced.execute(Noise_RandomNoise(0), guider, comfy.samplers.sampler_object("euler"), sigmas,
                                          {"samples": torch.zeros(frames, 4, size, size)})
        times["guidance (every step)"] = round(time.perf_counter() - t0, 2)
        out[name] = {"UNet parameters (M)": round(params / 1e6, 1), **times}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--size", type=int, default=16, help="latent size (pixels / 8)")
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    result = run(a.frames, a.size, a.steps)
    print(json.dumps({"frames": a.frames, "latent": a.size, "steps": a.steps, "seconds": result}, indent=2))


if __name__ == "__main__":
    main()
