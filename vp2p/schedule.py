"""Step identity and the DDIM schedule in ComfyUI's σ-space.

ComfyUI samples ``x = x_ddpm·√(1+σ²)`` with ``σ_t = √((1−ᾱ_t)/ᾱ_t)``. Deterministic DDIM
is Euler in this space and running the sigmas backwards is DDIM inversion. For parity
with the reference implementations the schedule is built from explicit timesteps
(981…1 for 50 steps) and ends at the reference's final ᾱ (ᾱ_0, not 1), so the last
sigma is small but not zero. A step is identified by matching a call's sigma against
the schedule, never by counting calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import SettingsError


def sd_alphas_cumprod(train_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ of Stable Diffusion's ``scaled_linear`` schedule, float64 [train_steps]."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, train_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigma_from_alpha(alpha_cumprod: torch.Tensor) -> torch.Tensor:
    return ((1.0 - alpha_cumprod) / alpha_cumprod).sqrt()


@dataclass(frozen=True)
class Schedule:
    """A denoising schedule: ``timesteps`` [S] (high→low) and ``sigmas`` [S+1], the last one
    being where sampling ends (σ of the reference's final ᾱ)."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    @classmethod
    def reference(cls, steps: int, alphas_cumprod: torch.Tensor | None = None) -> "Schedule":
        """The reference DDIM schedule: timesteps ``(S−1…0)·(T//S) + 1`` ("leading" with
        offset 1: 981…1 for 50 steps of 1000) and final ᾱ = ᾱ_0."""
        ac = sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.to(torch.float64)
        train = int(ac.shape[0])
        if steps < 1 or steps > train:
            raise SettingsError(f"steps must be between 1 and {train}, got {steps}.")
        ratio = train // steps
        timesteps = torch.arange(steps - 1, -1, -1, dtype=torch.long) * ratio + 1
        sigmas = torch.cat([sigma_from_alpha(ac[timesteps]), sigma_from_alpha(ac[:1])])
        return cls(timesteps, sigmas.float())

    def tail(self, start: int) -> "Schedule":
        """The schedule from step ``start`` on (img2img / SDEdit-style partial denoising)."""
        if not 0 <= start < self.steps:
            raise SettingsError(f"start step must be in [0, {self.steps - 1}], got {start}.")
        return Schedule(self.timesteps[start:], self.sigmas[start:])

    def step_index(self, sigma: torch.Tensor | float, rtol: float = 1e-4) -> int:
        """The index ``i`` with ``sigmas[i] == sigma`` (relative tolerance); raises if none."""
        i = sigma_index(self.sigmas, sigma, rtol)
        if i is None:
            s = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
            raise SettingsError(
                f"sigma={s:.6g} is not a step of this schedule "
                f"({self.steps} steps, σ from {float(self.sigmas[0]):.4g} to {float(self.sigmas[-2]):.4g})."
            )
        return i


def sigma_index(sigmas: torch.Tensor, sigma: torch.Tensor | float, rtol: float = 1e-4) -> Optional[int]:
    """The step ``i`` of a schedule's ``sigmas`` [S+1] (the last one ends sampling) with
    ``sigmas[i] == sigma`` within a relative tolerance, or None: a step identified by its sigma."""
    s = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
    diffs = (sigmas[:-1].double().cpu() - s).abs()
    i = int(torch.argmin(diffs))
    return i if diffs[i] <= rtol * max(abs(s), 1e-8) else None


# denoised = D(x, sigma_index): x in σ-space [B, C, h, w] -> x0 prediction [B, C, h, w]
# x [B, C, h, w] at step i (σ-space), i -> x0 prediction
StepDenoiser = Callable[[torch.Tensor, int], torch.Tensor]


def ddim_step(x: torch.Tensor, denoised: torch.Tensor, s_cur: torch.Tensor | float, s_next: torch.Tensor | float) -> torch.Tensor:
    """Deterministic DDIM from σ ``s_cur`` to ``s_next`` given the x0 prediction (= Euler in σ-space,
    ComfyUI's ``euler`` sampler): x' = D + s_next·(x − D)/s_cur."""
    return denoised + s_next * (x - denoised) / s_cur


def folded_denoised(x: torch.Tensor, x_next: torch.Tensor, s_cur: torch.Tensor | float, s_next: torch.Tensor | float) -> torch.Tensor:
    """The x0 prediction D with ``ddim_step(x, D, s_cur, s_next) == x_next``: how a GUIDER hands a sampler
    a step whose result was changed after the step (a latent blend, the final rescale):
    D = (s_cur·x_next − s_next·x)/(s_cur − s_next). Exact for Euler/DDIM."""
    return (s_cur * x_next - s_next * x) / (s_cur - s_next)


def to_data_scale(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """σ-space x -> the DDPM (data) scale: x/√(1+σ²)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return x / torch.sqrt(1.0 + sigma**2)


def to_sigma_space(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """DDPM-scale x -> σ-space at σ: x·√(1+σ²)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return x * torch.sqrt(1.0 + sigma**2)


def ddim_sample(denoise: StepDenoiser, x: torch.Tensor, schedule: Schedule, callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Deterministic DDIM (= Euler in σ-space) from ``sigmas[0]`` to ``sigmas[-1]``.

    x: [B, C, h, w] at σ_0 in σ-space -> the latent at the final sigma, rescaled to the
    data scale (divided by √(1+σ_final²)) like the reference's output.
    """
    sig = schedule.sigmas.to(x.device)
    for i in range(schedule.steps):
        x = ddim_step(x, denoise(x, i), sig[i], sig[i + 1])
        if callback is not None:
            callback(i, x)
    return to_data_scale(x, sig[-1])
