"""Shared Null-Text Invert inside ComfyUI: the video's DDIM inversion and null-text
optimisation (``vp2p.inversion``) run on the connected MODEL, with a content-addressed
disk cache.

* Latents: a LATENT holds VAE-scale samples; the model works on
  ``latent_format.process_in(samples)``, and the trajectory is kept in that space (σ-scaled,
  as ComfyUI's samplers hold x), so ``process_out(z_T)`` is a LATENT that any sampler can
  start from with its noise disabled.
* Every UNet call goes through ComfyUI's conditioning path (``comfy_call.run_stage``): the
  positive CONDITIONING's extras (ControlNet, GLIGEN, hooks …) apply to every call, the negative's
  to the null-text loop, whose optimised embedding replaces the negative's text rows.
* Autograd: the optimising modes run on an autograd clone (``autograd_host``); the null
  embedding is fp32 whatever the UNet computes in. ``ddim_only`` and ``negative_prompt``
  need no gradient and run on the MODEL as given.
* Cache key: the MODEL's fingerprint (effective weights, temporal layers, T2S settings),
  the latents, both conditionings and the settings. A hit costs a file read and no UNet
  call; a damaged file is reported and recomputed (``vp2p.disk_cache``).
* FateZero's attention store (``store_attention``) is recorded by the DDIM inversion's own
  UNet calls (one per step, at the step's sigma, as FateZero records) and cached apart from
  the inversion, in a folder named by the inversion's key and the store's settings: turning
  the store on later costs one UNet call per stored step on the cached trajectory, not a
  new inversion.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import comfy.model_management
import torch

from ..vp2p import LayoutSpec, RunState, SettingsError
from ..vp2p.attention_store import (
    AttentionStore,
    StoreLocation,
    StorePrecision,
    StoreRecorder,
    StoreSpec,
    abandon_recording,
    auto_location,
    claim_folder,
    cond_digest,
    finish_recording,
    record_missing_steps,
    store_nbytes,
)
from ..vp2p.disk_cache import load_or_compute
from ..vp2p.fingerprint import fingerprint
from ..vp2p.frame_attention import FrameMode
from ..vp2p.inversion import InversionMode, InversionSettings, ddim_invert, optimise_null_text
from ..vp2p.inversion_file import FORMAT, Inversion, load_inversion, save_inversion
from ..vp2p.schedule import Schedule
from .autograd_host import BACKWARD_MEMORY, autograd, make_autograd_clone
from .cache_admin import after_write, enforce_limit
from .comfy_call import Stage, pooled_of, run_stage
from .comfy_host import block_levels, block_shapes, check_latent, get_state, options_cacheable, tokens_per_frame, transformer_blocks
from .model_facts import alphas_cumprod, conditioning_key, conditioning_tensor, model_fingerprint, prediction_kind

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
           progress: Optional[Progress] = None, fingerprint_: Optional[str] = None, store: Optional[AttentionStore] = None) -> Inversion:
    """Invert a video (LATENT samples [F, C, h, w]) with ``model``; ``model`` is not changed.
    With ``store`` the source attention is recorded into it on the way (not finished here)."""
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
        context = nullcontext()

    def loop(stage: Stage) -> tuple[torch.Tensor, Any]:
        den = stage.denoiser()
        # fresh, ordinary tensors: the executor's inference tensors cannot be saved for backward
        x0 = stage.latent.detach().clone().float()  # ComfyUI's process_latent_in (the model's latent scale)
        cond = cond_in.detach().clone().to(stage.device, torch.float32)
        null_init = neg_in.detach().clone().to(stage.device, torch.float32)
        run = None if store is None else RunState(StoreRecorder(store, schedule), LayoutSpec(frames))
        with torch.no_grad():  # with a store, the inversion's own calls record every step
            trajectory = ddim_invert(den, x0, cond, schedule, should_stop=stop, on_step=inverted, run=run)
        result = optimise_null_text(den, trajectory, cond, null_init, schedule, settings, on_step=optimised, should_stop=stop,
                                    combine=den.cfg)
        return trajectory, result

    with context:
        schedule = Schedule.reference(steps, alphas_cumprod(model))  # built here: ordinary tensors under autograd
        # one video (F rows) per UNet call; the null-text loop runs backward passes through it
        trajectory, result = run_stage(mp, {"positive": positive, "negative": negative}, samples, schedule.sigmas, loop,
                                       memory_rows=frames, backward_factor=BACKWARD_MEMORY if settings.mode.optimises else 1.0)
    if result.iterations:
        log.info("%s: %s, inner iterations per step %s (mean %.1f), last loss %.3g", NODE, settings.mode.value,
                 dict(sorted(Counter(result.iterations).items())), sum(result.iterations) / len(result.iterations), result.losses[-1])
    return Inversion(
        trajectory=trajectory.detach().cpu(),
        null_embeddings=None if result.null_embeddings is None else result.null_embeddings.detach().cpu(),
        cond=cond_in.detach().cpu().float(), schedule=schedule, mode=settings.mode, cfg=settings.cfg, model_fingerprint=fp,
        negative=neg_in.detach().cpu().float(), negative_pooled=pooled_of(negative),
        iterations=torch.tensor(result.iterations, dtype=torch.int32) if result.iterations else None,
        source_path=None if result.source_path is None else result.source_path.detach().cpu(),
    )


def record_for_cached(model: Any, positive: list, inv: Inversion, store: AttentionStore) -> int:
    """Record a store for an inversion that came from the cache: one UNet call per stored step,
    on its trajectory (exactly the latents the inversion evaluated). Returns the calls made."""

    def loop(stage: Stage) -> int:
        run = RunState(StoreRecorder(store, inv.schedule), LayoutSpec(inv.frames))
        with torch.no_grad():
            return record_missing_steps(stage.denoiser(), inv.trajectory.to(stage.device), inv.cond.to(stage.device), inv.schedule,
                                        store, run)

    return run_stage(model, {"positive": positive}, torch.zeros(inv.latent_shape), inv.schedule.sigmas, loop, memory_rows=inv.frames)


def store_spec(model: Any, positive: list, frames: int, steps: int, fraction: float, max_tokens: int,
               precision: StorePrecision = StorePrecision.FP16) -> StoreSpec:
    state = get_state(model)
    if state is None:
        raise SettingsError(
            f"{NODE}: store_attention records attention through the pack's attention patch, and this MODEL has none. Put "
            "'Inflate to T2S' before the inverter (middle_frame and no temporal attention for a zero-shot FateZero edit)."
        )
    cond = conditioning_tensor(positive, frames, "positive", NODE)
    return StoreSpec.for_fraction(steps, fraction, max_tokens, frames, state.settings.frame_attention, cond_digest(cond),
                                  state.settings.frame_attention_min_channels, precision)


def predicted_store_bytes(model: Any, spec: StoreSpec, latent_hw: tuple[int, int], context: int) -> int:
    """The size the store of ``spec`` will have on this MODEL and latent size, before recording: the layers'
    token counts from the UNet's own halvings, their widths and heads from the blocks (``store_nbytes``)."""
    blocks = transformer_blocks(model)
    levels, shapes = block_levels(model, blocks), block_shapes(model, blocks)
    layers = [(tokens_per_frame(levels[k], latent_hw), shapes[k].dim, shapes[k].heads) for k in blocks]
    return store_nbytes(spec.frames, layers, FrameMode.parse(spec.frame_mode), context, spec.stored_steps, spec.max_tokens,
                        spec.frame_attention_min_channels, spec.precision)


