"""Random-weight SD2.x and SDXL-family models and their text encoders, in a real ComfyUI.

* SD2.x: a ComfyUI UNet (``openaimodel.UNetModel``) of SD2's detected shape (model_channels 320, context
  1024, linear transformer projections) with 2 levels of 320 channels and 5 res blocks per level, so that
  ``output_blocks.11.1`` exists: ComfyUI's ``SD20.model_type`` decides v-prediction from that block's
  ``norm1.bias`` (std > 0.09: 768-v; else eps, the 512-base). The state dict goes through ComfyUI's own
  loader (``load_diffusion_model_state_dict``), which detects SD20 and the prediction from the weights.
* SDXL family: ComfyUI's SDXL architecture (adm 2816 = pooled 1280 + 6 size embeddings, context 2048,
  linear projections, head dim 64) in Segmind-Vega's layout (transformer depth [0,0,1,1,2,2]) but 64
  channels instead of 320. Detection would refuse the width (every SDXL-family config matches
  model_channels 320; a detected full-width Vega is ~745M parameters), so the detected config is given to
  ``supported_models.Segmind_Vega`` (an SDXL subclass: ``model_base.SDXL``, SDXL latent format) directly,
  as ``comfy_env.make_narrow_sd15`` does for SD1.5.
* CLIPs: ComfyUI's own ``SD2ClipModel`` (OpenCLIP-H) and ``SDXLClipModel`` (CLIP-L + CLIP-G) with their
  real tokenizers, built by ``comfy.sd.CLIP`` as the loader builds them, with 3 layers instead of 24/12/32
  (the loader detects an encoder by its layer count, so it is built from the target directly) and the
  real widths (the UNet's context is their concatenation, the pooled output CLIP-G's 1280).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.helpers import init_weights


def _unet_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    # transformer_depth_output lists the output blocks top level first (as detect_unet_config gives it)

    unet = UNetModel(dtype=torch.float32, device="cpu", **config)
    init_weights(unet, seed)
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def sd2_unet_config() -> dict:
    return dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[5, 5], channel_mult=[1, 1],
                transformer_depth=[1] * 5 + [0] * 5, transformer_depth_output=[1] * 6 + [0] * 6, transformer_depth_middle=1,
                use_spatial_transformer=True, use_linear_in_transformer=True, context_dim=1024, legacy=False,
                num_heads=-1, num_head_channels=64, adm_in_channels=None)


def make_sd2(v_prediction: bool, seed: int = 0) -> Any:
    """A ComfyUI MODEL that ComfyUI's loader detects as SD20, v-prediction (768-v) or eps (512-base) from the weights."""
    import comfy.model_base
    import comfy.sd

    sd = _unet_state_dict(sd2_unet_config(), seed)
    key = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    g = torch.Generator().manual_seed(seed + 7)
    sd[key] = torch.randn(sd[key].shape, generator=g) * (0.2 if v_prediction else 0.01)
    with torch.inference_mode():
        patcher = comfy.sd.load_diffusion_model_state_dict(sd)
    assert patcher is not None, "ComfyUI did not detect the random UNet"
    assert type(patcher.model.model_config).__name__ == "SD20", type(patcher.model.model_config)
    want = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    assert patcher.model.model_type == want, patcher.model.model_type
    return patcher


def sdxl_unet_config(width: int = 64) -> dict:
    return dict(image_size=32, in_channels=4, out_channels=4, model_channels=width, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], transformer_depth_middle=2,
                use_spatial_transformer=True, use_linear_in_transformer=True, context_dim=2048, legacy=False,
                num_heads=-1, num_head_channels=64, adm_in_channels=2816, num_classes="sequential")


def make_sdxl(seed: int = 0, width: int = 64, in_channels: int = 4) -> Any:
    """A ComfyUI SDXL-family MODEL (``model_base.SDXL`` of ``Segmind_Vega``'s config, ``width`` channels)."""
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    sd = _unet_state_dict({**sdxl_unet_config(width), "in_channels": in_channels}, seed)
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    vega = comfy.supported_models.Segmind_Vega.unet_config
    for k, v in vega.items():
        if k != "model_channels":
            assert unet_config.get(k) == v, (k, unet_config.get(k), v)
    config = comfy.supported_models.Segmind_Vega(unet_config)
    config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():
        model = config.get_model(sd, "")
        model.load_model_weights(sd, "")
    assert isinstance(model, comfy.model_base.SDXL)
    return comfy.model_patcher.CoreModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                                offload_device=comfy.model_management.unet_offload_device())


def make_detected_sdxl(seed: int = 0) -> Any:
    """An SDXL-family MODEL that ComfyUI's own loader detects (``load_diffusion_model_state_dict``): Segmind Vega's
    depths at 320 channels on every level (``tests.host.checkpoint.SDXL_UNET_CONFIG``, 115 M parameters; detection
    does not read the channel multipliers), the UNet the SDXL workflow checkpoint carries."""
    import comfy.model_base
    import comfy.sd

    from tests.host.checkpoint import _sdxl_unet_state_dict

    with torch.inference_mode():
        patcher = comfy.sd.load_diffusion_model_state_dict(_sdxl_unet_state_dict(seed))
    assert patcher is not None and type(patcher.model.model_config).__name__ == "Segmind_Vega"
    assert isinstance(patcher.model, comfy.model_base.SDXL)
    return patcher


def _random_clip(target: Any, options: dict, seed: int) -> Any:
    import comfy.ops
    import comfy.sd

    clip = comfy.sd.CLIP(target, model_options={**options, "custom_operations": comfy.ops.manual_cast, "dtype": torch.float32})
    model = clip.cond_stage_model
    init_weights(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
        for name, p in model.named_parameters():
            if name.endswith("text_projection.weight"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            assert torch.isfinite(p).all(), name
    return clip


def make_clip_sd2(seed: int = 0) -> Any:
    import comfy.supported_models_base
    import comfy.text_encoders.sd2_clip as sd2

    target = comfy.supported_models_base.ClipTarget(sd2.SD2Tokenizer, sd2.SD2ClipModel)
    return _random_clip(target, {"clip_h_model_config": {"num_hidden_layers": 3, "intermediate_size": 256}}, seed)


def make_clip_sdxl(seed: int = 0) -> Any:
    import comfy.sdxl_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    small = {"num_hidden_layers": 3, "intermediate_size": 256}
    return _random_clip(target, {"clip_l_model_config": small, "clip_g_model_config": small}, seed)
