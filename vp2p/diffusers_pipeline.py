"""Headless video runs on diffusers components through ``DiffusersT2S``.

Used by the README's main-job command: with a real SD1.x/SD2.x checkpoint in diffusers
format it does the real job; without one it builds a small random-weight SD1.5-shaped
model (the output is then noise, and says so).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from .control import RunState
from .diffusers_host import DiffusersT2S, tune_diffusers
from .errors import SettingsError
from .layout import COND, UNCOND
from .patch import T2SSettings
from .schedule import Schedule, ddim_sample
from .tuning import TuneSettings

if TYPE_CHECKING:
    from .edit import EditInputs, EditResult
    from .inversion import InversionSettings
    from .p2p import P2PEdit

log = logging.getLogger("VideoP2P")


@dataclass
class Components:
    """What a text-to-image SD model consists of, on the diffusers side."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    scaling_factor: float = 0.18215
    random_weights: bool = False


def load_components(model_dir: Path, device: torch.device, dtype: torch.dtype, vae: bool = True) -> Components:
    """Load a diffusers-format SD1.x/SD2.x folder from disk (never from a hub). ``vae=False`` for
    runs that start from latents (e.g. the parity fixture, which has no VAE)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not (model_dir / "unet").is_dir():
        raise SettingsError(
            f"{model_dir} is not a diffusers-format model folder (no unet/ inside). "
            "Give the folder that holds unet/, vae/, text_encoder/, tokenizer/."
        )
    kw = dict(local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet", **kw).to(device, dtype).eval()
    ae = AutoencoderKL.from_pretrained(str(model_dir), subfolder="vae", **kw).to(device, dtype).eval() if vae else None
    text = CLIPTextModel.from_pretrained(str(model_dir), subfolder="text_encoder", **kw).to(device, dtype).eval()
    tok = CLIPTokenizer.from_pretrained(str(model_dir), subfolder="tokenizer", **kw)
    sched_file = model_dir / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.is_file() else {}
    from .schedule import sd_alphas_cumprod

    ac = sd_alphas_cumprod(sched.get("num_train_timesteps", 1000), sched.get("beta_start", 0.00085), sched.get("beta_end", 0.012))
    scale = float(ae.config.scaling_factor) if ae is not None else 0.18215
    return Components(unet, ae, text, tok, ac, sched.get("prediction_type", "epsilon"), scale)


def random_components(device: torch.device, dtype: torch.dtype, seed: int = 0) -> Components:
    """A small random-weight SD1.5-shaped model: 320/640-channel UNet with 768-wide cross
    attention, an 8×-downsampling VAE and a 2-layer CLIP text encoder with the real vocabulary."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .clip_vocab import CONTEXT_LENGTH, clip_tokenizer
    from .schedule import sd_alphas_cumprod

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(320, 640),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, layers_per_block=1,
    )
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=12,
                                        max_position_embeddings=CONTEXT_LENGTH, vocab_size=49408))
    return Components(unet.to(device, dtype).eval(), vae.to(device, dtype).eval(), text.to(device, dtype).eval(),
                      clip_tokenizer(), sd_alphas_cumprod(), random_weights=True)


