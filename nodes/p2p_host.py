"""Prompt-to-prompt in ComfyUI: tokenising with the connected CLIP's own tokenizer
(``prompt_host``: ComfyUI's emphasis syntax and embeddings, the weights kept), building
the ``P2PEdit`` (``VP2P_CONTROL``), the decoupled edit as the pack's own loop (``run_edit``) and
the Attention Maps' one UNet call — both through ComfyUI's conditioning path (``comfy_call``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import comfy.model_management
import torch

from ..vp2p import LayoutSpec, RunState, SettingsError
from ..vp2p.edit import EditResult, Guidance, decoupled_edit
from ..vp2p.inversion_file import Inversion
from ..vp2p.layout import COND, SOURCE, TARGET
from ..vp2p.local_blend import LocalBlend, LocalBlendSpec
from ..vp2p.p2p import P2PController, P2PEdit, SelfReplace
from ..vp2p.prompt_align import EditKind, parse_word_values, resolve_kind, reweight_vector, split_words, word_positions
from .comfy_call import Stage, bare_conditioning, branch_pooled, run_stage
from .edit_inputs import edit_inputs
from .prompt_host import encode_prompt_pooled, tokenized_prompt

log = logging.getLogger("VideoP2P")


def build_edit(clip: Any, source_prompt: str, target_prompt: str, edit: str, cross_replace: float, self_replace: float,
               blend_source_words: str, blend_target_words: str, blend_threshold: float, reweight: str,
               cross_replace_words: str = "", self_replace_attention: str = "temporal", blend_start: float = 0.2,
               blend_average: bool = True) -> P2PEdit:
    src = tokenized_prompt(clip, source_prompt)
    tgt = tokenized_prompt(clip, target_prompt)
    if not src.words or not tgt.words:
        raise SettingsError("Both prompts need at least one word: the source describes the video, the target the edit.")
    kind = resolve_kind(EditKind.parse(edit), src, tgt)
    factors = parse_word_values(reweight, "reweight", 0.0, 10.0)
    cross_words: dict[int, float] = {}
    for word, frac in parse_word_values(cross_replace_words, "cross_replace_words", 0.0, 1.0).items():
        for pos in word_positions(tgt, [word], "cross_replace_words", "target"):
            cross_words[pos] = frac
    blend = None
    src_words, tgt_words = split_words(blend_source_words), split_words(blend_target_words)
    if src_words or tgt_words:
        if not 0.0 <= blend_threshold <= 1.0:
            raise SettingsError(f"blend_threshold={blend_threshold} must be between 0 and 1 (0.3 as in Video-P2P).")
        blend = LocalBlendSpec(tuple(word_positions(src, src_words, "blend_source_words", "source")),
                               tuple(word_positions(tgt, tgt_words, "blend_target_words", "target")),
                               threshold=float(blend_threshold), start=float(blend_start), average=bool(blend_average))
    (source_cond, source_pooled), (target_cond, target_pooled) = encode_prompt_pooled(clip, src.text), encode_prompt_pooled(clip, tgt.text)
    return P2PEdit(src, tgt, source_cond, target_cond, kind, cross_replace=float(cross_replace), source_pooled=source_pooled,
                   target_pooled=target_pooled,
                   self_replace=float(self_replace), self_attention=SelfReplace.parse(self_replace_attention),
                   cross_words=cross_words, reweight=reweight_vector(tgt, factors) if factors else None, blend=blend)


def run_edit(model: Any, inversion: Inversion, edit: P2PEdit, cfg: float, guidance: Guidance, reuse: bool = True,
             callback: Optional[Callable[[int, torch.Tensor], None]] = None, positive: Optional[list] = None,
             negative: Optional[list] = None) -> tuple[EditResult, Optional[LocalBlend]]:
    """The decoupled edit as the pack's own loop (``vp2p.edit.decoupled_edit``: the result of the last step
    exactly as computed, e.g. the source itself outside a LocalBlend mask), through ComfyUI's conditioning
    path. Returns the result (model space, data scale) and the blend used. The Decoupled Sampler node runs the
    same steps as a GUIDER under ComfyUI's euler sampler (``edit_guider``)."""
    frames = inversion.frames
    sched = inversion.schedule

    def loop(stage: Stage) -> tuple[EditResult, Optional[LocalBlend]]:
        den = stage.denoiser()
        den.pooled = branch_pooled(edit)
        inputs = edit_inputs(inversion, edit.source_cond, cfg, stage.device)
        blend = LocalBlend(edit.blend, frames, tuple(inversion.latent_shape[-2:]), sched.steps) if edit.blend is not None else None
        controller = P2PController(edit, sched, blend)
        result = decoupled_edit(den, inputs, edit.target_cond.to(stage.device), cfg, guidance, controller, reuse=reuse,
                                on_step=callback, should_stop=comfy.model_management.throw_exception_if_processing_interrupted,
                                combine=den.cfg)
        return result, blend

    negative_text = inversion.negative if inversion.negative is not None else inversion.cond
    conds = {"positive": positive if positive is not None else bare_conditioning(edit.target_cond, edit.target_pooled),
             "negative": negative if negative is not None else bare_conditioning(negative_text, inversion.negative_pooled)}
    with torch.inference_mode():
        return run_stage(model, conds, torch.zeros(inversion.latent_shape), sched.sigmas, loop, memory_rows=4 * frames)


