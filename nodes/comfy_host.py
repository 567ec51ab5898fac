"""The ComfyUI host: installs the pack's attention patch and temporal layers on a
``ModelPatcher`` clone through ComfyUI's sanctioned extension points.

* attention: one ``AttentionPatch`` registered as the ``attn1``/``attn2`` replace of
  every transformer key enumerated from the model (replaces already present are
  chained, a previous inflation's are replaced, never stacked);
* temporal layers: a ``PatcherInjection`` that adds forward hooks on the transformer
  blocks while the clone is patched and removes them when it is unpatched; the base
  model's modules never change;
* video-level GroupNorm (``group_norm=video``, the references' 3-D UNet): a ``DIFFUSION_MODEL``
  wrapper in the clone's model options tells a ``VideoNorm`` the options of the call in progress,
  and a ``PatcherInjection`` shadows the ResNet GroupNorms' ``forward`` while the clone is patched;
* state: a ``T2SState`` attachment (shared by reference between clones, never
  deep-copied).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension
import torch

from ..vp2p import AttentionPatch, LayerKey, SettingsError, T2SSettings, TemporalBank, UnsupportedModelError, is_vp2p_patch
from ..vp2p.attention import sdpa
from ..vp2p.control import RUN_STATE_KEY, RunState
from ..vp2p.frame_attention import FrameMode, FrameWindow
from ..vp2p.frame_chunks import evaluate_in_windows, should_chunk, take_rows, window_run
from ..vp2p.keys import comfy_transformer_keys
from ..vp2p.layout import BatchLayout
from ..vp2p.temporal import BlockShape
from ..vp2p.video_norm import NormScope, VideoNorm, video_norm_paths
from .inference_tensors import ordinary_tensors

log = logging.getLogger("VideoP2P")

STATE_KEY = "vp2p_t2s"
TEMPORAL_INJECTION_KEY = "vp2p_temporal"
NORM_INJECTION_KEY = "vp2p_video_norm"
NORM_WRAPPER_KEY = "vp2p_video_norm"
CHUNK_WRAPPER_KEY = "vp2p_frame_chunks"


def comfy_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, extra_options: Optional[dict] = None) -> torch.Tensor:
    """ComfyUI's configured attention kernel (SDPA, xformers, sage, sub-quadratic …); under autograd,
    PyTorch's SDPA: ComfyUI's split/sub-quadratic CPU kernels choose their slicing by the free memory of
    the moment, which a gradient-checkpointed block's recomputation need not reproduce."""
    if torch.is_grad_enabled():
        return sdpa(q, k, v, heads)
    eo = extra_options or {}
    return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=eo.get("attn_precision"), transformer_options=eo)


@dataclass
class T2SState:
    """What an inflated MODEL carries: its settings, its patch and where its blocks live."""

    settings: T2SSettings
    patch: AttentionPatch
    blocks: dict[LayerKey, str]
    video_norm: Optional[VideoNorm] = None

    @property
    def bank(self) -> Optional[TemporalBank]:
        return self.patch.temporal


def model_name(model: Any) -> str:
    inner = getattr(model, "model", None)
    config = getattr(inner, "model_config", None)
    return f"{type(inner).__name__} ({type(config).__name__})" if config is not None else type(inner).__name__


WHAT_WORKS = ("What works: SD1.x, SD2.x (512 eps and 768 v-prediction) and SDXL-family base models (SDXL, its fine-tunes, "
              "SSD-1B, Segmind Vega, KOALA), eps or v-prediction, with 4 latent channels.")


