"""The diffusers host: the same patch on a diffusers ``UNet2DConditionModel``.

``DiffusersT2S`` registers one attention processor per ``attn1``/``attn2`` module
(each bound to its ``LayerKey``), a forward hook per transformer block for the
temporal layers, and (``group_norm=video``) video-level statistics on the ResNet
GroupNorms (``vp2p.video_norm``). All behaviour is in ``AttentionPatch``; this module only translates
diffusers calls into the patch's ``(q, k, v, extra_options)`` convention, with the
same ``extra_options`` keys ComfyUI provides (``block``, ``block_index``,
``n_heads``, ``cond_or_uncond``, ``sigmas``, ``original_shape``).

SDXL-style UNets (``addition_embed_type="text_time"``) also take a pooled text embedding and six size
numbers per row (``added_cond_kwargs``): ``AddedCond`` gives each video role ``(kind, branch)`` its pooled
output (the source branch the source prompt's, the target branch the target's, the unconditional rows the
negative's) and the size ids; the rows are read from the call's explicit layout, as ComfyUI's host does.

Installing is reversible: ``remove()`` (or leaving the ``with`` block) restores the
UNet's processors and removes the hooks.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .control import RUN_STATE_KEY, RunState
from .errors import LayoutError, RegistrationError, SettingsError, UnsupportedModelError
from .frame_attention import FrameWindow
from .frame_chunks import evaluate_in_windows, should_chunk, take_rows, window_run
from .keys import LayerKey, diffusers_transformer_keys
from .layout import BatchLayout
from .patch import AttentionPatch, T2SSettings
from .temporal import BlockShape, TemporalBank
from .video_norm import NormScope, VideoNorm, video_norm_paths

if TYPE_CHECKING:
    from .tuning import TuneSettings

log = logging.getLogger("VideoP2P")


def diffusers_block_shapes(unet: nn.Module) -> dict[LayerKey, tuple[str, BlockShape]]:
    """Every transformer block of a diffusers UNet: key -> (module path, shape)."""
    layers = getattr(getattr(unet, "config", None), "layers_per_block", None)
    names = [n for n, _ in unet.named_modules()]
    keys = diffusers_transformer_keys(names, layers)
    if not keys:
        raise UnsupportedModelError(
            f"{type(unet).__name__} has no SD-style transformer blocks (down_blocks.*.attentions.*.transformer_blocks.*); "
            "expected a diffusers UNet2DConditionModel of SD1.x/SD2.x/SDXL."
        )
    out: dict[LayerKey, tuple[str, BlockShape]] = {}
    for key, path in keys.items():
        block = unet.get_submodule(path)
        attn = block.attn1
        inner = attn.to_q.out_features
        out[key] = (path, BlockShape(dim=attn.to_q.in_features, heads=attn.heads, dim_head=inner // attn.heads))
    return out


def sdxl_time_ids(height: int, width: int, crop: tuple[int, int] = (0, 0), target: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """SDXL's size conditioning [1, 6] in pixels: original (h, w), crop top-left (top, left), target (h, w) —
    the order of ComfyUI's ``SDXL.encode_adm`` (height, width, crop_h, crop_w, target_height, target_width);
    ``target`` defaults to the original size."""
    th, tw = target if target is not None else (height, width)
    return torch.tensor([[float(height), float(width), float(crop[0]), float(crop[1]), float(th), float(tw)]])


PooledSource = Union[Mapping[tuple[int, int], torch.Tensor], Callable[[int, int], torch.Tensor]]


@dataclass(frozen=True)
class AddedCond:
    """The added conditioning of an SDXL-style UNet (``addition_embed_type="text_time"``).

    ``pooled``: ``(kind, branch) -> [1, P]`` pooled text output of that video role (a mapping or a callable);
    ``time_ids``: [1, 6] size ids (``sdxl_time_ids``), the same for every row."""

    pooled: PooledSource
    time_ids: torch.Tensor

    def pooled_of(self, kind: int, branch: int) -> torch.Tensor:
        """[1, P] pooled output of the video role ``(kind, branch)``."""
        if callable(self.pooled) and not isinstance(self.pooled, Mapping):
            p = self.pooled(kind, branch)
        else:
            p = self.pooled.get((kind, branch))
        if p is None:
            raise LayoutError(f"No pooled text output for the video role (kind={kind}, branch={branch}); the added conditioning names "
                              f"{sorted(self.pooled) if isinstance(self.pooled, Mapping) else 'a callable'}.")
        return p.reshape(1, -1)

    def rows(self, layout: BatchLayout, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``added_cond_kwargs`` of a call: ``text_embeds`` [R, P] (each video's pooled output on its F rows) and
        ``time_ids`` [R, 6], R = videos × frames in the layout's row order."""
        pooled = torch.cat([self.pooled_of(k, b).expand(layout.frames, -1) for k, b in layout.video_roles])
        time_ids = self.time_ids.reshape(1, 6).expand(pooled.shape[0], -1)
        return {"text_embeds": pooled.to(device=device, dtype=dtype), "time_ids": time_ids.to(device=device, dtype=dtype)}


