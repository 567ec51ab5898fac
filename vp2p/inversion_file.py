"""``VP2P_INVERSION``: what an inversion holds, and its safetensors file.

The trajectory is kept whole (the edit's source branch is fully determined by it), with
the per-step null embeddings, the source conditioning, the schedule, the mode and the
fingerprint of the model it was made with, and optionally FateZero's attention store (saved
as ``attention.<step>/<entry>`` tensors with its description in the metadata). Files are
written atomically; a damaged file raises ``InversionFileError``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .attention_store import AttentionStore, AttentionStoreError, StoreSpec
from .errors import VP2PError
from .inversion import InversionMode
from .safetensors_io import read_checked, save_checked
from .schedule import Schedule

# /2: the inversion evaluates the UNet at the destination timestep (as the references); /1 files differ.
FORMAT = "vp2p-inversion/2"


class InversionFileError(VP2PError):
    """An inversion file is missing, damaged, or does not fit."""


@dataclass
class Inversion:
    """trajectory [S+1, F, C, h, w] (model latent space, σ-scaled; index 0 = z_T at ``sigmas[0]``);
    null_embeddings [S, 1|F, T, D] (the optimised unconditional embedding per step) or None;
    cond [1|F, T, D] (the source conditioning); negative [1|F, T, D] (the initial unconditional
    embedding, which the decoupled target branch uses) or None; schedule (timesteps [S],
    sigmas [S+1]); iterations [S] inner optimisation steps used per step (None when none);
    source_path [S+1, F, C, h, w] the guided walk with the optimised embeddings (the decoupled
    edit's source branch, so an edit can reuse it) or None."""

    trajectory: torch.Tensor
    null_embeddings: Optional[torch.Tensor]
    cond: torch.Tensor
    schedule: Schedule
    mode: InversionMode
    cfg: float
    model_fingerprint: str
    negative: Optional[torch.Tensor] = None
    iterations: Optional[torch.Tensor] = None
    source_path: Optional[torch.Tensor] = None
    # A generated video ("Start From Noise"): only z_T exists, the source prompt is the controller's,
    # the source branch is guided with ``negative`` at the sampler's cfg, and any SD model fits.
    generated: bool = False
    attention: Optional[AttentionStore] = None  # FateZero's store of the source attention
    # The model's extra text conditioning of ``negative`` (SDXL's pooled CLIP-G output [1|F, 1280]), or None
    # (SD1.x/SD2.x have none): the unconditional rows keep it when no negative CONDITIONING is connected.
    negative_pooled: Optional[torch.Tensor] = None

    @property
    def frames(self) -> int:
        return int(self.trajectory.shape[1])

    def source_text(self, controller_source: torch.Tensor) -> torch.Tensor:
        """The source branch's text rows: the prompt the video was inverted with, or (Start From Noise,
        nothing inverted) the controller's source prompt."""
        return controller_source if self.generated else self.cond

    def source_cfg(self, cfg: float) -> float:
        """The source branch's guidance scale: the inversion's (its null embeddings were optimised for it),
        or (Start From Noise) the sampler's."""
        return cfg if self.generated else self.cfg

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.trajectory.shape[1:])

    @property
    def z_t(self) -> torch.Tensor:
        return self.trajectory[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"trajectory": self.trajectory, "cond": self.cond, "timesteps": self.schedule.timesteps, "sigmas": self.schedule.sigmas}
        for name in ("null_embeddings", "negative", "iterations", "source_path", "negative_pooled"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.attention is not None:
            out.update({f"attention.{k}": v for k, v in self.attention.tensors().items()})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "mode": self.mode.value, "cfg": repr(self.cfg), "model_fingerprint": self.model_fingerprint,
                "frames": str(self.frames), "latent_shape": json.dumps(list(self.latent_shape)),
                "generated": "1" if self.generated else "0"} | (
                    {"attention_spec": self.attention.spec.to_json()} if self.attention is not None else {})


