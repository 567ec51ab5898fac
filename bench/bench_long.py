"""Long videos in frame chunks: peak memory and time of the edit at 8, 32 and 128 frames, and what
chunking changes (max difference to the whole clip, per frame mode).

CPU, the tiny random UNet of the tests on the diffusers host (T2S: first_frame, temporal layers, video
GroupNorm), latents of ``--size``² and ``--steps`` DDIM steps. Each (frames, chunk) runs in its own process:
the DDIM inversion first, then the peak resident memory is reset (``/proc/self/clear_refs``) and a P2P
edit (word swap, cross/self replace 0.4, LocalBlend; the source branch walked beside the target: 4 videos
per UNet call) is timed; reported: its peak RSS above the RSS before it, and its wall time.

    python bench/bench_long.py [--size 32] [--steps 4] [--chunk 8] [--null-text]

``--null-text`` measures null-text optimisation (2 inner steps per step) instead of the edit, same runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.proc_memory import reset_peak, status_kb  # noqa: E402


def _status_kb(field: str) -> int:
    kb = status_kb(field)
    if kb is None:
        raise RuntimeError(f"no {field} in /proc/self/status (this benchmark measures memory on Linux)")
    return kb


def _setup(frames: int, size: int, steps: int, settings):
    import torch

    from tests.helpers import tiny_unet
    from vp2p.clip_vocab import clip_tokenizer
    from vp2p.diffusers_host import DiffusersT2S
    from vp2p.inversion import ddim_invert
    from vp2p.local_blend import LocalBlendSpec
    from vp2p.p2p import P2PEdit
    from vp2p.prompt_align import EditKind, hf_encoder, tokenize_prompt
    from vp2p.schedule import Schedule, sd_alphas_cumprod

    unet = tiny_unet(seed=0, sample_size=size)
    enc = hf_encoder(clip_tokenizer())
    src, tgt = tokenize_prompt("a cat is running on the grass", enc, 77), tokenize_prompt("a tiger is running on the grass", enc, 77)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50000, 32, generator=g)

    def embed(p):
        return table[[49406, *p.ids, 49407] + [49407] * (77 - p.end - 1)].unsqueeze(0)

    latents = torch.randn(1, 4, size, size, generator=g) + 0.3 * torch.randn(frames, 4, size, size, generator=g)
    empty = 0.1 * torch.randn(1, 77, 32, generator=g)
    host = DiffusersT2S(unet, settings).install()
    den = host.denoiser(sd_alphas_cumprod())
    sched = Schedule.reference(steps)
    cond = embed(src)
    with torch.no_grad():
        traj = ddim_invert(den, latents, cond, sched)
    spec = LocalBlendSpec(tuple(src.positions("cat")), tuple(tgt.positions("tiger")), start=0.0)
    edit = P2PEdit(src, tgt, cond, embed(tgt), EditKind.REPLACE, cross_replace=0.4, self_replace=0.4, blend=spec)
    return host, den, traj, cond, empty, sched, edit


def _edit(den, traj, cond, empty, sched, edit, frames: int, size: int):
    import torch

    from vp2p.edit import EditInputs, Guidance, decoupled_edit
    from vp2p.local_blend import LocalBlend
    from vp2p.p2p import P2PController

    # the inversion's first null embedding for every step: a guided source branch walked beside the target
    nulls = empty.expand(sched.steps, -1, -1).unsqueeze(1).clone()
    inputs = EditInputs(traj[0], sched, cond, nulls, empty, 7.5, None)
    blend = LocalBlend(edit.blend, frames, (size, size), sched.steps)
    with torch.no_grad():
        return decoupled_edit(den, inputs, edit.target_cond, 7.5, Guidance.DECOUPLED, P2PController(edit, sched, blend), reuse=False)


def one(frames: int, chunk: int, size: int, steps: int) -> dict:
    """Worker: one (frames, chunk) in this process."""
    from vp2p import FrameMode, T2SSettings

    _, den, traj, cond, empty, sched, edit = _setup(frames, size, steps, T2SSettings(FrameMode.FIRST_FRAME, True, frames_per_chunk=chunk))
    before = _status_kb("VmRSS")
    reset_peak()  # the peak RSS (VmHWM) := the current RSS
    t0 = time.perf_counter()
    res = _edit(den, traj, cond, empty, sched, edit, frames, size)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    return {"frames": frames, "frames_per_chunk": chunk, "edit_s": round(seconds, 2), "edit_peak_rss_mb": round((peak - before) / 1024, 1),
            "rows_per_step": max(res.rows), "rows_per_unet_call": 4 * min(chunk or frames, frames), "finite": bool(res.edited.isfinite().all())}


def one_null_text(frames: int, chunk: int, size: int, steps: int) -> dict:
    """Worker: null-text optimisation (2 inner steps per step) on the DDIM inversion, in this process."""
    from vp2p import FrameMode, T2SSettings
    from vp2p.inversion import InversionSettings, optimise_null_text

    _, den, traj, cond, empty, sched, _ = _setup(frames, size, steps, T2SSettings(FrameMode.FIRST_FRAME, True, frames_per_chunk=chunk))
    before = _status_kb("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    res = optimise_null_text(den, traj, cond, empty, sched, InversionSettings(steps=steps, inner_steps=2, early_stop=0.0))
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    return {"stage": "null-text", "frames": frames, "frames_per_chunk": chunk, "seconds": round(seconds, 2),
            "peak_rss_mb": round((peak - before) / 1024, 1), "finite": bool(res.null_embeddings.isfinite().all())}


def differences(size: int, steps: int, frames: int, chunk: int) -> list[dict]:
    """Chunked vs whole, max |difference| of the edited latents (and relative to their max), per frame mode;
    exact settings (group_norm=frame, untuned temporal layers) and the two that chunks change."""
    import torch

    from tests.helpers import randomise_temporal
    from vp2p import FrameMode, T2SSettings
    from vp2p.video_norm import NormScope

    rows = []
    cases = [(mode, NormScope.FRAME, False, 0) for mode in FrameMode] + [(FrameMode.FIRST_FRAME, NormScope.VIDEO, False, 0),
                                                                        (FrameMode.FIRST_FRAME, NormScope.VIDEO, False, chunk // 2),
                                                                        (FrameMode.FIRST_FRAME, NormScope.FRAME, True, 0),
                                                                        (FrameMode.FIRST_FRAME, NormScope.FRAME, True, chunk // 2)]
    for mode, norm, tuned, overlap in cases:
        out = []
        bank = None
        for per in (0, chunk):
            settings = T2SSettings(mode, True, norm, frames_per_chunk=per, chunk_overlap=overlap if per else 0)
            host, den, traj, cond, empty, sched, edit = _setup(frames, size, steps, settings)
            if tuned:
                if bank is None:
                    bank = randomise_temporal(host.bank, 7).state_dict()
                host.bank.load_state_dict(bank)
                with torch.no_grad():  # the inversion again, with the tuned layers
                    from vp2p.inversion import ddim_invert
                    traj = ddim_invert(den, traj[-1] / (1 + sched.sigmas[-1] ** 2) ** 0.5, cond, sched)
            out.append(_edit(den, traj, cond, empty, sched, edit, frames, size).edited)
            host.remove()
        diff = float((out[0] - out[1]).abs().max())
        rows.append({"frame_attention": mode.value, "group_norm": norm.value, "temporal": "tuned (random)" if tuned else "untuned",
                     "frames": frames, "frames_per_chunk": chunk, "chunk_overlap": overlap, "max_abs_diff": diff,
                     "relative": diff / float(out[0].abs().max())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=32, help="latent size (pixels / 8)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--one", nargs=2, type=int, metavar=("FRAMES", "CHUNK"))
    ap.add_argument("--differences-only", action="store_true")
    ap.add_argument("--null-text", action="store_true", help="measure null-text optimisation instead of the edit")
    args = ap.parse_args()
    if args.one:
        worker = one_null_text if args.null_text else one
        print(json.dumps(worker(args.one[0], args.one[1], args.size, args.steps)))
        return
    runs = [] if args.differences_only else [(8, args.chunk), (32, args.chunk), (128, args.chunk), (8, 0), (32, 0)]
    for frames, chunk in runs:
        cmd = [sys.executable, __file__, "--size", str(args.size), "--steps", str(args.steps), "--one", str(frames), str(chunk)]
        cmd += ["--null-text"] if args.null_text else []
        print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip(), flush=True)
    if args.null_text:
        return
    for row in differences(args.size // 2, args.steps, 16, 4):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