@torch.no_grad()
def encode_prompt(c: Components, prompt: str) -> torch.Tensor:
    """[1, T, C] text embedding."""
    ids = c.tokenizer(prompt, padding="max_length", max_length=c.tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
    return c.text_encoder(ids.to(c.text_encoder.device))[0]


@torch.no_grad()
def encode_video(c: Components, frames: torch.Tensor) -> torch.Tensor:
    """frames [F, H, W, 3] in [0, 1] -> latents [F, 4, H/8, W/8] (scaled)."""
    x = frames.permute(0, 3, 1, 2).to(c.vae.device, c.vae.dtype) * 2 - 1
    return c.vae.encode(x).latent_dist.mean * c.scaling_factor


@torch.no_grad()
def decode_video(c: Components, latents: torch.Tensor) -> torch.Tensor:
    """latents [F, 4, h, w] -> frames [F, 8h, 8w, 3] in [0, 1]."""
    x = c.vae.decode(latents.to(c.vae.dtype) / c.scaling_factor).sample
    return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def cfg_denoiser(c: Components, host: DiffusersT2S, schedule: Schedule, cond: torch.Tensor, uncond: torch.Tensor,
                 cfg: float, run: Optional[RunState] = None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """D(x, i): classifier-free guided x0 prediction in σ-space, uncond and cond in one UNet call."""

    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
        frames = x.shape[0]
        sigma = schedule.sigmas[i].to(x.device)
        scale = torch.rsqrt(1 + sigma**2)
        x_in = torch.cat([x, x]) * scale
        ctx = torch.cat([uncond.expand(frames, -1, -1), cond.expand(frames, -1, -1)]).to(x.dtype)
        out = host(x_in.to(c.unet.dtype), schedule.timesteps[i].to(x.device), ctx.to(c.unet.dtype),
                   cond_or_uncond=[UNCOND, COND], sigmas=sigma.expand(2 * frames), run=run).float()
        xx = torch.cat([x, x])
        if c.prediction_type == "v_prediction":
            x0 = xx * scale**2 - (sigma * scale) * out
        else:
            x0 = xx - sigma * out
        x0_u, x0_c = x0.chunk(2)
        return x0_u + cfg * (x0_c - x0_u)

    return denoise


def sample_video(c: Components, settings: T2SSettings, latents: torch.Tensor, prompt: str, negative: str = "",
                 steps: int = 20, cfg: float = 7.5, strength: float = 0.7, seed: int = 0,
                 progress: Optional[Callable[[int, int], None]] = None, tune: Optional[TuneSettings] = None,
                 tune_progress: Optional[Callable[[int, float], None]] = None) -> torch.Tensor:
    """Tune-A-Video-style sampling of a clip with the inflated model (SDEdit from the clip's
    latents at ``strength``; 1.0 = from pure noise), optionally after tuning the T2S model on
    the clip with the prompt (Tune on Video). latents [F, 4, h, w] -> [F, 4, h, w]."""
    if not 0.0 < strength <= 1.0:
        raise SettingsError(f"strength must be in (0, 1], got {strength}.")
    full = Schedule.reference(steps, c.alphas_cumprod)
    start = min(steps - 1, int(round(steps * (1.0 - strength))))
    schedule = full.tail(start)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g).to(latents.device)
    x = latents.float() + schedule.sigmas[0] * noise
    cond, uncond = encode_prompt(c, prompt), encode_prompt(c, negative)
    with DiffusersT2S(c.unet, settings) as host:
        if tune is not None and tune.steps > 0:
            tune_diffusers(host, latents.float(), cond, c.alphas_cumprod, tune, "v" if c.prediction_type == "v_prediction" else "eps",
                           on_step=tune_progress)
        denoise = cfg_denoiser(c, host, schedule, cond, uncond, cfg)
        cb = (lambda i, _x: progress(i + 1, schedule.steps)) if progress else None
        with torch.no_grad():
            return ddim_sample(denoise, x, schedule, cb)


@dataclass
class EditOptions:
    """The headless Video-P2P edit: prompts and the P2P Controller / Decoupled Sampler settings."""

    source_prompt: str
    target_prompt: str
    negative: str = ""
    edit: str = "auto"
    cross_replace: float = 0.2  # the P2P Controller's defaults: the official Video-P2P code's
    self_replace: float = 0.5
    blend_source_words: tuple[str, ...] = ()
    blend_target_words: tuple[str, ...] = ()
    blend_threshold: float = 0.3
    reweight: str = ""
    guidance: str = "decoupled"
    cfg: float = 7.5


@dataclass
class EditRun:
    """What ``edit_video`` computed: ``edited``/``source`` [F, 4, h, w] (data scale, at the final
    sigma: the latents the VAE decodes); ``trajectory`` [S+1, F, 4, h, w] the inversion (σ-space,
    index 0 = z_T); ``null_embeddings`` [S, 1|F, T, D] or None; ``schedule``."""

    edited: torch.Tensor
    source: torch.Tensor
    trajectory: torch.Tensor
    null_embeddings: Optional[torch.Tensor]
    schedule: Schedule

    @property
    def z_t(self) -> torch.Tensor:
        """The inverted noise in the DDPM scale (√ᾱ_T·x0 + √(1−ᾱ_T)·ε form): [F, 4, h, w]."""
        return self.trajectory[0] / torch.sqrt(1 + self.schedule.sigmas[0] ** 2)


def build_edit(c: Components, options: EditOptions) -> tuple["P2PEdit", torch.Tensor]:
    """The P2P Controller's work on diffusers components: (the edit, the negative embedding [1, T, D])."""
    from .local_blend import LocalBlendSpec
    from .p2p import P2PEdit
    from .prompt_align import EditKind, hf_encoder, parse_word_values, resolve_kind, reweight_vector, tokenize_prompt, word_positions

    encode = hf_encoder(c.tokenizer)
    context = int(c.tokenizer.model_max_length)
    src = tokenize_prompt(options.source_prompt, encode, context)
    tgt = tokenize_prompt(options.target_prompt, encode, context)
    kind = resolve_kind(EditKind.parse(options.edit), src, tgt)
    factors = parse_word_values(options.reweight, "reweight", 0.0, 10.0)
    blend_spec = None
    if options.blend_source_words or options.blend_target_words:
        blend_spec = LocalBlendSpec(tuple(word_positions(src, options.blend_source_words, "blend source words", "source")),
                                    tuple(word_positions(tgt, options.blend_target_words, "blend target words", "target")),
                                    threshold=options.blend_threshold)
    cond, target, negative = (encode_prompt(c, p).float() for p in (options.source_prompt, options.target_prompt, options.negative))
    edit = P2PEdit(src, tgt, cond.cpu(), target.cpu(), kind, cross_replace=options.cross_replace,
                   self_replace=options.self_replace, reweight=reweight_vector(tgt, factors) if factors else None, blend=blend_spec)
    return edit, negative.cpu()


def sample_edit(den: Callable, edit: "P2PEdit", inputs: "EditInputs", options: EditOptions, latent_hw: tuple[int, int],
                progress: Optional[Callable[[str, int, int, float], None]] = None) -> "EditResult":
    """The Decoupled Sampler on diffusers components: P2P control (and LocalBlend) from an inversion."""
    from .edit import Guidance, decoupled_edit
    from .local_blend import LocalBlend
    from .p2p import P2PController

    report = progress or (lambda stage, i, n, loss: None)
    schedule = inputs.schedule
    blend = LocalBlend(edit.blend, inputs.z_t.shape[0], latent_hw, schedule.steps) if edit.blend is not None else None
    with torch.no_grad():
        return decoupled_edit(den, inputs, edit.target_cond, options.cfg, Guidance.parse(options.guidance),
                              P2PController(edit, schedule, blend),
                              on_step=lambda i, x: report("edit", i + 1, schedule.steps, float("nan")))


def edit_video(c: Components, settings: T2SSettings, latents: torch.Tensor, options: EditOptions,
               inversion: "InversionSettings", tune: Optional[TuneSettings] = None,
               progress: Optional[Callable[[str, int, int, float], None]] = None) -> EditRun:
    """Video-P2P end to end on diffusers components: (tune) → invert → control → decoupled sampling.
    latents [F, 4, h, w] (VAE-scaled) -> the edit, the source reconstruction and the inversion."""
    from .edit import EditInputs
    from .inversion import ddim_invert, optimise_null_text

    report = progress or (lambda stage, i, n, loss: None)
    edit, negative = build_edit(c, options)
    x0 = latents.float()
    cond, negative = edit.source_cond.to(x0.device), negative.to(x0.device)
    schedule = Schedule.reference(inversion.steps, c.alphas_cumprod)
    prediction = "v" if c.prediction_type == "v_prediction" else "eps"
    with DiffusersT2S(c.unet, settings) as host:
        if tune is not None and tune.steps > 0:
            tune_diffusers(host, x0, cond, c.alphas_cumprod, tune, prediction,
                           on_step=lambda i, loss: report("tune", i + 1, tune.steps, loss))
        den = host.denoiser(c.alphas_cumprod, prediction)
        with torch.no_grad():
            trajectory = ddim_invert(den, x0, cond, schedule, on_step=lambda i: report("invert", i, schedule.steps, float("nan")))
        result = optimise_null_text(den, trajectory, cond, negative, schedule, inversion,
                                    on_step=lambda i, used, loss: report("null-text", i, schedule.steps, loss))
        inputs = EditInputs(trajectory[0], schedule, cond, result.null_embeddings, negative, inversion.cfg, result.source_path)
        out = sample_edit(den, edit, inputs, options, tuple(x0.shape[-2:]), progress)
    return EditRun(out.edited, out.source, trajectory, result.null_embeddings, schedule)
