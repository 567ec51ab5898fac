"""The one attention patch.

A single ``AttentionPatch`` serves every ``attn1`` and ``attn2`` of the UNet and
every temporal layer. Hosts call ``attn1``/``attn2`` with the projected
``q, k, v: [B, N, H·D]`` and the block's ``extra_options`` (ComfyUI's replace-patch
signature) and ``temporal_block`` with a transformer block's output. It

1. identifies the layer from ``extra_options`` (``LayerKey``) and the rows from an
   explicit ``BatchLayout`` (``cond_or_uncond`` × branches × frames);
2. applies frame attention to ``attn1`` (T2S; per block: blocks narrower than
   ``frame_attention_min_channels`` keep per-frame self-attention);
3. lets the run's controller compute the videos it edits (``override`` returns only those);
4. computes every other row as it would run without the controller: a replace function
   that another node installed earlier on the key (chained, never dropped, called with every
   row; on edited videos its contribution is added to the controller's output), else the
   host's configured attention kernel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from .attention import AttentionFn, apply_probabilities, attention_probabilities, sdpa
from .control import ATTN1, ATTN2, RUN_STATE_KEY, TEMPORAL, AttentionCall, AttentionController, RunState, VideoOutputs
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
    SD1.x's 320-channel blocks alone); 0 gives every block frame attention.
    ``frames_per_chunk``: a host evaluates longer videos this many frames at a time
    (``vp2p.frame_chunks``); 0: every frame in one call. ``chunk_overlap``: frames consecutive chunks
    share, their outputs blended."""

    frame_attention: FrameMode = FrameMode.FIRST_FRAME
    temporal_attention: bool = True
    group_norm: NormScope = NormScope.VIDEO
    frame_attention_min_channels: int = 0
    frames_per_chunk: int = 0
    chunk_overlap: int = 0

    def __post_init__(self) -> None:
        if self.frame_attention_min_channels < 0:
            raise SettingsError(f"frame_attention_min_channels={self.frame_attention_min_channels} must be ≥ 0 "
                                "(0: frame attention in every block; FateZero: 640).")
        if self.frames_per_chunk < 0:
            raise SettingsError(f"frames_per_chunk={self.frames_per_chunk} must be ≥ 0 (0: every frame in one UNet call; "
                                "8 or 16: long videos in bounded memory).")
        if self.chunk_overlap < 0 or (self.chunk_overlap and self.chunk_overlap >= max(self.frames_per_chunk, 1)):
            raise SettingsError(f"chunk_overlap={self.chunk_overlap} must be ≥ 0 and smaller than frames_per_chunk={self.frames_per_chunk} "
                                "(the frames consecutive chunks share; e.g. a quarter of the chunk).")

    def frame_mode_for(self, width: int) -> FrameMode:
        """The frame attention of a transformer block ``width`` channels wide."""
        return self.frame_attention if width >= self.frame_attention_min_channels else FrameMode.NONE

    def describe(self) -> str:
        text = (f"frame_attention={self.frame_attention.value}, temporal_attention={self.temporal_attention}, "
                f"group_norm={self.group_norm.value}")
        if self.frame_attention_min_channels:
            text += f", frame_attention_min_channels={self.frame_attention_min_channels}"
        if self.frames_per_chunk:
            text += f", frames_per_chunk={self.frames_per_chunk}"
        if self.chunk_overlap:
            text += f", chunk_overlap={self.chunk_overlap}"
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
            call = AttentionCall(TEMPORAL, key, heads, layout, self.frame_mode(key), extra_options, self.attention_fn, run.window)
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
        window = run.window
        inputs = frame_attention_inputs(q, k, v, layout.videos, layout.frames, mode, window, key)
        total = window.total if window is not None else layout.frames
        call = AttentionCall(kind, key, heads, layout, mode if total > 1 else FrameMode.NONE, extra_options, self.attention_fn, window)
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
        """q/k/v in attention space (``inputs``: how attn1's frame attention regrouped them; ``None``
        for attn2 and temporal, whose rows are not regrouped) -> the output in row space."""
        restore = inputs.restore if inputs is not None else (lambda t: t)
        owned: VideoOutputs = {}
        if controller is not None:
            owned = controller.override(call, q, k, v) or {}
            if not owned and controller.needs_probabilities(call):
                probs = controller.edit_probabilities(call, attention_probabilities(q, k, call.heads))
                return restore(apply_probabilities(probs, v, call.heads))
        if owned:
            self._check_owned(call, owned, q, v)
        previous = self.previous.get((call.kind, call.key)) if inputs is not None else None
        if previous is None:
            return restore(self._fill(call, owned, q, k, v))
        # Another node's replace function: it sees every row, row-aligned, with the call's own
        # options (its batch is the batch it expects). A video the controller edits gets the
        # controller's output plus what the other patch adds there (its output minus the plain
        # attention of those rows), so an additive patch (IPAdapter's image attention, a bias)
        # keeps working on edited rows and an identity edit gives exactly the other patch's result.
        qr, kr, vr = per_row_keys(inputs, call.layout.frames)
        out = previous(qr, kr, vr, dict(extra_options))
        if not owned:
            return out
        plain = restore(self._fill(call, {}, q, k, v, only=sorted(owned)))
        edited = restore(self._fill(call, owned, q, k, v, only=sorted(owned)))
        frames = call.layout.frames
        out = out.clone()
        for video in owned:
            rows = slice(video * frames, (video + 1) * frames)
            out[rows] = edited[rows] + (out[rows] - plain[rows])
        return out

    @staticmethod
    def _check_owned(call: AttentionCall, owned: VideoOutputs, q: torch.Tensor, v: torch.Tensor) -> None:
        per = call.per_video(q)
        want = (per, q.shape[1], v.shape[2])
        for video, out in owned.items():
            if not 0 <= video < call.layout.videos or tuple(out.shape) != want:
                raise RegistrationError(
                    f"A controller returned {list(out.shape)} for video {video} of {call.kind} {call.key}; the call has "
                    f"{call.layout.videos} videos of shape {list(want)}. This is a bug in the controller."
                )

    @staticmethod
    def _fill(call: AttentionCall, owned: VideoOutputs, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              only: Optional[list[int]] = None) -> torch.Tensor:
        """The attention-space output [A, Nq, H·D]: the owned videos' given outputs, every other video
        through the host's kernel (consecutive videos in one call). ``only``: compute just these videos
        (the other rows are left uninitialised)."""
        per = call.per_video(q)
        if not owned and only is None:
            return call.attend(q, k, v)
        out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=v.dtype, device=v.device)
        wanted = range(call.layout.videos) if only is None else only
        for video in wanted:
            if video in owned:
                out[video * per:(video + 1) * per] = owned[video].to(out.dtype)
        for start, end in _runs([i for i in wanted if i not in owned]):
            rows = slice(start * per, (end + 1) * per)
            out[rows] = call.attend(q[rows], k[rows], v[rows])
        return out


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted indices: [0, 1, 3] -> [(0, 1), (3, 3)]."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def is_vp2p_patch(fn: Any) -> bool:
    """Whether a registered replace function is a bound method of an ``AttentionPatch``."""
    return isinstance(getattr(fn, "__self__", None), AttentionPatch)
