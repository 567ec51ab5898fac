"""ComfyUI host ↔ diffusers host on an SDXL-family UNet: the same weights give the same UNet output and the same edit.

The UNet is a random diffusers ``UNet2DConditionModel`` in the layout of the pack's SDXL checkpoint
(``tests.host.checkpoint.SDXL_UNET_CONFIG``: Segmind Vega's transformer depths with 320 channels on every level,
``addition_embed_type="text_time"``), mapped to ComfyUI's keys with ComfyUI's own ``unet_to_diffusers`` and
loaded by ComfyUI's loader, which detects it as Segmind_Vega (an SDXL subclass: pooled + size conditioning).
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from tests.host import family_checks as fc
from tests.host.comfy_env import encode, host_module, inflated, load_as_comfy
from tests.host.model_zoo import make_clip_sdxl

SIZE = 16  # latent 16×16: images of 128×128
FRAMES = 3
log = logging.getLogger("VideoP2P")


def diffusers_sdxl_config() -> dict:
    """The diffusers config of ``SDXL_UNET_CONFIG``: 3 levels of 320 channels, transformer depths 0/1/2 (middle 2),
    5 heads of 64, linear projections, context 2048, text_time added embedding (pooled 1280 + 6 × 256)."""
    return dict(sample_size=SIZE, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 320, 320),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 1, 2), cross_attention_dim=2048, attention_head_dim=5, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


@pytest.fixture(scope="module")
def models(comfy_path):
    """(diffusers UNet, ComfyUI MODEL) with the same random weights; ComfyUI detects Segmind_Vega."""
    import comfy.model_base
    import comfy.utils
    from diffusers import UNet2DConditionModel

    from tests.helpers import init_weights
    from tests.host.checkpoint import SDXL_UNET_CONFIG

    unet = init_weights(UNet2DConditionModel(**diffusers_sdxl_config()), 0).eval()
    mapping = comfy.utils.unet_to_diffusers(dict(SDXL_UNET_CONFIG))
    assert mapping.get("add_embedding.linear_1.weight") == "label_emb.0.0.weight"
    patcher = load_as_comfy(unet, SDXL_UNET_CONFIG, "Segmind_Vega")
    assert isinstance(patcher.model, comfy.model_base.SDXL)
    return unet, patcher


@pytest.fixture(scope="module")
def clip(comfy_path):
    return make_clip_sdxl(0)


def test_one_unet_forward_agrees(pack, models):
    """The key map and the size embedding: ComfyUI's y (``SDXL.encode_adm``: pooled + height, width, crops, target
    size) and diffusers' ``added_cond_kwargs`` give the same output for the same x, t, context, pooled and size."""
    unet, patcher = models
    dh = importlib.import_module(f"{pack.__name__}.vp2p.diffusers_host")
    g = torch.Generator().manual_seed(3)
    x, ctx, pooled = torch.randn(2, 4, SIZE, SIZE, generator=g), torch.randn(2, 7, 2048, generator=g), torch.randn(2, 1280, generator=g)
    t = torch.tensor([400.0, 400.0])
    size = dict(height=SIZE * 8, width=SIZE * 8 + 16, crop_h=8, crop_w=0, target_height=SIZE * 8, target_width=SIZE * 8)
    with torch.no_grad():
        y = torch.cat([patcher.model.encode_adm(pooled_output=pooled[i:i + 1], **size) for i in range(2)])
        comfy_out = patcher.model.diffusion_model(x, timesteps=t, context=ctx, y=y.to(x))
        ids = dh.sdxl_time_ids(size["height"], size["width"], (size["crop_h"], size["crop_w"]), (size["target_height"], size["target_width"]))
        diff_out = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids.expand(2, -1)}).sample
        other = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids.expand(2, -1) * 2}).sample
    err = float((comfy_out - diff_out).abs().max())
    log.info("SDXL plain forward: max |ComfyUI - diffusers| = %.3g (output max %.3g)", err, float(comfy_out.abs().max()))
    assert not torch.allclose(diff_out, other, atol=1e-3)  # the size ids matter
    torch.testing.assert_close(comfy_out, diff_out, atol=1e-4, rtol=1e-4)


