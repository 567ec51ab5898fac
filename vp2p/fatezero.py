"""FateZero attention fusion (FateZero §3.2): edit a video zero-shot by fusing the source
attention stored during its inversion into the target's denoising.

Only the target branch is denoised; at step ``i`` (found by sigma) the controller reads the
store's step ``i`` — the attention the inversion computed on the inverted latent at the same
sigma, recorded in the reverse order. On the conditional target rows, for the stored layers:

* cross-attention (``attn2``) while the cross-replace window is open: the target's maps are
  rebuilt from the stored source maps as in prompt-to-prompt (replace / refine, re-weight);
* self-attention (``attn1``, the spatial-temporal frame attention) during the first
  ``self_replace`` of the steps: ``M·edit + (1−M)·source`` per query position, where the
  source's attention output is ``SDPA(q_src, k_src, v_edit)`` from the stored queries/keys
  (no probability tensor), the edit's is its own SDPA, and ``M`` (per frame) is the source's
  stored cross-attention of the blend words, thresholded as the local blend does (3×3 max-pool,
  nearest upsampling to the layer, per-frame normalisation). Without blend words, M = 0:
  full replacement. Since a probability row sums to one, blending maps equals blending
  outputs row by row;
* optionally a latent blend (``FateZeroLatentBlend``) in FateZero's window (after steps
  ``int(start·S)`` … ``int(end·S) − 2``: 10…38 of 50 with its 0.2/0.8): outside the union of
  the blend words' source mask (the stored maps of the step) and target mask (the target's own
  maps summed over every step so far) the target latent is reset to the inverted latent — at
  the noise level the step reached (``same_level``, the default), or one level noisier as
  FateZero's code reads it (``one_level_noisier``).

Temporal attention runs unchanged, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional

import torch

from .attention import apply_probabilities, attention_probabilities
from .attention_store import AttentionStore, AttentionStoreError, entry, parse_entry
from .control import ATTN1, ATTN2, AttentionCall, AttentionController, VideoOutputs
from .errors import SettingsError, parse_option
from .frame_attention import FrameMode, window_keys
from .layout import COND, TARGET
from .local_blend import LocalBlendSpec, WordMaps, blend_factor, grid_of, normalised_maps
from .p2p import P2PEdit
from .prompt_align import EditKind
from .schedule import Schedule


class BlendLatent(str, Enum):
    """Which inverted latent the latent blend keeps outside its mask after step i (σ_i → σ_{i+1}).

    ``same_level``: the inversion's latent at σ_{i+1}, the level the target just reached (on a
    trajectory the sampler itself walked, the blend then changes nothing outside the mask);
    ``one_level_noisier``: its latent at σ_i, as FateZero's code reads it (for parity with it)."""

    SAME_LEVEL = "same_level"
    ONE_LEVEL_NOISIER = "one_level_noisier"

    @classmethod
    def parse(cls, value: "str | BlendLatent") -> "BlendLatent":
        return parse_option(cls, value, "latent_blend_source", "a latent blend source")


def latent_blend_steps(spec: LocalBlendSpec, steps: int) -> range:
    """The steps after which FateZero's latent blend acts: ``int(start·S) … int(end·S) − 2``.

    FateZero's code counts the steps from 1 and blends while ``start·S < count < end·S`` (both
    ends excluded): with 50 steps and 0.2/0.8, after steps 10…38 (0-based), 29 steps."""
    return range(int(spec.start * steps), int(spec.end * steps) - 1)


