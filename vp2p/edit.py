"""The decoupled sampler (Video-P2P §3.3): DDIM from the inversion's z_T, source and target
branches in one UNet call per step, the controller editing the target from the source.

Rows are videos of F frames, each with an explicit role ``(COND|UNCOND, branch)``; branch 0
is the source, branch 1 the target. Guidance:

* ``decoupled`` (Video-P2P): source ``D_u(∅_i) + w_s·(D_c − D_u)`` with the optimised null
  embedding of step i, target ``D_u(negative) + w·(D_c − D_u)`` with the initial one;
* ``shared_null`` (prompt-to-prompt): ∅_i for both branches;
* ``fast``: the source branch conditional only (what a ``ddim_only`` inversion matches), the
  target with cfg.

The source always uses the inversion's cfg ``w_s`` (its null embeddings were optimised for
it); the target uses the sampler's ``w``. An inversion without optimised embeddings
(``ddim_only``, ``negative_prompt``) has a conditional-only source branch.

**Reuse.** The source branch is fully determined by the inversion: a null-text inversion
keeps the latents of exactly this source walk (``source_path``). With ``reuse`` the sampler
takes x_src from it and sends the source's conditional rows only at steps where the
controller reads the source attention — F rows at most, instead of 2F — and none otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Callable, Optional, Protocol

import torch

from .control import AttentionController, RunState
from .errors import SettingsError, parse_option
from .layout import COND, SOURCE, TARGET, UNCOND, LayoutSpec
from .local_blend import LocalBlend
from .schedule import Schedule

if TYPE_CHECKING:
    from .fatezero import FateZeroLatentBlend

log = logging.getLogger("VideoP2P")


class Guidance(str, Enum):
    DECOUPLED = "decoupled"
    SHARED_NULL = "shared_null"
    FAST = "fast"

    @classmethod
    def parse(cls, value: "str | Guidance") -> "Guidance":
        return parse_option(cls, value, "guidance", "a guidance mode")


class BranchDenoise(Protocol):
    """x [R, C, h, w] (σ-space), σ [R], context [R, T, D], cond_or_uncond (one per video),
    run state -> x0 [R, C, h, w]."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, cond_or_uncond: list[int],
                 run: RunState) -> torch.Tensor: ...


@dataclass
class EditInputs:
    """What the sampler takes from an inversion: z_t [F, C, h, w] (σ-space at sigmas[0]);
    cond [1|F, T, D]; null_embeddings [S, 1|F, T, D] or None; negative [1|F, T, D];
    source_path [S+1, F, C, h, w] or None (the source walk, when the inversion made it)."""

    z_t: torch.Tensor
    schedule: Schedule
    cond: torch.Tensor
    null_embeddings: Optional[torch.Tensor]
    negative: torch.Tensor
    cfg: float
    source_path: Optional[torch.Tensor] = None


@dataclass
class EditResult:
    """edited/source: [F, C, h, w] at the final sigma, data scale; rows: UNet rows per step."""

    edited: torch.Tensor
    source: torch.Tensor
    rows: list[int] = field(default_factory=list)


def _rows(t: torch.Tensor, frames: int) -> torch.Tensor:
    return t if t.shape[0] == frames else t.expand(frames, *t.shape[1:])