def test_same_edit_as_the_diffusers_host(pack, models, clip):
    """The P2P decoupled edit through both hosts: each conditional branch with its prompt's pooled output, the
    unconditional rows with the negative's, the size ids of the latent (× 8) as ComfyUI's conditioning gives them."""
    unet, patcher = models
    vp = pack.vp2p
    dh = importlib.import_module(f"{pack.__name__}.vp2p.diffusers_host")
    p2p = importlib.import_module(f"{pack.__name__}.vp2p.p2p")
    layout = importlib.import_module(f"{pack.__name__}.vp2p.layout")
    model = inflated(pack, patcher)
    latents = fc.video(frames=FRAMES, h=SIZE, w=SIZE)
    with torch.inference_mode():
        inv = pack_nodes_invert(pack, model, clip, latents)
    edit = fc.controller(pack, clip)
    assert edit.source_pooled is not None and edit.target_pooled is not None and inv.negative_pooled is not None
    host = host_module(pack, "p2p_host")
    with torch.inference_mode():
        comfy_res, _ = host.run_edit(model, inv, edit, 7.5, vp.edit.Guidance.DECOUPLED)
    pooled = {(layout.COND, layout.SOURCE): edit.source_pooled, (layout.COND, layout.TARGET): edit.target_pooled,
              (layout.UNCOND, layout.SOURCE): inv.negative_pooled, (layout.UNCOND, layout.TARGET): inv.negative_pooled}
    inputs = vp.edit.EditInputs(inv.z_t, inv.schedule, inv.cond, inv.null_embeddings, inv.negative, inv.cfg, inv.source_path)

    def diffusers_edit(pooled: dict):
        added = dh.AddedCond(pooled, dh.sdxl_time_ids(SIZE * 8, SIZE * 8))
        with dh.DiffusersT2S(unet, vp.T2SSettings(vp.FrameMode.FIRST_FRAME, True), added_cond=added) as dhost, torch.no_grad():
            den = dhost.denoiser(vp.schedule.sd_alphas_cumprod())
            return vp.edit.decoupled_edit(den, inputs, edit.target_cond, 7.5, vp.edit.Guidance.DECOUPLED, p2p.P2PController(edit, inv.schedule))

    diff_res = diffusers_edit(pooled)
    # the target branch given the source prompt's pooled output: another edit (the per-branch rows matter)
    swapped = diffusers_edit({**pooled, (layout.COND, layout.TARGET): edit.source_pooled})
    assert not torch.allclose(swapped.edited, diff_res.edited, atol=2e-2)
    err = float((comfy_res.edited.cpu() - diff_res.edited).abs().max())
    log.info("SDXL decoupled edit: max |ComfyUI - diffusers| = %.3g (edit max %.3g)", err, float(diff_res.edited.abs().max()))
    assert not torch.allclose(diff_res.edited, diff_res.source, atol=1e-2)  # an edit, not the source
    torch.testing.assert_close(comfy_res.edited.cpu(), diff_res.edited, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(comfy_res.source.cpu(), diff_res.source, atol=2e-3, rtol=2e-3)


def pack_nodes_invert(pack, model, clip, latents):
    """Null-text inversion (shared null, 2 steps) with the SDXL CLIP's source prompt and empty negative."""
    from tests.host.comfy_env import nodes_of

    inv, _ = nodes_of(pack)["VP2P_NullTextInvert"].execute(
        model=model, positive=encode(clip, fc.SOURCE), negative=encode(clip, ""), latent={"samples": latents}, steps=fc.STEPS,
        cfg=7.5, mode="shared_null_text", inner_steps=2, early_stop=1e-5, store_attention=False, use_cache=False).result
    return inv
