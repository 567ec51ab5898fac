"""Headless main job of the pack (no ComfyUI needed).

The whole Video-P2P edit: inflate an SD model to a text-to-set model, tune it on the clip
(Tune on Video), invert the clip with one null-text embedding per step shared by all frames,
and edit it with prompt-to-prompt control and decoupled guidance (P2P Controller + Decoupled
Sampler), then decode and write the edited video and the source reconstruction. Without
--model it runs on a small random-weight SD1.5-shaped model and a clip it generates: the
pipeline is real, the pictures are noise. With --model DIR (a diffusers-format SD1.x/SD2.x
folder on disk) it does the real job.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vp2p import FrameMode, T2SSettings  # noqa: E402
from vp2p.diffusers_pipeline import EditOptions, decode_video, edit_video, encode_video, load_components, random_components  # noqa: E402
from vp2p.inversion import InversionMode, InversionSettings  # noqa: E402
from vp2p.prompt_align import split_words  # noqa: E402
from vp2p.tuning import TuneSettings  # noqa: E402
from vp2p.video_norm import NormScope  # noqa: E402

log = logging.getLogger("VideoP2P")


def generated_clip(frames: int, height: int, width: int) -> torch.Tensor:
    """A disc moving left to right over a gradient: [F, H, W, 3] in [0, 1]."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for f in range(frames):
        img = np.stack([xx / width, yy / height, np.full_like(xx, 0.4)], -1)
        cx = width * (0.2 + 0.6 * f / max(1, frames - 1))
        disc = ((xx - cx) ** 2 + (yy - height / 2) ** 2) < (min(height, width) / 5) ** 2
        img[disc] = (0.9, 0.5, 0.1)
        out.append(img)
    return torch.from_numpy(np.stack(out))


def load_clip(path: Path, frames: int, height: int, width: int) -> torch.Tensor:
    from PIL import Image, ImageSequence

    paths = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")) if path.is_dir() else None
    images = [Image.open(p) for p in paths] if paths else list(ImageSequence.Iterator(Image.open(path)))
    picked = [images[round(i * (len(images) - 1) / max(1, frames - 1))] for i in range(min(frames, len(images)))]
    arr = [np.asarray(im.convert("RGB").resize((width, height)), dtype=np.float32) / 255 for im in picked]
    return torch.from_numpy(np.stack(arr))


def save_gif(frames: torch.Tensor, path: Path, fps: int = 8) -> None:
    from PIL import Image

    ims = [Image.fromarray((f.numpy() * 255).round().astype(np.uint8)) for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=int(1000 / fps), loop=0)


