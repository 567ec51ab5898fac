"""The one denoiser protocol of the pack's loops (inversion, null-text, tuning, edits).

A host evaluates its UNet as ``denoise(x, sigma, context, kinds, run) -> x0`` in ComfyUI's
σ-space: ``x`` [R, C, h, w] holds videos of F frames, ``context`` [R, T, D] their text rows,
``kinds`` one ``COND``/``UNCOND`` per video (default: every video conditional) and ``run`` the
controller and layout of the call. The ComfyUI host turns each video into a cond of the user's
CONDITIONING (ControlNet, GLIGEN, hooks … kept; the text rows replaced by ``context``) and calls
ComfyUI's ``calc_cond_batch``; the diffusers host calls its UNet directly.

Classifier-free guidance goes through a ``Combine`` (default ``plain_cfg``), so the ComfyUI host
can run ComfyUI's ``cfg_function`` (``sampler_cfg_function`` and post-CFG functions of other nodes).
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch

from .control import RunState


class Denoiser(Protocol):
    """x [R, C, h, w] (σ-space), σ [R], context [R, T, D], kinds (one COND/UNCOND per video), run -> x0 [R, C, h, w]."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, kinds: Optional[Sequence[int]] = None,
                 run: Optional[RunState] = None) -> torch.Tensor: ...


class Combine(Protocol):
    """Classifier-free guidance: (D_cond, D_uncond, scale, x, σ) -> the guided x0, all [F, C, h, w]."""

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


def plain_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """D_u + scale·(D_c − D_u)."""
    return uncond + scale * (cond - uncond)
