"""The T2V cross-attention study's measurements on a text-to-video model in ComfyUI: SD1.5 + an AnimateDiff motion
module (AnimateDiff-Evolved, the real pack), random weights.

For a generation from seeded noise with the motion module on (with and without Cross-Attention Guidance) and with
it off (effect 0, guided), it reports per frame the guided word's share of cross-attention mass inside the target
box (the study's measure of where the word lands), read on the generated video re-noised to the middle of the
schedule with the same noise for every variant, averaged over the 16²/8²/middle-block maps the guidance uses; the
guidance energy per guided step; and the motion module's effect on the video (relative change against effect 0).
Random weights make the numbers relative: guidance against none on the same model, the motion module against none.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_animatediff.py [--frames 4] [--size 128] [--steps 4] [--eta 20]

Needs ../shared/community (AnimateDiff-Evolved). Writes bench/out/animatediff.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORD = "cat"
PROMPT = "a cat running on the grass"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="frame size in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--eta", type=float, default=20.0)
    args = parser.parse_args()

    import torch

    from tests.host.animatediff import ADE_DIR, MOTION_MODULE, load_pack_module, load_sd15_full, write_motion_module
    from tests.host.comfy_env import encode, find_comfyui, host_module, import_comfy, inflated, load_pack, make_clip, nodes_of

    import_comfy(find_comfyui())
    pack = load_pack()
    ade = load_pack_module(ADE_DIR)
    write_motion_module(ade, Path(tempfile.gettempdir()) / "vp2p-host-models" / "animatediff_models")
    base, clip = load_sd15_full(seed=3), make_clip(0)
    N = nodes_of(pack)
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    vp2p = pack.vp2p
    comfy_call = host_module(pack, "comfy_call")
    F, lat = args.frames, args.size // 8
    pos, neg = encode(clip, PROMPT), encode(clip, "")

    def with_ade(effect: float):
        with torch.inference_mode():
            mm = N["ADE_LoadAnimateDiffModel"]().load_motion_model(MOTION_MODULE)[0]
            effect_mv = N["ADE_MultivalDynamic"]().create_multival(float_val=effect)[0]
            m_models = N["ADE_ApplyAnimateDiffModel"]().apply_motion_model(mm, 0.0, 1.0, effect_multival=effect_mv)[0]
            return N["ADE_UseEvolvedSampling"]().use_evolved_sampling(base, "use existing", m_models)[0]

    with torch.inference_mode():
        masks = N["VP2P_BoxTrajectory"].execute(width=args.size, height=args.size, frames=F, start_x=0.0, start_y=0.25, start_w=0.5,
                                                start_h=0.5, end_x=0.5, end_y=0.25, end_w=0.5, end_h=0.5, shape="box",
                                                easing="linear").result[0]
    tokens = host_module(pack, "prompt_host").tokenized_prompt(clip, PROMPT)
    positions = tuple(vp2p.prompt_align.word_positions(tokens, [WORD], "word", "positive"))

    def generate(model, eta: float) -> tuple[torch.Tensor, list]:
        with torch.inference_mode():
            guider = N["VP2P_CrossAttentionGuidance"].execute(model=model, positive=pos, negative=neg, cfg=7.5, clip=clip, prompt=PROMPT,
                                                              word=WORD, target_masks=masks, strength=eta,
                                                              schedule="every_step").result[0]
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", args.steps).cpu()
            out = SamplerCustomAdvanced.execute(Noise_RandomNoise(0), guider, comfy.samplers.sampler_object("euler"), sigmas,
                                                {"samples": torch.zeros(F, 4, lat, lat)}).result[0]["samples"]
        return out.float(), list(guider.energies)

    def mass_inside(model, samples: torch.Tensor) -> list[float]:
        """Per frame: the word's attention mass inside the box / all of it, at the middle sigma of a re-noised video."""
        ms = model.get_model_object("model_sampling")
        sigma = float(comfy.samplers.calculate_sigmas(ms, "normal", 2)[1])
        noise = torch.randn(samples.shape, generator=torch.Generator().manual_seed(7))

        def loop(stage):
            x = stage.latent + sigma * noise.to(stage.latent)
            recorder = vp2p.guidance.WordMapRecorder(positions, (lat, lat), (4, 8), True)
            ctx = pos[0][0].to(stage.device).expand(F, -1, -1)
            stage.denoiser()(x, torch.tensor([sigma]), ctx, [0], vp2p.RunState(recorder, vp2p.LayoutSpec(F)))
            shares = []
            for maps in recorder.maps.values():
                m = vp2p.guidance.resample_masks(masks.to(maps), tuple(maps.shape[-2:]))
                shares.append(((maps * m).sum((-2, -1)) / maps.sum((-2, -1))).detach())
            return torch.stack(shares).mean(0).tolist()

        with torch.inference_mode():
            return comfy_call.run_stage(model, {"positive": pos}, samples, torch.tensor([sigma, 0.0]), loop, memory_rows=F)

    results = {}
    t0 = time.perf_counter()
    on = inflated(pack, with_ade(1.0), "first_frame", temporal=False)
    off = inflated(pack, with_ade(0.0), "first_frame", temporal=False)
    for name, model, eta in (("motion module, unguided", on, 0.0), ("motion module, guided", on, args.eta),
                             ("motion module off (effect 0), guided", off, args.eta)):
        samples, energies = generate(model, eta)
        results[name] = {"inside_share_per_frame": mass_inside(model, samples), "energies": energies, "samples": samples}
        print(f"{name}: word mass inside the box per frame {[round(v, 3) for v in results[name]['inside_share_per_frame']]}; "
              f"energy per guided step {[round(e, 4) for _, e in energies]}", flush=True)
    on_guided, off_guided = results["motion module, guided"]["samples"], results["motion module off (effect 0), guided"]["samples"]
    motion_effect = float((on_guided - off_guided).norm() / off_guided.norm())
    box_area = float(masks.float().mean())
    print(f"box area {box_area:.3f} of each frame (a uniform map puts this share inside); motion module's effect on the guided "
          f"video: {motion_effect:.3f} relative; {time.perf_counter() - t0:.0f} s", flush=True)
    out = {k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in results.items()}
    out.update(box_area=box_area, motion_effect=motion_effect, frames=F, size=args.size, steps=args.steps, eta=args.eta)
    path = ROOT / "bench" / "out" / "animatediff.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
