"""Tune on Video: fine-tune the T2S model on the video it will edit (Video-P2P §3.2,
after Tune-A-Video).

Trainable set (the reference's): ``to_q`` of frame attention (attn1) and of cross
attention (attn2) in every transformer block, plus the temporal attention's projections
(``to_q``/``to_k``/``to_v``/``to_out``, the output bias included). The temporal layer's
LayerNorm is not trained: the reference's trainable module is the temporal attention, and
its norm is a sibling module.
Objective: the model's own training target (eps, or v for v-models) at a uniformly random
training timestep (one per step, shared by the frames: the video is one sample) with
fresh noise; AdamW with weight decay; gradient clipping.

Frame windows (long clips): with ``frames_per_step`` > 0 each step trains on a window of
that many frames taken every ``frame_stride`` frames from a random start, as Tune-A-Video
samples ``n_sample_frames`` at a sampling rate; frame and temporal attention then see the
window as the video. The default (0) trains on the whole clip every step, the reference's
behaviour for its 8-frame clips, and draws nothing extra from the seeded generator.

The loop is host-agnostic: it sees the model only through ``denoise(x_σ, σ, cond) -> x0``
(ComfyUI's σ-space convention), so eps- and v-models train through the same code and
hosts decide how the trainable tensors enter the forward pass.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from .denoise import Denoiser
from .errors import SettingsError, VP2PError

log = logging.getLogger("VideoP2P")


TRAINABLE_UNET_SUFFIXES = (".attn1.to_q.weight", ".attn2.to_q.weight")
# The modules of a temporal layer (``TemporalAttention``) that tuning trains; its ``norm`` stays frozen.
TRAINABLE_TEMPORAL_MODULES = ("to_q", "to_k", "to_v", "to_out")
# What is trained, in words: part of the tuning cache key, so results of another trainable set are not reused.
TRAINABLE_SET = "attn1.to_q, attn2.to_q, temporal to_q/to_k/to_v/to_out (temporal norm frozen)"


class TrainingDivergedError(VP2PError):
    """The loss became NaN or infinite."""


class TuningInterrupted(Exception):
    """Raised by a ``should_stop`` callback to end tuning early (nothing is kept)."""


def is_trainable_unet_weight(name: str) -> bool:
    """Whether a UNet parameter (either host's naming) is in the reference's trainable set."""
    return ".transformer_blocks." in f".{name}" and name.endswith(TRAINABLE_UNET_SUFFIXES)


def trainable_unet_names(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if is_trainable_unet_weight(n))


def trainable_temporal_parameters(bank: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters of a temporal bank that tuning trains, marked ``requires_grad``; every
    other parameter of the bank (the LayerNorms) is marked frozen, so it gets no gradient.
    Names are ``layers.<slug>.<module>.<weight|bias>``."""
    out: list[torch.Tensor] = []
    for name, p in bank.named_parameters():
        train = name.rsplit(".", 2)[-2] in TRAINABLE_TEMPORAL_MODULES
        p.requires_grad_(train)
        if train:
            out.append(p)
    if not out:
        raise SettingsError("The temporal bank has no to_q/to_k/to_v/to_out parameters to tune.")
    return out


@dataclass(frozen=True)
class TuneSettings:
    steps: int = 500
    learning_rate: float = 3e-5
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    seed: int = 0
    # frames each step trains on (0: the whole clip) and the step between them
    frames_per_step: int = 0
    frame_stride: int = 1
    # also train the attention projections of a motion module another extension put into the UNet
    # (AnimateDiff's temporal transformers: to_q/to_k/to_v/to_out, as Tune-A-Video trains its temporal attention)
    train_motion_module: bool = False

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise SettingsError(f"steps must be ≥ 0, got {self.steps}.")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise SettingsError(f"learning_rate must be a positive number, got {self.learning_rate}.")
        if self.frames_per_step < 0:
            raise SettingsError(f"frames_per_step must be ≥ 0 (0: the whole clip every step), got {self.frames_per_step}.")
        if self.frame_stride < 1:
            raise SettingsError(f"frame_stride must be ≥ 1 (1: consecutive frames), got {self.frame_stride}.")

    def describe(self) -> str:
        """The settings in words, for cache keys. For the default window (the whole clip) this is the text
        earlier versions keyed on, so their cached tunings stay valid; the window is added only when set."""
        text = (f"TuneSettings(steps={self.steps!r}, learning_rate={self.learning_rate!r}, weight_decay={self.weight_decay!r}, "
                f"max_grad_norm={self.max_grad_norm!r}, seed={self.seed!r})")
        if self.frames_per_step:  # the stride alone changes nothing
            text += f" window(frames_per_step={self.frames_per_step!r}, frame_stride={self.frame_stride!r})"
        if self.train_motion_module:
            text += " motion_module_attention"
        return text


def resolve_window(settings: TuneSettings, frames: int, node: str = "Tune on Video") -> Optional[tuple[int, int]]:
    """The (frames per step, stride) a clip of ``frames`` frames trains with, or None for the whole clip
    every step. A window as long as the clip or longer uses the clip; a window whose stride reaches past
    the clip keeps its frame count with the largest stride that fits. Both are logged."""
    n, stride = settings.frames_per_step, settings.frame_stride
    if n == 0:
        if stride != 1:
            log.info("%s: frame_stride %d has no effect without frames_per_step: every step trains on the whole clip.", node, stride)
        return None
    if n >= frames:
        if n > frames:
            log.info("%s: frames_per_step %d is longer than the clip (%d frames): every step trains on the whole clip.", node, n, frames)
        return None
    if (n - 1) * stride + 1 > frames:
        fitted = (frames - 1) // (n - 1)
        log.info("%s: %d frames every %d frames reach past the clip (%d frames): the stride is lowered to %d.",
                 node, n, stride, frames, fitted)
        stride = fitted
    return n, stride


def window_rows(settings: TuneSettings, frames: int) -> int:
    """How many frames (UNet rows) one training step runs on a clip of ``frames`` frames."""
    return settings.frames_per_step if 0 < settings.frames_per_step < frames else frames


def draw_window(gen: torch.Generator, frames: int, window: tuple[int, int]) -> torch.Tensor:
    """The frame indices of one step's window: [n] int64, ``n`` frames ``stride`` apart from a start drawn
    uniformly (from ``gen``) among those that keep the window inside the clip."""
    n, stride = window
    span = (n - 1) * stride + 1
    start = int(torch.randint(0, frames - span + 1, (1,), generator=gen))
    return torch.arange(start, start + span, stride)


def training_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ of every training timestep: [T] float32."""
    ac = alphas_cumprod.double()
    return ((1 - ac) / ac).sqrt().float()


def prediction_and_target(x: torch.Tensor, denoised: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                          sigma: torch.Tensor, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's training target and its prediction, recovered from the denoised output.

    σ-space: x = x0 + σ·ε, so ε̂ = (x − x̂0)/σ. For v-models (α = 1/√(1+σ²), s = σ·α):
    v = α·ε − s·x0 and v̂ = α·ε̂ − s·x̂0.
    """
    s = sigma.view(-1, *([1] * (x.dim() - 1)))
    eps_hat = (x - denoised) / s
    if prediction == "v":
        a = torch.rsqrt(1 + s**2)
        return a * eps_hat - s * a * denoised, a * noise - s * a * x0
    if prediction != "eps":
        raise SettingsError(f"prediction must be 'eps' or 'v', got {prediction!r}.")
    return eps_hat, noise


def tune(denoise: Denoiser, latents: torch.Tensor, cond: torch.Tensor, params: Sequence[torch.Tensor],
         alphas_cumprod: torch.Tensor, settings: TuneSettings, prediction: str = "eps",
         on_step: Optional[Callable[[int, float], None]] = None,
         should_stop: Optional[Callable[[], None]] = None) -> list[float]:
    """Optimise ``params`` in place; returns the loss of every step.

    latents: [F, C, h, w] (model latent space); cond: [F, T, D] (or [1, T, D]). With a frame window
    (``settings.frames_per_step``) each step trains on [n, C, h, w] rows of the clip and their cond rows.
    ``should_stop`` may raise (e.g. ``TuningInterrupted``) between and inside steps.
    Raises ``TrainingDivergedError`` on a non-finite loss.
    """
    if not params:
        raise SettingsError("Nothing to tune: no trainable tensors were given.")
    frames = latents.shape[0]
    if cond.shape[0] == 1 and frames > 1:
        cond = cond.expand(frames, -1, -1)
    window = resolve_window(settings, frames)
    if window is not None and cond.shape[0] != frames:
        raise SettingsError(f"The conditioning has {cond.shape[0]} rows for a {frames}-frame clip: give one row or one per frame.")
    sigmas = training_sigmas(alphas_cumprod)
    gen = torch.Generator().manual_seed(settings.seed)  # CPU draws: identical on every device
    opt = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    x0 = latents.detach().float()
    losses: list[float] = []
    for step in range(settings.steps):
        if should_stop is not None:
            should_stop()
        t = int(torch.randint(0, sigmas.shape[0], (1,), generator=gen))
        clip, text = x0, cond
        if window is not None:  # drawn only when windowing: the whole clip's draws are as they always were
            rows = draw_window(gen, frames, window)
            clip, text = x0[rows.to(x0.device)], cond[rows.to(cond.device)]
        noise = torch.randn(clip.shape, generator=gen).to(x0.device)
        sigma = sigmas[t].to(x0.device).expand(clip.shape[0])
        x = clip + sigma.view(-1, 1, 1, 1) * noise
        denoised = denoise(x, sigma, text).float()
        pred, target = prediction_and_target(x, denoised, clip, noise, sigma, prediction)
        loss = F.mse_loss(pred, target)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"The tuning loss became {value} at step {step + 1}/{settings.steps} (timestep {t}). Nothing was saved. "
                f"Lower the learning rate (given {settings.learning_rate:g}) or tune in full precision."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        opt.step()
        losses.append(value)
        if on_step is not None:
            on_step(step, value)
    return losses