def word_maps(model: Any, inversion: Inversion, edit: P2PEdit, at_step: float, source_words: list[str],
              target_words: list[str], threshold: float, positive: Optional[list] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The blend words' cross-attention at one step, as LocalBlend computes it: one UNet call with the
    source and target conditional rows on the source latent of that step (no edit applied).
    Returns (maps [2, F, h, w] normalised per prompt and frame, mask [F, h, w] of their union)."""
    from dataclasses import replace

    sched = inversion.schedule
    step = min(sched.steps - 1, max(0, int(at_step * sched.steps)))
    spec = LocalBlendSpec(tuple(word_positions(edit.source, source_words, "source_word", "source")),
                          tuple(word_positions(edit.target, target_words, "target_word", "target")), threshold=threshold,
                          start=0.0, average=False)
    plain = replace(edit, cross_replace=0.0, self_replace=0.0, cross_words={}, reweight=None, blend=spec)
    blend = LocalBlend(spec, inversion.frames, tuple(inversion.latent_shape[-2:]), sched.steps)
    controller = P2PController(plain, sched, blend)
    path = inversion.source_path if inversion.source_path is not None else inversion.trajectory
    if inversion.generated:  # only z_T exists: look at the first step
        step = 0
    frames = inversion.frames

    def loop(stage: Stage) -> None:
        x = path[step].to(stage.device)
        context = torch.cat([edit.source_cond.expand(frames, -1, -1), edit.target_cond.expand(frames, -1, -1)]).to(stage.device)
        run = RunState(controller, LayoutSpec(frames, 2, ((COND, SOURCE), (COND, TARGET))))
        den = stage.denoiser()
        den.pooled = branch_pooled(edit)
        den(torch.cat([x, x]), sched.sigmas[step].to(stage.device).expand(2 * frames), context, [COND, COND], run)

    with torch.inference_mode():
        conds = {"positive": positive if positive is not None else bare_conditioning(edit.source_cond, edit.source_pooled)}
        run_stage(model, conds, torch.zeros(inversion.latent_shape), sched.sigmas, loop,
                  memory_rows=2 * frames)
    blend.end_step()
    maps = blend.maps()
    if maps is None:
        raise SettingsError("No cross-attention map was recorded; the MODEL has no cross-attention layers the pack patches.")
    return maps.cpu(), blend.mask()[:, 0].cpu().float()
