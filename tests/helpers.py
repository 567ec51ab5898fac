"""Builders shared by the tests and the benchmarks (no weights are ever downloaded)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

TINY_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)


def init_weights(model: nn.Module, seed: int) -> nn.Module:
    """PyTorch default init for linear/conv, weight 1 / bias 0 for norms, then small
    noise on every zero-initialised output projection so the network is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                bound = 1.0 / max(1, m.weight[0].numel()) ** 0.5
                m.weight.copy_((torch.rand(m.weight.shape, generator=g) * 2 - 1) * bound)
                if m.bias is not None:
                    m.bias.copy_((torch.rand(m.bias.shape, generator=g) * 2 - 1) * bound)
    return model


def tiny_unet(seed: int = 0, **overrides: Any) -> nn.Module:
    from diffusers import UNet2DConditionModel

    cfg = dict(TINY_UNET_CONFIG)
    cfg.update(overrides)
    unet = init_weights(UNet2DConditionModel(**cfg), seed).eval()
    assert_nontrivial(unet, cfg)
    return unet


def assert_nontrivial(unet: nn.Module, cfg: dict[str, Any]) -> None:
    """A UNet whose norms are zero outputs exactly 0 and makes every comparison vacuous."""
    g = torch.Generator().manual_seed(123)
    s = cfg["sample_size"]
    x = torch.randn(2, cfg["in_channels"], s, s, generator=g)
    ctx = torch.randn(2, 7, cfg["cross_attention_dim"], generator=g)
    with torch.no_grad():
        out = unet(x, 500, encoder_hidden_states=ctx).sample
    assert out.std() > 1e-2, f"random UNet output has no spread (std={float(out.std()):.3g}); check the init"


def randomise_temporal(bank: nn.Module, seed: int, scale: float = 0.2) -> nn.Module:
    """Give the zero-initialised temporal output projections non-zero weights, so tests
    can see temporal attention act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bank.named_parameters():
            if "to_out" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale / max(1, p.shape[-1]) ** 0.5)
    return bank


def extra_options(block: tuple[str, int], index: int, heads: int, cond_or_uncond: list[int], **more: Any) -> dict:
    """ComfyUI-shaped extra options for calling the patch directly."""
    eo = {"block": block, "block_index": index, "n_heads": heads, "cond_or_uncond": cond_or_uncond}
    eo.update(more)
    return eo
