"""FateZero in ComfyUI: building the ``FateZeroEdit`` (``VP2P_CONTROL``) with the connected
CLIP, and the target-only sampling run that fuses the inversion's attention store.

The prompts, word alignment and re-weighting are prompt-to-prompt's (``p2p_host.build_edit``);
FateZero adds the blend words' source mask for self-attention and the latent blend (window,
and which inverted latent it keeps).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import comfy.model_management
import torch

from ..vp2p import SettingsError
from ..vp2p.edit import EditResult, Guidance, fused_edit
from ..vp2p.fatezero import BlendLatent, FateZeroController, FateZeroEdit, FateZeroLatentBlend
from ..vp2p.inversion_file import Inversion
from ..vp2p.local_blend import LocalBlendSpec
from ..vp2p.prompt_align import split_words, word_positions
from .comfy_call import Stage, bare_conditioning, branch_pooled, run_stage
from .edit_inputs import check_fusion, edit_inputs
from .p2p_host import build_edit

NODE = "FateZero Controller"


def build_fatezero(clip: Any, source_prompt: str, target_prompt: str, cross_replace: float, self_replace: float, blend_words: str,
                   blend_threshold: float, reweight: str, latent_blend: bool, edit: str = "auto", latent_blend_target_words: str = "",
                   latent_blend_start: float = 0.2, latent_blend_end: float = 0.8,
                   latent_blend_source: str = BlendLatent.SAME_LEVEL.value) -> FateZeroEdit:
    p2p = build_edit(clip, source_prompt, target_prompt, edit, cross_replace, self_replace, "", "", blend_threshold, reweight)
    words = split_words(blend_words)
    positions = tuple(word_positions(p2p.source, words, "blend_words", "source")) if words else ()
    if latent_blend:
        if not words:
            raise SettingsError(f"{NODE}: latent_blend keeps the video outside the blend words' region, so it needs blend_words "
                                "(source words, e.g. 'jeep'). Name them, or turn latent_blend off.")
        if not 0.0 <= latent_blend_start < latent_blend_end <= 1.0:
            raise SettingsError(f"{NODE}: the latent blend runs from latent_blend_start={latent_blend_start} to "
                                f"latent_blend_end={latent_blend_end}; use 0 ≤ start < end ≤ 1 (FateZero: 0.2 to 0.8).")
        target_words = split_words(latent_blend_target_words)
        p2p.blend = LocalBlendSpec(positions, tuple(word_positions(p2p.target, target_words, "latent_blend_target_words", "target")),
                                   threshold=float(blend_threshold), start=float(latent_blend_start), average=False,
                                   end=float(latent_blend_end))
    return FateZeroEdit(p2p, positions, float(blend_threshold), BlendLatent.parse(latent_blend_source))


def check_fatezero_inputs(source_prompt: Optional[str], target_prompt: Optional[str], blend_words: Optional[str], reweight: Optional[str],
                          latent_blend: Optional[bool], edit: Optional[str] = "auto", latent_blend_target_words: Optional[str] = "",
                          latent_blend_start: Optional[float] = 0.2, latent_blend_end: Optional[float] = 0.8) -> None:
    """The FateZero Controller's checks that need no CLIP (its ``validate_inputs``); None = unknown (linked), skipped."""
    from ..vp2p.prompt_align import check_edit_words
    from .prompt_host import parse_weights

    check_edit_words(source_prompt, target_prompt, "auto" if edit is None else edit, parse_weights, reweight=reweight,
                     source_lists={"blend_words": blend_words}, target_lists={"latent_blend_target_words": latent_blend_target_words})
    if latent_blend and blend_words is not None and not split_words(blend_words):
        raise SettingsError(f"{NODE}: latent_blend keeps the video outside the blend words' region, so it needs blend_words "
                            "(source words, e.g. 'jeep'). Name them, or turn latent_blend off.")
    for name, value in (("latent_blend_start", latent_blend_start), ("latent_blend_end", latent_blend_end)):
        if value is not None and not 0.0 <= float(value) <= 1.0:
            raise SettingsError(f"{NODE}: {name}={value} is a fraction of the steps; use a value between 0 and 1.")
    if latent_blend and latent_blend_start is not None and latent_blend_end is not None and not latent_blend_start < latent_blend_end:
        raise SettingsError(f"{NODE}: the latent blend runs from latent_blend_start={latent_blend_start} to "
                            f"latent_blend_end={latent_blend_end}; use 0 ≤ start < end ≤ 1 (FateZero: 0.2 to 0.8).")


def run_fused(model: Any, inversion: Inversion, control: FateZeroEdit, cfg: float, guidance: Guidance,
              callback: Optional[Callable[[int, torch.Tensor], None]] = None, positive: Optional[list] = None,
              negative: Optional[list] = None) -> tuple[EditResult, FateZeroController]:
    """Denoise the target from z_T, fusing the stored source attention (the pack's own loop, through
    ComfyUI's conditioning path); results in model space, data scale."""
    check_fusion(model, inversion, control)
    sched = inversion.schedule
    latent_hw = tuple(inversion.latent_shape[-2:])

    def loop(stage: Stage) -> tuple[EditResult, FateZeroController]:
        den = stage.denoiser()
        den.pooled = branch_pooled(control.edit)
        blend = (FateZeroLatentBlend(control.edit.blend, inversion.frames, latent_hw, sched.steps, control.blend_latent)
                 if control.edit.blend is not None else None)
        controller = FateZeroController(control, inversion.attention, sched, latent_hw, blend)
        inputs = edit_inputs(inversion, inversion.cond, cfg, stage.device)
        result = fused_edit(den, inputs, inversion.trajectory.to(stage.device), control.edit.target_cond.to(stage.device), cfg,
                            guidance, controller, on_step=callback,
                            should_stop=comfy.model_management.throw_exception_if_processing_interrupted, combine=den.cfg)
        return result, controller

    negative_text = inversion.negative if inversion.negative is not None else inversion.cond
    conds = {"positive": positive if positive is not None else bare_conditioning(control.edit.target_cond, control.edit.target_pooled),
             "negative": negative if negative is not None else bare_conditioning(negative_text, inversion.negative_pooled)}
    with torch.inference_mode():
        return run_stage(model, conds, torch.zeros(inversion.latent_shape), sched.sigmas, loop, memory_rows=2 * inversion.frames)
