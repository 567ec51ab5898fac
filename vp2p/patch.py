"""The one attention patch.

A single ``AttentionPatch`` serves every ``attn1`` and ``attn2`` of the UNet and
every temporal layer. Hosts call ``attn1``/``attn2`` with the projected
``q, k, v: [B, N, H·D]`` and the block's ``extra_options`` (ComfyUI's replace-patch
signature) and ``temporal_block`` with a transformer block's output. It

1. identifies the layer from ``extra_options`` (``LayerKey``) and the rows from an
   explicit ``BatchLayout`` (``cond_or_uncond`` × branches × frames);
2. applies frame attention to ``attn1`` (T2S; per block: blocks narrower than
   ``frame_attention_min_channels`` keep per-frame self-attention);
3. lets the run's controller override or edit the attention;
4. otherwise runs the fast path: a replace function that another node installed
   earlier on the key (chained, never dropped), or the host's SDPA kernel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from .attention import AttentionFn, apply_probabilities, attention_probabilities, sdpa
from .control import ATTN1, ATTN2, RUN_STATE_KEY, TEMPORAL, AttentionCall, AttentionController, RunState
from .errors import RegistrationError, SettingsError
from .frame_attention import FrameAttentionInputs, FrameMode, frame_attention_inputs, per_row_keys
from .keys import LayerKey
from .layout import BatchLayout
from .temporal import TemporalBank
from .video_norm import NormScope

log = logging.getLogger("VideoP2P")

# A replace function as ComfyUI calls it: (q, k, v, extra_options) -> out
ReplaceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]


@dataclass(frozen=True)
class T2SSettings:
    """How the image model is inflated to a text-to-set model.

    ``group_norm``: ``video`` pools the ResNet GroupNorms' statistics over each video's frames, as
    the references' 3-D UNet does (``vp2p.video_norm``); ``frame`` keeps the image model's.
    ``frame_attention_min_channels``: blocks narrower than this keep plain per-frame
    self-attention (FateZero's ``least_sc_channel``: 640 in most of its configs, which leaves
    SD1.x's 320-channel blocks alone); 0 gives every block frame attention."""

    frame_attention: FrameMode = FrameMode.FIRST_FRAME
    temporal_attention: bool = True
    group_norm: NormScope = NormScope.VIDEO
    frame_attention_min_channels: int = 0

    def __post_init__(self) -> None:
        if self.frame_attention_min_channels < 0:
            raise SettingsError(f"frame_attention_min_channels={self.frame_attention_min_channels} must be ≥ 0 "
                                "(0: frame attention in every block; FateZero: 640).")

    def frame_mode_for(self, width: int) -> FrameMode:
        """The frame attention of a transformer block ``width`` channels wide."""
        return self.frame_attention if width >= self.frame_attention_min_channels else FrameMode.NONE

    def describe(self) -> str:
        text = (f"frame_attention={self.frame_attention.value}, temporal_attention={self.temporal_attention}, "
                f"group_norm={self.group_norm.value}")
        if self.frame_attention_min_channels:
            text += f", frame_attention_min_channels={self.frame_attention_min_channels}"
        return text


class AttentionPatch:
    """The attention replace function of the pack (see the module docstring)."""

    def __init__(
        self,
        settings: T2SSettings,
        attention_fn: AttentionFn = sdpa,
        previous: Optional[Mapping[tuple[str, LayerKey], ReplaceFn]] = None,
        temporal: Optional[TemporalBank] = None,
        block_widths: Optional[Mapping[LayerKey, int]] = None,
    ) -> None:
        """``block_widths``: each transformer block's channels (``BlockShape.dim``), which the host
        knows; needed when ``settings.frame_attention_min_channels`` is set."""
        self.settings = settings
        self.attention_fn = attention_fn
        self.previous: dict[tuple[str, LayerKey], ReplaceFn] = dict(previous or {})
        self.temporal = temporal
        if settings.frame_attention_min_channels and block_widths is None:
            raise SettingsError("frame_attention_min_channels needs the width of every transformer block; the host must pass "
                                "block_widths to AttentionPatch.")
        # Per-layer frame attention, decided once at install time (None: the same in every block).
        self.frame_modes: Optional[dict[LayerKey, FrameMode]] = (
            {k: settings.frame_mode_for(w) for k, w in block_widths.items()}
            if settings.frame_attention_min_channels and block_widths is not None else None)

    def frame_mode(self, key: LayerKey) -> FrameMode:
        """The frame attention of the block ``key`` (``none`` where it is narrower than the minimum)."""
        if self.frame_modes is None:
            return self.settings.frame_attention
        mode = self.frame_modes.get(key)
        if mode is None:
            raise RegistrationError(f"The attention patch was called for {key}, which is not among the {len(self.frame_modes)} "
                                    "transformer blocks it was installed on. Inflate the MODEL again.")
        return mode

    # -- entry points -----------------------------------------------------------------
    def attn1(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        """Frame (self) attention of one block: q/k/v [B, N, H·D] -> [B, N, H·D]."""
        return self._dispatch(ATTN1, q, k, v, extra_options)

    def attn2(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        """Cross attention of one block: q [B, N, H·D], k/v [B, T, H·D] -> [B, N, H·D]."""
        return self._dispatch(ATTN2, q, k, v, extra_options)

    def temporal_block(self, key: LayerKey, x: torch.Tensor, extra_options: Mapping[str, Any]) -> torch.Tensor:
        """Temporal attention after a transformer block: x [B, N, C] -> [B, N, C]."""
        if self.temporal is None or key not in self.temporal:
            return x
        run = self._run(extra_options)
        layout = BatchLayout.resolve(x.shape[0], extra_options.get("cond_or_uncond"), run.layout)
        controller = run.controller
        if controller is None:
            return self.temporal[key](x, layout.videos, layout.frames)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
            call = AttentionCall(TEMPORAL, key, heads, layout, self.frame_mode(key), extra_options)
            return self._attend(call, controller, q, k, v, extra_options, None)

        return self.temporal[key](x, layout.videos, layout.frames, attend)

    # -- internals --------------------------------------------------------------------
    @staticmethod
    def _run(extra_options: Mapping[str, Any]) -> RunState:
        run = extra_options.get(RUN_STATE_KEY)
        return run if isinstance(run, RunState) else RunState()

    def _dispatch(self, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        key = LayerKey.from_extra_options(extra_options)
        heads = int(extra_options["n_heads"])
        run = self._run(extra_options)
        layout = BatchLayout.resolve(q.shape[0], extra_options.get("cond_or_uncond"), run.layout)
        mode = self.frame_mode(key) if kind == ATTN1 else FrameMode.NONE
        inputs = frame_attention_inputs(q, k, v, layout.videos, layout.frames, mode)
        call = AttentionCall(kind, key, heads, layout, mode if layout.frames > 1 else FrameMode.NONE, extra_options)
        return self._attend(call, run.controller, inputs.q, inputs.k, inputs.v, extra_options, inputs)

    def _attend(
        self,
        call: AttentionCall,
        controller: Optional[AttentionController],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        extra_options: Mapping[str, Any],
        inputs: Optional[FrameAttentionInputs],
    ) -> torch.Tensor:
        restore = inputs.restore if inputs is not None else (lambda t: t)
        if controller is not None:
            out = controller.override(call, q, k, v)
            if out is not None:
                return restore(out)
            if controller.needs_probabilities(call):
                probs = controller.edit_probabilities(call, attention_probabilities(q, k, call.heads))
                return restore(apply_probabilities(probs, v, call.heads))
        previous = self.previous.get((call.kind, call.key))
        if previous is not None and inputs is not None:
            # Chained patches expect ordinary row-aligned inputs.
            qr, kr, vr = per_row_keys(inputs, call.layout.frames)
            return previous(qr, kr, vr, dict(extra_options))
        return restore(self.attention_fn(q, k, v, call.heads, extra_options))


def is_vp2p_patch(fn: Any) -> bool:
    """Whether a registered replace function is a bound method of an ``AttentionPatch``."""
    return isinstance(getattr(fn, "__self__", None), AttentionPatch)
