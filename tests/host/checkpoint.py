"""A random-weight SD1.5-format single-file checkpoint for running whole workflows.

The file has the layout of an original SD1.x ``.ckpt``/``.safetensors`` (``model.diffusion_model.``,
``first_stage_model.``, ``cond_stage_model.transformer.text_model.``), so ComfyUI's own
``CheckpointLoaderSimple`` detects it as SD15 and builds MODEL, CLIP and VAE from it. No weights are
downloaded: the UNet is a random diffusers UNet mapped with ComfyUI's diffusers→ComfyUI key map (as in
:func:`tests.host.comfy_env.make_models`), and the VAE and text encoder are ComfyUI's own classes,
initialised here.

Needs ComfyUI importable (the ``comfy_path`` fixture does that).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tests.helpers import assert_nontrivial, init_weights
from tests.host.comfy_env import sd15_unet_config

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# The SD1.x/SD2.x VAE as ComfyUI's ``comfy.sd.VAE`` builds it when it sees ``decoder.conv_in.weight``
# (comfy/sd.py, the "default SD1.x/SD2.x VAE parameters" branch): it ignores the weights' shapes apart
# from z_channels, so a smaller VAE would not load — the full shape is required.
SD1_VAE_DDCONFIG: dict = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}

# Standard deviation of the random token/position embeddings: small, like CLIP's own init (0.02),
# so the 12 pre-norm layers stay well conditioned.
EMBEDDING_STD = 0.02


def _unet_state_dict(levels: int, seed: int) -> dict[str, torch.Tensor]:
    """ComfyUI-keyed state dict of a random diffusers SD1.5-shaped UNet (no prefix)."""
    import comfy.utils
    from diffusers import UNet2DConditionModel

    dcfg, ccfg = sd15_unet_config(levels)
    unet = init_weights(UNet2DConditionModel(**dcfg), seed).eval()
    assert_nontrivial(unet, dcfg)
    mapping = comfy.utils.unet_to_diffusers(ccfg)
    dsd = unet.state_dict()
    missing = sorted(set(dsd) - set(mapping))
    assert not missing, f"diffusers keys without a ComfyUI mapping: {missing[:5]}"
    return {comfy_key: dsd[diff_key] for diff_key, comfy_key in mapping.items() if diff_key in dsd}


def _vae_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """State dict of ComfyUI's SD1 ``AutoencoderKL`` with every parameter written.

    ComfyUI builds its layers with ``disable_weight_init`` ops (no init at all), so init_weights has to
    reach every Conv2d/Linear/GroupNorm; the check below makes sure nothing is left as ``torch.empty``.
    """
    from comfy.ldm.models.autoencoder import AutoencoderKL

    vae = AutoencoderKL(ddconfig=dict(SD1_VAE_DDCONFIG), embed_dim=SD1_VAE_DDCONFIG["z_channels"])
    init_weights(vae, seed)
    _assert_all_initialised(vae, "VAE")
    return vae.state_dict()


def _random_text_encoder(clip: nn.Module, seed: int) -> None:
    """Random weights for a text encoder: ``init_weights``, then N(0, EMBEDDING_STD) token/position embeddings."""
    init_weights(clip, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in clip.modules():
            if isinstance(m, nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * EMBEDDING_STD)


def _clip_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """``text_model.*`` state dict of ComfyUI's SD1 CLIP-L text encoder, every weight written."""
    import comfy.ops
    from comfy.sd1_clip import SDClipModel

    # manual_cast keeps plain fp32 parameters on the CPU; its Linear/Embedding/LayerNorm subclass torch's.
    clip = SDClipModel(device="cpu", dtype=torch.float32, model_options={"custom_operations": comfy.ops.manual_cast})
    _random_text_encoder(clip, seed)
    text_model = clip.transformer.text_model
    _assert_all_initialised(text_model, "CLIP text model")
    # Original SD1.x checkpoints carry neither text_projection nor logit_scale; ComfyUI expects them absent
    # (comfy/sd.py CLIP.__init__ filters exactly those two from its "clip missing" warning).
    return {f"text_model.{k}": v for k, v in text_model.state_dict().items()}


def _assert_all_initialised(module: nn.Module, what: str) -> None:
    """Every floating parameter must have been written: uninitialised memory shows up as NaN/huge values,
    and a norm left untouched would be indistinguishable from a missing key at load time."""
    seen = set()
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)):
            seen.update(id(p) for p in m.parameters(recurse=False))
    for name, p in module.named_parameters():
        assert id(p) in seen, f"{what}: parameter {name} of an unhandled layer type would stay uninitialised"
        assert torch.isfinite(p).all(), f"{what}: parameter {name} is not finite"


