"""Every UNet evaluation of the pack through ComfyUI's own conditioning path.

A stage of the pack (DDIM inversion and null-text, the edit, tuning, attention maps) runs as the
*sampler* of a ``comfy.samplers.CFGGuider`` (``run_stage``): ComfyUI prepares everything as it does
for a KSampler — the conds converted and processed (area, mask, timestep range, the model's extra
conds such as SDXL's pooled/size embedding), hooks registered, ControlNets/T2I-Adapters/GLIGEN loaded
and cleaned up, the MODEL's wrappers and callbacks merged, the model loaded with a memory estimate for
the rows the stage really runs (partial loading on small cards) — and the stage's loop evaluates the
UNet with ``ComfyDenoiser``:

* each video of a call becomes a cond of the user's CONDITIONING (every extra kept), its text rows
  replaced by the stage's (the prompt-to-prompt rows, the optimised null embedding of a step);
* ComfyUI's per-step sampling function runs them (``evaluate_per_step``: whatever replaced it, e.g.
  AnimateDiff-Evolved's, prepares the step as for a KSampler; then ``calc_cond_batch`` with its wrappers,
  the context handler, ``model_function_wrapper``, or ``sampler_calc_cond_batch_function``): slot 0 the
  conditional videos, slot 1 the unconditional ones, one latent batch holding each branch's rows
  (``LayoutSpec.present``);
* guidance combines through ``sampler_pre_cfg_function`` and ``cfg_function`` (``sampler_cfg_function``,
  post-CFG functions), as ``sampling_function`` does.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence, TypeVar

import comfy.conds
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import torch

from ..vp2p import RUN_STATE_KEY, LayoutError, LayoutSpec, RunState, SettingsError
from ..vp2p.layout import COND, UNCOND
from .inference_tensors import ordinary_tensors

log = logging.getLogger("VideoP2P")

T = TypeVar("T")
MEMORY_WRAPPER_KEY = "vp2p_stage_memory"
SLOTS = (COND, UNCOND)  # calc_cond_batch's slot index is the kind: cond_or_uncond then reads as COND/UNCOND


def bare_conditioning(text: torch.Tensor, pooled: Optional[torch.Tensor] = None) -> list:
    """A CONDITIONING of a text embedding [1|F, T, D] for a stage given none: with the prompt's pooled
    output (``pooled_output``, as CLIP Text Encode gives it) when known, which SDXL-family models turn into
    their ``y`` (pooled + size embedding) in ``extra_conds``; SD1.x/SD2.x ignore it."""
    return [[text, {} if pooled is None else {"pooled_output": pooled}]]


def pooled_of(conditioning: Optional[list]) -> Optional[torch.Tensor]:
    """The pooled text output of a CONDITIONING's first entry (None when it has none)."""
    if not conditioning:
        return None
    pooled = conditioning[0][1].get("pooled_output")
    return None if pooled is None else pooled.detach().float().cpu()


def pooled_in_y(model: Any) -> int:
    """How many leading columns of the model's ``y`` are the prompt's pooled output: SDXL-family models
    (``model_base.SDXL``: y = [pooled 1280, 6 × 256 size/crop embedding]); 0 for a model whose extra
    conditioning does not follow the prompt (SD1.x/SD2.x have no ``y``)."""
    import comfy.model_base

    return 1280 if isinstance(model, comfy.model_base.SDXL) else 0


def check_pooled(model_patcher: Any, conds: dict[str, Optional[list]], node: str) -> None:
    """An SDXL-family MODEL needs every CONDITIONING with its pooled output (its ``y``): refuse clearly
    before ComfyUI's ``extra_conds`` fails with a bare KeyError."""
    from .comfy_host import model_name

    if not pooled_in_y(model_patcher.model):
        return
    for name, cond in conds.items():
        if cond and any("pooled_output" not in entry[1] for entry in cond):
            raise SettingsError(
                f"{node}: the MODEL is {model_name(model_patcher)}, an SDXL-family model, whose UNet also takes the prompt's pooled CLIP-G "
                f"output and the image size; the {name} text here has none (an inversion made before this version, or a CLIP that is no "
                f"SDXL CLIP). Encode the prompts with the SDXL checkpoint's CLIP (CLIP Text Encode), invert again, or connect the {name} "
                "CONDITIONING to this node.")