def announce_store(model: Any, spec: StoreSpec, latent_hw: tuple[int, int], context: int, folder: Optional[Path]) -> int:
    """Log the store's predicted size and where it goes before recording; refuse a disk store that would not fit
    the free space of its folder's disk (nothing recorded, nothing written)."""
    import shutil

    need = predicted_store_bytes(model, spec, latent_hw, context)
    where = "in RAM" if folder is None else f"on disk in {folder}"
    log.info("%s: recording an attention store of %.3f GB (%s; %d of %d steps, layers ≤ %d tokens per frame, %d frames), %s.",
             NODE, need / 1e9, spec.precision, spec.stored_steps, spec.steps, spec.max_tokens, spec.frames, where)
    if folder is not None:
        existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
        free = shutil.disk_usage(existing).free if existing is not None else None
        if free is not None and need > free:
            raise SettingsError(
                f"{NODE}: the attention store needs {need / 1e9:.2f} GB but the disk of {folder} has {free / 1e9:.2f} GB free. Free "
                "some space (e.g. 'Clear Video-P2P cache'), lower store_steps or store_max_tokens, or use fewer frames.")
    return need


def cache_key(fp: str, samples: torch.Tensor, positive: list, negative: list, settings: InversionSettings) -> Optional[str]:
    """The inversion's content key, or ``None`` when a CONDITIONING carries something that cannot be keyed
    (a ControlNet, GLIGEN, hooks): then the inversion is not cached."""
    _embeddings(positive, negative, samples.shape[0], settings.mode)  # refuses what cannot be inverted
    pos, neg = conditioning_key(positive, "positive"), conditioning_key(negative, "negative")
    if pos is None or neg is None:
        return None
    return fingerprint([("latents", samples), *pos[0], *neg[0]],
                       {"model": fp, "settings": settings.key(), "format": FORMAT, **pos[1], **neg[1]})