def save_inversion(path: Path, inv: Inversion) -> Path:
    return save_checked(path, inv.tensors(), inv.metadata())


TENSORS = frozenset({"trajectory", "cond", "timesteps", "sigmas", "null_embeddings", "negative", "iterations", "source_path",
                     "negative_pooled"})
REQUIRED_META = ("mode", "cfg", "model_fingerprint", "latent_shape")


def load_inversion(path: Path, folder: Optional[Path] = None) -> Inversion:
    """Read an inversion file; raises ``InversionFileError`` naming the file and what is wrong (see ``check_tensors``).
    ``folder``: the file must lie inside it (no symlink out of it)."""
    t, meta = read_checked(path, FORMAT, "inversion", InversionFileError, folder)
    check_tensors(t, meta, path.name)
    try:
        inv = Inversion(t["trajectory"], t.get("null_embeddings"), t["cond"], Schedule(t["timesteps"], t["sigmas"]),
                        InversionMode.parse(meta["mode"]), float(meta["cfg"]), meta["model_fingerprint"],
                        t.get("negative"), t.get("iterations"), t.get("source_path"), meta.get("generated") == "1",
                        negative_pooled=t.get("negative_pooled"))
        if "attention_spec" in meta:
            inv.attention = AttentionStore.from_tensors(StoreSpec.from_json(meta["attention_spec"]),
                                                        {k[len("attention."):]: v for k, v in t.items() if k.startswith("attention.")})
    except AttentionStoreError as e:
        raise InversionFileError(f"{path.name}: its attention store is damaged ({e}). Invert again.") from e
    except VP2PError as e:
        raise InversionFileError(f"{path.name} is damaged: {e} Invert again.") from e
    if inv.mode.optimises and inv.null_embeddings is None:
        raise InversionFileError(f"{path.name}: a {inv.mode.value} inversion without its null embeddings; the file is damaged.")
    if inv.attention is not None and inv.attention.spec.frames != inv.frames:
        raise InversionFileError(f"{path.name}: its attention store was recorded for {inv.attention.spec.frames} frames, its "
                                 f"trajectory has {inv.frames}; the file is damaged. Invert again.")
    return inv