def refuse_unsupported(model: Any, node: str = "Inflate to T2S") -> None:
    """Refuse, naming the model and why, the MODELs the pack cannot edit with: DiT/MMDiT models (SD3, Flux, video
    DiTs), video UNets with their own temporal layers (SVD), the SDXL refiner, UNets that take extra input channels
    (inpainting, instruct-pix2pix), unCLIP models and samplings other than discrete eps / v-prediction (EDM, flow)."""
    import comfy.model_base as mb

    inner = model.model
    name = model_name(model)
    dm = model.get_model_object("diffusion_model")
    why = None
    if isinstance(inner, mb.SDXLRefiner):
        why = ("it is the SDXL refiner: it is conditioned on an aesthetic score and refines the last steps of an SDXL base "
               "image; it cannot invert or edit a video from noise. Use the SDXL base checkpoint (the refiner can polish "
               "the edited frames afterwards with a KSampler at low denoise)")
    elif not hasattr(dm, "input_blocks") or not hasattr(dm, "output_blocks"):
        why = (f"its diffusion model is a {type(dm).__name__} with no SD-style spatial transformer blocks (an SD-style UNet has "
               "input_blocks/middle_block/output_blocks with spatial transformers): DiT/MMDiT models such as SD3, Flux or "
               "video DiTs have no cross-attention maps per word that the pack can control")
    elif isinstance(inner, mb.SVD_img2vid) or getattr(dm, "use_temporal_resblocks", False):
        why = "it is a video UNet with its own temporal layers (SVD); the pack inflates image UNets"
    elif isinstance(inner, (mb.SD21UNCLIP,)):
        why = "it is an unCLIP model (conditioned on an image embedding), which the pack does not give"
    else:
        channels = getattr(dm, "in_channels", None)
        latent = getattr(inner.latent_format, "latent_channels", 4)
        kind = getattr(inner, "model_type", None)
        if channels is not None and channels != latent:
            why = (f"its UNet takes {channels} input channels, the latent has {latent}: an inpainting (9 channels: latent, mask, "
                   "masked image) or instruct-pix2pix (8) UNet, whose extra inputs the pack does not give. Use the base model of "
                   "the same family")
        elif kind not in (mb.ModelType.EPS, mb.ModelType.V_PREDICTION):
            why = (f"it predicts {getattr(kind, 'name', kind)} (e.g. Playground v2.5's EDM, a flow model); the inversion and edit "
                   "are DDIM on a discrete eps/v-prediction schedule")
    if why is not None:
        raise UnsupportedModelError(f"{node}: the MODEL is {name}; {why}. {WHAT_WORKS}")


def transformer_blocks(model: Any) -> dict[LayerKey, str]:
    """Enumerate the SD-style transformer blocks of a ComfyUI MODEL: key -> module path."""
    refuse_unsupported(model)
    dm = model.get_model_object("diffusion_model")
    keys = comfy_transformer_keys(name for name, _ in dm.named_modules())
    if not keys:
        raise UnsupportedModelError(
            f"The MODEL is {model_name(model)}, which has no SD-style spatial transformer blocks "
            f"(input_blocks/middle_block/output_blocks with transformer_blocks). {WHAT_WORKS}"
        )
    return keys


def check_latent(model: Any, samples: Any, what: str) -> None:
    """Refuse latents the UNet cannot take, before any work: channels and spatial size."""
    if samples is None or samples.dim() != 4 or samples.shape[0] == 0:
        shape = None if samples is None else tuple(samples.shape)
        raise SettingsError(f"{what} needs a LATENT with samples [frames, channels, h, w]; got {shape}. Connect a VAE Encode of the video frames.")
    dm = model.get_model_object("diffusion_model")
    channels = getattr(dm, "in_channels", None)
    if channels is not None and samples.shape[1] != channels:
        raise SettingsError(
            f"{what}: the latent has {samples.shape[1]} channels but this model takes {channels}. Encode the frames with this "
            "checkpoint's VAE."
        )
    h, w = samples.shape[-2:]
    if h < 1 or w < 1:
        raise SettingsError(f"{what}: the latent is {h}×{w}; it needs at least one pixel of latent (8 pixels) each way.")
    # Any size passes: ComfyUI's UNet halves with ceil (stride-2 convolutions) and upsamples to each skip
    # connection's shape, and every per-layer token grid the pack uses is derived the same way (grid_of).