@dataclass
class FateZeroEdit:
    """The ``VP2P_CONTROL`` of a FateZero Controller.

    ``edit``: prompts, token alignment, ``cross_replace``/``self_replace`` fractions and
    re-weighting (its ``blend`` is the optional latent blend, with an ``end``);
    ``mask_positions``: source token positions of the blend words whose stored cross-attention
    gives the self-attention mask; ``mask_threshold``: its threshold (0.3; ≥1 keeps no edit
    attention, 0 keeps all of it); ``blend_latent``: which inverted latent the latent blend keeps."""

    edit: P2PEdit
    mask_positions: tuple[int, ...] = ()
    mask_threshold: float = 0.3
    blend_latent: BlendLatent = BlendLatent.SAME_LEVEL

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_threshold <= 1.0:
            raise SettingsError(f"blend_threshold={self.mask_threshold} must be between 0 and 1 (FateZero: 0.3).")

    def reads_until(self, steps: int) -> int:
        """How many of the first steps read the store (every step before this one may)."""
        e = self.edit
        alpha = e.cross_alpha(steps)
        cross = int(alpha.any(dim=1).nonzero().max()) + 1 if alpha.any() else 0
        window = latent_blend_steps(e.blend, steps) if e.blend is not None else range(0)
        blend = window[-1] + 1 if len(window) else 0  # its maps are recorded from step 0 up to the last blended step
        return max(cross, e.self_steps(steps), blend)


class FateZeroLatentBlend(WordMaps):
    """FateZero's latent blend, as its code computes it.

    Maps, per frame, from the cross-attention of the non-middle layers at one resolution
    (latent/4: the 16² maps at 64² latents), the blend words' tokens summed, heads and layers
    averaged: the *source* map is the stored inversion map of the current step alone; the
    *target* map is the target's own (pre-edit) map summed over every step so far, from step 0
    on (not only inside the window). Each is 3×3 max-pooled, upsampled (nearest) to the latent,
    divided by its per-frame maximum and thresholded; the mask is their union. After each step
    of ``latent_blend_steps``: ``x ← where(mask, x, x_inverted)`` with the inverted latent that
    ``blend_latent`` names. ``spec.average`` is not used (FateZero's rule is fixed).
    """

    def __init__(self, spec: LocalBlendSpec, frames: int, latent_hw: tuple[int, int], steps: int,
                 blend_latent: BlendLatent = BlendLatent.SAME_LEVEL) -> None:
        super().__init__(spec, frames, latent_hw, steps)
        self.blend_latent = BlendLatent.parse(blend_latent)
        self.window = latent_blend_steps(spec, steps)
        self._source: Optional[torch.Tensor] = None  # [F, h, w]: this step's source map
        self._target_sum: Optional[torch.Tensor] = None  # [F, h, w]: target maps summed over the steps so far

    def records(self, step: int) -> bool:
        """Whether the maps of ``step`` are recorded: every step up to the last blended one."""
        return len(self.window) > 0 and step <= self.window[-1]

    def applies(self, step: int) -> bool:
        return step in self.window

    def end_step(self) -> None:
        """Close a step's recording: this step's source map, the target's running sum."""
        step_map = self._close_step()
        if step_map is None:
            return
        source, target = step_map
        self._source = source
        self._target_sum = target if self._target_sum is None else self._target_sum + target

    def mask(self) -> Optional[torch.Tensor]:
        """[F, 1, H, W] bool: the union of the thresholded source and target masks (None before any map)."""
        if self._source is None or self._target_sum is None:
            return None
        maps = normalised_maps(torch.stack([self._source, self._target_sum]), self.latent_hw)  # [2, F, H, W]
        return (maps > self.spec.threshold).any(0).unsqueeze(1)

    def source_index(self, step: int) -> int:
        """The index into the inversion's trajectory (index i at σ_i) of the latent kept after ``step``."""
        return step + 1 if self.blend_latent is BlendLatent.SAME_LEVEL else step