def check_tensors(t: dict[str, torch.Tensor], meta: dict[str, str], name: str) -> None:
    """Refuse, naming ``name`` and the field, an inversion file whose tensors or metadata do not fit together: missing or
    unknown entries, non-float trajectories/embeddings/sigmas, wrong ranks, steps that differ between the schedule, the
    trajectory, the null embeddings and the iteration counts, frames or widths that differ between fields, metadata
    that does not parse or does not match the tensors."""

    def bad(problem: str) -> InversionFileError:
        return InversionFileError(f"{name}: {problem}; the file is damaged or was not written by this pack. Invert again.")

    missing = [k for k in ("trajectory", "cond", "timesteps", "sigmas") if k not in t] + [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise bad(f"it lacks {', '.join(repr(k) for k in missing)}")
    unknown = sorted(k for k in t if k not in TENSORS and not k.startswith("attention."))
    if unknown:
        raise bad(f"it holds tensors this pack does not write ({', '.join(repr(k) for k in unknown[:5])})")
    for k, v in t.items():
        if k in ("timesteps", "iterations"):
            if v.dtype == torch.bool or v.is_complex():
                raise bad(f"{k!r} has dtype {v.dtype}, expected numbers")
        elif not v.is_floating_point():
            raise bad(f"{k!r} has dtype {v.dtype}, expected a floating-point tensor")
    ranks = {"trajectory": 5, "source_path": 5, "cond": 3, "negative": 3, "null_embeddings": 4, "timesteps": 1, "sigmas": 1,
             "iterations": 1, "negative_pooled": 2}
    for k, rank in ranks.items():
        if k in t and t[k].dim() != rank:
            raise bad(f"{k!r} has shape {list(t[k].shape)}, expected {rank} dimensions")
    generated = meta.get("generated", "0")
    if generated not in ("0", "1"):
        raise bad(f"its metadata 'generated' is {generated!r}, expected '0' or '1'")
    traj = t["trajectory"]
    steps, frames = int(t["timesteps"].shape[0]), int(traj.shape[1])
    if steps < 1 or min(traj.shape[1:]) < 1:
        raise bad(f"it holds an empty schedule or video (timesteps {list(t['timesteps'].shape)}, trajectory {list(traj.shape)})")
    if t["sigmas"].shape[0] != steps + 1:
        raise bad(f"its schedule has {steps} timesteps but {t['sigmas'].shape[0]} sigmas, expected {steps + 1}")
    want = 1 if generated == "1" else steps + 1
    if traj.shape[0] != want:
        raise bad(f"its trajectory holds {traj.shape[0]} latents, but its {steps}-step schedule needs {want}")
    if "source_path" in t and t["source_path"].shape != traj.shape:
        raise bad(f"'source_path' has shape {list(t['source_path'].shape)}, the trajectory {list(traj.shape)}")
    if "iterations" in t and t["iterations"].shape[0] != steps:
        raise bad(f"'iterations' has {t['iterations'].shape[0]} entries for {steps} steps")
    width = int(t["cond"].shape[-1])
    for k in ("cond", "negative", "null_embeddings", "negative_pooled"):
        if k not in t:
            continue
        v = t[k]
        rows = v.shape[1] if k == "null_embeddings" else v.shape[0]
        if rows not in (1, frames):
            raise bad(f"{k!r} has shape {list(v.shape)}: {rows} rows for a video of {frames} frames (expected 1 or {frames})")
        if k == "null_embeddings" and v.shape[0] != steps:
            raise bad(f"'null_embeddings' has {v.shape[0]} steps, the schedule {steps}")
        if k != "negative_pooled" and (v.shape[-1] != width or v.shape[-2] < 1):
            raise bad(f"{k!r} has shape {list(v.shape)}, but 'cond' {list(t['cond'].shape)} (token width {width})")
    try:
        InversionMode.parse(meta["mode"])
    except VP2PError as e:
        raise bad(f"its metadata 'mode' does not parse ({e})") from None
    try:
        cfg = float(meta["cfg"])
    except ValueError:
        raise bad(f"its metadata 'cfg' is {meta['cfg']!r}, not a number") from None
    try:
        shape = json.loads(meta["latent_shape"])
    except ValueError as e:
        raise bad(f"its metadata 'latent_shape' does not parse ({e})") from None
    if generated == "0" and not math.isfinite(cfg):
        raise bad(f"its guidance scale cfg is {meta['cfg']!r}")
    if shape != list(traj.shape[1:]):
        raise bad(f"its trajectory {list(traj.shape)} does not match its recorded latent shape {meta['latent_shape']}")
    if "frames" in meta and meta["frames"] != str(frames):
        raise bad(f"its metadata says {meta['frames']!r} frames, its trajectory holds {frames}")
    if "attention_spec" not in meta and any(k.startswith("attention.") for k in t):
        raise bad("it holds attention tensors without their description 'attention_spec'")


def check_fits(inv: Inversion, model_fingerprint: str, latent_shape: tuple[int, ...], name: str) -> None:
    """Refuse an inversion made with another model or for another video size."""
    if not inv.generated and inv.model_fingerprint != model_fingerprint:
        raise InversionFileError(
            f"{name} was made with a different model (fingerprint {inv.model_fingerprint[:12]}…, this MODEL is "
            f"{model_fingerprint[:12]}…). Use the same checkpoint, LoRAs, inflation and tuning, or invert again."
        )
    if tuple(latent_shape) != inv.latent_shape:
        raise InversionFileError(
            f"{name} holds a video of latent shape {list(inv.latent_shape)} (frames, channels, h, w); this one is "
            f"{list(latent_shape)}. Use the same frames and size, or invert again."
        )