def branch_pooled(edit: Any) -> dict[tuple[int, int], Optional[torch.Tensor]]:
    """The conditional rows' pooled outputs of a P2P edit: the source branch the source prompt's, the target
    branch the target prompt's (the unconditional rows keep their CONDITIONING's)."""
    from ..vp2p.layout import SOURCE, TARGET

    return {(COND, SOURCE): edit.source_pooled, (COND, TARGET): edit.target_pooled}


class _ConstantControl:
    """A ControlNet/T2I-Adapter of a cond, its residuals computed without gradient. In the pack's
    backward passes (tuning, null-text) its weights are ComfyUI's inference tensors, which autograd
    cannot use; the residuals enter the UNet as constants (the null-text gradient does not flow back
    through the ControlNet's own use of the null embedding)."""

    def __init__(self, control: Any) -> None:
        self.control = control

    def get_control(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.control.get_control(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.control, name)


def with_text(conds: Sequence[dict], text: torch.Tensor, pooled: Optional[torch.Tensor] = None) -> list[dict]:
    """Processed cond dicts with their text rows replaced by ``text`` [R, T, D]; every other entry
    (control, gligen, area, mask, hooks, timestep range, the model's other extra conds) is kept. Under
    autograd a control's residuals are constants (``_ConstantControl``). ``pooled`` [R, P]: the rows'
    pooled outputs, which replace the first P columns of the model's ``y`` (SDXL: the size/crop
    embedding of the user's CONDITIONING is kept)."""
    out = []
    for c in conds:
        d = dict(c)
        if torch.is_grad_enabled() and d.get("control") is not None and not isinstance(d["control"], _ConstantControl):
            d["control"] = _ConstantControl(d["control"])
        model_conds = dict(d.get("model_conds", {}))
        model_conds["c_crossattn"] = comfy.conds.CONDCrossAttn(text)
        y = model_conds.get("y")
        if pooled is not None and y is not None:
            rows = y.cond.expand(text.shape[0], -1) if y.cond.shape[0] == 1 else y.cond
            if rows.shape[0] != text.shape[0]:
                raise LayoutError(f"The CONDITIONING's y has {y.cond.shape[0]} rows; the call {text.shape[0]}.")
            model_conds["y"] = comfy.conds.CONDRegular(torch.cat([pooled.to(rows), rows[:, pooled.shape[1]:]], dim=1))
        d["model_conds"] = model_conds
        d["cross_attn"] = text
        out.append(d)
    return out


STEP_CAPTURE_KEY = "vp2p_step_capture"


def _discarded_cfg(args: dict) -> torch.Tensor:
    return args["cond"]


def evaluate_per_step(model: Any, slots: list[Optional[list[dict]]], x_in: torch.Tensor, sigma_in: torch.Tensor,
                      options: dict) -> list[torch.Tensor]:
    """``calc_cond_batch``'s outputs for ``slots`` (index ``COND``, ``UNCOND``), evaluated through the sampling
    function a KSampler's ``CFGGuider`` calls at every step (``comfy.samplers.sampling_function``, looked up at
    call time): extensions that prepare each step there — AnimateDiff-Evolved replaces it to apply its motion
    models' start/end percent, scale/effect keyframes and special models at the step's sigma — act on the
    pack's UNet calls exactly as on a KSampler's. The conditional and unconditional predictions are taken
    from the outermost ``CALC_COND_BATCH`` wrapper (or a ``sampler_calc_cond_batch_function``); the guidance
    that function would combine is discarded (its CFG, pre- and post-CFG functions are left out of the
    call: the stage combines its own rows, with the user's CFG functions, in ``ComfyDenoiser.cfg``)."""
    captured: list[list[torch.Tensor]] = []

    def capture(executor: Any, *args: Any, **kwargs: Any) -> Any:
        out = executor(*args, **kwargs)
        captured.append(out)
        return out

    probe = dict(options)
    to = dict(probe.get("transformer_options", {}))
    wrappers = dict(to.get("wrappers", {}))
    kind = comfy.patcher_extension.WrappersMP.CALC_COND_BATCH
    wrappers[kind] = {STEP_CAPTURE_KEY: [capture], **{k: v for k, v in wrappers.get(kind, {}).items() if k != STEP_CAPTURE_KEY}}
    to["wrappers"] = wrappers
    probe["transformer_options"] = to
    custom = options.get("sampler_calc_cond_batch_function")
    if custom is not None:
        probe["sampler_calc_cond_batch_function"] = lambda args: capture(lambda *a, **k: custom(args))
    probe["sampler_cfg_function"] = _discarded_cfg
    probe["sampler_pre_cfg_function"] = []
    probe["sampler_post_cfg_function"] = []
    probe["disable_cfg1_optimization"] = True  # both slots are evaluated whatever the scale
    comfy.samplers.sampling_function(model, x_in, sigma_in, slots[UNCOND], slots[COND], 2.0, model_options=probe, seed=None)
    if not captured:
        raise SettingsError(
            "ComfyUI's sampling function (comfy.samplers.sampling_function) was replaced by another extension with one that never "
            "evaluates the model through calc_cond_batch; the pack's stages cannot take their predictions from it. Remove that "
            "extension's node from this branch of the graph.")
    return captured[0]


def refuse_foreign_windows(model_options: dict, node: str) -> None:
    """Refuse AnimateDiff-Evolved's sliding context windows (its context options): they cut the latent batch into
    windows of ``full_length`` frames, while a stage's UNet calls hold several videos (branches × cond/uncond)."""
    adgs = model_options.get("transformer_options", {}).get("ADGS")
    using = getattr(adgs, "is_using_sliding_context", None)
    if callable(using) and using():
        raise SettingsError(
            f"{node}: the MODEL carries AnimateDiff-Evolved context options (sliding context windows), which cut a latent batch "
            "into windows of frames. This stage's UNet calls hold several videos (source and target branches, cond and uncond) "
            "in one batch, which those windows would mix up. For long videos set frames_per_chunk on Inflate to T2S instead "
            "without a motion module, or give AnimateDiff no context options (a clip within the motion module's length).")


class ComfyDenoiser:
    """The ``vp2p.denoise.Denoiser`` and ``Combine`` of a stage running inside ``run_stage``.

    ``templates``: the processed cond dicts of each kind (the user's positive for ``COND``, negative for
    ``UNCOND``). Videos of one branch share their latent (they are one branch's rows under different
    conditioning), so the call's latent batch holds each branch once; every kind must hold the same
    branches (``calc_cond_batch`` evaluates one latent batch under every slot)."""

    def __init__(self, model: Any, model_options: dict, templates: dict[int, Optional[list[dict]]]) -> None:
        self.model = model
        self.model_options = model_options
        self.templates = templates
        self.calls = 0
        # (kind, branch) -> that video's pooled text output [1, P], for models whose y holds it (SDXL)
        self.pooled: dict[tuple[int, int], Optional[torch.Tensor]] = {}

    def _template(self, kind: int) -> list[dict]:
        conds = self.templates.get(kind)
        if not conds:
            raise SettingsError(f"This stage has no {'positive' if kind == COND else 'negative'} CONDITIONING to evaluate the "
                                "UNet with; connect one.")
        return conds

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, kinds: Optional[Sequence[int]] = None,
                 run: Optional[RunState] = None) -> torch.Tensor:
        layout = run.layout if run is not None else None
        videos = len(kinds) if kinds else (len(layout.roles) if layout is not None and layout.roles else 1)
        frames = layout.frames if layout is not None else x.shape[0] // videos
        if layout is not None and layout.roles is not None:
            roles = tuple(layout.roles)
        else:
            roles = tuple((int(k), 0) for k in (kinds or [COND] * videos))
        if context.shape[0] == 1 and x.shape[0] > 1:  # one text for every row
            context = context.expand(x.shape[0], *context.shape[1:])
        if len(roles) * frames != x.shape[0]:
            raise LayoutError(f"{x.shape[0]} rows do not hold {len(roles)} videos of {frames} frames.")
        branches = sorted({b for _, b in roles})
        latent_of: dict[int, torch.Tensor] = {}
        text_of: dict[tuple[int, int], torch.Tensor] = {}
        for n, role in enumerate(roles):
            rows = slice(n * frames, (n + 1) * frames)
            latent_of.setdefault(role[1], x[rows])
            text_of[role] = context[rows]
        x_in = torch.cat([latent_of[b] for b in branches])
        slots: list[Optional[list[dict]]] = [None, None]
        for kind in SLOTS:
            held = [b for k, b in roles if k == kind]
            if not held:
                continue
            if sorted(held) != branches:
                raise LayoutError(f"The {'conditional' if kind == COND else 'unconditional'} videos hold branches {sorted(held)}, the "
                                  f"call {branches}: through ComfyUI every kind must hold the same branches.")
            slots[kind] = with_text(self._template(kind), torch.cat([text_of[(kind, b)] for b in branches]), self._pooled_rows(kind, branches, frames))
        spec = LayoutSpec(frames, max(branches) + 1, present=tuple(branches))
        options = dict(self.model_options)
        options["transformer_options"] = {**self.model_options.get("transformer_options", {}),
                                           RUN_STATE_KEY: RunState(run.controller if run is not None else None, spec)}
        sigma_in = sigma.reshape(-1)[:1].expand(x_in.shape[0]).to(x_in)
        refuse_foreign_windows(options, "This stage")
        with ordinary_tensors():  # under autograd: what other nodes put into the UNet may hold inference tensors
            out = evaluate_per_step(self.model, slots, x_in, sigma_in, options)
        self.calls += 1
        result = []
        for kind, branch in roles:
            pos = branches.index(branch)
            result.append(out[kind][pos * frames:(pos + 1) * frames])
        return torch.cat(result)

    def _pooled_rows(self, kind: int, branches: list[int], frames: int) -> Optional[torch.Tensor]:
        """[branches × frames, P] pooled outputs of ``kind``'s videos, or None (the template's y as it is)."""
        width = pooled_in_y(self.model) if self.model is not None else 0
        given = [self.pooled.get((kind, b)) for b in branches]
        if not width or all(p is None for p in given):
            return None
        if any(p is None for p in given):
            raise LayoutError(f"Pooled outputs are known for some branches of kind {kind} only.")
        return torch.cat([p.reshape(1, -1)[:, :width].expand(frames, -1) for p in given])

    def cfg(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Guidance as ``sampling_function`` combines it: pre-CFG functions, then ``cfg_function``."""
        sig = sigma.reshape(-1)[:1].expand(x.shape[0]).to(x)
        conds = [self.templates.get(COND), self.templates.get(UNCOND)]
        out = [cond, uncond]
        for fn in self.model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": conds, "conds_out": out, "cond_scale": scale, "timestep": sig, "input": x, "sigma": sig,
                      "model": self.model, "model_options": self.model_options})
        return comfy.samplers.cfg_function(self.model, out[0], out[1], scale, x, sig, model_options=self.model_options,
                                           cond=conds[0], uncond=conds[1])


class Stage:
    """What a stage's loop gets inside ComfyUI's sampling setup."""

    def __init__(self, guider: "StageGuider", model_options: dict, latent: torch.Tensor, sigmas: torch.Tensor) -> None:
        self.guider = guider
        self.model = guider.inner_model  # the BaseModel (apply_model, latent format, model sampling)
        self.model_options = model_options
        self.latent = latent  # the stage's latent after ComfyUI's process_latent_in (zeros are left as they are)
        self.sigmas = sigmas
        self.device = guider.model_patcher.load_device

    def conds(self, name: str) -> Optional[list[dict]]:
        return self.guider.conds.get(name)

    def denoiser(self, cond: str = "positive", uncond: str = "negative") -> ComfyDenoiser:
        return ComfyDenoiser(self.model, self.model_options, {COND: self.conds(cond), UNCOND: self.conds(uncond)})


class _StageSampler(comfy.samplers.Sampler):
    """Runs a stage's loop where a sampler would run; its result is kept, not returned to the guider."""

    def __init__(self, loop: Callable[[Stage], Any], node: str = "This node") -> None:
        self.loop = loop
        self.node = node
        self.result: Any = None

    def sample(self, model_wrap: Any, sigmas: torch.Tensor, extra_args: dict, callback: Any, noise: torch.Tensor,
               latent_image: Optional[torch.Tensor] = None, denoise_mask: Any = None, disable_pbar: bool = False) -> torch.Tensor:
        refuse_foreign_windows(extra_args["model_options"], self.node)  # before any work
        self.result = self.loop(Stage(model_wrap, extra_args["model_options"], latent_image, sigmas))
        return latent_image


def estimate_memory_for(model_options: dict, rows: int, frames_per_chunk: int = 0) -> None:
    """Make ComfyUI's model loading estimate memory for ``rows`` UNet rows at once (a ``PREPARE_SAMPLING``
    wrapper in ``model_options``): its own estimate assumes cond + uncond of one latent batch, while a
    stage runs its own row count (the edit: uncond and cond of two branches). With ``frames_per_chunk`` a
    video of F frames (the latent's batch) runs in windows: rows × chunk / F at once."""

    def memory(executor: Any, model: Any, noise_shape: Any, conds: Any, *args: Any, **kwargs: Any) -> Any:
        frames = int(noise_shape[0])
        now = -(-rows * frames_per_chunk // frames) if 0 < frames_per_chunk < frames else rows
        shape = [max(1, (now + 1) // 2)] + list(noise_shape[1:])  # prepare_sampling estimates for 2 × the batch
        return executor(model, shape, conds, *args, **kwargs)

    comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, MEMORY_WRAPPER_KEY, memory,
                                                 model_options, is_model_options=True)


class StageGuider(comfy.samplers.CFGGuider):
    """A ``CFGGuider`` whose sampling run is one of the pack's stages; ``memory_rows``: the UNet rows the
    stage runs at once (× ``backward_factor`` when it runs backward passes), for ComfyUI's memory estimate."""

    def __init__(self, model_patcher: Any, memory_rows: int, backward_factor: float = 1.0) -> None:
        from .comfy_host import get_state

        super().__init__(model_patcher)
        self.model_options = comfy.model_patcher.create_model_options_clone(model_patcher.model_options)
        state = get_state(model_patcher)
        estimate_memory_for(self.model_options, max(1, int(round(memory_rows * backward_factor))),
                            state.settings.frames_per_chunk if state is not None else 0)


def run_stage(model_patcher: Any, conds: dict[str, list], latent: torch.Tensor, sigmas: torch.Tensor, loop: Callable[[Stage], T],
              memory_rows: int, backward_factor: float = 1.0, node: str = "This node") -> T:
    """Run ``loop(stage)`` inside ComfyUI's sampling setup for ``model_patcher`` with the CONDITIONING
    ``conds`` (e.g. ``{"positive": …, "negative": …}``). ``latent`` [F, C, h, w] (model space; the stage
    sees it after ``process_latent_in``) gives the conds their size; ``sigmas`` the run's schedule."""
    from .comfy_host import with_pack_patch

    check_pooled(model_patcher, conds, node)
    if model_patcher.model_options.get("context_handler") is not None:
        raise SettingsError(
            f"{node}: the MODEL carries core's context windows (a Context Windows node), which cut a latent batch into "
            "windows of frames. This stage's UNet calls hold several videos (source and target branches, cond and uncond) "
            "in one batch, which those windows would mix up. For long videos set frames_per_chunk on Inflate to T2S "
            "instead (exact frame attention, bounded memory), and leave the Context Windows node out of this branch "
            "of the graph.")
    guider = StageGuider(with_pack_patch(model_patcher), memory_rows, backward_factor)
    guider.inner_set_conds({k: v for k, v in conds.items() if v is not None})
    sampler = _StageSampler(loop, node)
    latent = latent.float()
    guider.sample(torch.zeros_like(latent), latent, sampler, sigmas.float().cpu(), disable_pbar=True, seed=0)
    return sampler.result