def block_levels(model: Any, blocks: dict[LayerKey, str]) -> dict[LayerKey, int]:
    """How many times the UNet has halved the latent where each transformer block runs, read from the
    module tree: the ``Downsample`` modules before an input block (all of them for the middle block), minus
    the ``Upsample`` modules before an output block."""
    dm = model.get_model_object("diffusion_model")

    def count(seq: Any, kind: str, upto: int) -> int:
        return sum(type(m).__name__ == kind for block in list(seq)[:upto] for m in block.modules())

    total = count(dm.input_blocks, "Downsample", len(dm.input_blocks))
    levels = {}
    for key, path in blocks.items():
        top, index = path.split(".")[:2]
        if top == "input_blocks":
            levels[key] = count(dm.input_blocks, "Downsample", int(index) + 1)
        elif top == "output_blocks":
            levels[key] = total - count(dm.output_blocks, "Upsample", int(index))
        else:
            levels[key] = total
    return levels


def tokens_per_frame(level: int, latent_hw: tuple[int, int]) -> int:
    """Spatial tokens of a block ``level`` halvings down a latent of ``latent_hw`` (each halving rounds up,
    as the UNet's stride-2 convolutions do; ``vp2p.local_blend.grid_of`` reads grids the same way)."""
    h, w = latent_hw
    for _ in range(level):
        h, w = -(-h // 2), -(-w // 2)
    return h * w


def block_shapes(model: Any, blocks: dict[LayerKey, str]) -> dict[LayerKey, BlockShape]:
    dm = model.get_model_object("diffusion_model")
    shapes = {}
    for key, path in blocks.items():
        block = dm.get_submodule(path)
        shapes[key] = BlockShape(dim=block.attn1.to_q.in_features, heads=block.n_heads, dim_head=block.d_head)
    return shapes


def get_state(model: Any) -> Optional[T2SState]:
    state = model.get_attachment(STATE_KEY) if hasattr(model, "get_attachment") else None
    return state if isinstance(state, T2SState) else None


class _TemporalHooks:
    """Adds the temporal layers as forward hooks while the patcher is injected."""

    def __init__(self, patch: AttentionPatch, blocks: dict[LayerKey, str]) -> None:
        self.patch = patch
        self.blocks = blocks
        self.handles: list[Any] = []

    def _hook(self, key: LayerKey) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
            options = kwargs.get("transformer_options")
            if options is None and len(args) > 2:
                options = args[2]
            return self.patch.temporal_block(key, output, options or {})
        hook._vp2p_temporal = True  # type: ignore[attr-defined]
        return hook

    def inject(self, patcher: Any) -> None:
        if self.handles:
            return
        bank = self.patch.temporal
        if bank is not None and bank.device != torch.device(patcher.load_device):
            with torch.inference_mode(False):  # keep ordinary (trainable) tensors
                bank.to(patcher.load_device)  # the bank belongs to this inflation, not to the base model
        dm = patcher.model.diffusion_model
        for key, path in self.blocks.items():
            module = dm.get_submodule(path)
            # At most one temporal layer per block: drop a pack hook another patcher left behind.
            for hook_id, fn in list(module._forward_hooks.items()):
                if getattr(fn, "_vp2p_temporal", False):
                    module._forward_hooks.pop(hook_id, None)
                    module._forward_hooks_with_kwargs.pop(hook_id, None)
            self.handles.append(module.register_forward_hook(self._hook(key), with_kwargs=True))

    def eject(self, patcher: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class _NormHooks:
    """Video-level statistics on the UNet's ResNet GroupNorms while the patcher is injected."""

    def __init__(self, video_norm: VideoNorm) -> None:
        self.video_norm = video_norm

    def inject(self, patcher: Any) -> None:
        dm = patcher.model.diffusion_model
        self.video_norm.remove()  # never twice on a module
        self.video_norm.install(dm.get_submodule(p) for p in video_norm_paths(dm.named_modules()))

    def eject(self, patcher: Any) -> None:
        self.video_norm.remove()


def _norm_wrapper(video_norm: VideoNorm) -> Callable:
    """A ``DIFFUSION_MODEL`` wrapper: the UNet call's transformer options, for the GroupNorms."""

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        options = kwargs.get("transformer_options", args[5] if len(args) > 5 else None)
        with video_norm.call(options or {}):
            return executor(*args, **kwargs)

    return wrapper


def _chunk_wrapper(per_chunk: int, mode: FrameMode, overlap: int = 0) -> Callable:
    """An ``APPLY_MODEL`` wrapper that evaluates a call's videos ``per_chunk`` frames at a time
    (``vp2p.frame_chunks``): every per-row input (latent, timestep, text, ControlNet residuals, the
    model's extra conds such as SDXL's ``y``) is cut to the window's rows and each window runs through
    the rest of the model's wrappers and the UNet with its own run state, the windows of one call
    sharing the anchor frame's keys/values. The conds were processed for the whole batch by ComfyUI."""

    def wrapper(executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None, c_crossattn: Any = None, control: Any = None,
                transformer_options: Optional[dict] = None, **kwargs: Any) -> torch.Tensor:
        options = transformer_options if transformer_options is not None else {}
        run = options.get(RUN_STATE_KEY)
        run = run if isinstance(run, RunState) else None
        layout = BatchLayout.resolve(x.shape[0], options.get("cond_or_uncond"), run.layout if run is not None else None)
        if not should_chunk(run, layout.frames, per_chunk):
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        refuse_chunks_with_motion_modules(options)
        rows = x.shape[0]

        def evaluate(index: torch.Tensor, window: FrameWindow) -> torch.Tensor:
            window_options = dict(options)
            window_options[RUN_STATE_KEY] = window_run(run, window)
            window_options["sigmas"] = take_rows(options.get("sigmas"), index, rows)
            with ordinary_tensors():  # under autograd a window is checkpointed: its recomputation runs outside the call
                    return executor(x[index], take_rows(t, index, rows), take_rows(c_concat, index, rows), take_rows(c_crossattn, index, rows),
                                take_rows(control, index, rows), window_options, **take_rows(kwargs, index, rows))

        return evaluate_in_windows(evaluate, layout.videos, layout.frames, per_chunk, mode, x.device, overlap)

    return wrapper


def motion_modules(model: Any) -> list[str]:
    """Names of the AnimateDiff motion modules on a MODEL: AnimateDiff-Evolved keeps them as the patcher's
    additional models (each a patcher whose model carries ``mm_info``) and injects them into the UNet's
    blocks while it is loaded. Read without importing AnimateDiff-Evolved."""
    names = []
    for group in getattr(model, "additional_models", {}).values():
        for patcher in group:
            info = getattr(getattr(patcher, "model", None), "mm_info", None)
            if info is not None:
                names.append(str(getattr(info, "mm_name", "motion module")))
    return names


def refuse_chunks_with_motion_modules(transformer_options: dict) -> None:
    """Frame chunks cannot run an AnimateDiff motion module: it attends over every frame of the clip (the video
    length AnimateDiff-Evolved set for the run), so a call holding a chunk's frames would be cut wrongly."""
    adgs = transformer_options.get("ADGS")
    group = getattr(adgs, "motion_models", None)
    if group is not None and getattr(group, "models", None):
        raise SettingsError(
            "Inflate to T2S: frames_per_chunk runs the UNet on a part of the clip at a time, but the MODEL carries an AnimateDiff "
            "motion module, which attends over the whole clip at once (its video length). Set frames_per_chunk to 0 for a clip "
            "within the motion module's length, or leave AnimateDiff out of this branch for a longer clip.")


def _fresh_clone(parent: Any, clone: Any) -> None:
    clone.is_injected = False


def inflate(model: Any, settings: T2SSettings, seed: int = 0, temporal_with_motion_module: bool = False) -> Any:
    """Return a clone of ``model`` inflated to a T2S model; ``model`` itself is not touched.

    Inflating an inflated model replaces its settings (the temporal layers, possibly
    tuned, are kept when temporal attention stays on). On a MODEL carrying an AnimateDiff motion
    module (AnimateDiff-Evolved) the motion module is the temporal layer: the pack's own temporal
    layers are left out unless ``temporal_with_motion_module``; frame chunks are refused.
    """
    blocks = transformer_blocks(model)
    modules = motion_modules(model)
    if modules:
        names = ", ".join(modules)
        if settings.frames_per_chunk:
            raise SettingsError(
                f"Inflate to T2S: frames_per_chunk={settings.frames_per_chunk}, but the MODEL carries the AnimateDiff motion module "
                f"{names}, which attends over the whole clip at once; chunks would cut it. Set frames_per_chunk to 0 (a clip within "
                "the motion module's length), or apply AnimateDiff in another branch.")
        if settings.temporal_attention and not temporal_with_motion_module:
            settings = replace(settings, temporal_attention=False)
            log.info("Inflate to T2S: the MODEL carries the AnimateDiff motion module %s, which is the temporal layer; the pack's own "
                     "temporal attention layers are off (temporal_with_motion_module adds them as well).", names)
        else:
            log.info("Inflate to T2S: the MODEL carries the AnimateDiff motion module %s%s.", names,
                     "; the pack's temporal attention layers are added as well" if settings.temporal_attention else "")
    previous_state = get_state(model)
    bank: Optional[TemporalBank] = None
    if settings.temporal_attention:
        if previous_state is not None and previous_state.bank is not None:
            bank = previous_state.bank
        else:
            # ComfyUI executes nodes under inference_mode; the bank must hold ordinary
            # tensors so that it can be trained and versioned later.
            with torch.inference_mode(False):
                bank = TemporalBank(block_shapes(model, blocks), seed=seed)
    if previous_state is not None:
        log.info("Inflate to T2S: the MODEL was already inflated (%s); replacing with %s.",
                 previous_state.settings.describe(), settings.describe())
    clone = install(model.clone(), settings, bank, blocks)
    log.info("Inflate to T2S: %s on %d transformer blocks of %s.", settings.describe(), len(blocks), model_name(model))
    return clone


def install(clone: Any, settings: T2SSettings, bank: Optional[TemporalBank], blocks: dict[LayerKey, str]) -> Any:
    """Register the pack's patch (and temporal hooks for ``bank``) on ``clone`` in place.

    ``clone`` must be a fresh clone the caller owns. Replace functions other nodes put on a
    key are chained; the pack's own earlier patch is replaced, never stacked.
    """
    replaces = clone.model_options.get("transformer_options", {}).get("patches_replace", {})
    chained: dict[tuple[str, LayerKey], Any] = {}
    for kind in ("attn1", "attn2"):
        for key in blocks:
            fn = replaces.get(kind, {}).get((key.block, key.id, key.index))
            if fn is None:
                continue
            if is_vp2p_patch(fn):
                fn = fn.__self__.previous.get((kind, key))
            if fn is not None:
                chained[(kind, key)] = fn
    if chained:
        log.info("Inflate to T2S: chaining %d attention replace(s) installed by other nodes.", len(chained))

    widths = {key: shape.dim for key, shape in block_shapes(clone, blocks).items()}
    patch = AttentionPatch(settings, attention_fn=comfy_sdpa, previous=chained, temporal=bank, block_widths=widths)
    for key in blocks:
        clone.set_model_attn1_replace(patch.attn1, key.block, key.id, key.index)
        clone.set_model_attn2_replace(patch.attn2, key.block, key.id, key.index)

    # ModelPatcher.clone() copies is_injected: a clone of a loaded (injected) parent would think
    # its own injections are in place and never inject them. ComfyUI detaches the parent before
    # loading a clone, so a clone must start un-injected; the callback keeps that for descendants.
    clone.is_injected = False
    clone.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLONE, TEMPORAL_INJECTION_KEY, _fresh_clone)
    clone.remove_injections(TEMPORAL_INJECTION_KEY)
    if bank is not None:
        hooks = _TemporalHooks(patch, blocks)
        clone.set_injections(TEMPORAL_INJECTION_KEY, [comfy.patcher_extension.PatcherInjection(hooks.inject, hooks.eject)])
    clone.remove_injections(NORM_INJECTION_KEY)
    wrappers = clone.model_options.get("transformer_options", {}).get("wrappers", {})
    wrappers.get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {}).pop(NORM_WRAPPER_KEY, None)
    video_norm = None
    if settings.group_norm is NormScope.VIDEO:
        video_norm = VideoNorm()
        norms = _NormHooks(video_norm)
        clone.set_injections(NORM_INJECTION_KEY, [comfy.patcher_extension.PatcherInjection(norms.inject, norms.eject)])
        # In the model options (not the patcher's wrappers, which only samplers merge in): every UNet
        # call made with this MODEL's transformer options carries it, the pack's own loops included.
        comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, NORM_WRAPPER_KEY,
                                                     _norm_wrapper(video_norm), clone.model_options, is_model_options=True)
    wrappers.get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {}).pop(CHUNK_WRAPPER_KEY, None)
    if settings.frames_per_chunk:
        # Outside the UNet (APPLY_MODEL): each window then passes the DIFFUSION_MODEL wrappers (the video
        # GroupNorm) with its own layout.
        comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, CHUNK_WRAPPER_KEY,
                                                     _chunk_wrapper(settings.frames_per_chunk, settings.frame_attention, settings.chunk_overlap),
                                                     clone.model_options, is_model_options=True)
    clone.set_attachments(STATE_KEY, T2SState(settings, patch, blocks, video_norm))
    return clone