class _Processor:
    """Attention processor bound to one layer; forwards to the shared patch."""

    def __init__(self, host: "DiffusersT2S", key: LayerKey, kind: str) -> None:
        self.host, self.key, self.kind = host, key, kind

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None, **_: Any) -> torch.Tensor:
        if attention_mask is not None:
            raise RegistrationError(f"{self.kind} of {self.key} received an attention mask; the pack's processor does not support masks.")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        delta = self.host.deltas.get((self.kind, self.key))
        # A tuned to_q is the base weight plus a delta the host owns; the UNet is never written.
        q = attn.to_q(hidden_states) if delta is None else F.linear(hidden_states, attn.to_q.weight + delta.to(attn.to_q.weight))
        k, v = attn.to_k(context), attn.to_v(context)
        eo = self.host.extra_options(self.key, attn.heads, q.shape[-1] // attn.heads)
        patch = self.host.patch
        out = patch.attn1(q, k, v, eo) if self.kind == "attn1" else patch.attn2(q, k, v, eo)
        return attn.to_out[1](attn.to_out[0](out))


def _check_attention_module(name: str, attn: nn.Module) -> None:
    unsupported = [a for a in ("spatial_norm", "group_norm", "norm_q", "norm_k") if getattr(attn, a, None) is not None]
    if getattr(attn, "norm_cross", None):
        unsupported.append("norm_cross")
    if getattr(attn, "residual_connection", False):
        unsupported.append("residual_connection")
    if getattr(attn, "rescale_output_factor", 1.0) != 1.0:
        unsupported.append("rescale_output_factor")
    if unsupported:
        raise RegistrationError(
            f"Attention module {name} uses {unsupported}, which SD1.x/SD2.x UNets do not; the pack's processor "
            "cannot reproduce it. Use a standard UNet2DConditionModel."
        )


class DiffusersT2S:
    """Installs the pack's patch (and temporal layers) on a diffusers UNet.

    Usage::

        host = DiffusersT2S(unet, T2SSettings(FrameMode.FIRST_FRAME, True))
        with host:
            eps = host(sample, timestep, text, cond_or_uncond=[1, 0], sigmas=sig)
    """

    def __init__(self, unet: nn.Module, settings: T2SSettings, bank: Optional[TemporalBank] = None,
                 patch: Optional[AttentionPatch] = None, added_cond: Optional[AddedCond] = None) -> None:
        self.unet = unet
        self.added_cond = added_cond  # SDXL-style UNets: pooled output per video role + size ids
        self.blocks = diffusers_block_shapes(unet)
        if settings.temporal_attention and bank is None:
            bank = TemporalBank({k: s for k, (_, s) in self.blocks.items()}).to(next(unet.parameters()).device)
        self.bank = bank if settings.temporal_attention else None
        self.patch = patch or AttentionPatch(settings, temporal=self.bank,
                                             block_widths={k: shape.dim for k, (_, shape) in self.blocks.items()})
        self.deltas: dict[tuple[str, LayerKey], torch.Tensor] = {}  # tuned to_q = base + delta
        self.video_norm = VideoNorm() if settings.group_norm is NormScope.VIDEO else None
        self._options: dict[str, Any] = {}
        self._saved: Optional[dict[str, Any]] = None
        self._hooks: list[Any] = []

    # -- per-call context -------------------------------------------------------------------
    def extra_options(self, key: LayerKey, heads: int, dim_head: int) -> dict[str, Any]:
        eo = dict(self._options)
        eo.update(block=(key.block, key.id), block_index=key.index, n_heads=heads, dim_head=dim_head)
        return eo

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                 cond_or_uncond: Optional[Sequence[int]] = None, sigmas: Optional[torch.Tensor] = None,
                 run: Optional[RunState] = None) -> torch.Tensor:
        """One UNet evaluation with the pack's per-call options; returns the UNet's raw output."""
        if self._saved is None:
            raise RuntimeError("DiffusersT2S is not installed: call install() or use it as a context manager.")
        settings = self.patch.settings
        if settings.frames_per_chunk:
            layout = BatchLayout.resolve(sample.shape[0], cond_or_uncond, run.layout if run is not None else None)
            if should_chunk(run, layout.frames, settings.frames_per_chunk):
                rows = sample.shape[0]

                def evaluate(index: torch.Tensor, window: FrameWindow) -> torch.Tensor:
                    return self(sample[index], take_rows(timestep, index, rows), take_rows(encoder_hidden_states, index, rows),
                                cond_or_uncond, take_rows(sigmas, index, rows), window_run(run, window))

                return evaluate_in_windows(evaluate, layout.videos, layout.frames, settings.frames_per_chunk,
                                           settings.frame_attention, sample.device, settings.chunk_overlap)
        self._options = {"cond_or_uncond": list(cond_or_uncond) if cond_or_uncond is not None else [0],
                         "sigmas": sigmas, "original_shape": list(sample.shape), RUN_STATE_KEY: run or RunState()}
        kwargs: dict[str, Any] = {}
        added = self._added_cond_kwargs(sample, cond_or_uncond, run)
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        try:
            with self.video_norm.call(self._options) if self.video_norm is not None else nullcontext():
                return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs).sample
        finally:
            self._options = {}

    def _added_cond_kwargs(self, sample: torch.Tensor, cond_or_uncond: Optional[Sequence[int]],
                           run: Optional[RunState]) -> Optional[dict[str, torch.Tensor]]:
        """Per-row ``added_cond_kwargs`` of an SDXL-style UNet, each row's video role read from the call's explicit
        layout (``run.layout``; without one, one video per ``cond_or_uncond`` entry); None for SD1.x/SD2.x."""
        text_time = getattr(getattr(self.unet, "config", None), "addition_embed_type", None) == "text_time"
        if self.added_cond is None:
            if text_time:
                raise SettingsError("This UNet is SDXL-style (addition_embed_type='text_time'): it also takes each row's pooled text output "
                                    "and size ids. Give DiffusersT2S an AddedCond (pooled per (kind, branch), sdxl_time_ids).")
            return None
        if not text_time:
            raise SettingsError("An AddedCond was given, but this UNet takes no pooled/size conditioning (addition_embed_type is not 'text_time').")
        layout = BatchLayout.resolve(sample.shape[0], cond_or_uncond, run.layout if run is not None else None)
        return self.added_cond.rows(layout, sample.device, sample.dtype)

    def denoiser(self, alphas_cumprod: torch.Tensor, prediction: str = "eps") -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """``D(x_σ, σ, cond[, cond_or_uncond, run]) -> x0`` in the σ-space convention of ``vp2p.tuning``:
        one conditional video by default, or the rows a sampler composed (one ``cond_or_uncond``
        entry per video, with its ``RunState``). σ must be the σ of an integer training timestep."""
        from .tuning import training_sigmas

        table = training_sigmas(alphas_cumprod)

        def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, cond_or_uncond: Optional[Sequence[int]] = None,
                    run: Optional[RunState] = None) -> torch.Tensor:
            s = sigma.to(x.device).view(-1, 1, 1, 1).float()
            t = int(torch.argmin((table.to(sigma.device) - sigma.flatten()[0].float()).abs()))
            a = torch.rsqrt(1 + s**2)
            dtype = next(self.unet.parameters()).dtype
            out = self((x * a).to(dtype), t, cond.to(dtype), cond_or_uncond=list(cond_or_uncond or [0]), sigmas=sigma, run=run).float()
            if prediction == "v":
                return x * a**2 - s * a * out
            return x - s * out

        return denoise

    # -- installation -----------------------------------------------------------------------
    def install(self) -> "DiffusersT2S":
        if self._saved is not None:
            return self
        processors: dict[str, Any] = {}
        for key, (path, _) in self.blocks.items():
            block = self.unet.get_submodule(path)
            for kind in ("attn1", "attn2"):
                attn = getattr(block, kind, None)
                if attn is None:
                    continue
                _check_attention_module(f"{path}.{kind}", attn)
                processors[f"{path}.{kind}.processor"] = _Processor(self, key, kind)
            if self.bank is not None:
                self._hooks.append(block.register_forward_hook(self._temporal_hook(key)))
        if self.video_norm is not None:
            self.video_norm.install(self.unet.get_submodule(p) for p in video_norm_paths(self.unet.named_modules()))
        self._saved = dict(self.unet.attn_processors)
        full = dict(self._saved)
        full.update(processors)
        self.unet.set_attn_processor(full)
        log.debug("diffusers host: %d attention processors, %d temporal hooks", len(processors), len(self._hooks))
        return self

    def _temporal_hook(self, key: LayerKey):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return self.patch.temporal_block(key, output, self._options)
        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.video_norm is not None:
            self.video_norm.remove()
        if self._saved is not None:
            self.unet.set_attn_processor(self._saved)
            self._saved = None

    def __enter__(self) -> "DiffusersT2S":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def tune_diffusers(host: DiffusersT2S, latents: torch.Tensor, cond: torch.Tensor, alphas_cumprod: torch.Tensor,
                   settings: "TuneSettings", prediction: str = "eps", **kw: Any) -> list[float]:
    """Tune on Video on the diffusers host: trains ``host.deltas`` (to_q of attn1/attn2 of every
    block) and the temporal bank's projections in place (its LayerNorms stay frozen); the
    UNet's own weights are not written."""
    from .tuning import trainable_temporal_parameters, tune

    params: list[torch.Tensor] = []
    for key, (path, _) in host.blocks.items():
        block = host.unet.get_submodule(path)
        for kind in ("attn1", "attn2"):
            w = getattr(block, kind).to_q.weight
            d = host.deltas.get((kind, key))
            if d is None:
                d = host.deltas[(kind, key)] = torch.zeros(w.shape, device=w.device, dtype=torch.float32)
            params.append(d.requires_grad_(True))
    if host.bank is not None:
        params += trainable_temporal_parameters(host.bank)
    frozen = [p.requires_grad for p in host.unet.parameters()]
    for p in host.unet.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            return tune(host.denoiser(alphas_cumprod, prediction), latents, cond, params, alphas_cumprod, settings, prediction, **kw)
    finally:
        for p, flag in zip(host.unet.parameters(), frozen):
            p.requires_grad_(flag)
        for d in host.deltas.values():
            d.requires_grad_(False)
        if host.bank is not None:
            host.bank.requires_grad_(False)
