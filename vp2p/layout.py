"""Explicit batch layouts.

The rows of a UNet batch are ``chunks × branches × frames`` in that order:

* a *chunk* is one entry of ComfyUI's ``cond_or_uncond`` (0 = conditional,
  1 = unconditional). ComfyUI may send cond and uncond in one call (uncond usually
  first) or in separate calls; the layout is rebuilt on every call from what the
  call says, never from the number of calls;
* a *branch* is one prompt of an edit (e.g. source and target of prompt-to-prompt);
  a plain sampler has one;
* *frames* are the frames of one video, which is the batch axis of an IMAGE/LATENT.

A *video* is one ``(chunk, branch)`` pair: ``F`` consecutive rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import LayoutError

COND = 0
UNCOND = 1


@dataclass(frozen=True)
class LayoutSpec:
    """What a sampler knows about its batch before ComfyUI splits it into calls."""

    frames: int
    branches: int = 1

    def __post_init__(self) -> None:
        if self.frames < 1 or self.branches < 1:
            raise LayoutError(f"A layout needs frames ≥ 1 and branches ≥ 1, got frames={self.frames}, branches={self.branches}.")


@dataclass(frozen=True)
class BatchLayout:
    """The meaning of every row of one UNet call."""

    chunks: tuple[int, ...]
    branches: int
    frames: int

    @property
    def videos(self) -> int:
        return len(self.chunks) * self.branches

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
        layout = cls(chunks, spec.branches, spec.frames)
        if layout.rows != rows:
            raise LayoutError(
                f"The UNet call has {rows} rows but the layout expects {len(chunks)} chunks × {spec.branches} "
                f"branches × {spec.frames} frames = {layout.rows}. The sampler and the model disagree about the video."
            )
        return layout

    def video_slice(self, chunk: int, branch: int = 0) -> slice:
        """Rows of the video at position ``chunk`` (index into ``chunks``) and ``branch``."""
        start = (chunk * self.branches + branch) * self.frames
        return slice(start, start + self.frames)

    def chunk_positions(self, kind: int) -> list[int]:
        """Positions of the chunks of a kind (``COND`` or ``UNCOND``)."""
        return [i for i, c in enumerate(self.chunks) if c == kind]
