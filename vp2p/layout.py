"""Explicit batch layouts.

The rows of a UNet batch are ``chunks × branches × frames`` in that order:

* a *chunk* is one entry of ComfyUI's ``cond_or_uncond`` (0 = conditional,
  1 = unconditional). ComfyUI may send cond and uncond in one call (uncond usually
  first) or in separate calls; the layout is rebuilt on every call from what the
  call says, never from the number of calls;
* a *branch* is one prompt of an edit (e.g. source and target of prompt-to-prompt);
  a plain sampler has one;
* *frames* are the frames of one video, which is the batch axis of an IMAGE/LATENT.

A *video* is one ``(chunk, branch)`` pair: ``F`` consecutive rows. Through ComfyUI's
``calc_cond_batch`` every chunk holds the same branches (the sampler's latent rows, one video
per branch, in the order ``LayoutSpec.present`` names them: e.g. only the target while the
source is not needed). A host that composes its own batch (the diffusers host) may instead
name every video's ``(kind, branch)`` in ``LayoutSpec.roles`` and pass one ``cond_or_uncond``
entry per video, which is what ComfyUI's own patches expect (equal chunks of F rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import LayoutError

COND = 0
UNCOND = 1
SOURCE, TARGET = 0, 1  # the branches of an edit


@dataclass(frozen=True)
class LayoutSpec:
    """What a sampler knows about its batch before ComfyUI splits it into calls."""

    frames: int
    branches: int = 1
    roles: Optional[tuple[tuple[int, int], ...]] = None  # per video: (COND|UNCOND, branch)
    present: Optional[tuple[int, ...]] = None  # the branches each chunk holds, in row order (default: all)

    def __post_init__(self) -> None:
        if self.frames < 1 or self.branches < 1:
            raise LayoutError(f"A layout needs frames ≥ 1 and branches ≥ 1, got frames={self.frames}, branches={self.branches}.")
        if self.roles is not None and any(b >= self.branches or c not in (COND, UNCOND) for c, b in self.roles):
            raise LayoutError(f"Video roles {self.roles} do not fit {self.branches} branches.")
        if self.present is not None and (not self.present or len(set(self.present)) != len(self.present)
                                         or any(not 0 <= b < self.branches for b in self.present)):
            raise LayoutError(f"present={self.present} must name distinct branches of {self.branches}.")

    @property
    def chunk_branches(self) -> tuple[int, ...]:
        """The branches of every chunk, in row order."""
        return self.present if self.present is not None else tuple(range(self.branches))


@dataclass(frozen=True)
class BatchLayout:
    """The meaning of every row of one UNet call."""

    chunks: tuple[int, ...]
    branches: int
    frames: int
    roles: Optional[tuple[tuple[int, int], ...]] = None
    present: Optional[tuple[int, ...]] = None

    @property
    def video_roles(self) -> tuple[tuple[int, int], ...]:
        """(kind, branch) of every video, in row order."""
        if self.roles is not None:
            return self.roles
        present = self.present if self.present is not None else tuple(range(self.branches))
        return tuple((c, b) for c in self.chunks for b in present)

    @property
    def videos(self) -> int:
        return len(self.video_roles)

    def video_of(self, kind: int, branch: int) -> Optional[int]:
        """Index of the video with this role, or ``None`` when the call does not hold it."""
        roles = self.video_roles
        return roles.index((kind, branch)) if (kind, branch) in roles else None

    @property
    def rows(self) -> int:
        return self.videos * self.frames

    @classmethod
    def resolve(cls, rows: int, cond_or_uncond: Optional[Sequence[int]], spec: Optional[LayoutSpec] = None) -> "BatchLayout":
        """Build the layout of a call with ``rows`` batch rows.

        Without a ``spec`` the call holds one video per chunk (ComfyUI's stock
        samplers: the latent batch is the video). With a ``spec`` the frame and
        branch counts are checked against the rows.
        """
        chunks = tuple(int(c) for c in cond_or_uncond) if cond_or_uncond else (COND,)
        if spec is None:
            if rows % len(chunks):
                raise LayoutError(
                    f"A batch of {rows} rows does not split into {len(chunks)} equal cond/uncond chunks "
                    f"(cond_or_uncond={list(chunks)}). Feed the video as one latent batch."
                )
            return cls(chunks, 1, rows // len(chunks))
        if spec.roles is not None:
            layout = cls(tuple(c for c, _ in spec.roles), spec.branches, spec.frames, spec.roles)
            if [c for c, _ in spec.roles] != list(chunks) and cond_or_uncond:
                raise LayoutError(f"cond_or_uncond={list(chunks)} does not match the sampler's video roles {list(spec.roles)}.")
        else:
            layout = cls(chunks, spec.branches, spec.frames, present=spec.present)
        if layout.rows != rows:
            raise LayoutError(
                f"The UNet call has {rows} rows but the layout expects {len(chunks)} chunks × {len(spec.chunk_branches)} "
                f"branches × {spec.frames} frames = {layout.rows}. The sampler and the model disagree about the video."
            )
        return layout

    def video_slice(self, chunk: int, branch: int = 0) -> slice:
        """Rows of the video at position ``chunk`` (index into ``chunks``) and ``branch`` (grid layouts)."""
        present = self.present if self.present is not None else tuple(range(self.branches))
        start = (chunk * len(present) + present.index(branch)) * self.frames
        return slice(start, start + self.frames)

    def chunk_positions(self, kind: int) -> list[int]:
        """Positions of the chunks of a kind (``COND`` or ``UNCOND``)."""
        return [i for i, c in enumerate(self.chunks) if c == kind]
