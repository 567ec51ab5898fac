"""Prompt-to-prompt attention control for a source/target pair of branches (Video-P2P §3.3).

``P2PEdit`` is what a controller node builds once (prompts, token alignment, fractions,
blend words); ``P2PController`` applies it during one sampling run. Rows are found by the
layout's roles: branch 0 is the source, branch 1 the target; only the conditional rows
are edited (uncond rows always run the fast path).

* Cross-attention (``attn2``), while a token's cross-replace window is open: the target's
  maps are rebuilt from the source's (``replace``: ``P_src @ M``; ``refine``:
  ``P_src[..., mapper]·α + P_tgt·(1−α)``), then re-weighted; outside the window the target
  keeps its own maps. Probabilities are built only for the two conditional videos.
* Self-attention, during the first ``self_replace`` of the steps: the target's maps become
  the source's, computed as ``SDPA(q_src, k_src, v_tgt)`` (no probability tensor). Which
  self-attention: ``temporal`` (the reference's behaviour: temporal-attention maps only),
  ``frame`` (frame attention, on layers of ≤16² tokens per frame as prompt-to-prompt does),
  or ``both``.
* LocalBlend maps are recorded from the conditional rows' cross-attention: the source's own and
  the target's *after* the edit (replaced/refined/re-weighted), as the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Optional

import torch

from .attention import apply_probabilities, attention_probabilities
from .control import ATTN1, ATTN2, TEMPORAL, AttentionCall, AttentionController, VideoOutputs
from .errors import SettingsError, parse_option
from .layout import COND, SOURCE, TARGET
from .local_blend import LocalBlend, LocalBlendSpec
from .prompt_align import EditKind, TokenizedPrompt, refine_mapper, replace_mapper
from .schedule import Schedule

FRAME_SELF_MAX_TOKENS = 16 * 16


class SelfReplace(str, Enum):
    TEMPORAL = "temporal"
    FRAME = "frame"
    BOTH = "both"

    @classmethod
    def parse(cls, value: "str | SelfReplace") -> "SelfReplace":
        return parse_option(cls, value, "self_replace_attention", "a self-attention choice")


@dataclass
class P2PEdit:
    """A prompt-to-prompt edit, independent of the sampler.

    source_cond/target_cond: [1, T, D] text embeddings of the two prompts; ``mapper`` is
    [T, T] (replace) or [T] long (refine) with ``alphas`` [T]; ``reweight`` [T] or None;
    ``cross_words``: target token position -> its own cross-replace fraction.
    """

    source: TokenizedPrompt
    target: TokenizedPrompt
    source_cond: torch.Tensor
    target_cond: torch.Tensor
    kind: EditKind
    cross_replace: float = 0.2  # the official Video-P2P code's defaults (the paper quotes 0.4 for cross)
    self_replace: float = 0.5
    self_attention: SelfReplace = SelfReplace.TEMPORAL
    cross_words: dict[int, float] = field(default_factory=dict)
    reweight: Optional[torch.Tensor] = None
    blend: Optional[LocalBlendSpec] = None
    # the model's extra text conditioning of each prompt (SDXL's pooled CLIP-G output [1, 1280]), or None
    source_pooled: Optional[torch.Tensor] = None
    target_pooled: Optional[torch.Tensor] = None
    mapper: torch.Tensor = field(init=False)
    alphas: Optional[torch.Tensor] = field(init=False, default=None)

    def __post_init__(self) -> None:
        for name in ("cross_replace", "self_replace"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise SettingsError(f"{name}={value} is a fraction of the steps; use a number between 0 and 1.")
        if self.kind is EditKind.REPLACE:
            self.mapper = replace_mapper(self.source, self.target)
        elif self.kind is EditKind.REFINE:
            self.mapper, self.alphas = refine_mapper(self.source, self.target)
        else:
            raise SettingsError("P2PEdit needs a resolved edit kind (replace or refine), not auto.")
        t = self.source.context
        for c in (self.source_cond, self.target_cond):
            if c.dim() != 3 or c.shape[0] != 1 or c.shape[1] != t:
                raise SettingsError(f"Prompt embeddings must be [1, {t}, D] (one {t}-token sequence); got {list(c.shape)}.")

    @property
    def identity(self) -> bool:
        """Whether the edit changes nothing (no window, no re-weighting, no blending)."""
        return (self.cross_replace == 0 and not any(self.cross_words.values()) and self.self_replace == 0
                and self.reweight is None and self.blend is None)

    def cross_alpha(self, steps: int) -> torch.Tensor:
        """[S, T]: 1 where a target token's cross-attention is taken from the source at a step.

        A window of fraction f covers the steps below ``cross_steps(f, S)`` = int(f·(S+1)): the
        reference's per-step table has S+1 rows (prompt-to-prompt's), so e.g. 0.75 of 50 steps is 38
        steps, not 37; the self-attention window is int(f·S) (``self_steps``)."""
        t = self.source.context
        alpha = torch.zeros(steps, t)
        alpha[: cross_steps(self.cross_replace, steps)] = 1.0
        for pos, frac in self.cross_words.items():
            alpha[:, pos] = 0.0
            alpha[: cross_steps(frac, steps), pos] = 1.0
        return alpha

    def self_steps(self, steps: int) -> int:
        """The self-attention window: steps below int(f·S), as the reference."""
        return int(self.self_replace * steps)

    def edit_cross(self, p_source: torch.Tensor, p_target: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """p_*: [F, H, N, T] fp32, alpha [T] -> the target's maps."""
        if self.kind is EditKind.REPLACE:
            replaced = p_source @ self.mapper.to(p_source)
        else:
            a = self.alphas.to(p_source)
            replaced = p_source[..., self.mapper.to(p_source.device)] * a + p_target * (1 - a)
        if self.reweight is not None:
            replaced = replaced * self.reweight.to(p_source)
        alpha = alpha.to(p_source)
        return replaced * alpha + p_target * (1 - alpha)


