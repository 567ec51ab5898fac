"""Shared Null-Text Invert inside ComfyUI: the video's DDIM inversion and null-text
optimisation (``vp2p.inversion``) run on the connected MODEL, with a content-addressed
disk cache.

* Latents: a LATENT holds VAE-scale samples; the model works on
  ``latent_format.process_in(samples)``, and the trajectory is kept in that space (σ-scaled,
  as ComfyUI's samplers hold x), so ``process_out(z_T)`` is a LATENT that any sampler can
  start from with its noise disabled.
* Autograd: the optimising modes run on an autograd clone (``autograd_host``); the null
  embedding is fp32 whatever the UNet computes in. ``ddim_only`` and ``negative_prompt``
  need no gradient and run on the MODEL as given.
* Cache key: the MODEL's fingerprint (effective weights, temporal layers, T2S settings),
  the latents, both conditionings and the settings. A hit costs a file read and no UNet
  call; a damaged file is reported and recomputed (``vp2p.disk_cache``).
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import comfy.model_management
import torch

from ..vp2p import SettingsError
from ..vp2p.disk_cache import load_or_compute
from ..vp2p.fingerprint import fingerprint
from ..vp2p.inversion import InversionMode, InversionSettings, ddim_invert, optimise_null_text
from ..vp2p.inversion_file import FORMAT, Inversion, load_inversion, save_inversion
from ..vp2p.schedule import Schedule
from .autograd_host import autograd, denoiser, make_autograd_clone
from .comfy_host import check_latent
from .model_facts import alphas_cumprod, conditioning_tensor, model_fingerprint, prediction_kind

log = logging.getLogger("VideoP2P")

NODE = "Shared Null-Text Invert"

# progress(done, total, text)
Progress = Callable[[int, int, str], None]


def _embeddings(positive: list, negative: list, frames: int, mode: InversionMode) -> tuple[torch.Tensor, torch.Tensor]:
    cond = conditioning_tensor(positive, frames, "positive", NODE)
    neg = conditioning_tensor(negative, frames, "negative", NODE)
    if mode is InversionMode.SHARED_NULL_TEXT and neg.shape[0] > 1:
        if not torch.equal(neg, neg[:1].expand_as(neg)):
            raise SettingsError(
                f"{NODE}: shared_null_text optimises one null embedding for all frames, but the negative CONDITIONING has "
                f"{neg.shape[0]} different rows. Give one negative prompt (batch 1), or use per_frame_null_text."
            )
        neg = neg[:1]
    return cond, neg


def invert(model: Any, positive: list, negative: list, samples: torch.Tensor, settings: InversionSettings,
           progress: Optional[Progress] = None, fingerprint_: Optional[str] = None) -> Inversion:
    """Invert a video (LATENT samples [F, C, h, w]) with ``model``; ``model`` is not changed."""
    check_latent(model, samples, NODE)
    frames = samples.shape[0]
    cond_in, neg_in = _embeddings(positive, negative, frames, settings.mode)
    prediction_kind(model, NODE)
    fp = fingerprint_ or model_fingerprint(model)
    steps = settings.steps
    total = steps + (steps * settings.inner_steps if settings.mode.optimises else 0)
    stop = comfy.model_management.throw_exception_if_processing_interrupted

    def inverted(i: int) -> None:
        if progress is not None:
            progress(i, total, f"DDIM inversion {i}/{steps}")

    def optimised(i: int, used: int, loss: float) -> None:
        if progress is not None and settings.mode.optimises:
            progress(steps + i * settings.inner_steps, total, f"null-text step {i}/{steps} · {used} iterations · loss {loss:.3g}")

    if settings.mode.optimises:
        mp = make_autograd_clone(model)
        context = autograd(mp)
    else:
        mp = model
        comfy.model_management.load_models_gpu([mp])
        context = nullcontext()
    with context:
        device = mp.load_device
        # fresh, ordinary tensors: the executor's inference tensors cannot be saved for backward
        x0 = mp.model.latent_format.process_in(samples.detach().clone().to(device, torch.float32))
        cond = cond_in.detach().clone().to(device, torch.float32)
        null_init = neg_in.detach().clone().to(device, torch.float32)
        schedule = Schedule.reference(steps, alphas_cumprod(model))  # built here: ordinary tensors under autograd
        den = denoiser(mp)
        with torch.no_grad():
            trajectory = ddim_invert(den, x0, cond, schedule, should_stop=stop, on_step=inverted)
        result = optimise_null_text(den, trajectory, cond, null_init, schedule, settings, on_step=optimised, should_stop=stop)
    if result.iterations:
        log.info("%s: %s, inner iterations per step %s (mean %.1f), last loss %.3g", NODE, settings.mode.value,
                 dict(sorted(Counter(result.iterations).items())), sum(result.iterations) / len(result.iterations), result.losses[-1])
    return Inversion(
        trajectory=trajectory.detach().cpu(),
        null_embeddings=None if result.null_embeddings is None else result.null_embeddings.detach().cpu(),
        cond=cond_in.detach().cpu().float(), schedule=schedule, mode=settings.mode, cfg=settings.cfg, model_fingerprint=fp,
        negative=neg_in.detach().cpu().float(),
        iterations=torch.tensor(result.iterations, dtype=torch.int32) if result.iterations else None,
        source_path=None if result.source_path is None else result.source_path.detach().cpu(),
    )


def cache_key(fp: str, samples: torch.Tensor, positive: list, negative: list, settings: InversionSettings) -> str:
    cond, neg = _embeddings(positive, negative, samples.shape[0], settings.mode)
    return fingerprint([("latents", samples), ("cond", cond), ("negative", neg)],
                       {"model": fp, "settings": repr(settings), "format": FORMAT})


def invert_cached(model: Any, positive: list, negative: list, samples: torch.Tensor, settings: InversionSettings,
                  cache: Optional[Path], progress: Optional[Progress] = None) -> Inversion:
    """``invert`` behind a content-addressed file in ``cache`` (no cache when ``None``)."""
    check_latent(model, samples, NODE)
    fp = model_fingerprint(model)
    path = None
    if cache is not None:
        path = cache / f"inversion_{cache_key(fp, samples, positive, negative, settings)[:40]}.safetensors"
    inv, _ = load_or_compute(path, load_inversion, lambda: invert(model, positive, negative, samples, settings, progress, fingerprint_=fp),
                             save_inversion, NODE)
    return inv