def invert_cached(model: Any, positive: list, negative: list, samples: torch.Tensor, settings: InversionSettings,
                  cache: Optional[Path], progress: Optional[Progress] = None, store_spec_: Optional[StoreSpec] = None,
                  store_location: StoreLocation = StoreLocation.CPU, store_root: Optional[Path] = None) -> Inversion:
    """``invert`` behind a content-addressed file in ``cache`` (no cache when ``None``); with
    ``store_spec_`` also FateZero's attention store. A ``cpu`` store lives in RAM only and writes
    nothing (it reuses a finished ``disk`` store of the same inversion when ``cache`` holds one, else
    it is recorded again, on the cached inversion when that is a hit); a ``disk`` store lives in a
    folder under ``cache`` (else ``store_root``) that counts toward the cache's size limit."""
    check_latent(model, samples, NODE)
    fp = model_fingerprint(model)
    key = cache_key(fp, samples, positive, negative, settings)
    if key is None and cache is not None:
        log.info("%s: the conditioning carries a ControlNet, GLIGEN or hooks, which a cache key cannot capture: the "
                 "inversion is computed, not cached.", NODE)
        cache = None
    if cache is not None and not options_cacheable(model):
        log.info("%s: another node put a wrapper, CFG function or patch on the MODEL, which a cache key cannot capture: "
                 "the inversion is computed, not cached.", NODE)
        cache, key = None, None
    path = None if cache is None else cache / f"inversion_{key[:40]}.safetensors"
    if key is None:  # a disk store still needs a folder of its own, never another inversion's
        key = f"uncached-{uuid.uuid4().hex}"
    if store_spec_ is not None and store_location is StoreLocation.AUTO:
        context = conditioning_tensor(positive, samples.shape[0], "positive", NODE).shape[1]
        need = predicted_store_bytes(model, store_spec_, tuple(samples.shape[-2:]), context)
        store_location = auto_location(need)
        log.info("%s: store_location auto: the store will take %.3f GB, so it is kept %s.", NODE, need / 1e9,
                 "on disk" if store_location is StoreLocation.DISK else "in RAM")
    store, recording, on_disk = None, None, store_location is StoreLocation.DISK
    stop = comfy.model_management.throw_exception_if_processing_interrupted  # also while waiting for another process
    if store_spec_ is not None:
        root = cache if cache is not None else (store_root if on_disk else None)
        folder = None if root is None else root / f"attention_{fingerprint((), {'inversion': key, 'spec': store_spec_.to_json()})[:40]}"
        context = conditioning_tensor(positive, samples.shape[0], "positive", NODE).shape[1]
        announced = False
        if on_disk and folder is not None and not (folder / "spec.json").is_file():
            # Checked before anything is written (the lock file included): a store that would not fit is refused here.
            announce_store(model, store_spec_, tuple(samples.shape[-2:]), context, folder)
            announced = True
        if folder is not None and (on_disk or cache is not None):
            # Locked (other processes wait for this recording); a disk store stays pinned while the inversion lives.
            store, recording = claim_folder(folder, store_spec_, in_memory=not on_disk, reuse=cache is not None, record=on_disk,
                                            on_wait=stop)
        if store is None:
            if not on_disk:
                folder = None  # cpu: in RAM only, nothing written
            if not announced:
                announce_store(model, store_spec_, tuple(samples.shape[-2:]), context, folder)
            if recording is None:
                recording = AttentionStore(store_spec_, folder, in_memory=not on_disk)
    recording_dir = None if recording is None else recording.directory
    try:
        inv, hit = load_or_compute(path, load_inversion,
                                   lambda: invert(model, positive, negative, samples, settings, progress, fingerprint_=fp, store=recording),
                                   save_inversion, NODE, after_write(cache, recording_dir), on_wait=stop)
        if hit and inv.cfg != settings.cfg:  # ddim_only: cfg is not in the key (unused); report what was asked
            inv = dataclasses.replace(inv, cfg=settings.cfg)
        if recording is not None:
            if hit:
                calls = record_for_cached(model, positive, inv, recording)
                log.info("%s: recorded the attention store on the cached inversion (%d UNet calls).", NODE, calls)
            store = finish_recording(recording)
            if recording_dir is not None:
                enforce_limit(recording_dir.parent, (recording_dir, path))
    except BaseException:
        abandon_recording(recording)  # an interrupted or failed recording leaves no folder behind
        raise
    if store is not None:
        inv.attention = store
        s = store.spec
        log.info("%s: attention store of %d/%d steps, layers ≤ %d tokens per frame, %d frames (%s): %.3f GB in %s, kept %s.",
                 NODE, s.stored_steps, s.steps, s.max_tokens, s.frames, s.frame_mode, store.nbytes / 1e9, s.precision,
                 "in memory" if store.in_memory else f"on disk in {store.directory}")
    return inv