def with_pack_patch(model: Any) -> Any:
    """``model`` itself, or — when another node put attention replaces on an inflated MODEL *after*
    Inflate to T2S, replacing the pack's patch on those keys (and with it frame attention and the
    controllers) — a clone with the pack's patch installed again, chaining theirs under it."""
    state = get_state(model)
    if state is None:
        return model
    replaces = model.model_options.get("transformer_options", {}).get("patches_replace", {})
    lost = [(kind, key) for key in state.blocks for kind in ("attn1", "attn2")
            if not is_vp2p_patch(replaces.get(kind, {}).get((key.block, key.id, key.index)))]
    if not lost:
        return model
    log.info("Video-P2P: %d attention replace(s) were put on the MODEL after Inflate to T2S; installing the pack's patch "
             "again on a clone and chaining them under it.", len(lost))
    return install(model.clone(), state.settings, state.bank, state.blocks)


def foreign_parts(model: Any) -> list[str]:
    """What other extensions put on the MODEL's patcher itself (not its options): additional models (AnimateDiff's
    motion modules, ControlNet-like models), injections, wrappers and callbacks that are not the pack's. Each may
    change what the UNet computes at run time (AnimateDiff-Evolved: its motion module, its per-step schedule, its
    sampling function), which a fingerprint of the UNet's weights does not see."""
    own_injections = (TEMPORAL_INJECTION_KEY, NORM_INJECTION_KEY)
    parts = [f"additional_models:{k}" for k, v in getattr(model, "additional_models", {}).items() if v]
    parts += [f"injections:{k}" for k, v in getattr(model, "injections", {}).items() if v and k not in own_injections]
    parts += [f"wrappers:{kind}:{k}" for kind, by_key in getattr(model, "wrappers", {}).items() for k, v in by_key.items() if v]
    parts += [f"callbacks:{kind}:{k}" for kind, by_key in getattr(model, "callbacks", {}).items() for k, v in by_key.items()
              if v and k != TEMPORAL_INJECTION_KEY]
    return sorted(parts)


