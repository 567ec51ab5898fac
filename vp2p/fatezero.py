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
* optionally a latent blend between ``start`` and ``end`` of the steps (FateZero: 20–80%):
  outside the union of the source (stored) and target maps of the blend words the target
  latent is reset to the inverted latent of that step.

Temporal attention runs unchanged, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .attention import apply_probabilities, attention_probabilities, sdpa
from .attention_store import AttentionStore, AttentionStoreError, entry, parse_entry
from .control import ATTN1, ATTN2, AttentionCall, AttentionController
from .errors import SettingsError
from .frame_attention import FrameMode, expand_keys
from .layout import COND, TARGET
from .local_blend import LocalBlend, blend_factor, grid_of, normalised_maps
from .p2p import P2PController, P2PEdit
from .prompt_align import EditKind
from .schedule import Schedule


@dataclass
class FateZeroEdit:
    """The ``VP2P_CONTROL`` of a FateZero Controller.

    ``edit``: prompts, token alignment, ``cross_replace``/``self_replace`` fractions and
    re-weighting (its ``blend`` is the optional latent blend, with an ``end``);
    ``mask_positions``: source token positions of the blend words whose stored cross-attention
    gives the self-attention mask; ``mask_threshold``: its threshold (0.3; ≥1 keeps no edit
    attention, 0 keeps all of it)."""

    edit: P2PEdit
    mask_positions: tuple[int, ...] = ()
    mask_threshold: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_threshold <= 1.0:
            raise SettingsError(f"blend_threshold={self.mask_threshold} must be between 0 and 1 (FateZero: 0.3).")

    def reads_until(self, steps: int) -> int:
        """How many of the first steps read the store (every step before this one may)."""
        e = self.edit
        alpha = e.cross_alpha(steps)
        cross = int(alpha.any(dim=1).nonzero().max()) + 1 if alpha.any() else 0
        blend = int(e.blend.end * steps) if e.blend is not None else 0
        return max(cross, e.self_steps(steps), blend)


class FateZeroController(AttentionController):
    """Runs a ``FateZeroEdit`` from a store during one target-only sampling run."""

    def __init__(self, fz: FateZeroEdit, store: AttentionStore, schedule: Schedule, latent_hw: tuple[int, int],
                 blend: Optional[LocalBlend] = None) -> None:
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

    def override(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
        if call.kind not in (ATTN1, ATTN2):
            return None
        tgt = call.layout.video_of(COND, TARGET)
        if tgt is None or call.sigmas is None:
            return None
        step = self.schedule.step_index(call.sigmas)
        tokens = call.frame_tokens(q)
        if step >= self.store.spec.stored_steps or tokens > self.store.spec.max_tokens:
            return None
        per = q.shape[0] // call.layout.videos
        rows = slice(tgt * per, (tgt + 1) * per)
        if call.kind == ATTN2:
            out_t = self._cross(call, step, tokens, q[rows], k[rows], v[rows])
        else:
            out_t = self._self(call, step, tokens, q[rows], k[rows], v[rows])
        if out_t is None:
            return None
        out = P2PController._rest(call, q, k, v, (tgt,), per)
        out[rows] = out_t
        return out

    # -- cross-attention: prompt-to-prompt from the stored source maps --------------------------------
    def _cross(self, call: AttentionCall, step: int, tokens: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> Optional[torch.Tensor]:
        cross = bool(self.alpha[step].any())
        record = self.blend is not None and self.blend.applies(step) and self.blend.wants(call.key, tokens)
        if not cross and not record:
            return None
        p_src = self.store.get(step, entry(ATTN2, call.key, "p")).to(q.device, torch.float32)
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
            self.blend.record(call.key, p_src, p_tgt)
        edited = self.fz.edit.edit_cross(p_src, p_tgt, self.alpha[step]) if cross else p_tgt
        return apply_probabilities(edited, v, call.heads)

    # -- self-attention: stored queries/keys, blended by the source's word mask ---------------------
    def _self(self, call: AttentionCall, step: int, tokens: int, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> Optional[torch.Tensor]:
        if step >= self.self_until:
            return None
        mask = self.self_mask(step, tokens) if self.fz.mask_positions else None  # [F, N] True: the edit's own
        if mask is not None and bool(mask.all()):
            return None  # the edit keeps all of its own attention
        # The layer's own frame attention (the store's mode, or none in a block narrower than
        # frame_attention_min_channels) regrouped its keys when they were recorded.
        if call.frame_mode not in (self.frame_mode, FrameMode.NONE):
            raise AttentionStoreError(
                f"The attention store was recorded with {self.frame_mode.value} frame attention, but layer {call.key} of this "
                f"MODEL uses {call.frame_mode.value}. Edit with the MODEL the video was inverted with, or invert again."
            )
        q_src = self.store.get(step, entry(ATTN1, call.key, "q")).to(q)
        k_src = expand_keys(self.store.get(step, entry(ATTN1, call.key, "k")).to(k), call.frame_mode, call.layout.frames)
        if q_src.shape != q.shape or k_src.shape != k.shape:
            raise AttentionStoreError(
                f"The stored self-attention of layer {call.key} does not fit this edit (queries {list(q_src.shape)} vs "
                f"{list(q.shape)}): the store was made with another frame attention or video size. Invert again."
            )
        source = sdpa(q_src, k_src, v, call.heads)
        if mask is None or not bool(mask.any()):
            return source
        own = sdpa(q, k, v, call.heads)
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
            maps = self.source_word_maps(step)  # [F, h', w']
            mask = normalised_maps(maps[None], (h, w))[0] > self.fz.mask_threshold
            self._masks = {k_: m for k_, m in self._masks.items() if k_[0] == step}  # keep one step's masks
            self._masks[key] = mask
            self.last_self_mask = mask
        return self._masks[key].reshape(self._masks[key].shape[0], -1)

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