def build_parser() -> argparse.ArgumentParser:
    """The command's options (their defaults are the P2P Controller's)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="diffusers-format SD1.x/SD2.x folder (unet/, vae/, text_encoder/, tokenizer/)")
    ap.add_argument("--video", type=Path, help="input clip: a GIF or a folder of frames (default: a generated clip)")
    ap.add_argument("--prompt", default="an orange ball rolling on a table", help="source prompt: what the clip shows")
    ap.add_argument("--target", default="a red ball rolling on a table", help="target prompt: the edit")
    ap.add_argument("--negative", default="")
    ap.add_argument("--edit", default="auto", choices=["auto", "replace", "refine"])
    ap.add_argument("--cross-replace", type=float, default=0.2,
                    help="fraction of the steps the target's cross-attention comes from the source (official code: 0.2)")
    ap.add_argument("--self-replace", type=float, default=0.5,
                    help="fraction of the steps the target's self-attention comes from the source (official code: 0.5)")
    ap.add_argument("--blend-source", default="ball", help="local blend words of the source prompt (comma-separated; '' for none)")
    ap.add_argument("--blend-target", default="ball", help="local blend words of the target prompt")
    ap.add_argument("--blend-threshold", type=float, default=0.3)
    ap.add_argument("--reweight", default="", help="e.g. 'red:2.0'")
    ap.add_argument("--guidance", default="decoupled", choices=["decoupled", "shared_null", "fast"])
    ap.add_argument("--invert-mode", default="shared_null_text", choices=[m.value for m in InversionMode])
    ap.add_argument("--inner-steps", type=int, default=None, help="null-text iterations per step (default: 10 with --model, 2 without)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 50 with --model, 8 without)")
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--frame-attention", default="first_frame", choices=[m.value for m in FrameMode])
    ap.add_argument("--no-temporal", action="store_true")
    ap.add_argument("--group-norm", default="video", choices=["video", "frame"],
                    help="GroupNorm statistics over the whole video (the references' 3-D UNet) or per frame")
    ap.add_argument("--tune-steps", type=int, default=None, help="Tune on Video steps (default: 300 with --model, 4 without)")
    ap.add_argument("--tune-lr", type=float, default=3e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "out")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.width % 8 or args.height % 8:
        ap.error(f"--width/--height must be multiples of 8 (the VAE's factor), got {args.width}×{args.height}")
    comps = load_components(args.model, device, dtype) if args.model else random_components(device, dtype, args.seed)
    clip = load_clip(args.video, args.frames, args.height, args.width) if args.video else generated_clip(args.frames, args.height, args.width)
    args.out.mkdir(parents=True, exist_ok=True)
    save_gif(clip, args.out / "input.gif")

    t0 = time.perf_counter()
    latents = encode_video(comps, clip)
    settings = T2SSettings(FrameMode(args.frame_attention), not args.no_temporal, NormScope(args.group_norm))
    tune_steps = args.tune_steps if args.tune_steps is not None else (300 if args.model else 4)
    steps = args.steps if args.steps is not None else (50 if args.model else 8)
    inner = args.inner_steps if args.inner_steps is not None else (10 if args.model else 2)
    mode = InversionMode(args.invert_mode)
    inversion = InversionSettings(steps=steps, cfg=args.cfg if mode.optimises else max(args.cfg, 1.0), mode=mode, inner_steps=inner)
    words = lambda text: tuple(split_words(text))
    options = EditOptions(args.prompt, args.target, args.negative, args.edit, args.cross_replace, args.self_replace,
                          words(args.blend_source), words(args.blend_target), args.blend_threshold, args.reweight,
                          args.guidance, args.cfg)
    shown: dict[str, int] = {}

    def progress(stage: str, i: int, n: int, loss: float) -> None:
        every = max(1, math.ceil(n / 5))
        if i % every == 0 or i == n:
            shown[stage] = i
            log.info("%s %d/%d%s", stage, i, n, "" if loss != loss else f", loss {loss:.4g}")

    run = edit_video(comps, settings, latents.float(), options, inversion,
                     TuneSettings(steps=tune_steps, learning_rate=args.tune_lr, seed=args.seed), progress)
    from PIL import Image

    for name, lat in (("edited", run.edited), ("source", run.source)):
        video = decode_video(comps, lat)
        save_gif(video, args.out / f"{name}.gif")
        for i, f in enumerate(video):
            Image.fromarray((f.numpy() * 255).round().astype(np.uint8)).save(args.out / f"{name}_{i:03d}.png")
    log.info("Video-P2P: inflated (%s), tuned %d steps, inverted (%s, %d steps), edited %r -> %r on %d frames of %dx%d "
             "in %.1f s -> %s", settings.describe(), tune_steps, mode.value, steps, args.prompt, args.target, video.shape[0],
             video.shape[2], video.shape[1], time.perf_counter() - t0, args.out / "edited.gif")
    if comps.random_weights:
        log.info("NOTE: no --model was given, so this ran on a small RANDOM-WEIGHT SD1.5-shaped model: the output is "
                 "noise by design. It shows the pipeline runs end to end; give --model DIR (a diffusers SD1.x folder) for real results.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