def cross_steps(fraction: float, steps: int) -> int:
    """How many of ``steps`` a cross-replace fraction covers: int(f·(S+1)), the reference's rounding
    (its per-step table has S+1 rows), capped at S."""
    return min(steps, int(fraction * (steps + 1)))


class P2PController(AttentionController):
    """Runs a ``P2PEdit`` during one sampling run over ``schedule`` (steps found by sigma)."""

    def __init__(self, edit: P2PEdit, schedule: Schedule, blend: Optional[LocalBlend] = None) -> None:
        self.edit = edit
        self.schedule = schedule
        self.blend = blend
        self.alpha = edit.cross_alpha(schedule.steps)
        self.self_until = edit.self_steps(schedule.steps)

    # -- what a step needs ------------------------------------------------------------------
    def needs_source(self, step: int) -> bool:
        """Whether the target rows read the source's conditional rows at ``step``."""
        return bool(self.alpha[step].any()) or step < self.self_until or self.blend is not None

    def end_step(self, step: int, x_target: torch.Tensor, source_at: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """LocalBlend: outside the blend words' mask the target takes the source's latent of the level reached."""
        if self.blend is None:
            return x_target
        self.blend.end_step()
        return self.blend.blend(step, source_at(step + 1), x_target)

    def _step(self, call: AttentionCall) -> int:
        if call.sigmas is None:
            raise SettingsError("The attention call carries no sigmas; the P2P controller identifies steps by sigma.")
        return self.schedule.step_index(call.sigmas)

    # -- the hook --------------------------------------------------------------------------
    def override(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[VideoOutputs]:
        """The conditional target's output where the edit changes it; nothing else."""
        src, tgt = call.layout.video_of(COND, SOURCE), call.layout.video_of(COND, TARGET)
        if src is None or tgt is None:
            return None
        step = self._step(call)
        rs, rt = call.video_rows(src, q), call.video_rows(tgt, q)
        if call.kind == ATTN2:
            cross = bool(self.alpha[step].any())
            record = self.blend is not None and self.blend.wants(call.key, q.shape[1])
            if not cross and not record:
                return None
            p_src = attention_probabilities(q[rs], k[rs], call.heads)
            p_tgt = attention_probabilities(q[rt], k[rt], call.heads)
            edited = self.edit.edit_cross(p_src, p_tgt, self.alpha[step]) if cross else p_tgt
            if record:
                # The target's maps *after* the edit, as the reference's LocalBlend reads them (it stores
                # the maps it then edits in place).
                self.blend.record(call.key, p_src, edited, call.frame_slice)
            return {tgt: apply_probabilities(edited, v[rt], call.heads)} if cross else None
        if step >= self.self_until or not self._self_applies(call, q):
            return None
        return {tgt: call.attend(q[rs], k[rs], v[rt])}

    def _self_applies(self, call: AttentionCall, q: torch.Tensor) -> bool:
        which = self.edit.self_attention
        if call.kind == TEMPORAL:
            return which in (SelfReplace.TEMPORAL, SelfReplace.BOTH)
        if call.kind == ATTN1 and which in (SelfReplace.FRAME, SelfReplace.BOTH):
            return call.frame_tokens(q) <= FRAME_SELF_MAX_TOKENS
        return False
