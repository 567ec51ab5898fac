"""Tuned T2S weights: what Tune on Video produces, and its safetensors file.

The file holds only the tuned tensors — the ``to_q`` deltas (tuned weight = base + delta)
of attn1/attn2 per layer key, the temporal layers' whole state (the trained projections
and the untrained LayerNorms, so that it loads into a bank as it is) and, when a motion module's
attention was tuned, its projections' deltas by path (``motion.<path>.weight|bias``) — plus string metadata:
format version, base-model fingerprint, inflation settings, frames, prompt, steps,
learning rate, seed. Writes are atomic (temporary file + rename). Never pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .errors import VP2PError
from .frame_attention import FrameMode
from .keys import LayerKey
from .patch import T2SSettings
from .safetensors_io import read_checked, save_checked
from .video_norm import NormScope

FORMAT = "vp2p-tuned/1"


class TunedFileError(VP2PError):
    """A tuned-weights file is missing, corrupt, or does not fit the model."""


@dataclass
class TunedWeights:
    """deltas: (kind, key) -> [out, in] fp32; temporal: bank state dict (``layers.<slug>.<param>``); motion: deltas of a
    motion module's attention projections, by their path in the UNet (``<module path>.weight`` [out, in] /
    ``.bias`` [out]: tuned = the motion module's own + delta)."""

    settings: T2SSettings
    deltas: dict[tuple[str, LayerKey], torch.Tensor]
    temporal: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    motion: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"to_q.{kind}.{key.slug}": d.detach().float().cpu().contiguous() for (kind, key), d in self.deltas.items()}
        out.update({f"temporal.{name}": t.detach().float().cpu().contiguous() for name, t in self.temporal.items()})
        out.update({f"motion.{name}": t.detach().float().cpu().contiguous() for name, t in self.motion.items()})
        return out


def save_tuned(path: Path, weights: TunedWeights) -> Path:
    """Write ``weights`` atomically to ``path`` (a .safetensors file)."""
    meta = dict(weights.metadata)
    meta.update(format=FORMAT, frame_attention=weights.settings.frame_attention.value,
                temporal_attention=json.dumps(weights.settings.temporal_attention), group_norm=weights.settings.group_norm.value,
                frame_attention_min_channels=str(weights.settings.frame_attention_min_channels))
    return save_checked(path, weights.tensors(), meta)


def load_tuned(path: Path, folder: Optional[Path] = None) -> TunedWeights:
    """Read a tuned-weights file; raises ``TunedFileError`` naming the file and what is wrong: a damaged header or
    tensor data (``read_checked``), metadata that is missing or does not parse, a tensor name this pack does not
    write, a tensor that is not floating-point or whose rank does not fit its name, NaN/inf values. ``folder``: the
    file must lie inside it (no symlink out of it)."""
    tensors, meta = read_checked(path, FORMAT, "Tune on Video", TunedFileError, folder)

    def bad(problem: str) -> TunedFileError:
        return TunedFileError(f"{path.name}: {problem}; the file is damaged or was not written by this pack. Tune again.")

    missing = [k for k in ("frame_attention", "temporal_attention") if k not in meta]
    if missing:
        raise bad(f"its metadata lacks {', '.join(repr(k) for k in missing)}")
    # Files written before group_norm existed were tuned with per-frame GroupNorm statistics; before
    # frame_attention_min_channels existed, with frame attention in every block.
    try:
        temporal_flag = json.loads(meta["temporal_attention"])
        if not isinstance(temporal_flag, bool):
            raise ValueError(f"temporal_attention is {meta['temporal_attention']!r}, expected true or false")
        settings = T2SSettings(FrameMode.parse(meta["frame_attention"]), temporal_flag,
                               NormScope.parse(meta.get("group_norm", NormScope.FRAME.value)),
                               int(meta.get("frame_attention_min_channels", "0")))
    except (VP2PError, ValueError) as e:
        raise bad(f"its metadata does not parse ({e})") from None
    deltas: dict[tuple[str, LayerKey], torch.Tensor] = {}
    temporal: dict[str, torch.Tensor] = {}
    motion: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise bad(f"tensor {name!r} has dtype {t.dtype}, expected floating-point weights")
        group, _, rest = name.partition(".")
        if group == "to_q":
            kind, _, slug = rest.partition(".")
            try:
                key = LayerKey.from_slug(slug)
            except ValueError:
                key = None
            if kind not in ("attn1", "attn2") or key is None:
                raise bad(f"tensor {name!r} is no to_q.<attn1|attn2>.<block>_<id>_<index> delta")
            if t.dim() != 2:
                raise bad(f"the to_q delta {name!r} has shape {list(t.shape)}, expected [out, in]")
            deltas[(kind, key)] = t
        elif group == "temporal" and rest:
            temporal[rest] = t
        elif group == "motion" and rest:
            motion[rest] = t
        else:
            raise bad(f"it holds the tensor {name!r}, which this pack does not write (to_q.*, temporal.*, motion.* only)")
    return TunedWeights(settings, deltas, temporal, meta, motion)


def check_compatible(weights: TunedWeights, settings: T2SSettings, base_fingerprint: Optional[str], keys: set[LayerKey], name: str) -> None:
    """Refuse clearly when a tuned file was made for another base model or inflation."""
    if weights.settings != settings:
        raise TunedFileError(
            f"{name} was tuned with {weights.settings.describe()}, but the MODEL is inflated with {settings.describe()}. "
            "Set Inflate to T2S to the same settings."
        )
    file_keys = {key for _, key in weights.deltas}
    if file_keys != keys:
        raise TunedFileError(f"{name} holds {len(file_keys)} transformer blocks; this MODEL has {len(keys)}. It was tuned on another architecture.")
    if base_fingerprint is not None and weights.metadata.get("base_fingerprint") not in (None, base_fingerprint):
        raise TunedFileError(
            f"{name} was tuned on a different base model (fingerprint {weights.metadata.get('base_fingerprint', '?')[:12]}…, "
            f"this MODEL is {base_fingerprint[:12]}…). Load the checkpoint (and LoRAs) it was tuned on, or tune again."
        )
