"""The edit as a ComfyUI GUIDER ("Video-P2P Guider"): prompt-to-prompt's decoupled sampler or
FateZero's fused edit, usable with the stock ``SamplerCustomAdvanced`` and core samplers.

The sampler holds the target latent; the guider runs one edit step per model evaluation
(``vp2p.edit.DecoupledSteps`` / ``FusedSteps``: the UNet through ComfyUI's conditioning path,
``comfy_call.ComfyDenoiser``), keeping the source branch itself (the inversion's walk, or walked
here). It returns the target's guided x0. Where the step's result is changed after the step (the
controller's latent blend) or at the last step (the result in the data scale, as the pack's own
loop gives it), it returns the x0 that makes a DDIM/Euler step land exactly there
(``vp2p.schedule.folded_denoised``).

Samplers: ``euler`` (= DDIM in σ-space) on the inversion's sigmas is the edit exactly; the
Decoupled Sampler node is this guider with it. Other samplers evaluate the same steps at the same
sigmas (the source branch follows its own DDIM walk), so they change only how the target
integrates; ancestral/SDE samplers add noise to the target only. Sigmas off the inversion's
schedule are refused.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import comfy.model_patcher
import comfy.samplers
import torch

from ..vp2p import SettingsError
from ..vp2p.edit import DecoupledSteps, FusedSteps, Guidance
from ..vp2p.fatezero import FateZeroController, FateZeroEdit, FateZeroLatentBlend
from ..vp2p.inversion_file import Inversion
from ..vp2p.layout import COND, UNCOND
from ..vp2p.local_blend import LocalBlend
from ..vp2p.p2p import P2PController, P2PEdit
from ..vp2p.schedule import folded_denoised, sigma_index, to_data_scale
from .comfy_call import ComfyDenoiser, bare_conditioning, branch_pooled, check_pooled, estimate_memory_for
from .comfy_host import with_pack_patch
from .edit_inputs import check_consistency, check_fusion, edit_inputs

log = logging.getLogger("VideoP2P")


def check_control(model: Any, inversion: Any, control: Any) -> None:
    """Everything the edit needs of its inputs, before any UNet call."""
    if not isinstance(inversion, Inversion):
        raise SettingsError(f"inversion must come from 'Shared Null-Text Invert' or 'Load Inversion'; got {type(inversion).__name__}.")
    if isinstance(control, FateZeroEdit):
        check_fusion(model, inversion, control)
    elif isinstance(control, P2PEdit):
        check_consistency(model, inversion, control)
    else:
        raise SettingsError(f"control must come from 'P2P Controller' or 'FateZero Controller'; got {type(control).__name__}.")


class VideoP2PGuider(comfy.samplers.CFGGuider):
    """The edit of ``inversion`` by ``control`` (see the module docstring). ``positive``/``negative``:
    CONDITIONING whose extras (ControlNet, GLIGEN, hooks …) apply to both branches' conditional /
    unconditional rows; their text rows are the controller's and the inversion's."""

    def __init__(self, model_patcher: Any, inversion: Inversion, control: Any, cfg: float, guidance: Guidance,
                 positive: Optional[list] = None, negative: Optional[list] = None, reuse: bool = True) -> None:
        check_control(model_patcher, inversion, control)
        model_patcher = with_pack_patch(model_patcher)
        super().__init__(model_patcher)
        self.inversion, self.control, self.guidance, self.reuse = inversion, control, guidance, reuse
        self.set_cfg(float(cfg))
        self.fused = isinstance(control, FateZeroEdit)
        edit = control.edit if self.fused else control
        self.edit = edit
        if positive is not None:
            text = positive[0][0] if positive else None
            if text is not None and (text.shape[1:] != edit.target_cond.shape[1:]
                                     or not torch.allclose(text[:1].float().cpu(), edit.target_cond.float().cpu(), atol=1e-3, rtol=1e-3)):
                log.info("Video-P2P Guider: the positive CONDITIONING's text is not the controller's target prompt %r; the controller's "
                         "prompt is used, the CONDITIONING gives its extras (ControlNet, hooks …).", edit.target.text)
        negative_text = inversion.negative if inversion.negative is not None else inversion.cond
        conds = {"positive": positive if positive is not None else bare_conditioning(edit.target_cond, edit.target_pooled),
                 "negative": negative if negative is not None else bare_conditioning(negative_text, inversion.negative_pooled)}
        check_pooled(model_patcher, conds, "Video-P2P Guider")
        self.inner_set_conds(conds)
        self.model_options = comfy.model_patcher.create_model_options_clone(model_patcher.model_options)
        rows_per_video = inversion.frames
        estimate_memory_for(self.model_options, (2 if self.fused else 4) * rows_per_video)
        self.steps: Optional[DecoupledSteps | FusedSteps] = None
        self.controller: Optional[P2PController | FateZeroController] = None

    # -- what a graph connects to the sampler ---------------------------------------------------------
    @property
    def sigmas(self) -> torch.Tensor:
        """The inversion's sigmas: the schedule the edit runs on."""
        return self.inversion.schedule.sigmas.float().cpu()

    def start_latent(self) -> dict:
        """z_T as a LATENT (model space: ComfyUI's samplers ``process_latent_in`` it), for a sampler with its noise disabled."""
        return {"samples": self.model_patcher.model.latent_format.process_out(self.inversion.z_t.float().cpu())}

    def source_latent(self) -> dict:
        """The source branch of the last run (the reconstruction; FateZero: the inverted video) as a LATENT."""
        if self.steps is None:
            raise SettingsError("The Video-P2P Guider has not sampled yet.")
        x = to_data_scale(self.steps.source_at(self.steps.steps), self.steps.sigmas[-1])
        return {"samples": self.model_patcher.model.latent_format.process_out(x.float().cpu())}

    # -- one run -------------------------------------------------------------------------------------------
    def inner_sample(self, noise: torch.Tensor, latent_image: torch.Tensor, device: Any, sampler: Any, sigmas: torch.Tensor,
                     *args: Any, **kwargs: Any) -> torch.Tensor:
        sched = self.inversion.schedule
        ours = sched.sigmas.to(sigmas.device, sigmas.dtype)
        if sigmas.shape != ours.shape or not torch.allclose(sigmas, ours, rtol=1e-4, atol=1e-6):
            raise SettingsError(
                f"The Video-P2P Guider edits on the inversion's {sched.steps} steps; the sampler was given {sigmas.shape[-1] - 1} "
                "other sigmas. Connect the guider's sigmas output to the sampler.")
        self._start(device)
        return super().inner_sample(noise, latent_image, device, sampler, sigmas, *args, **kwargs)

    def _start(self, device: Any) -> None:
        inv, sched = self.inversion, self.inversion.schedule
        frames, latent_hw = inv.frames, tuple(inv.latent_shape[-2:])
        placeholder = ComfyDenoiser(None, {}, {})  # replaced by each evaluation's own (its model options)
        if self.fused:
            fz: FateZeroEdit = self.control
            blend = (FateZeroLatentBlend(fz.edit.blend, frames, latent_hw, sched.steps, fz.blend_latent)
                     if fz.edit.blend is not None else None)
            self.controller = FateZeroController(fz, inv.attention, sched, latent_hw, blend)
            inputs = edit_inputs(inv, inv.cond, self.cfg, device)
            self.steps = FusedSteps(placeholder, inputs, inv.trajectory.to(device), fz.edit.target_cond.to(device), self.cfg,
                                    self.guidance, self.controller)
        else:
            edit: P2PEdit = self.control
            blend = LocalBlend(edit.blend, frames, latent_hw, sched.steps) if edit.blend is not None else None
            self.controller = P2PController(edit, sched, blend)
            inputs = edit_inputs(inv, edit.source_cond, self.cfg, device)
            self.steps = DecoupledSteps(placeholder, inputs, edit.target_cond.to(device), self.cfg, self.guidance, self.controller,
                                        self.reuse)

    def predict_noise(self, x: torch.Tensor, timestep: torch.Tensor, model_options: Optional[dict] = None,
                      seed: Optional[int] = None) -> torch.Tensor:
        steps = self.steps
        if steps is None:
            raise SettingsError("The Video-P2P Guider was called outside a sampling run.")
        i = sigma_index(steps.sigmas, timestep.reshape(-1)[0])
        if i is None or i >= steps.steps:
            raise SettingsError(f"The sampler evaluated the Video-P2P Guider at σ={float(timestep.reshape(-1)[0]):.4g}, which is not one "
                                "of the inversion's steps; use a sampler that evaluates at the given sigmas (euler, ddim).")
        den = ComfyDenoiser(self.inner_model, model_options or {}, {COND: self.conds.get("positive"), UNCOND: self.conds.get("negative")})
        den.pooled = branch_pooled(self.edit)
        steps.denoise, steps.combine = den, den.cfg
        result = steps.step(i, x.float())
        last = i == steps.steps - 1
        if not result.changed and not last:
            return result.denoised.to(x.dtype)
        x_next = to_data_scale(result.x_next, steps.sigmas[-1]) if last else result.x_next
        return folded_denoised(x.float(), x_next, steps.sigmas[i], steps.sigmas[i + 1]).to(x.dtype)