class FateZeroController(AttentionController):
    """Runs a ``FateZeroEdit`` from a store during one target-only sampling run."""

    def __init__(self, fz: FateZeroEdit, store: AttentionStore, schedule: Schedule, latent_hw: tuple[int, int],
                 blend: Optional[FateZeroLatentBlend] = None) -> None:
        check_store_covers(fz, store, schedule)
        self.fz = fz
        self.store = store
        self.schedule = schedule
        self.latent_hw = latent_hw
        self.blend = blend
        self.alpha = fz.edit.cross_alpha(schedule.steps)
        self.self_until = fz.edit.self_steps(schedule.steps)
        self.frame_mode = FrameMode.parse(store.spec.frame_mode)
        self._masks: dict[tuple[int, int, int], torch.Tensor] = {}
        self.last_self_mask: Optional[torch.Tensor] = None  # [F, h, w] bool, for tests and previews

    def end_step(self, step: int, x_target: torch.Tensor, source_at: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """FateZero's latent blend: outside its mask the target takes the inverted latent it keeps."""
        if self.blend is None:
            return x_target
        self.blend.end_step()
        return self.blend.blend(step, source_at(self.blend.source_index(step)).to(x_target), x_target)

    def override(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[VideoOutputs]:
        if call.kind not in (ATTN1, ATTN2):
            return None
        tgt = call.layout.video_of(COND, TARGET)
        if tgt is None or call.sigmas is None:
            return None
        step = self.schedule.step_index(call.sigmas)
        tokens = call.frame_tokens(q)
        if step >= self.store.spec.stored_steps or tokens > self.store.spec.max_tokens:
            return None
        rows = call.video_rows(tgt, q)
        if call.kind == ATTN2:
            out_t = self._cross(call, step, tokens, q[rows], k[rows], v[rows])
        else:
            out_t = self._self(call, step, tokens, q[rows], k[rows], v[rows])
        return None if out_t is None else {tgt: out_t}

    # -- cross-attention: prompt-to-prompt from the stored source maps --------------------------------
    def _cross(self, call: AttentionCall, step: int, tokens: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> Optional[torch.Tensor]:
        cross = bool(self.alpha[step].any())
        record = self.blend is not None and self.blend.records(step) and self.blend.wants(call.key, tokens)
        if not cross and not record:
            return None
        p_src = self.store.get(step, entry(ATTN2, call.key, "p"))[call.frame_slice].to(q.device, torch.float32)
        want = (q.shape[0], call.heads, q.shape[1], k.shape[1])
        if tuple(p_src.shape) != want:
            raise AttentionStoreError(
                f"The stored cross-attention of layer {call.key} has shape {list(p_src.shape)}, the edit's "
                f"{list(want)}: the store was made for another video size or model. Invert again."
            )
        # a word swap replacing every token needs none of the target's own maps
        whole = cross and self.fz.edit.kind is EditKind.REPLACE and bool(self.alpha[step].all())
        p_tgt = p_src if whole and not record else attention_probabilities(q, k, call.heads)
        if record:
            self.blend.record(call.key, p_src, p_tgt, call.frame_slice)
        if not cross:
            return None  # recorded for the latent blend only: the target keeps its own attention
        return apply_probabilities(self.fz.edit.edit_cross(p_src, p_tgt, self.alpha[step]), v, call.heads)

    # -- self-attention: stored queries/keys, blended by the source's word mask ---------------------
    def _self(self, call: AttentionCall, step: int, tokens: int, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> Optional[torch.Tensor]:
        if step >= self.self_until:
            return None
        mask = self.self_mask(step, tokens)[call.frame_slice] if self.fz.mask_positions else None  # [F', N] True: the edit's own
        if mask is not None and bool(mask.all()):
            return None  # the edit keeps all of its own attention
        # The layer's own frame attention (the store's mode, or none in a block narrower than
        # frame_attention_min_channels) regrouped its keys when they were recorded.
        if call.frame_mode not in (self.frame_mode, FrameMode.NONE):
            raise AttentionStoreError(
                f"The attention store was recorded with {self.frame_mode.value} frame attention, but layer {call.key} of this "
                f"MODEL uses {call.frame_mode.value}. Edit with the MODEL the video was inverted with, or invert again."
            )
        q_src = self.store.get(step, entry(ATTN1, call.key, "q"))
        frames = call.frame_slice
        if call.window is not None:  # this call holds a window of the video's frames: its queries only
            grouped = call.frame_mode in (FrameMode.FIRST_FRAME, FrameMode.MIDDLE_FRAME)  # stored as [1, F·N, C]
            q_src = q_src[:, frames.start * tokens:frames.stop * tokens] if grouped else q_src[frames]
        q_src = q_src.to(q)
        k_src = window_keys(self.store.get(step, entry(ATTN1, call.key, "k")), call.frame_mode, call.total_frames, frames).to(k)
        if q_src.shape != q.shape or k_src.shape != k.shape:
            raise AttentionStoreError(
                f"The stored self-attention of layer {call.key} does not fit this edit (queries {list(q_src.shape)} vs "
                f"{list(q.shape)}): the store was made with another frame attention or video size. Invert again."
            )
        source = call.attend(q_src, k_src, v)
        if mask is None or not bool(mask.any()):
            return source
        own = call.attend(q, k, v)
        m = mask.reshape(q.shape[0], q.shape[1], 1).to(q.device)  # rows of q are frames, or one video's F·N queries
        return torch.where(m, own, source)

    def self_mask(self, step: int, tokens: int) -> torch.Tensor:
        """[F, N] bool at a layer with ``tokens`` per frame: where the edit keeps its own self-attention."""
        g = grid_of(tokens, self.latent_hw)
        if g is None:
            raise SettingsError(f"A layer of {tokens} tokens per frame does not fit the latent {self.latent_hw}.")
        _, h, w = g
        key = (step, h, w)
        if key not in self._masks:
            mask = self.self_blend_values(step, (h, w)) > self.fz.mask_threshold
            self._masks = {k_: m for k_, m in self._masks.items() if k_[0] == step}  # keep one step's masks
            self._masks[key] = mask
            self.last_self_mask = mask
        return self._masks[key].reshape(self._masks[key].shape[0], -1)

    def self_blend_values(self, step: int, size: tuple[int, int]) -> torch.Tensor:
        """[F, h, w] fp32 in [0, 1]: what the self-attention mask of ``step`` thresholds at a layer of
        ``size`` = (h, w) tokens — the blend words' stored source maps (``source_word_maps``), 3×3
        max-pooled, nearest-resized to the layer and divided by each frame's maximum (FateZero's
        ``SpatialBlender.get_mask`` before its threshold)."""
        return normalised_maps(self.source_word_maps(step)[None], size)[0]

    def source_word_maps(self, step: int) -> torch.Tensor:
        """[F, h, w]: the blend words' stored source cross-attention at ``step``, summed over their
        tokens and averaged over heads and the layers of the blend resolution."""
        by_factor: dict[int, list[torch.Tensor]] = {}
        for name in self.store.names(step):
            kind, key, part = parse_entry(name)
            if kind != ATTN2 or key.block == "middle":
                continue
            p = self.store.get(step, name)  # [F, H, N, T]
            g = grid_of(p.shape[2], self.latent_hw)
            if g is None:
                continue
            factor, h, w = g
            m = p[..., list(self.fz.mask_positions)].float().sum(-1).mean(1)
            by_factor.setdefault(factor, []).append(m.reshape(p.shape[0], h, w))
        if not by_factor:
            raise AttentionStoreError(
                "The attention store holds no cross-attention map outside the middle block, so the blend words have no "
                "mask. Store larger layers (store_max_tokens) or leave blend_words empty."
            )
        return torch.stack(by_factor[blend_factor(list(by_factor))]).mean(0)


def check_store_covers(fz: FateZeroEdit, store: AttentionStore, schedule: Schedule) -> None:
    """Refuse a store that cannot serve this edit (other step count, too few stored steps)."""
    spec = store.spec
    if spec.steps != schedule.steps:
        raise AttentionStoreError(f"The attention store was recorded for {spec.steps} steps; this edit has {schedule.steps}.")
    need = fz.reads_until(schedule.steps)
    if need > spec.stored_steps:
        raise AttentionStoreError(
            f"This FateZero control reads the stored attention during the first {need} of {spec.steps} steps "
            f"(cross_replace, self_replace, latent blend), but the inversion stored only {spec.stored_steps}. Raise the "
            f"inverter's store_steps to at least {need / spec.steps:.2f} and run it again, or lower the fractions."
        )
