"""Layer identity.

A transformer block of an SD-style UNet is named by ComfyUI's triple
``(block, id, block_index)``: ``("input", 4, 0)``, ``("middle", 0, 0)``,
``("output", 11, 0)``. Every host maps its own module names onto these keys, so
controllers, stores and tuned weights refer to one layer the same way everywhere.
Keys are always enumerated from the model itself, never hard-coded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .errors import UnsupportedModelError

BLOCK_KINDS = ("input", "middle", "output")


@dataclass(frozen=True, order=True)
class LayerKey:
    """One transformer block: ComfyUI's ``(block, id)`` plus the block index inside it."""

    block: str
    id: int
    index: int = 0

    def __post_init__(self) -> None:
        if self.block not in BLOCK_KINDS:
            raise ValueError(f"LayerKey block must be one of {BLOCK_KINDS}, got {self.block!r}")

    @classmethod
    def from_extra_options(cls, extra_options: Mapping[str, Any]) -> "LayerKey":
        """The key of the block that is calling an attention replace function."""
        block = extra_options.get("block")
        if block is None:
            raise KeyError("extra_options carries no 'block': the caller is not a UNet transformer block")
        return cls(str(block[0]), int(block[1]), int(extra_options.get("block_index", 0)))

    @property
    def slug(self) -> str:
        """A name usable as a module or tensor-key component, e.g. ``input_4_0``."""
        return f"{self.block}_{self.id}_{self.index}"

    @classmethod
    def from_slug(cls, slug: str) -> "LayerKey":
        block, ident, index = slug.split("_")
        return cls(block, int(ident), int(index))

    def __str__(self) -> str:
        return f"({self.block}, {self.id}, {self.index})"


_COMFY_NAME = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:(\d+)\.)?transformer_blocks\.(\d+)$")
_DIFFUSERS_NAME = re.compile(
    r"^(down_blocks|mid_block|up_blocks)\.?(\d+)?\.attentions\.(\d+)\.transformer_blocks\.(\d+)$"
)


def comfy_transformer_keys(module_names: Iterable[str]) -> dict[LayerKey, str]:
    """Map each transformer block of a ComfyUI ``diffusion_model`` to its module path.

    ``module_names`` are the names from ``diffusion_model.named_modules()``. ComfyUI
    names the middle block ``("middle", 0)`` whatever its position inside
    ``middle_block``.
    """
    found: dict[LayerKey, str] = {}
    for name in module_names:
        m = _COMFY_NAME.match(name)
        if m is None:
            continue
        group, ident, _, index = m.groups()
        if group == "input_blocks":
            key = LayerKey("input", int(ident), int(index))
        elif group == "output_blocks":
            key = LayerKey("output", int(ident), int(index))
        else:
            key = LayerKey("middle", 0, int(index))
        found[key] = name
    return dict(sorted(found.items()))


def diffusers_transformer_keys(module_names: Iterable[str], layers_per_block: Any) -> dict[LayerKey, str]:
    """Map each ``BasicTransformerBlock`` of a diffusers ``UNet2DConditionModel`` to its key.

    Down block ``i``'s attention ``j`` sits at ComfyUI input block
    ``1 + i·(layers_per_block+1) + j`` (block 0 is ``conv_in``; each level ends with a
    downsampler); up block ``i``'s attention ``j`` at output block ``i·(layers_per_block+1) + j``.
    """
    if not isinstance(layers_per_block, int):
        raise UnsupportedModelError(
            f"The diffusers UNet has layers_per_block={layers_per_block!r}; the key mapping supports one "
            "integer for every level (as SD1.x/SD2.x/SDXL use). Use a UNet with a uniform layers_per_block."
        )
    stride = layers_per_block + 1
    found: dict[LayerKey, str] = {}
    for name in module_names:
        m = _DIFFUSERS_NAME.match(name)
        if m is None:
            continue
        group, level, attention, index = m.groups()
        if group == "down_blocks":
            key = LayerKey("input", 1 + int(level) * stride + int(attention), int(index))
        elif group == "up_blocks":
            key = LayerKey("output", int(level) * stride + int(attention), int(index))
        else:
            key = LayerKey("middle", 0, int(index))
        found[key] = name
    return dict(sorted(found.items()))
