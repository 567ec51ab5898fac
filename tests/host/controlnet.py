"""A random-weight SD1.5 ControlNet that matches the reduced random UNets of the host tests.

The state dict has the layout of the original lllyasviel ``control_*_sd15_*.pth`` files: ldm/ComfyUI keys
under ``control_model.`` (``input_blocks``, ``middle_block``, ``zero_convs``, ``middle_block_out``,
``input_hint_block``). That layout is the one ComfyUI's ``comfy.controlnet.load_controlnet_state_dict``
detects by shape, at any depth: it finds ``control_model.zero_convs.0.0.weight``, infers the UNet config
from the keys with ``comfy.model_detection.model_config_from_unet`` (model_channels 320, context 768, no
linear proj → the ``SD15`` model config, which adds 8 heads) and builds a ``comfy.cldm.cldm.ControlNet``
wrapped in ``comfy.controlnet.ControlNet``. The diffusers layout (``controlnet_cond_embedding.*``) would
not do: ComfyUI maps it through ``unet_config_from_diffusers_unet``, which only knows the full-size
configs, so a 2-level ControlNet would not be recognised.

The ControlNet has the same levels as ``sd15_unet_config(levels)`` (the UNet of ``make_models(levels)``
and ``write_random_sd15_checkpoint(levels=...)``), so each of its residuals lands on a UNet skip
connection of the same shape. A trained ControlNet starts with zero convolutions and learns them; here
they are random and small (:data:`ZERO_CONV_SCALE`), so applying the ControlNet visibly changes the
UNet's output while the sampled latents stay in a sane range.

Needs ComfyUI importable (the ``comfy_path`` fixture does that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.helpers import init_weights
from tests.host.comfy_env import sd15_unet_config

PREFIX = "control_model."
# Hint images are RGB (what ComfyUI's IMAGE → [B, 3, H, W] hint gives).
HINT_CHANNELS = 3
# The zero convolutions (one per UNet input block, and the middle block's) get PyTorch's default init
# scaled by this: non-zero, so the ControlNet acts, and small, like a ControlNet early in training.
ZERO_CONV_SCALE = 0.1
# The hint encoder (``input_hint_block``: 8 convolutions with SiLU between them) gets its conv weights scaled
# by this, i.e. He-uniform (bound sqrt(6 / fan_in)) instead of PyTorch's default (bound 1 / sqrt(fan_in)).
# With the default init the signal shrinks ~3× per layer and the hint reaches the first block at ~1e-4 of
# the latent's features: the ControlNet would then ignore its hint. He init keeps it at their scale.
HINT_GAIN = 6 ** 0.5


def controlnet_config(levels: int = 2) -> dict[str, Any]:
    """Constructor arguments of ``comfy.cldm.cldm.ControlNet`` for the SD1.5 UNet with ``levels`` levels.

    The same values ComfyUI infers from the state dict (its detected ``SD15`` unet_config), so the module
    built here and the one ComfyUI builds when loading have the same parameters.
    """
    _, ccfg = sd15_unet_config(levels)
    return dict(image_size=32, in_channels=4, model_channels=320, hint_channels=HINT_CHANNELS,
                num_res_blocks=list(ccfg["num_res_blocks"]), channel_mult=list(ccfg["channel_mult"]),
                transformer_depth=list(ccfg["transformer_depth"]), transformer_depth_middle=ccfg["transformer_depth_middle"],
                context_dim=768, num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
                use_linear_in_transformer=False, legacy=False, use_checkpoint=False)


def controlnet_state_dict(levels: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 state dict (``control_model.`` keys) of a random SD1.5 ControlNet with ``levels`` levels.

    Every layer is initialised (ComfyUI builds them uninitialised): PyTorch's default init for convs and
    linears, 1/0 for norms; then the hint encoder's conv weights scaled by :data:`HINT_GAIN` and the zero
    convolutions by :data:`ZERO_CONV_SCALE`.
    """
    import comfy.cldm.cldm
    import comfy.ops

    from tests.host.checkpoint import _assert_all_initialised

    model = comfy.cldm.cldm.ControlNet(**controlnet_config(levels), dtype=torch.float32, device="cpu",
                                       operations=comfy.ops.disable_weight_init)
    init_weights(model, seed)
    _assert_all_initialised(model, "ControlNet")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("input_hint_block.") and name.endswith(".weight"):
                p.mul_(HINT_GAIN)
            elif name.startswith(("zero_convs.", "middle_block_out.")):
                p.mul_(ZERO_CONV_SCALE)
    return {PREFIX + k: v.detach().contiguous() for k, v in model.state_dict().items()}


def write_random_controlnet(path: Path, levels: int = 2, seed: int = 0) -> Path:
    """Write :func:`controlnet_state_dict` as a safetensors file at ``path`` and return the path.

    Stored in fp16 to keep the file small, like the random checkpoint; ComfyUI casts the weights to its
    compute dtype when loading.
    """
    from safetensors.torch import save_file

    path = Path(path)
    sd = {k: v.to(torch.float16).contiguous() for k, v in controlnet_state_dict(levels, seed).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "note": "random weights for tests"})
    return path


def load_random_controlnet(levels: int = 2, seed: int = 0) -> Any:
    """ComfyUI's ``comfy.controlnet.ControlNet`` built by ComfyUI's own loader from the random state dict.

    Loaded under ``torch.inference_mode`` because ComfyUI's executor runs loader nodes that way, so the
    weights are inference tensors as in a real run.
    """
    import comfy.controlnet

    with torch.inference_mode():
        control = comfy.controlnet.load_controlnet_state_dict(controlnet_state_dict(levels, seed))
    assert control is not None, "ComfyUI did not detect the random state dict as a ControlNet"
    return control
