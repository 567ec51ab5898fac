"""``VP2P_INVERSION``: what an inversion holds, and its safetensors file.

The trajectory is kept whole (the edit's source branch is fully determined by it), with
the per-step null embeddings, the source conditioning, the schedule, the mode and the
fingerprint of the model it was made with, and optionally FateZero's attention store (saved
as ``attention.<step>/<entry>`` tensors with its description in the metadata). Files are
written atomically; a damaged file raises ``InversionFileError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .attention_store import AttentionStore, AttentionStoreError, StoreSpec
from .errors import VP2PError
from .inversion import InversionMode
from .safetensors_io import read_checked, write_atomic
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
    return write_atomic(path, inv.tensors(), inv.metadata())


def load_inversion(path: Path) -> Inversion:
    t, meta = read_checked(path, FORMAT, "inversion", InversionFileError)
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
    except KeyError as e:
        raise InversionFileError(f"{path.name} lacks {e}; it was not written by this pack or is damaged. Invert again.") from e
    if inv.mode.optimises and inv.null_embeddings is None:
        raise InversionFileError(f"{path.name}: a {inv.mode.value} inversion without its null embeddings; the file is damaged.")
    if list(inv.latent_shape) != json.loads(meta["latent_shape"]):
        raise InversionFileError(f"{path.name}: its trajectory does not match its recorded latent shape; the file is damaged.")
    return inv


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
