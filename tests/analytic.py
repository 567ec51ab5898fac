"""A smooth analytic denoiser for absolute claims about inversion (DESIGN §6).

Data of a frame with text embedding c is Gaussian, x0 ~ N(μ(c), s²·I), with μ(c) a fixed
linear map of the token-averaged embedding. Its exact denoiser in σ-space is
D(x, σ, c) = μ(c) + s²/(s²+σ²)·(x − μ(c)): smooth in x and σ, so DDIM inversion at cfg 1
is nearly exact, and differentiable in c, so null-text optimisation can act on it.
"""

from __future__ import annotations

import torch

LATENT = (4, 4, 4)
TOKENS, WIDTH = 3, 64


class GaussianDenoiser:
    def __init__(self, seed: int = 0, s: float = 0.5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.s = s
        self.W = torch.randn(int(torch.tensor(LATENT).prod()), WIDTH, generator=g) / WIDTH**0.5
        self.calls = 0

    def mean(self, cond: torch.Tensor) -> torch.Tensor:
        return (cond.mean(dim=1) @ self.W.T).view(cond.shape[0], *LATENT)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, kinds=None, run=None) -> torch.Tensor:
        self.calls += 1
        mu = self.mean(cond)
        k = (self.s**2 / (self.s**2 + sigma.float() ** 2)).view(-1, 1, 1, 1)
        return mu + k * (x - mu)


def video(frames: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents [F, *LATENT], source cond [1, T, D], empty-prompt embedding [1, T, D])."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, *LATENT, generator=g) + 0.3 * torch.randn(frames, *LATENT, generator=g)
    return latents, torch.randn(1, TOKENS, WIDTH, generator=g), torch.randn(1, TOKENS, WIDTH, generator=g) * 0.1
