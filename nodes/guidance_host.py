"""Cross-attention guidance as a ComfyUI GUIDER (``comfy.samplers.CFGGuider`` subclass), usable with
the stock ``SamplerCustomAdvanced``.

At a guided step (found by matching the step's sigma against the run's ``sample_sigmas``) the
latent gets one backward-guidance update (``vp2p.guidance``), then the normal CFG prediction is
made at the updated latent. The sampler itself keeps its own x, so the update is folded into the
returned prediction: ``D' = D(x_g) + σ_next/(σ − σ_next)·(x_g − x)`` makes a first-order step
(Euler, DDIM) from x land exactly where it would from x_g; other samplers get the same shift
folded into their prediction of that step, which is close but not exact.

Backward passes need ordinary weights: the guider samples with an autograd clone of the MODEL
(``autograd_host``), with the pack's attention patch installed so the word's maps can be read.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import comfy.samplers
import torch

from ..vp2p import LayoutSpec, RunState, SettingsError, T2SSettings
from ..vp2p.frame_attention import FrameMode
from ..vp2p.guidance import WordMapRecorder, default_guided_steps, guided_update
from ..vp2p.layout import COND
from ..vp2p.schedule import sigma_index
from ..vp2p.video_norm import NormScope
from .autograd_host import make_autograd_clone
from .comfy_call import ComfyDenoiser
from .comfy_host import get_state, install, transformer_blocks, with_pack_patch

log = logging.getLogger("VideoP2P")

LAYER_CHOICES = {"16x16_8x8_middle": ((4, 8), True), "16x16_8x8": ((4, 8), False), "16x16": ((4,), False),
                 "8x8_middle": ((8,), True), "all": ((1, 2, 4, 8, 16), True)}


def guided_model(model: Any) -> Any:
    """An autograd clone of ``model`` carrying the pack's attention patch (installed when the MODEL is
    not inflated: plain per-frame attention, nothing else changes)."""
    clone = with_pack_patch(model).clone()
    if get_state(clone) is None:
        install(clone, T2SSettings(FrameMode.NONE, False, NormScope.FRAME), None, transformer_blocks(model))
    return make_autograd_clone(model, clone)


class CrossAttentionGuider(comfy.samplers.CFGGuider):
    def __init__(self, model_patcher: Any, context: torch.Tensor, positions: tuple[int, ...], masks: torch.Tensor,
                 eta: float, layers: str, schedule: str) -> None:
        super().__init__(model_patcher)
        self.context = context.detach().cpu()
        self.positions = positions
        self.masks = masks.detach().cpu().float()
        self.eta = float(eta)
        self.factors, self.include_middle = LAYER_CHOICES[layers]
        self.schedule = schedule
        self.energies: list[tuple[int, float]] = []  # (step, energy before the update), for logs and tests

    def _steps(self, sample_sigmas: torch.Tensor) -> list[bool]:
        steps = int(sample_sigmas.shape[-1]) - 1
        if self.schedule == "every_step":
            return [True] * steps
        return default_guided_steps(steps)

    def predict_noise(self, x: torch.Tensor, timestep: torch.Tensor, model_options: Optional[dict] = None,
                      seed: Optional[int] = None) -> torch.Tensor:
        model_options = model_options if model_options is not None else {}
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        step = sigma_index(sigmas, timestep) if sigmas is not None else None
        if self.eta == 0 or step is None or step >= len(self._steps(sigmas)) or not self._steps(sigmas)[step]:
            return super().predict_noise(x, timestep, model_options, seed)
        frames = x.shape[0]
        if self.masks.shape[0] not in (1, frames):
            raise SettingsError(f"target_masks has {self.masks.shape[0]} frames; the video has {frames}. Give one mask per "
                                "frame, or one for all.")
        masks = self.masks.expand(frames, -1, -1) if self.masks.shape[0] == 1 else self.masks
        sigma = float(timestep.flatten()[0])
        recorder = WordMapRecorder(self.positions, tuple(x.shape[-2:]), self.factors, self.include_middle)
        # the conditional rows through ComfyUI's conditioning path: the positive's extras (ControlNet …) apply
        den = ComfyDenoiser(self.inner_model, model_options, {COND: self.conds.get("positive")})

        def evaluate(xx: torch.Tensor, rec: WordMapRecorder) -> None:
            ctx = self.context.to(xx.device).clone().expand(frames, -1, -1)  # an ordinary tensor: saved for backward
            den(xx, ts, ctx, [COND], RunState(rec, LayoutSpec(frames)))

        with torch.inference_mode(False):
            x_in = x.detach().clone()
            ts = timestep.detach().clone()
            x_g, e = guided_update(x_in, sigma, masks.to(x.device), self.eta, evaluate, recorder)
        self.energies.append((step, e))
        log.debug("Cross-Attention Guidance: step %d, energy %.4f", step, e)
        denoised = super().predict_noise(x_g.to(x.dtype), timestep, model_options, seed)
        s_next = float(sigmas[step + 1])
        return denoised + (s_next / (sigma - s_next)) * (x_g.to(x.dtype) - x)