# Entries of a MODEL's options that change what the UNet computes without changing its weights; the pack's
# own are its attention patch and its GroupNorm wrapper.
_OUTPUT_OPTIONS = ("model_function_wrapper", "sampler_cfg_function", "sampler_post_cfg_function", "sampler_pre_cfg_function",
                   "sampler_calc_cond_batch_function", "context_handler")


def options_cacheable(model: Any) -> bool:
    """Whether a MODEL's options hold nothing but the pack's own patches: a wrapper, CFG function or patch
    another node added changes results without changing the weights a cache key fingerprints — and so does
    what another extension put on the patcher itself (``foreign_parts``: an AnimateDiff motion module and its
    schedule)."""
    from .motion_tuning import MOTION_WRAPPER_KEY

    if foreign_parts(model):
        return False
    options = model.model_options
    if any(options.get(k) for k in _OUTPUT_OPTIONS):
        return False
    to = options.get("transformer_options", {})
    if any(to.get("patches", {}).values()):
        return False
    for fns in to.get("patches_replace", {}).values():
        for fn in fns.values():
            if not is_vp2p_patch(fn) or fn.__self__.previous:
                return False
    for by_key in to.get("wrappers", {}).values():
        if any(fns for key, fns in by_key.items() if key not in (NORM_WRAPPER_KEY, CHUNK_WRAPPER_KEY, MOTION_WRAPPER_KEY)):
            return False
    return True
