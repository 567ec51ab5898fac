"""AnimateDiff in the host tests: the real AnimateDiff-Evolved (ADE) and VideoHelperSuite (VHS) packs
(unmodified snapshots in ``../shared/community``), a random-weight motion module in the format ADE loads, and
the full-layout SD1.5 UNet a motion module needs.

* ADE hard-codes SD1.5's block widths (320/640/1280/1280) and injects one temporal module after each
  spatial transformer / first ResBlock of every block, so the UNet must have SD1.5's full layout; its weights
  are kept in fp16 (ComfyUI computes in fp32 on a CPU, casting per layer: ``manual_cast``), 1.7 GB instead of
  3.4 GB, as most SD1.5 checkpoints ship.
* The motion module is built by ADE's own ``AnimateDiffModel`` from a skeleton of ``mm_sd_v15_v2``'s key set
  (down/up/mid blocks, position encodings of 32 frames), initialised here (ADE builds its layers without
  init) and written in fp16. ``attention_blocks`` 1 (instead of v2's 2) is the smallest layout ADE accepts:
  290 M parameters instead of 450 M. ADE's loader checks the key set against the model it builds.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from tests.helpers import init_weights

ROOT = Path(__file__).resolve().parents[2]
COMMUNITY = ROOT.parent / "shared" / "community"
ADE_DIR = COMMUNITY / "ComfyUI-AnimateDiff-Evolved"
VHS_DIR = COMMUNITY / "ComfyUI-VideoHelperSuite"
MOTION_MODULE = "mm_random_v2.safetensors"
SD15_FULL = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1,
                 use_spatial_transformer=True, context_dim=768, num_heads=8, num_head_channels=-1, legacy=False,
                 use_linear_in_transformer=False, adm_in_channels=None)


def community_available() -> bool:
    return (ADE_DIR / "__init__.py").is_file() and (VHS_DIR / "__init__.py").is_file()


def load_pack_module(path: Path) -> Any:
    """A custom node pack loaded through ComfyUI's own loader (its nodes registered); its module."""
    import asyncio

    import nodes

    name = str(path).replace(".", "_x_")
    if name not in sys.modules:
        assert asyncio.run(nodes.load_custom_node(str(path))), f"ComfyUI's loader refused {path.name}"
    return sys.modules[name]


def ade_module(ade: Any, name: str) -> Any:
    import importlib

    return importlib.import_module(f"{ade.__name__}.animatediff.{name}")


def sd15_full_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """ComfyUI-keyed random weights of SD1.5's full UNet (860 M parameters) in ``dtype``."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(dtype=dtype, device="cpu", operations=comfy.ops.disable_weight_init, **SD15_FULL)
    init_weights(unet, seed)
    return {k: v.detach() for k, v in unet.state_dict().items()}


def load_sd15_full(seed: int = 0) -> Any:
    """A ComfyUI MODEL of SD1.5's full UNet that ComfyUI's loader detects as SD15, weights in fp16."""
    import comfy.sd

    sd = sd15_full_state_dict(seed)
    with torch.inference_mode():  # as the checkpoint loader inside the executor
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float16})
    assert patcher is not None and type(patcher.model.model_config).__name__ == "SD15"
    return patcher


def motion_module_state_dict(ade: Any, seed: int = 0, attention_blocks: int = 1, frames: int = 32) -> dict[str, torch.Tensor]:
    """Random weights of an SD1.5 AnimateDiff v2 motion module as ADE's ``AnimateDiffModel`` builds it (fp16)."""
    import comfy.ops

    mm = ade_module(ade, "motion_module_ad")
    skeleton = {"down_blocks.3.motion_modules.1.temporal_transformer.norm.weight": torch.zeros(1),
                "up_blocks.3.motion_modules.2.temporal_transformer.norm.weight": torch.zeros(1),
                "mid_block.motion_modules.0.temporal_transformer.norm.weight": torch.zeros(1),
                ("down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks."
                 f"{attention_blocks - 1}.pos_encoder.pe"): torch.zeros(1, frames, 320)}
    info = mm.AnimateDiffInfo(sd_type=mm.ModelTypeSD.SD1_5, mm_format=mm.AnimateDiffFormat.ANIMATEDIFF,
                              mm_version=mm.AnimateDiffVersion.V2, mm_name=MOTION_MODULE)
    model = mm.AnimateDiffModel(skeleton, info, init_kwargs={mm.InitKwargs.OPS: comfy.ops.disable_weight_init})
    init_weights(model, seed)
    return {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}


def write_motion_module(ade: Any, folder: Path, seed: int = 0, attention_blocks: int = 1) -> Path:
    """The random motion module as a safetensors file in ``folder`` (registered as an ADE model folder)."""
    import folder_paths
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MOTION_MODULE
    if not path.is_file():
        save_file(motion_module_state_dict(ade, seed, attention_blocks), str(path))
    folder_paths.add_model_folder_path("animatediff_models", str(folder))
    return path
