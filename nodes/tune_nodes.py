"""Node ``VP2P_TuneOnVideo`` — "Tune on Video"."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..vp2p.tuning import TuneSettings
from .progress import progress_text
from .tune_host import tune_weights

log = logging.getLogger("VideoP2P")


class TuneOnVideo(io.ComfyNode):
    """Fine-tune the inflated model on the video it will edit (Video-P2P stage 1)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VP2P_TuneOnVideo",
            display_name="Tune on Video",
            category="video_p2p/1 model",
            search_aliases=["tune-a-video", "fine-tune video", "video p2p", "video edit"],
            description=(
                "Fine-tunes a T2S model on one video so it can reconstruct it: to_q of frame and cross attention in "
                "every transformer block and the temporal attention's q/k/v/out projections (its LayerNorm stays "
                "frozen, as in Video-P2P/Tune-A-Video). The input MODEL is not changed; the output carries the tuned "
                "weights as patches and works with stock samplers."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A MODEL from 'Inflate to T2S' (optionally already tuned)."),
                io.Conditioning.Input("positive", tooltip="The source prompt describing the video (CLIP Text Encode)."),
                io.Latent.Input("latent", tooltip="The video as latents: one frame per batch entry (VAE Encode of the frames)."),
                io.Int.Input("steps", default=500, min=0, max=100000,
                             tooltip="Training steps. The reference uses 300–500. 0 returns the model unchanged."),
                io.Float.Input("learning_rate", default=3e-5, min=1e-7, max=1e-2, step=1e-6,
                               tooltip="AdamW learning rate (weight decay 1e-2, gradient clipping 1.0)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the timesteps and noise; the same seed gives the same tuned model."),
                io.String.Input("save_name", default="", optional=True,
                                tooltip="Also save the tuned weights as models/vp2p/<save_name>.safetensors (load them with "
                                        "'Load Tuned T2S'). Empty: do not save."),
                io.Boolean.Input("use_cache", default=True, optional=True,
                                 tooltip="Reuse an earlier result for the same model, video, prompt and settings from "
                                         "models/vp2p/cache instead of training again (a hit costs a file read)."),
                io.Int.Input("frames_per_step", default=0, min=0, max=4096, optional=True,
                             tooltip="Frames each training step sees (long clips): a window of this many frames, taken every "
                                     "frame_stride frames from a random start (seeded); frame attention and the temporal layers "
                                     "then see that window as the video, and memory follows the window. 0: the whole clip every "
                                     "step (the reference's behaviour for its 8-frame clips) — or, on a MODEL inflated with "
                                     "frames_per_chunk, a window of that many frames when the clip is longer; a window as long "
                                     "as the clip or longer also uses the whole clip."),
                io.Int.Input("frame_stride", default=1, min=1, max=1024, optional=True,
                             tooltip="Step between the frames of a window (as Tune-A-Video's sampling rate): 2 takes every "
                                     "other frame, so a window spans more of the clip's motion. Only used with frames_per_step."),
                io.Boolean.Input("train_motion_module", default=False, optional=True,
                                 tooltip="With an AnimateDiff motion module on the MODEL (AnimateDiff-Evolved nodes before Inflate "
                                         "to T2S): also train its attention (q/k/v/out of its temporal transformers), as "
                                         "Tune-A-Video trains its temporal attention. The motion module itself is not changed: the "
                                         "tuned MODEL carries the changes, saved and reloaded with the tuning."),
            ],
            outputs=[io.Model.Output(tooltip="The tuned T2S MODEL.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, latent, steps: int, learning_rate: float, seed: int, save_name: str = "",
                use_cache: bool = True, frames_per_step: int = 0, frame_stride: int = 1,
                train_motion_module: bool = False) -> io.NodeOutput:
        import comfy.utils

        from .comfy_host import check_latent
        from .tune_host import require_state

        samples = latent.get("samples") if isinstance(latent, dict) else None
        state = require_state(model)
        check_latent(model, samples, "Tune on Video")
        chunk = state.settings.frames_per_chunk
        if not frames_per_step and 0 < chunk < samples.shape[0]:
            # A chunked model on a clip longer than a chunk: train on chunk-sized windows, so a step's backward holds
            # one chunk's activations (the temporal layers then learn over the frames they will see in a chunk).
            frames_per_step = chunk
            log.info("Tune on Video: the MODEL runs %d frames per chunk and the clip has %d: each step trains on a window of %d "
                     "frames (set frames_per_step to choose another window).", chunk, samples.shape[0], chunk)
        settings = TuneSettings(steps=int(steps), learning_rate=float(learning_rate), seed=int(seed) % (2**63),
                                frames_per_step=int(frames_per_step), frame_stride=int(frame_stride),
                                train_motion_module=bool(train_motion_module))
        pbar = comfy.utils.ProgressBar(max(1, settings.steps))
        node_id = cls.hidden.unique_id if cls.hidden is not None else None

        def progress(step: int, total: int, loss: float) -> None:
            pbar.update_absolute(step, total)
            if step == 1 or step % max(1, total // 20) == 0 or step == total:
                log.info("Tune on Video: step %d/%d, loss %.5f", step, total, loss)
                progress_text(f"step {step}/{total} · loss {loss:.5f}", node_id)

        tuned = tune_cached(model, positive, samples, settings, progress, save_name=save_name or "", use_cache=use_cache)
        return io.NodeOutput(tuned)


def tune_cached(model, positive, samples, settings: TuneSettings, progress, save_name: str = "", use_cache: bool = True):
    """Tune (or load the content-addressed result of an identical earlier tuning), apply, save."""
    import comfy.model_management

    from ..vp2p.disk_cache import load_or_compute
    from ..vp2p.fingerprint import fingerprint
    from ..vp2p.tuned_file import load_tuned, save_tuned
    from ..vp2p.tuning import TRAINABLE_SET
    from .cache_admin import after_write
    from .comfy_host import motion_modules, options_cacheable
    from .model_facts import conditioning_key, conditioning_tensor, model_fingerprint
    from .storage import cache_dir, named_path
    from .tune_host import apply_tuned, require_state

    state = require_state(model)
    if settings.steps == 0:
        return model
    target = named_path(save_name) if save_name.strip() else None  # validate before hours of training
    cond = conditioning_tensor(positive, samples.shape[0])  # refuses what cannot be tuned on
    base = model_fingerprint(model)
    pos = conditioning_key(positive, "positive")
    if pos is None and use_cache:
        log.info("Tune on Video: the conditioning carries a ControlNet, GLIGEN or hooks, which a cache key cannot capture: "
                 "the tuning is computed, not cached.")
        use_cache = False
    if use_cache and not options_cacheable(model):
        log.info("Tune on Video: another node put a wrapper, CFG function or patch on the MODEL, which a cache key cannot "
                 "capture: the tuning is computed, not cached.")
        use_cache = False
    # format 2: trained on the model's latent scale (process_latent_in); format 1 trained on raw VAE latents
    key = "" if pos is None else fingerprint([("latents", samples), *pos[0]],
                                            {"base": base, "t2s": state.settings.describe(), "tune": settings.describe(),
                                             "format": "vp2p-tuned/2", "trainable": TRAINABLE_SET, **pos[1]})
    cached = cache_dir() / f"tune_{key[:40]}.safetensors" if use_cache else None

    def train():
        weights, losses = tune_weights(model, positive, samples, settings, progress)
        log.info("Tune on Video: done, loss %.5f → %.5f (mean of first/last 10 steps)",
                 sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:]))
        weights.metadata.update(base_fingerprint=base, frames=str(samples.shape[0]), latent_shape=str(list(samples.shape)),
                                conditioning_fingerprint=fingerprint([("cond", cond)]), steps=str(settings.steps),
                                learning_rate=repr(settings.learning_rate), seed=str(settings.seed),
                                final_loss=f"{sum(losses[-10:]) / len(losses[-10:]):.6g}")
        if settings.frames_per_step:
            weights.metadata.update(frames_per_step=str(settings.frames_per_step), frame_stride=str(settings.frame_stride))
        if weights.motion:
            weights.metadata.update(motion_modules=", ".join(motion_modules(model)))
        return weights

    weights, _ = load_or_compute(cached, load_tuned, train, save_tuned, "Tune on Video", after_write(cache_dir()),
                                 on_wait=comfy.model_management.throw_exception_if_processing_interrupted)
    if target is not None:
        save_tuned(target, weights)
        log.info("Tune on Video: saved %s", target)
    return apply_tuned(model, weights)


