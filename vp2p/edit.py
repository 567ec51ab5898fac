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
takes x_src from it and sends the source's rows only at steps where the controller reads the
source attention (``needs_source``), and none otherwise. Each UNet call holds every chunk
(uncond, cond) × the same branches, the shape of ComfyUI's ``calc_cond_batch`` (one latent batch,
evaluated under each conditioning): 4F rows with the source (its uncond rows are not used when the
source comes from the walk), 2F without.

The loops are written one step at a time (``DecoupledSteps``, ``FusedSteps``), so a ComfyUI GUIDER
can run the same steps under any sampler, and the controller owns what happens at the end of a step
(its latent blend: ``AttentionController.end_step``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Optional

import torch

from .control import AttentionController, RunState
from .denoise import Combine, Denoiser, plain_cfg
from .errors import SettingsError, parse_option
from .layout import COND, SOURCE, TARGET, UNCOND, LayoutSpec
from .schedule import Schedule, ddim_step, to_data_scale

log = logging.getLogger("VideoP2P")


class Guidance(str, Enum):
    DECOUPLED = "decoupled"
    SHARED_NULL = "shared_null"
    FAST = "fast"

    @classmethod
    def parse(cls, value: "str | Guidance") -> "Guidance":
        return parse_option(cls, value, "guidance", "a guidance mode")


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


@dataclass
class StepResult:
    """One step of an edit: the target latent at sigmas[i+1] (σ-space, after the controller's end of
    step) and the guided x0 prediction it came from (what a preview shows)."""

    x_next: torch.Tensor
    denoised: torch.Tensor
    changed: bool  # whether end_step changed x_next (a latent blend): then it is not ddim_step(x, denoised)


def _finish_step(controller: Optional[AttentionController], i: int, x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor,
                 source_at: Callable[[int], torch.Tensor]) -> StepResult:
    """The DDIM step from sigmas[i] to sigmas[i+1], then the controller's end of step (its latent blend)."""
    x_next = ddim_step(x, denoised, sigmas[i], sigmas[i + 1])
    if controller is None:
        return StepResult(x_next, denoised, False)
    blended = controller.end_step(i, x_next, source_at)
    return StepResult(blended, denoised, blended is not x_next)


class DecoupledSteps:
    """The decoupled sampler one step at a time (Video-P2P §3.3; see the module docstring): the
    source branch comes from the inversion's walk (``reuse``) or is walked here, beside the target.
    Each UNet call holds every chunk (uncond, cond) × the branches it needs: the source only at steps
    where the controller reads it (``needs_source``) or when it is walked here."""

    def __init__(self, denoise: Denoiser, inputs: EditInputs, target_cond: torch.Tensor, cfg: float, guidance: Guidance,
                 controller: Optional[AttentionController] = None, reuse: bool = True, combine: Combine = plain_cfg) -> None:
        self.denoise, self.inputs, self.target_cond = denoise, inputs, target_cond
        self.cfg, self.guidance, self.controller, self.combine = cfg, guidance, controller, combine
        sched = inputs.schedule
        self.frames = inputs.z_t.shape[0]
        self.sigmas = sched.sigmas.to(inputs.z_t.device)
        nulls = inputs.null_embeddings
        self.source_guided = guidance is not Guidance.FAST and nulls is not None
        self.use_path = reuse and self.source_guided and inputs.source_path is not None
        if self.use_path and inputs.source_path.shape[0] != sched.steps + 1:
            raise SettingsError("The inversion's source path does not match its schedule; the inversion is damaged.")
        contexts = [inputs.cond, target_cond, inputs.negative] + ([] if nulls is None else [nulls[0]])
        if len({c.shape[-2] for c in contexts}) != 1:
            raise SettingsError(f"The prompt embeddings have different token counts {[c.shape[-2] for c in contexts]}; "
                                "use prompts of one sequence length (77 tokens for SD1.x).")
        self._walk: dict[int, torch.Tensor] = {0: inputs.z_t.float()}  # the source walked here, by sigma index
        self.rows: list[int] = []

    @property
    def steps(self) -> int:
        return self.inputs.schedule.steps

    def source_at(self, j: int) -> torch.Tensor:
        """The source latent at sigmas[j] (σ-space)."""
        if self.use_path:
            return self.inputs.source_path[j].to(self.inputs.z_t.device).float()
        if j not in self._walk:
            raise SettingsError(f"The source branch has not reached step {j} yet; sample the steps in order.")
        return self._walk[j]

    def step(self, i: int, x_tgt: torch.Tensor) -> StepResult:
        inputs, frames, sig = self.inputs, self.frames, self.sigmas
        nulls = inputs.null_embeddings
        null_i = None if nulls is None else nulls[i]
        source_neg = null_i if self.source_guided else None
        target_neg = null_i if (self.guidance is Guidance.SHARED_NULL and null_i is not None) else inputs.negative
        with_source = not self.use_path or (self.controller is not None and self.controller.needs_source(i))
        x_src = self.source_at(i) if with_source else None
        videos: list[tuple[tuple[int, int], torch.Tensor, torch.Tensor]] = []  # (role, x, context)
        for kind, src_ctx, tgt_ctx in ((UNCOND, source_neg if source_neg is not None else inputs.negative, target_neg),
                                       (COND, inputs.cond, self.target_cond)):
            if with_source:
                videos.append(((kind, SOURCE), x_src, src_ctx))
            videos.append(((kind, TARGET), x_tgt, tgt_ctx))
        roles = tuple(r for r, _, _ in videos)
        x = torch.cat([v for _, v, _ in videos])
        context = torch.cat([_rows(c, frames) for _, _, c in videos]).to(x.device)
        run = RunState(self.controller, LayoutSpec(frames, 2, roles))
        out = self.denoise(x, sig[i].expand(x.shape[0]), context, [k for k, _ in roles], run).float()
        self.rows.append(x.shape[0])
        d = {role: out[n * frames:(n + 1) * frames] for n, role in enumerate(roles)}
        d_tgt = self.combine(d[(COND, TARGET)], d[(UNCOND, TARGET)], self.cfg, x_tgt, sig[i])
        if not self.use_path and i + 1 not in self._walk:
            d_src = d[(COND, SOURCE)]
            if source_neg is not None:
                d_src = self.combine(d_src, d[(UNCOND, SOURCE)], inputs.cfg, x_src, sig[i])
            self._walk[i + 1] = ddim_step(x_src, d_src, sig[i], sig[i + 1])
        return _finish_step(self.controller, i, x_tgt, d_tgt, sig, self.source_at)


class FusedSteps:
    """FateZero's edit one step at a time: only the target is denoised (uncond + cond, one UNet call
    per step); the controller reads the source from the inversion's attention store, and its latent
    blend reads the inversion's trajectory (``source_latents`` [S+1, F, C, h, w], σ-space)."""

    def __init__(self, denoise: Denoiser, inputs: EditInputs, source_latents: torch.Tensor, target_cond: torch.Tensor, cfg: float,
                 guidance: Guidance, controller: Optional[AttentionController] = None, combine: Combine = plain_cfg) -> None:
        if source_latents.shape[0] != inputs.schedule.steps + 1:
            raise SettingsError("The inversion's trajectory does not match its schedule; the inversion is damaged.")
        self.denoise, self.inputs, self.source_latents, self.target_cond = denoise, inputs, source_latents, target_cond
        self.cfg, self.guidance, self.controller, self.combine = cfg, guidance, controller, combine
        self.frames = inputs.z_t.shape[0]
        self.sigmas = inputs.schedule.sigmas.to(inputs.z_t.device)
        self.rows: list[int] = []

    @property
    def steps(self) -> int:
        return self.inputs.schedule.steps

    def source_at(self, j: int) -> torch.Tensor:
        return self.source_latents[j].to(self.inputs.z_t.device).float()

    def step(self, i: int, x: torch.Tensor) -> StepResult:
        frames, sig, nulls = self.frames, self.sigmas, self.inputs.null_embeddings
        negative = nulls[i] if (self.guidance is Guidance.SHARED_NULL and nulls is not None) else self.inputs.negative
        context = torch.cat([_rows(negative, frames), _rows(self.target_cond, frames)]).to(x.device)
        run = RunState(self.controller, LayoutSpec(frames, 2, ((UNCOND, TARGET), (COND, TARGET))))
        out = self.denoise(torch.cat([x, x]), sig[i].expand(2 * frames), context, [UNCOND, COND], run).float()
        self.rows.append(2 * frames)
        d = self.combine(out[frames:], out[:frames], self.cfg, x, sig[i])
        return _finish_step(self.controller, i, x, d, sig, self.source_at)


def _sample(steps: "DecoupledSteps | FusedSteps", on_step: Optional[Callable[[int, torch.Tensor], None]],
            should_stop: Optional[Callable[[], None]]) -> torch.Tensor:
    x = steps.inputs.z_t.float()
    for i in range(steps.steps):
        if should_stop is not None:
            should_stop()
        x = steps.step(i, x).x_next
        if on_step is not None:
            on_step(i, x)
    return x


def decoupled_edit(denoise: Denoiser, inputs: EditInputs, target_cond: torch.Tensor, cfg: float, guidance: Guidance,
                   controller: Optional[AttentionController] = None, reuse: bool = True,
                   on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
                   should_stop: Optional[Callable[[], None]] = None, combine: Combine = plain_cfg) -> EditResult:
    """Edit a video from its inversion. ``target_cond`` [1|F, T, D]; see the module docstring.
    ``on_step(i, x)``: the target latent after step i (σ-space)."""
    steps = DecoupledSteps(denoise, inputs, target_cond, cfg, guidance, controller, reuse, combine)
    x = _sample(steps, on_step, should_stop)
    last = steps.sigmas[-1]
    return EditResult(to_data_scale(x, last), to_data_scale(steps.source_at(steps.steps), last), steps.rows)


def fused_edit(denoise: Denoiser, inputs: EditInputs, source_latents: torch.Tensor, target_cond: torch.Tensor, cfg: float,
               guidance: Guidance, controller: Optional[AttentionController] = None,
               on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
               should_stop: Optional[Callable[[], None]] = None, combine: Combine = plain_cfg) -> EditResult:
    """FateZero's edit (``FusedSteps``): the controller's latent blend resets the target outside its mask
    to the trajectory's latent at ``blend.source_index(i)`` (i+1: the level reached; i: FateZero's code);
    the ``source`` result is the video the inversion started from. The target's negative is the initial
    one (``shared_null``: the optimised null embedding of each step, where there is one)."""
    steps = FusedSteps(denoise, inputs, source_latents, target_cond, cfg, guidance, controller, combine)
    x = _sample(steps, on_step, should_stop)
    last = steps.sigmas[-1]
    return EditResult(to_data_scale(x, last), to_data_scale(steps.source_at(steps.steps), last), steps.rows)
