"""Finding and starting a real ComfyUI for the host tests, and random-weight models in it.

ComfyUI is found through ``COMFYUI_PATH`` or by the pack living in
``ComfyUI/custom_nodes/``. Models are real ComfyUI models loaded through ComfyUI's
own loader from a random-weight diffusers UNet mapped with ComfyUI's
diffusers→ComfyUI key map, so the same weights exist on both hosts.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[2]


def find_comfyui() -> Optional[Path]:
    env = os.environ.get("COMFYUI_PATH")
    candidates = [Path(env)] if env else []
    candidates.append(ROOT.parent.parent)  # ComfyUI/custom_nodes/<this pack>
    for c in candidates:
        if (c / "comfy" / "model_patcher.py").is_file() and (c / "nodes.py").is_file():
            return c.resolve()
    return None


def import_comfy(path: Path) -> None:
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()


def load_pack() -> Any:
    """Load the pack through ComfyUI's own custom-node loader; returns the pack module."""
    import nodes

    ok = asyncio.run(nodes.load_custom_node(str(ROOT)))
    assert ok, "ComfyUI's loader refused the pack (see the log above)"
    return sys.modules[str(ROOT).replace(".", "_x_")]


def sd15_unet_config(levels: int) -> tuple[dict, dict]:
    """(diffusers config, ComfyUI unet_config) of an SD1.5-format UNet with ``levels`` levels.

    The full shape has 4 levels (16 transformer keys). Fewer levels keep model_channels
    320 and context 768, so ComfyUI still detects it as SD1.5, and it is far faster on a CPU.
    """
    chans = [320, 640, 1280, 1280][:levels]
    attn = [True, True, True, False][:levels] if levels == 4 else [True] * (levels - 1) + [False]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    diffusers_cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=tuple(chans),
                         down_block_types=down, up_block_types=up, cross_attention_dim=768, attention_head_dim=8)
    depth = []
    for a in attn:
        depth += [1 if a else 0] * 2
    depth_out = []
    for a in attn:
        depth_out += [1 if a else 0] * 3
    mult = [c // 320 for c in chans]
    comfy_cfg = dict(num_res_blocks=[2] * levels, channel_mult=mult, transformer_depth=depth,
                     transformer_depth_output=depth_out, transformer_depth_middle=1)
    return diffusers_cfg, comfy_cfg


def load_as_comfy(unet: Any, comfy_unet_config: dict, config_class: str) -> Any:
    """ComfyUI's ModelPatcher of a diffusers ``unet``'s weights, through ComfyUI's own key map
    (``unet_to_diffusers``) and loader: every diffusers weight lands on its own ComfyUI key, ComfyUI detects
    ``config_class`` and its UNet has exactly these weights."""
    import comfy.sd
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(dict(comfy_unet_config))
    dsd = unet.state_dict()
    missing = set(dsd) - set(mapping)
    assert not missing, f"diffusers keys without a ComfyUI mapping: {sorted(missing)[:5]}"
    csd = {comfy_key: dsd[diff_key].detach().clone() for diff_key, comfy_key in mapping.items() if diff_key in dsd}
    keys = set(csd)  # the loader consumes the dict
    assert len(keys) == len(dsd)
    with torch.inference_mode():  # ComfyUI's loaders run inside the executor: weights are inference tensors
        patcher = comfy.sd.load_diffusion_model_state_dict(csd)
    assert patcher is not None, "ComfyUI did not detect the random UNet as an SD model"
    assert type(patcher.model.model_config).__name__ == config_class
    own = set(patcher.model.diffusion_model.state_dict())
    assert own == keys, sorted(own ^ keys)[:5]
    return patcher


def make_models(levels: int, seed: int = 0) -> tuple[Any, Any]:
    """(diffusers UNet, ComfyUI ModelPatcher) with identical random weights."""
    from diffusers import UNet2DConditionModel

    from tests.helpers import assert_nontrivial, init_weights

    dcfg, ccfg = sd15_unet_config(levels)
    unet = init_weights(UNet2DConditionModel(**dcfg), seed).eval()
    assert_nontrivial(unet, dcfg)
    return unet, load_as_comfy(unet, ccfg, "SD15")


def make_narrow_sd15(seed: int = 0, width: int = 32, dtype: torch.dtype = torch.float32) -> Any:
    """A ComfyUI SD1.5 model with the full depth (4 levels, 3 downsamplings, 16 transformer keys) but ``width``
    channels instead of 320: ComfyUI's own UNet class and config type (SD15: eps, its latent format), built as
    ComfyUI's loader builds a detected model, fast enough on a CPU to run latents of real frame sizes. Detection
    alone would refuse it (it matches model_channels 320), so the detected config is given to SD15 directly.

    ``dtype``: the UNet's weight and inference dtype, with no manual cast (as ComfyUI loads SD1.5 in fp16 on a GPU
    that computes in fp16): ComfyUI's ops then hold the weights in ``dtype`` and compute in it, also on the CPU.
    The same seed gives the same weights in every dtype (the fp32 ones, rounded)."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from diffusers import UNet2DConditionModel

    from tests.helpers import init_weights

    dcfg, ccfg = sd15_unet_config(4)
    dcfg["block_out_channels"] = tuple(c * width // 320 for c in dcfg["block_out_channels"])
    unet = init_weights(UNet2DConditionModel(**dcfg), seed).eval()
    dsd = unet.state_dict()
    sd = {comfy_key: dsd[diff_key].clone() for diff_key, comfy_key in comfy.utils.unet_to_diffusers(ccfg).items() if diff_key in dsd}
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    assert unet_config["model_channels"] == width, unet_config
    config = comfy.supported_models.SD15(unet_config)
    config.set_inference_dtype(dtype, None)  # no manual cast: the ops compute in the weights' dtype
    with torch.inference_mode():
        model = config.get_model(sd, "")
        model.load_model_weights(sd, "")
    return comfy.model_patcher.CoreModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                                offload_device=comfy.model_management.unet_offload_device())


def comfy_eps(patcher: Any, x: torch.Tensor, t: int, ctx: torch.Tensor, cond_or_uncond: Optional[list[int]] = None,
              extra: Optional[dict] = None) -> torch.Tensor:
    """One real ComfyUI UNet forward (patches and injections applied), returning eps.

    Builds the transformer options exactly as ComfyUI's ``calc_cond_batch`` does.
    """
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    model = patcher.model
    dev = patcher.load_device
    to = patcher.model_options.get("transformer_options", {}).copy()
    to["cond_or_uncond"] = list(cond_or_uncond or [0])
    ts = torch.full((x.shape[0],), float(t), device=dev)
    to["sigmas"] = model.model_sampling.sigma(ts)
    if extra:
        to.update(extra)
    with torch.inference_mode():
        dtype = model.get_dtype()
        out = model.diffusion_model(x.to(dev, dtype), timesteps=ts, context=ctx.to(dev, dtype), transformer_options=to)
    return out.float().cpu()


def nodes_of(pack: Any) -> dict:
    """ComfyUI's registry of node classes (the pack's nodes as ComfyUI registered them)."""
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


def host_module(pack: Any, name: str) -> Any:
    """A module of the loaded pack's ``nodes/`` package (as ComfyUI imported it)."""
    import importlib

    return importlib.import_module(f"{pack.__name__}.nodes.{name}")


def inflated(pack: Any, model: Any, frame_attention: str = "first_frame", temporal: bool = True) -> Any:
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        node = nodes_of(pack)["VP2P_InflateT2S"]
        return node.execute(model=model, frame_attention=frame_attention, temporal_attention=temporal).result[0]


def make_clip(seed: int = 0) -> Any:
    """A random-weight SD1.x CLIP-L (ComfyUI's own class and loader, the real SD1 tokenizer)."""
    import comfy.sd

    from tests.host.checkpoint import _clip_state_dict

    with torch.inference_mode():
        return comfy.sd.load_text_encoder_state_dicts([_clip_state_dict(seed)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)


def encode(clip: Any, text: str) -> list:
    """CONDITIONING of ``text`` exactly as ComfyUI's CLIP Text Encode node makes it."""
    import nodes

    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(clip, text)[0]