def decoupled_edit(denoise: BranchDenoise, inputs: EditInputs, target_cond: torch.Tensor, cfg: float, guidance: Guidance,
                   controller: Optional[AttentionController] = None, blend: Optional[LocalBlend] = None, reuse: bool = True,
                   on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
                   should_stop: Optional[Callable[[], None]] = None) -> EditResult:
    """Edit a video from its inversion. ``target_cond`` [1|F, T, D]; see the module docstring."""
    sched = inputs.schedule
    frames = inputs.z_t.shape[0]
    steps = sched.steps
    sig = sched.sigmas.to(inputs.z_t.device)
    nulls = inputs.null_embeddings
    source_guided = guidance is not Guidance.FAST and nulls is not None
    use_path = reuse and source_guided and inputs.source_path is not None
    if use_path and inputs.source_path.shape[0] != steps + 1:
        raise SettingsError("The inversion's source path does not match its schedule; the inversion is damaged.")
    contexts = [inputs.cond, target_cond, inputs.negative] + ([] if nulls is None else [nulls[0]])
    if len({c.shape[-2] for c in contexts}) != 1:
        raise SettingsError(f"The prompt embeddings have different token counts {[c.shape[-2] for c in contexts]}; "
                            "use prompts of one sequence length (77 tokens for SD1.x).")
    x_src = inputs.z_t.float()
    x_tgt = inputs.z_t.float()
    rows_per_step: list[int] = []
    for i in range(steps):
        if should_stop is not None:
            should_stop()
        null_i = None if nulls is None else nulls[i]
        source_neg = null_i if source_guided else None
        target_neg = null_i if (guidance is Guidance.SHARED_NULL and null_i is not None) else inputs.negative
        needs = getattr(controller, "needs_source", None)
        want_source = controller is not None and (needs is None or needs(i))
        videos: list[tuple[tuple[int, int], torch.Tensor, torch.Tensor]] = []  # (role, x, context)
        if not use_path and source_neg is not None:
            videos.append(((UNCOND, SOURCE), x_src, source_neg))
        videos.append(((UNCOND, TARGET), x_tgt, target_neg))
        if not use_path or want_source:
            videos.append(((COND, SOURCE), x_src, inputs.cond))
        videos.append(((COND, TARGET), x_tgt, target_cond))
        roles = [r for r, _, _ in videos]
        x = torch.cat([v for _, v, _ in videos])
        context = torch.cat([_rows(c, frames) for _, _, c in videos]).to(x.device)
        run = RunState(controller, LayoutSpec(frames, 2, tuple(roles)))
        out = denoise(x, sig[i].expand(x.shape[0]), context, [k for k, _ in roles], run).float()
        rows_per_step.append(x.shape[0])
        d = {role: out[n * frames:(n + 1) * frames] for n, role in enumerate(roles)}
        d_tgt = d[(UNCOND, TARGET)] + cfg * (d[(COND, TARGET)] - d[(UNCOND, TARGET)])
        x_tgt = d_tgt + sig[i + 1] * (x_tgt - d_tgt) / sig[i]
        if use_path:
            x_src = inputs.source_path[i + 1].to(x_tgt)
        else:
            d_src = d[(COND, SOURCE)]
            if source_neg is not None:
                d_src = d[(UNCOND, SOURCE)] + inputs.cfg * (d_src - d[(UNCOND, SOURCE)])
            x_src = d_src + sig[i + 1] * (x_src - d_src) / sig[i]
        if blend is not None:
            blend.end_step()
            x_tgt = blend.blend(i, x_src, x_tgt)
        if on_step is not None:
            on_step(i, x_tgt)
    scale = torch.sqrt(1 + sig[-1] ** 2)
    return EditResult(x_tgt / scale, x_src / scale, rows_per_step)



def fused_edit(denoise: BranchDenoise, inputs: EditInputs, source_latents: torch.Tensor, target_cond: torch.Tensor, cfg: float,
               guidance: Guidance, controller: Optional[AttentionController] = None, blend: "Optional[FateZeroLatentBlend]" = None,
               on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
               should_stop: Optional[Callable[[], None]] = None) -> EditResult:
    """FateZero's edit: only the target branch is denoised (uncond + cond, one UNet call per step);
    the controller reads the source from the inversion's attention store.

    source_latents [S+1, F, C, h, w]: the inversion's trajectory (σ-space, index i at sigmas[i]):
    after step i the latent blend resets the target outside its mask to the trajectory's latent at
    ``blend.source_index(i)`` (i+1: the level reached; i: FateZero's code), and the ``source``
    result is the video the inversion started from. The target's negative is the
    initial one (``shared_null``: the optimised null embedding of each step, where there is one).
    """
    sched = inputs.schedule
    frames = inputs.z_t.shape[0]
    sig = sched.sigmas.to(inputs.z_t.device)
    if source_latents.shape[0] != sched.steps + 1:
        raise SettingsError("The inversion's trajectory does not match its schedule; the inversion is damaged.")
    x = inputs.z_t.float()
    rows_per_step: list[int] = []
    roles = ((UNCOND, TARGET), (COND, TARGET))
    for i in range(sched.steps):
        if should_stop is not None:
            should_stop()
        nulls = inputs.null_embeddings
        negative = nulls[i] if (guidance is Guidance.SHARED_NULL and nulls is not None) else inputs.negative
        context = torch.cat([_rows(negative, frames), _rows(target_cond, frames)]).to(x.device)
        run = RunState(controller, LayoutSpec(frames, 2, roles))
        out = denoise(torch.cat([x, x]), sig[i].expand(2 * frames), context, [UNCOND, COND], run).float()
        rows_per_step.append(2 * frames)
        d = out[:frames] + cfg * (out[frames:] - out[:frames])
        x = d + sig[i + 1] * (x - d) / sig[i]
        if blend is not None:
            blend.end_step()
            x = blend.blend(i, source_latents[blend.source_index(i)].to(x), x)
        if on_step is not None:
            on_step(i, x)
    scale = torch.sqrt(1 + sig[-1] ** 2)
    return EditResult(x / scale, source_latents[-1].to(x) / scale, rows_per_step)