def write_random_sd15_checkpoint(path: Path, seed: int = 0, levels: int = 2, full: bool = False) -> Path:
    """Write a random-weight SD1.5-format single-file safetensors checkpoint to ``path`` and return it.

    ``levels`` UNet levels (1–4) keep model_channels 320 and context 768, so ComfyUI detects the file as
    SD15 at any depth; 2 levels sample quickly on a CPU. ``full``: SD1.5's full UNet layout instead
    (320/640/1280/1280, 860 M parameters, :func:`tests.host.animatediff.sd15_full_state_dict`), which an
    AnimateDiff motion module needs (AnimateDiff-Evolved hard-codes SD1.5's block widths); ~2 GB on disk.
    Weights are stored in fp16 to keep the file small (ComfyUI casts them to its compute dtype when loading).
    """
    from safetensors.torch import save_file

    path = Path(path)
    sd: dict[str, torch.Tensor] = {}
    if full:
        from tests.host.animatediff import sd15_full_state_dict

        def unet() -> dict[str, torch.Tensor]:
            # built and initialised in fp16 directly: 1.7 GB in memory instead of 3.4 GB
            return sd15_full_state_dict(seed, torch.float16)
    else:
        def unet() -> dict[str, torch.Tensor]:
            return _unet_state_dict(levels, seed)
    for prefix, make in ((UNET_PREFIX, unet), (VAE_PREFIX, lambda: _vae_state_dict(seed + 1)),
                         (CLIP_PREFIX, lambda: _clip_state_dict(seed + 2))):
        part = make()
        for k, v in part.items():
            # position_ids is an int buffer in some CLIP implementations; keep non-float tensors as they are.
            sd[prefix + k] = v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
        del part
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "note": "random weights for tests"})
    return path


# -- an SDXL-family checkpoint -------------------------------------------------------------------------

# ComfyUI's detection matches an SDXL-family model by model_channels, transformer depths, context and adm
# width (comfy/supported_models.py), not by the channel multipliers: Segmind Vega's depths with every level at
# 320 channels are detected as Segmind_Vega (an SDXL subclass: pooled + size conditioning, SDXL latent format)
# with 115 M parameters instead of 745 M.
SDXL_UNET_CONFIG: dict = {
    "model_channels": 320, "use_linear_in_transformer": True, "transformer_depth": [0, 0, 1, 1, 2, 2], "context_dim": 2048,
    "adm_in_channels": 2816, "use_temporal_attention": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential", "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 1, 1], "transformer_depth_middle": 2, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
    "num_head_channels": 64, "use_temporal_resblock": False, "use_checkpoint": False,
}
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."


def _sdxl_unet_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """State dict of ComfyUI's own UNet with ``SDXL_UNET_CONFIG``, every parameter written."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**SDXL_UNET_CONFIG, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    init_weights(unet, seed)
    _assert_all_initialised(unet, "SDXL UNet")
    return unet.state_dict()


def _sdxl_clip_state_dicts(seed: int) -> dict[str, torch.Tensor]:
    """ComfyUI's full SDXL text encoders (CLIP-L and CLIP-G: the checkpoint loader builds them at their real
    size, so every weight must be in the file), random, keyed as an SDXL checkpoint keys them."""
    import comfy.ops
    import comfy.sdxl_clip

    clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float32, model_options={"custom_operations": comfy.ops.manual_cast})
    _random_text_encoder(clip, seed)
    for name in ("clip_l", "clip_g"):  # the only plain parameters: CLIP's logit scale, created initialised
        assert torch.isfinite(getattr(clip, name).logit_scale).all()
        _assert_all_initialised(getattr(clip, name).transformer, f"SDXL {name}")
    out = {}
    for k, v in clip.state_dict().items():
        if k.startswith("clip_l.transformer.text_model."):
            out[SDXL_CLIP_L_PREFIX + k[len("clip_l.transformer."):]] = v
        elif k.startswith("clip_g."):  # already in the layout ComfyUI converts OpenCLIP-G keys to
            out[SDXL_CLIP_G_PREFIX + k[len("clip_g."):]] = v
    return out


def write_random_sdxl_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write a random-weight SDXL-family single-file checkpoint (``SDXL_UNET_CONFIG``, ComfyUI detects it as
    Segmind_Vega) with full-size CLIP-L + CLIP-G and the SD VAE, in fp16 (~1.9 GB)."""
    from safetensors.torch import save_file

    path = Path(path)
    sd: dict[str, torch.Tensor] = {}
    for prefix, part in ((UNET_PREFIX, _sdxl_unet_state_dict(seed)), (VAE_PREFIX, _vae_state_dict(seed + 1)), ("", _sdxl_clip_state_dicts(seed + 2))):
        for k, v in part.items():
            sd[prefix + k] = v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
        del part
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "note": "random weights for tests"})
    return path