class LoadTunedT2S(io.ComfyNode):
    """Re-apply tuned weights saved by Tune on Video onto the same inflated model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        from .storage import tuned_names

        return io.Schema(
            node_id="VP2P_LoadTuned",
            display_name="Load Tuned T2S",
            category="video_p2p/io",
            search_aliases=["tune-a-video", "load tuning", "video p2p"],
            description="Applies a tuned-weights file from models/vp2p onto an inflated MODEL (the same checkpoint, LoRAs and "
                        "Inflate to T2S settings it was tuned with; anything else is refused).",
            inputs=[
                io.Model.Input("model", tooltip="The inflated MODEL the file was tuned from (same checkpoint and settings)."),
                io.Combo.Input("tuned_name", options=tuned_names(), tooltip="A file saved by Tune on Video (models/vp2p)."),
            ],
            outputs=[io.Model.Output(tooltip="The tuned T2S MODEL.")],
        )

    @classmethod
    def execute(cls, model, tuned_name: str) -> io.NodeOutput:
        from ..vp2p.tuned_file import check_compatible, load_tuned
        from .model_facts import model_fingerprint
        from .storage import FOLDER, folder_of, resolve
        from .tune_host import apply_tuned, require_state

        from ..vp2p.tuned_file import TunedFileError
        from .comfy_host import motion_modules

        state = require_state(model)
        path = resolve(tuned_name)
        weights = load_tuned(path, folder_of(FOLDER, path))
        if weights.motion and not motion_modules(model):
            raise TunedFileError(
                f"{tuned_name} also tuned the attention of the AnimateDiff motion module "
                f"{weights.metadata.get('motion_modules', '(name not recorded)')}, but this MODEL carries no motion module. Apply the "
                "same AnimateDiff model (AnimateDiff-Evolved's nodes) before Inflate to T2S, as when it was tuned.")
        check_compatible(weights, state.settings, model_fingerprint(model), set(state.blocks), tuned_name)
        return io.NodeOutput(apply_tuned(model, weights))
