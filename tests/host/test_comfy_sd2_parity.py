"""ComfyUI host ↔ diffusers host on an SD2.x v-prediction UNet: the same weights give the same UNet output and the same edit.

The UNet is a random diffusers ``UNet2DConditionModel`` in the layout of the SD2 host tests
(``tests.host.model_zoo.sd2_unet_config``: 2 levels of 320 channels, 5 res blocks per level, transformers on the top
level only, heads of 64 channels, linear projections, context 1024), mapped to ComfyUI's keys with ComfyUI's own
``unet_to_diffusers`` and loaded by ComfyUI's loader, which detects SD20 and, from the spread of
``output_blocks.11.1.transformer_blocks.0.norm1.bias``, v-prediction (768-v).
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from tests.host import family_checks as fc
from tests.host.comfy_env import encode, host_module, inflated, load_as_comfy, nodes_of
from tests.host.model_zoo import make_clip_sd2, sd2_unet_config

SIZE = 16  # latent 16×16: images of 128×128
FRAMES = 3
V_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"  # SD20.model_type: std > 0.09 -> V_PREDICTION
log = logging.getLogger("VideoP2P")


def diffusers_sd2_config() -> dict:
    """The diffusers config of ``sd2_unet_config``: 2 levels of 320 channels, 5 res blocks each (6 on the way up),
    transformers on the top level and in the middle, 5 heads of 64 (diffusers' ``attention_head_dim`` is the head
    count here, as in SD2's own config), linear projections, context 1024."""
    return dict(sample_size=SIZE, in_channels=4, out_channels=4, layers_per_block=5, block_out_channels=(320, 320),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=1024, attention_head_dim=5, use_linear_projection=True)


@pytest.fixture(scope="module")
def models(comfy_path):
    """(diffusers UNet, ComfyUI MODEL) with the same random weights; ComfyUI detects SD20 with v-prediction."""
    import comfy.model_base
    import comfy.utils
    from diffusers import UNet2DConditionModel

    from tests.helpers import init_weights

    unet = init_weights(UNet2DConditionModel(**diffusers_sd2_config()), 0).eval()
    mapping = comfy.utils.unet_to_diffusers(sd2_unet_config())
    v_key = [d for d, c in mapping.items() if c == V_KEY]
    assert v_key == ["up_blocks.1.attentions.5.transformer_blocks.0.norm1.bias"], v_key
    with torch.no_grad():  # the 768-v spread on the block ComfyUI reads the prediction from
        p = unet.get_parameter(v_key[0])
        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.2)
    patcher = load_as_comfy(unet, sd2_unet_config(), "SD20")
    assert float(patcher.model.diffusion_model.state_dict()[V_KEY].float().std(unbiased=False)) > 0.09
    assert patcher.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    return unet, patcher


@pytest.fixture(scope="module")
def clip(comfy_path):
    return make_clip_sd2(0)


def test_v_sampling_uses_the_sd_schedule(pack, models):
    """ComfyUI's SD20 v model_sampling is the discrete scaled-linear schedule of SD1 (β 0.00085 → 0.012, no zero-SNR
    rescale): its σ table is that of ``sd_alphas_cumprod``, the ᾱ the diffusers denoiser is given."""
    import comfy.model_sampling

    _, patcher = models
    ms = patcher.get_model_object("model_sampling")
    assert isinstance(ms, comfy.model_sampling.V_PREDICTION) and isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete)
    assert not ms.zsnr
    want = pack.vp2p.schedule.sigma_from_alpha(pack.vp2p.schedule.sd_alphas_cumprod())
    torch.testing.assert_close(ms.sigmas.double(), want, atol=1e-5, rtol=1e-5)


def test_one_unet_forward_agrees(pack, models):
    """The key map: ComfyUI's UNet and diffusers' give the same raw (v) output for the same x, t, context."""
    unet, patcher = models
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, SIZE, SIZE, generator=g), torch.randn(2, 7, 1024, generator=g)
    t = torch.tensor([400.0, 400.0])
    with torch.no_grad():
        comfy_out = patcher.model.diffusion_model(x, timesteps=t, context=ctx)
        diff_out = unet(x, t, encoder_hidden_states=ctx).sample
    err = float((comfy_out - diff_out).abs().max())
    log.info("SD2-v plain forward: max |ComfyUI - diffusers| = %.3g (output max %.3g)", err, float(comfy_out.abs().max()))
    torch.testing.assert_close(comfy_out, diff_out, atol=1e-4, rtol=1e-4)


def test_same_edit_as_the_diffusers_host(pack, models, clip):
    """The P2P decoupled edit through both hosts, the diffusers denoiser converting the UNet's v to x0."""
    unet, patcher = models
    vp = pack.vp2p
    dh = importlib.import_module(f"{pack.__name__}.vp2p.diffusers_host")
    p2p = importlib.import_module(f"{pack.__name__}.vp2p.p2p")
    model = inflated(pack, patcher)
    latents = fc.video(frames=FRAMES, h=SIZE, w=SIZE)
    with torch.inference_mode():
        inv, _ = nodes_of(pack)["VP2P_NullTextInvert"].execute(
            model=model, positive=encode(clip, fc.SOURCE), negative=encode(clip, ""), latent={"samples": latents}, steps=fc.STEPS,
            cfg=7.5, mode="shared_null_text", inner_steps=2, early_stop=1e-5, store_attention=False, use_cache=False).result
    edit = fc.controller(pack, clip)
    host = host_module(pack, "p2p_host")
    with torch.inference_mode():
        comfy_res, _ = host.run_edit(model, inv, edit, 7.5, vp.edit.Guidance.DECOUPLED)
    inputs = vp.edit.EditInputs(inv.z_t, inv.schedule, inv.cond, inv.null_embeddings, inv.negative, inv.cfg, inv.source_path)

    def diffusers_edit(prediction: str):
        with dh.DiffusersT2S(unet, vp.T2SSettings(vp.FrameMode.FIRST_FRAME, True)) as dhost, torch.no_grad():
            den = dhost.denoiser(vp.schedule.sd_alphas_cumprod(), prediction=prediction)
            return vp.edit.decoupled_edit(den, inputs, edit.target_cond, 7.5, vp.edit.Guidance.DECOUPLED, p2p.P2PController(edit, inv.schedule))

    diff_res = diffusers_edit("v")
    # the same UNet read as ε: another result (the v conversion is what the parity rests on)
    as_eps = diffusers_edit("eps")
    assert not torch.allclose(as_eps.edited, diff_res.edited, atol=2e-2)
    err = float((comfy_res.edited.cpu() - diff_res.edited).abs().max())
    err_src = float((comfy_res.source.cpu() - diff_res.source).abs().max())
    log.info("SD2-v decoupled edit: max |ComfyUI - diffusers| = %.3g edited, %.3g source (edit max %.3g)", err, err_src,
             float(diff_res.edited.abs().max()))
    assert not torch.allclose(diff_res.edited, diff_res.source, atol=1e-2)  # an edit, not the source
    torch.testing.assert_close(comfy_res.edited.cpu(), diff_res.edited, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(comfy_res.source.cpu(), diff_res.source, atol=2e-3, rtol=2e-3)
