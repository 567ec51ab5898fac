"""ComfyUI host: the random SD1.5 ControlNet of ``tests/host/controlnet.py`` with stock ComfyUI only.

These tests pin down the test fixture itself before the pack composes with it: ComfyUI's own loader
(file → ``ControlNetLoader``) must detect it as an SD1.5 ControlNet that fits the reduced random UNet, and
applied with the stock ``ControlNetApplyAdvanced`` it must change what a stock KSampler samples — else a
later "the edit keeps the ControlNet" test could pass with a ControlNet that does nothing.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.host.comfy_env import encode, make_clip
from tests.host.controlnet import PREFIX, controlnet_state_dict, load_random_controlnet, write_random_controlnet

FRAMES = 2
LATENT = 8  # latent height/width; the hint image is LATENT * 8 pixels, the latent's pixel size
STEPS = 3
CFG = 7.5
PROMPT = "a cat running on the grass"
CN_NAME = "vp2p_random_controlnet_sd15.safetensors"


@pytest.fixture(scope="module")
def clip(comfy_path):
    return make_clip(0)


@pytest.fixture(scope="module")
def controlnet_file(comfy_path, tmp_path_factory):
    """The random ControlNet as a file, in a folder registered as a ComfyUI ``controlnet`` folder (unregistered after)."""
    import folder_paths

    folder = tmp_path_factory.mktemp("controlnet")
    path = write_random_controlnet(folder / CN_NAME, levels=2, seed=0)
    folder_paths.add_model_folder_path("controlnet", str(folder))
    yield path
    folder_paths.folder_names_and_paths["controlnet"][0].remove(str(folder))
    path.unlink(missing_ok=True)  # ~110 MB; pytest keeps the last few session folders


@pytest.fixture(scope="module")
def controlnet(comfy_path):
    return load_random_controlnet(levels=2, seed=0)


def hint(seed: int = 0) -> torch.Tensor:
    """A random IMAGE [frames, H, W, 3] in [0, 1] of the latent's pixel size."""
    return torch.rand(FRAMES, LATENT * 8, LATENT * 8, 3, generator=torch.Generator().manual_seed(seed))


def ksample(model, positive, negative, seed: int = 0) -> torch.Tensor:
    """Stock KSampler (Euler, normal schedule, full denoise) from an empty latent, as the node runs it."""
    import nodes

    latent = {"samples": torch.zeros(FRAMES, 4, LATENT, LATENT)}
    with torch.inference_mode():
        out = nodes.common_ksampler(model, seed, STEPS, CFG, "euler", "normal", positive, negative, latent)[0]
    return out["samples"].clone()


def apply(controlnet, positive, negative, image, strength: float):
    import nodes

    with torch.inference_mode():
        return nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, controlnet, image, strength, 0.0, 1.0)


def test_the_file_loads_through_the_controlnet_loader_node(controlnet_file, small_models, caplog):
    """ComfyUI lists the file, and its loader node builds its own ControlNet from it with every weight found,
    with one residual per input block of the random UNet (so each lands on a skip connection)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import folder_paths
    from safetensors import safe_open

    import nodes

    assert CN_NAME in folder_paths.get_filename_list("controlnet")
    assert CN_NAME in nodes.ControlNetLoader.INPUT_TYPES()["required"]["control_net_name"][0]
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        (control,) = nodes.ControlNetLoader().load_controlnet(CN_NAME)
    assert not [r.getMessage() for r in caplog.records if "controlnet" in r.getMessage().lower()]
    assert type(control) is comfy.controlnet.ControlNet
    net = control.control_model
    assert type(net) is comfy.cldm.cldm.ControlNet
    assert net.model_channels == 320 and net.num_heads == 8

    with safe_open(str(controlnet_file), "pt") as f:
        keys = set(f.keys())
    assert {PREFIX + k for k in net.state_dict()} == keys
    unet = small_models[1].model.diffusion_model
    assert len(net.zero_convs) == len(unet.input_blocks)
    # Each input block's first layer (conv_in, ResBlock or Downsample) sets the channels of its skip connection.
    assert [zc[0].out_channels for zc in net.zero_convs] == [block[0].out_channels for block in unet.input_blocks]


def test_in_memory_controlnet_matches_the_file(controlnet, controlnet_file):
    """``load_random_controlnet`` and the file hold the same weights (up to the file's fp16)."""
    import comfy.controlnet

    with torch.inference_mode():
        from_file = comfy.controlnet.load_controlnet(str(controlnet_file))
    a, b = controlnet.control_model.state_dict(), from_file.control_model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3, rtol=1e-3) for k in a)
    zero_convs = [v for k, v in controlnet_state_dict().items() if ".zero_convs." in k or ".middle_block_out." in k]
    assert zero_convs and all(v.abs().max() > 0 for v in zero_convs), "the zero convolutions must not be zero"


def test_controlnet_changes_the_stock_ksampler_and_strength_zero_is_exact(small_models, clip, controlnet):
    """Strength 1 changes the sampled latent, a different hint changes it again (the residuals depend on
    the hint, not only on the latent), and strength 0 gives exactly the plain KSampler's latent."""
    _, model = small_models
    pos, neg = encode(clip, PROMPT), encode(clip, "")
    plain = ksample(model, pos, neg)
    assert torch.isfinite(plain).all() and plain.std() > 1e-3

    with_cn = ksample(model, *apply(controlnet, pos, neg, hint(0), 1.0))
    assert torch.isfinite(with_cn).all()
    change = (with_cn - plain).norm() / plain.norm()
    assert change > 1e-2, f"the ControlNet barely changes the sample (relative change {float(change):.2e})"

    other_hint = ksample(model, *apply(controlnet, pos, neg, hint(1), 1.0))
    hint_change = (other_hint - with_cn).norm() / plain.norm()
    assert hint_change > 1e-3, f"the hint image barely matters (relative change {float(hint_change):.2e})"

    off = ksample(model, *apply(controlnet, pos, neg, hint(0), 0.0))
    assert torch.allclose(off, plain, atol=1e-6, rtol=0)
