"""Nodes ``VP2P_NullTextInvert`` "Shared Null-Text Invert", ``VP2P_SaveInversion`` and
``VP2P_LoadInversion``."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..vp2p.attention_store import StoreLocation, StorePrecision
from ..vp2p.inversion import InversionMode, InversionSettings

log = logging.getLogger("VideoP2P")

Inversion = io.Custom("VP2P_INVERSION")

MODE_HELP = (
    "shared_null_text (Video-P2P): per step, one unconditional embedding optimised for all frames; best edits, slowest "
    "(up to inner_steps extra forward+backward passes per step). "
    "per_frame_null_text: one embedding per frame (the paper's ablation; reconstructs at least as well, but frames can "
    "drift apart when edited). "
    "ddim_only: no optimisation, fastest; the edit's source branch then runs without guidance ('fast' guidance). "
    "negative_prompt: the source prompt serves as the null embedding, no optimisation; fast, usually a little less exact."
)


def _noise_latent(model, inversion) -> dict:
    """z_T as a LATENT (VAE scale), for samplers started with their own noise disabled."""
    return {"samples": model.model.latent_format.process_out(inversion.z_t.clone())}


class NullTextInvert(io.ComfyNode):
    """Invert the video: DDIM inversion + null-text optimisation (Video-P2P stage 2)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VP2P_NullTextInvert",
            display_name="Shared Null-Text Invert",
            category="video_p2p/2 invert",
            search_aliases=["null text", "null-text inversion", "ddim inversion", "inversion", "video p2p", "fatezero", "video edit"],
            description=(
                "Inverts a video for editing: conditional DDIM inversion with the source prompt, keeping every latent of the "
                "trajectory, then (in the null-text modes) an unconditional embedding per step optimised so that guided "
                "sampling from the inverted noise reconstructs the video. The result is cached on disk by content; a "
                "second run with the same model, video, prompts and settings is a file read."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The (inflated, tuned) MODEL the edit will use. Any SD1.x/SD2.x/SDXL MODEL works."),
                io.Conditioning.Input("positive", tooltip="The source prompt describing the video (batch 1, or one per frame)."),
                io.Conditioning.Input("negative", tooltip="The initial unconditional embedding, usually an empty prompt. The "
                                                          "decoupled sampler's target branch keeps using it."),
                io.Latent.Input("latent", tooltip="The video as latents, one frame per batch entry (VAE Encode of the frames)."),
                io.Int.Input("steps", default=50, min=2, max=1000, tooltip="DDIM steps (the reference's 50: timesteps 981…1). "
                                                                          "The edit uses the same steps."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The guidance scale the edit will use; null-text optimisation makes guided sampling at "
                                       "this scale reconstruct the video. Must be > 1 for the null-text modes. Ignored by ddim_only (changing "
                                       "it there re-uses the cached inversion)."),
                io.Combo.Input("mode", options=[m.value for m in InversionMode], default=InversionMode.SHARED_NULL_TEXT.value,
                               tooltip=MODE_HELP),
                io.Int.Input("inner_steps", default=10, min=0, max=1000,
                             tooltip="Most optimisation iterations per step (the reference's 10). Each is one UNet forward + "
                                     "backward on all frames. Only the null-text modes use it."),
                io.Float.Input("early_stop", default=1e-5, min=0.0, max=1.0, step=1e-6, round=1e-7,
                               tooltip="Stop a step's optimisation once its loss is below early_stop + step·2e-5 (as the "
                                       "reference). Larger is faster and less exact. Only the null-text modes use it."),
                io.Boolean.Input("store_attention", default=False,
                                 tooltip="Also store the source attention for the FateZero Controller (zero-shot edits): the "
                                         "self-attention queries/keys and the cross-attention maps of the small layers, in fp16, "
                                         "for the first store_steps of the steps. Needs a MODEL from 'Inflate to T2S'. Costs one "
                                         "extra UNet call and the store's memory (logged; ≈6 GB for 8 frames of 512² at 50 "
                                         "steps); P2P edits do not need it."),
                io.Boolean.Input("use_cache", default=True, optional=True,
                                 tooltip="Reuse an identical earlier inversion from models/vp2p/cache (a hit costs a "
                                         "file read, no UNet call). Turning store_attention on later reuses the cached inversion "
                                         "and records only the store."),
                io.Float.Input("store_steps", default=0.8, min=0.02, max=1.0, step=0.02, optional=True,
                               tooltip="Store the attention of this fraction of the edit's first (noisiest) steps: what the "
                                       "FateZero Controller's cross_replace, self_replace and latent blend read at most "
                                       "(FateZero's defaults: 0.8). Less is smaller; the controller says when it needs more."),
                io.Int.Input("store_max_tokens", default=1024, min=1, max=1 << 20, optional=True,
                             tooltip="Store the layers with at most this many tokens per frame (FateZero: 32×32 = 1024, i.e. "
                                     "all but the finest layers at 512²). Fusion acts on exactly the stored layers."),
                io.Combo.Input("store_location", options=[s_.value for s_ in StoreLocation], default=StoreLocation.AUTO.value,
                               optional=True,
                               tooltip="auto: disk when the store's predicted size (logged before recording) is above 4 GB "
                                       "(VP2P_STORE_DISK_ABOVE_GB), else cpu — long clips go to disk. "
                                       "cpu: the store is kept in RAM only (fastest edits; nothing is written to disk). "
                                       "disk: one file per step under models/vp2p/cache, read back one step at a time while "
                                       "editing (RAM stays at one step); it counts toward the cache's size limit."),
                io.Combo.Input("store_precision", options=[p_.value for p_ in StorePrecision], default=StorePrecision.FP16.value,
                               optional=True,
                               tooltip="fp16: the store in half precision (half the memory; on FateZero's parity fixture the "
                                       "edit is 9e-5 from the official code's). fp32: as FateZero keeps it (2.8e-5 there), twice "
                                       "the size. Only with store_attention."),
            ],
            outputs=[
                Inversion.Output("inversion", tooltip="The inversion: latent trajectory, per-step null embeddings, source "
                                                      "conditioning, schedule, and the model's fingerprint."),
                io.Latent.Output("noise", tooltip="z_T, the inverted noise, as a LATENT: start any sampler from it with its own "
                                                  "noise disabled (e.g. KSampler (Advanced), add_noise off, same steps)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, steps: int, cfg: float, mode: str, inner_steps: int,
                early_stop: float, store_attention: bool, use_cache: bool = True, store_steps: float = 0.8,
                store_max_tokens: int = 1024, store_location: str = "auto",
                store_precision: str = "fp16") -> io.NodeOutput:
        import comfy.utils

        from .invert_host import invert_cached, store_spec
        from .progress import progress_text
        from .storage import cache_dir

        settings = InversionSettings(steps=int(steps), cfg=float(cfg), mode=InversionMode.parse(mode),
                                     inner_steps=int(inner_steps), early_stop=float(early_stop))
        samples = latent.get("samples") if isinstance(latent, dict) else None
        pbar = comfy.utils.ProgressBar(1)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None

        def progress(done: int, total: int, text: str) -> None:
            pbar.update_absolute(done, total)
            progress_text(text, node_id)

        spec = None
        if store_attention:
            from .comfy_host import check_latent

            check_latent(model, samples, "Shared Null-Text Invert")
            spec = store_spec(model, positive, samples.shape[0], settings.steps, float(store_steps), int(store_max_tokens),
                              StorePrecision.parse(store_precision))
        inv = invert_cached(model, positive, negative, samples, settings, cache_dir() if use_cache else None, progress,
                            spec, StoreLocation.parse(store_location), cache_dir())
        return io.NodeOutput(inv, _noise_latent(model, inv))


class SaveInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VP2P_SaveInversion",
            display_name="Save Inversion",
            category="video_p2p/io",
            search_aliases=["inversion", "null text", "video p2p"],
            description="Saves an inversion as output/vp2p_inversions/<name>.safetensors, to edit the same video later or share "
                        "it. It only loads onto the same model (checkpoint, LoRAs, inflation, tuning).",
            inputs=[
                Inversion.Input("inversion", tooltip="From 'Shared Null-Text Invert'."),
                io.String.Input("name", default="video_p2p/inversion",
                                tooltip="File name under output/vp2p_inversions ('/' makes sub-folders). An existing file is replaced."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, inversion, name: str) -> io.NodeOutput:
        from ..vp2p.inversion_file import save_inversion
        from .storage import inversion_path

        path = save_inversion(inversion_path(name), inversion)
        log.info("Save Inversion: wrote %s", path)
        return io.NodeOutput()


class LoadInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from .storage import inversion_names

        return io.Schema(
            node_id="VP2P_LoadInversion",
            display_name="Load Inversion",
            category="video_p2p/io",
            search_aliases=["inversion", "null text", "video p2p"],
            description="Loads an inversion saved with 'Save Inversion'. One made with a different model, or (when a latent is "
                        "connected) for a different video size, is refused.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL the inversion was made with (it is checked by fingerprint)."),
                io.Combo.Input("inversion_name", options=inversion_names(), tooltip="A file in output/vp2p_inversions."),
                io.Latent.Input("latent", optional=True, tooltip="Optional: the video's latents, to check the frames and size."),
            ],
            outputs=[
                Inversion.Output("inversion", tooltip="The loaded inversion."),
                io.Latent.Output("noise", tooltip="Its z_T as a LATENT."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion_name: str, latent=None) -> io.NodeOutput:
        from ..vp2p.inversion_file import check_fits, load_inversion
        from .model_facts import model_fingerprint
        from .storage import INVERSIONS, folder_of, resolve_inversion

        path = resolve_inversion(inversion_name)
        inv = load_inversion(path, folder_of(INVERSIONS, path))
        samples = latent.get("samples") if isinstance(latent, dict) else None
        shape = tuple(samples.shape) if samples is not None else inv.latent_shape
        check_fits(inv, model_fingerprint(model), shape, inversion_name)
        return io.NodeOutput(inv, _noise_latent(model, inv))


class NoiseInversion(io.ComfyNode):
    """The 'inversion' of a video generated from noise, so the P2P nodes edit generated videos."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VP2P_NoiseInversion",
            display_name="Start From Noise",
            category="video_p2p/3 edit",
            search_aliases=["start from noise", "p2p", "prompt to prompt", "generated video edit"],
            description=(
                "Starts a video from seeded noise instead of inverting one: connect it to the Decoupled Sampler with a P2P "
                "Controller and the source branch generates the video of the source prompt while the target branch "
                "generates its edit with the same layout and motion (forward guidance, as prompt-to-prompt)."
            ),
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the noise; the same seed gives the same video."),
                io.Int.Input("width", default=512, min=64, max=8192, step=8, tooltip="Video width in pixels."),
                io.Int.Input("height", default=512, min=64, max=8192, step=8, tooltip="Video height in pixels."),
                io.Int.Input("frames", default=8, min=1, max=4096, tooltip="Number of frames."),
                io.Conditioning.Input("negative", tooltip="The negative conditioning both branches are guided away from."),
                io.Int.Input("steps", default=50, min=2, max=1000, optional=True,
                             tooltip="DDIM steps of the generation (the reference's 50: timesteps 981…1)."),
                io.Model.Input("model", optional=True,
                               tooltip="The MODEL the video will be generated with: its latent format (channels, scale) and training "
                                       "schedule. Without it, SD1.x/SD2.x (4 channels, SD1.5 latent scale) is assumed."),
            ],
            outputs=[
                Inversion.Output("inversion", tooltip="z_T and the schedule, for the Decoupled Sampler."),
                io.Latent.Output("noise", tooltip="z_T as a LATENT (the connected MODEL's latent format; SD1.x/SD2.x without one)."),
            ],
        )

    @classmethod
    def execute(cls, seed: int, width: int, height: int, frames: int, negative, steps: int = 50, model=None) -> io.NodeOutput:
        import comfy.latent_formats
        import torch

        from ..vp2p.inversion import InversionMode
        from ..vp2p.inversion_file import Inversion as InversionData
        from ..vp2p.schedule import Schedule
        from .comfy_call import pooled_of
        from .comfy_host import refuse_unsupported
        from .model_facts import alphas_cumprod, conditioning_tensor

        neg = conditioning_tensor(negative, frames, "negative", "Start From Noise")
        if model is not None:
            refuse_unsupported(model, "Start From Noise")
            latent_format = model.model.latent_format
            schedule = Schedule.reference(int(steps), alphas_cumprod(model))
        else:
            latent_format = comfy.latent_formats.SD15()
            schedule = Schedule.reference(int(steps))
        g = torch.Generator().manual_seed(int(seed) % (2**63))
        noise = torch.randn(frames, latent_format.latent_channels, height // 8, width // 8, generator=g)
        z_t = noise * torch.sqrt(1 + schedule.sigmas[0] ** 2)  # pure noise at the first step, in σ-space
        nulls = neg.detach().float().cpu().unsqueeze(0).expand(schedule.steps, *neg.shape).clone()
        inv = InversionData(trajectory=z_t.unsqueeze(0), null_embeddings=nulls, cond=neg.detach().float().cpu(), schedule=schedule,
                            mode=InversionMode.DDIM_ONLY, cfg=float("nan"), model_fingerprint="", negative=neg.detach().float().cpu(),
                            generated=True, negative_pooled=pooled_of(negative))
        return io.NodeOutput(inv, {"samples": latent_format.process_out(z_t.clone())})
