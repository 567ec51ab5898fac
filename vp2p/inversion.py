"""Video inversion: DDIM inversion and null-text optimisation (Video-P2P §3.2).

Host-agnostic: the model is a ``vp2p.denoise.Denoiser`` in ComfyUI's σ-space (``x = x0 + σ·ε``),
so eps- and v-models invert through the same code; classifier-free guidance goes through the
host's ``Combine`` (ComfyUI: its ``cfg_function``, so other nodes' CFG functions apply).

* DDIM inversion runs the schedule's sigmas backwards, conditional only, from the clean latent
  at the final sigma up to σ₀, and keeps the whole trajectory. Each step evaluates the UNet on
  the current latent at the *destination* timestep, as the references do (``inversion_step``).
* Null-text optimisation walks the sampler forward from z_T: at step i it optimises the
  unconditional embedding so that the classifier-free-guided step lands on the inversion's
  latent of step i+1 (loss in the DDPM scale, as the reference's thresholds assume). A fresh
  Adam per step, warm-started from the previous step's embedding, lr 1e-2·(1−i/100), at most
  ``inner_steps``, stopping early at ``early_stop + i·2e-5``.
  ``shared_null_text`` optimises one embedding for all frames (Video-P2P),
  ``per_frame_null_text`` one per frame (the paper's ablation).
* ``negative_prompt``: the null embedding is the source conditioning itself (no optimisation);
  ``ddim_only``: no null embedding (the edit's source branch then runs unguided).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .control import RunState
from .denoise import Combine, Denoiser, plain_cfg
from .errors import SettingsError, parse_option
from .layout import UNCOND
from .schedule import Schedule, ddim_step, to_data_scale

log = logging.getLogger("VideoP2P")



class InversionMode(str, Enum):
    SHARED_NULL_TEXT = "shared_null_text"
    PER_FRAME_NULL_TEXT = "per_frame_null_text"
    DDIM_ONLY = "ddim_only"
    NEGATIVE_PROMPT = "negative_prompt"

    @classmethod
    def parse(cls, value: "str | InversionMode") -> "InversionMode":
        return parse_option(cls, value, "mode", "an inversion mode")

    @property
    def optimises(self) -> bool:
        return self in (InversionMode.SHARED_NULL_TEXT, InversionMode.PER_FRAME_NULL_TEXT)


@dataclass(frozen=True)
class InversionSettings:
    steps: int = 50
    cfg: float = 7.5
    mode: InversionMode = InversionMode.SHARED_NULL_TEXT
    inner_steps: int = 10
    early_stop: float = 1e-5
    learning_rate: float = 1e-2

    def __post_init__(self) -> None:
        if self.steps < 2:
            raise SettingsError(f"steps must be ≥ 2 for an inversion, got {self.steps}.")
        if self.mode.optimises and self.cfg <= 1.0:
            raise SettingsError(
                f"cfg={self.cfg} with mode {self.mode.value}: at cfg ≤ 1 the unconditional prediction has no weight, so there is "
                "nothing for null-text optimisation to fix. Use cfg > 1 (7.5 as in Video-P2P) or mode ddim_only."
            )
        if self.inner_steps < 0:
            raise SettingsError(f"inner_steps must be ≥ 0, got {self.inner_steps}.")

    def key(self) -> str:
        """The settings that decide the inversion, for cache keys: ``ddim_only`` uses only the steps (cfg,
        inner_steps, early_stop and the learning rate do nothing there), ``negative_prompt`` the steps and cfg
        (the edit's source branch is guided at it); the null-text modes use everything."""
        if self.mode is InversionMode.DDIM_ONLY:
            return f"InversionSettings(steps={self.steps}, mode={self.mode.value})"
        if self.mode is InversionMode.NEGATIVE_PROMPT:
            return f"InversionSettings(steps={self.steps}, cfg={self.cfg}, mode={self.mode.value})"
        return repr(self)


@dataclass
class NullTextResult:
    """null_embeddings: [S, 1 or F, T, D] (None for ddim_only); iterations: inner steps used per step;
    source_path: [S+1, F, C, h, w] the guided walk from z_T with the optimised embeddings (σ-space),
    i.e. exactly the source branch of a decoupled edit (None when nothing was optimised)."""

    null_embeddings: Optional[torch.Tensor]
    iterations: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    source_path: Optional[torch.Tensor] = None


def to_sigma_space(x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """A clean (DDPM-scale) latent placed at a sigma: ×√(1+σ²) (the σ-space convention)."""
    return x0 * math.sqrt(1.0 + float(sigma) ** 2)


def inversion_input(x: torch.Tensor, s_cur: torch.Tensor, s_dst: torch.Tensor) -> torch.Tensor:
    """The latent at level ``s_cur`` (σ-space) re-expressed at the σ-space scale of ``s_dst``.

    The DDPM-scale latent is unchanged (x/√(1+s_cur²) = x'/√(1+s_dst²)); only ComfyUI's σ-space
    scaling moves, so a denoiser called at σ = s_dst feeds the UNet exactly the current latent
    with the destination's timestep, as the references' ``next_step`` does."""
    return x * (torch.sqrt(1.0 + s_dst**2) / torch.sqrt(1.0 + s_cur**2))


def inversion_step(denoise: Denoiser, x: torch.Tensor, s_cur: torch.Tensor, s_dst: torch.Tensor, cond: torch.Tensor,
                   run: Optional[RunState] = None) -> torch.Tensor:
    """One DDIM inversion step from level ``s_cur`` up to ``s_dst`` (σ-space, x [F, C, h, w]).

    As the references (Video-P2P's and FateZero's ``next_step``, null-text inversion before them):
    ε is the UNet's on the *current* latent at the *destination* timestep, ε(x_{t−Δ}, t); then
    x0 = x − s_cur·ε and the next latent is x0 + s_dst·ε. Evaluating at the current level instead
    is a different and less accurate inversion (tests/test_inversion.py measures both)."""
    x_in = inversion_input(x, s_cur, s_dst)
    d = denoise(x_in, s_dst.expand(x.shape[0]), cond, None, run).float()
    eps = (x_in - d) / s_dst
    return x - s_cur * eps + s_dst * eps


def ddim_invert(denoise: Denoiser, latents: torch.Tensor, cond: torch.Tensor, schedule: Schedule,
                should_stop: Optional[Callable[[], None]] = None,
                on_step: Optional[Callable[[int], None]] = None, run: Optional[RunState] = None) -> torch.Tensor:
    """Conditional-only DDIM inversion. latents [F, C, h, w] (DDPM scale, as encoded) ->
    trajectory [S+1, F, C, h, w] in σ-space, index i at ``schedule.sigmas[i]`` (0 = z_T).

    The step from ``sigmas[i+1]`` up to ``sigmas[i]`` evaluates the UNet at ``sigmas[i]`` (the
    destination: timesteps 1, 21, …, 981 at 50 steps) on the latent ``trajectory[i+1]``, so the
    UNet calls are exactly the schedule's steps S−1, …, 0 — the calls FateZero's store records."""
    sig = schedule.sigmas.to(latents.device)
    frames = latents.shape[0]
    cond = _per_frame(cond, frames)
    traj = [to_sigma_space(latents.float(), sig[-1])]
    x = traj[0]
    for i in range(schedule.steps, 0, -1):  # from the final sigma up to sigma 0
        if should_stop is not None:
            should_stop()
        x = inversion_step(denoise, x, sig[i], sig[i - 1], cond, run)
        traj.append(x)
        if on_step is not None:
            on_step(schedule.steps - i + 1)
    return torch.stack(traj[::-1])


def guided(denoise: Denoiser, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, null: Optional[torch.Tensor],
           cfg: float, d_cond: Optional[torch.Tensor] = None, combine: Combine = plain_cfg) -> torch.Tensor:
    """Classifier-free guided x0 (``combine``: D_u + cfg·(D_c − D_u)); without ``null`` the conditional D."""
    frames = x.shape[0]
    if d_cond is None:
        d_cond = denoise(x, sigma.expand(frames), _per_frame(cond, frames)).float()
    if null is None:
        return d_cond
    d_u = denoise(x, sigma.expand(frames), _per_frame(null, frames), [UNCOND]).float()
    return combine(d_cond, d_u, cfg, x, sigma)



def optimise_null_text(denoise: Denoiser, trajectory: torch.Tensor, cond: torch.Tensor, null_init: torch.Tensor,
                       schedule: Schedule, settings: InversionSettings,
                       on_step: Optional[Callable[[int, int, float], None]] = None,
                       should_stop: Optional[Callable[[], None]] = None, combine: Combine = plain_cfg) -> NullTextResult:
    """Null-text optimisation along an inversion trajectory (see the module docstring).

    trajectory [S+1, F, C, h, w]; cond [1 or F, T, D]; null_init [1, T, D] (the initial,
    e.g. empty-prompt, embedding). The embeddings are optimised in fp32.
    """
    mode = settings.mode
    frames = trajectory.shape[1]
    sig = schedule.sigmas.to(trajectory.device)
    if mode is InversionMode.DDIM_ONLY:
        return NullTextResult(None)
    if mode is InversionMode.NEGATIVE_PROMPT:
        src = _per_frame(cond, 1 if cond.shape[0] == 1 else frames)
        return NullTextResult(src.detach().float().unsqueeze(0).expand(schedule.steps, *src.shape).clone())

    rows = 1 if mode is InversionMode.SHARED_NULL_TEXT else frames
    null = null_init.detach().float().expand(rows, -1, -1).clone()
    x = trajectory[0].float()
    out, iterations, losses, path = [], [], [], [x]
    for i in range(schedule.steps):
        s_cur, s_next = sig[i], sig[i + 1]
        target = trajectory[i + 1].float() / torch.sqrt(1 + s_next**2)  # DDPM scale
        with torch.no_grad():
            d_cond = denoise(x, s_cur.expand(frames), _per_frame(cond, frames)).float()
        null = null.detach().requires_grad_(True)
        opt = torch.optim.Adam([null], lr=settings.learning_rate * (1.0 - i / 100.0))
        threshold = settings.early_stop + i * 2e-5
        used, loss_value = 0, float("nan")
        for _ in range(settings.inner_steps):
            if should_stop is not None:
                should_stop()
            with torch.enable_grad():
                d = guided(denoise, x, s_cur, cond, null, settings.cfg, d_cond, combine)
                rec = to_data_scale(ddim_step(x, d, s_cur, s_next), s_next)
                loss = F.mse_loss(rec, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            used += 1
            loss_value = float(loss.detach())
            if loss_value < threshold:
                break
        null = null.detach()
        with torch.no_grad():
            x = ddim_step(x, guided(denoise, x, s_cur, cond, null, settings.cfg, d_cond, combine), s_cur, s_next)
        path.append(x)
        out.append(null.clone())
        iterations.append(used)
        losses.append(loss_value)
        if on_step is not None:
            on_step(i + 1, used, loss_value)
    return NullTextResult(torch.stack(out), iterations, losses, torch.stack(path))


def reconstruct(denoise: Denoiser, z_t: torch.Tensor, cond: torch.Tensor, schedule: Schedule, cfg: float,
                null_embeddings: Optional[torch.Tensor], combine: Combine = plain_cfg) -> torch.Tensor:
    """Sample from z_T with per-step null embeddings (or unguided when ``None``); returns the
    latent at the final sigma in the DDPM scale. z_t [F, C, h, w] in σ-space at σ₀."""
    sig = schedule.sigmas.to(z_t.device)
    x = z_t.float()
    with torch.no_grad():
        for i in range(schedule.steps):
            null = None if null_embeddings is None else null_embeddings[i]
            x = ddim_step(x, guided(denoise, x, sig[i], cond, null, cfg, combine=combine), sig[i], sig[i + 1])
    return to_data_scale(x, sig[-1])


def _per_frame(t: torch.Tensor, frames: int) -> torch.Tensor:
    if t.shape[0] == frames:
        return t
    if t.shape[0] == 1:
        return t.expand(frames, *t.shape[1:])
    raise SettingsError(f"A conditioning batch of {t.shape[0]} does not match {frames} frames; give one (batch 1) or one per frame.")
