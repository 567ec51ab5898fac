"""ComfyUI host: the pack loaded by ComfyUI's loader, on real ComfyUI models."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import randomise_temporal
from tests.host.comfy_env import comfy_eps, host_module

FRAMES = 4


def batch(frames=FRAMES, chunks=1, seed=0, hw=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(chunks * frames, 4, hw, hw, generator=g), torch.randn(chunks * frames, 7, 768, generator=g)


def node(pack, name):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[name]


def inflate(pack, model, frame_attention="first_frame", temporal=True, **optional):
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return node(pack, "VP2P_InflateT2S").execute(model=model, frame_attention=frame_attention, temporal_attention=temporal,
                                                     **optional).result[0]


def test_nodes_are_filed_along_the_pipeline_and_found_by_what_users_search(pack):
    import nodes

    pack_nodes = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("VP2P_")}
    categories = {"video_p2p/1 model", "video_p2p/2 invert", "video_p2p/3 edit", "video_p2p/guidance", "video_p2p/io"}
    aliases: set[str] = set()
    for node_id, cls in pack_nodes.items():
        schema = cls.GET_SCHEMA()
        assert schema.category in categories, (node_id, schema.category)
        assert schema.search_aliases, f"{node_id} has no search aliases"
        aliases.update(schema.search_aliases)
    assert {"video edit", "prompt to prompt", "p2p", "null text", "inversion", "fatezero", "tune-a-video", "t2s",
            "text-to-set"} <= aliases
    assert pack_nodes["VP2P_NoiseInversion"].GET_SCHEMA().category == "video_p2p/3 edit"  # Start From Noise: with the edit


def test_pack_loads_through_comfy_loader_with_tooltips(pack):
    import nodes

    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["VP2P_InflateT2S"] == "Inflate to T2S"
    schema = nodes.NODE_CLASS_MAPPINGS["VP2P_InflateT2S"].GET_SCHEMA()
    assert schema.category.startswith("video_p2p")
    names = [i.id for i in schema.inputs]
    assert names == ["model", "frame_attention", "temporal_attention", "frame_attention_min_channels", "group_norm", "frames_per_chunk",
                     "chunk_overlap", "temporal_with_motion_module"]
    for i in schema.inputs:
        assert i.tooltip, f"input {i.id} has no tooltip"
    info = nodes.NODE_CLASS_MAPPINGS["VP2P_InflateT2S"].INPUT_TYPES()
    combo = info["required"]["frame_attention"]
    assert combo[0] == "COMBO" and combo[1]["options"] == ["first_frame", "sparse_causal", "middle_frame", "none"]
    assert combo[1]["default"] == "first_frame" and combo[1]["tooltip"]
    width = info["optional"]["frame_attention_min_channels"]
    assert width[0] == "INT" and width[1]["default"] == 0 and "640" in width[1]["tooltip"]


def test_every_sd15_key_fires_for_attn1_and_attn2(pack, full_sd15):
    vp2p = pack.vp2p

    class Recorder(vp2p.AttentionController):
        def __init__(self):
            self.seen = set()

        def needs_probabilities(self, call):
            self.seen.add((call.kind, (call.key.block, call.key.id, call.key.index)))
            return False

    inflated = inflate(pack, full_sd15)
    rec = Recorder()
    x, ctx = batch(frames=2)
    comfy_eps(inflated, x, 500, ctx, extra={vp2p.RUN_STATE_KEY: vp2p.RunState(controller=rec)})
    want = [("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)] + [("output", i, 0) for i in range(3, 12)]
    assert len(want) == 16
    for kind in ("attn1", "attn2", "temporal"):
        assert {k for kd, k in rec.seen if kd == kind} == set(want), kind
    assert ("attn1", ("middle", 0, 0)) in rec.seen


def test_input_model_is_bit_identical_before_and_after(pack, small_models):
    _, model = small_models
    x, ctx = batch(chunks=2)
    before = comfy_eps(model, x, 400, ctx, [1, 0])
    inflated = inflate(pack, model, "sparse_causal", True)
    state = inflated.get_attachment("vp2p_t2s")
    randomise_temporal(state.bank, seed=3)
    edited = comfy_eps(inflated, x, 400, ctx, [1, 0])
    assert not torch.equal(edited, before)
    after = comfy_eps(model, x, 400, ctx, [1, 0])
    assert torch.equal(before, after)
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    assert model.get_attachment("vp2p_t2s") is None and not model.injections


def test_first_frame_output_of_frame0_ignores_other_frames(pack, small_models):
    _, model = small_models
    inflated = inflate(pack, model, "first_frame", True)
    randomise_temporal(inflated.get_attachment("vp2p_t2s").bank, seed=4)
    x, ctx = batch()
    a = comfy_eps(inflated, x, 500, ctx)
    x2 = x.clone()
    x2[1:] = torch.randn_like(x2[1:])
    b = comfy_eps(inflated, x2, 500, ctx)
    # temporal attention and video-level GroupNorm mix frames, so compare without them for the frame-attention property
    plain = inflate(pack, model, "first_frame", False, group_norm="frame")
    c, d = comfy_eps(plain, x, 500, ctx), comfy_eps(plain, x2, 500, ctx)
    assert (c[0] - d[0]).abs().max() <= 1e-5
    assert (c[1:] - d[1:]).abs().max() > 1e-3
    assert (a[0] - b[0]).abs().max() > 1e-5  # trained temporal layers do look at other frames


def test_cross_host_parity(pack, small_models):
    from vp2p import FrameMode, T2SSettings
    from vp2p.diffusers_host import DiffusersT2S

    unet, model = small_models
    x, ctx = batch(chunks=2)
    with torch.no_grad():
        d_plain = unet(x, 500, encoder_hidden_states=ctx).sample
    c_plain = comfy_eps(model, x, 500, ctx, [1, 0])
    assert (d_plain - c_plain).abs().max() <= 1e-4

    for mode in ("first_frame", "sparse_causal", "middle_frame"):
        inflated = inflate(pack, model, mode, True)
        c_bank = inflated.get_attachment("vp2p_t2s").bank
        randomise_temporal(c_bank, seed=9)
        c_out = comfy_eps(inflated, x, 500, ctx, [1, 0])
        with DiffusersT2S(unet, T2SSettings(FrameMode(mode), True)) as host:
            host.bank.load_state_dict(c_bank.state_dict())
            with torch.no_grad():
                d_out = host(x, 500, ctx, cond_or_uncond=[1, 0])
        assert (d_out - c_out).abs().max() <= 1e-4, mode
        assert (d_out - d_plain).abs().max() > 1e-3


def test_video_level_group_norm_in_comfyui(pack, small_models, full_sd15):
    """The ResNet GroupNorms pool each video's frames (the references' 3-D UNet), per video of the call's
    layout; one frame is the image model; frame scope is the old per-frame behaviour."""
    from vp2p.video_norm import video_norm_paths

    dm = full_sd15.get_model_object("diffusion_model")
    paths = video_norm_paths(dm.named_modules())
    assert len(paths) == 45 and "out.0" in paths and "input_blocks.1.0.in_layers.0" in paths  # SD1.5: 22 ResBlocks × 2 + out

    _, model = small_models
    x, ctx = batch(chunks=2)
    video = inflate(pack, model, "none", False)  # the default: group_norm=video
    frame = inflate(pack, model, "none", False, group_norm="frame")
    plain = comfy_eps(model, x, 500, ctx, [1, 0])
    torch.testing.assert_close(comfy_eps(frame, x, 500, ctx, [1, 0]), plain, atol=1e-6, rtol=0)
    pooled = comfy_eps(video, x, 500, ctx, [1, 0])
    assert (pooled - plain).abs().max() > 1e-3
    # the two chunks (uncond, cond) are two videos: each alone gives the same rows
    for n, kind in enumerate((1, 0)):
        rows = slice(n * FRAMES, (n + 1) * FRAMES)
        torch.testing.assert_close(comfy_eps(video, x[rows], 500, ctx[rows], [kind]), pooled[rows], atol=1e-4, rtol=1e-4)
    # one frame per video: exactly the image model
    one = slice(0, 2)
    torch.testing.assert_close(comfy_eps(video, x[one], 500, ctx[one], [1, 0]), comfy_eps(model, x[one], 500, ctx[one], [1, 0]),
                               atol=1e-6, rtol=0)
    # the norms are back to per frame once the inflated model is unloaded: the input MODEL is untouched
    assert torch.equal(comfy_eps(model, x, 500, ctx, [1, 0]), plain)


def test_stock_ksampler_samples_the_batch_as_one_video(pack, small_models):
    import nodes

    vp2p = pack.vp2p
    _, model = small_models

    class Layouts(vp2p.AttentionController):
        def __init__(self):
            self.layouts = set()

        def needs_probabilities(self, call):
            self.layouts.add((call.layout.frames, call.layout.branches, len(call.layout.chunks)))
            return False

    inflated = inflate(pack, model, "first_frame", True)
    watched = inflated.clone()
    rec = Layouts()
    watched.model_options["transformer_options"][vp2p.RUN_STATE_KEY] = vp2p.RunState(controller=rec)
    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, 7, 768, generator=g), {}]]
    neg = [[torch.randn(1, 7, 768, generator=g), {}]]
    latent = {"samples": torch.zeros(5, 4, 8, 8)}
    out = nodes.common_ksampler(watched, 7, 3, 7.5, "euler", "normal", pos, neg, latent)[0]["samples"]
    assert out.shape == (5, 4, 8, 8) and torch.isfinite(out).all()
    assert rec.layouts and all(frames == 5 and branches == 1 for frames, branches, _ in rec.layouts)


def test_reinflation_replaces_instead_of_stacking(pack, small_models):
    _, model = small_models
    x, ctx = batch()
    once = inflate(pack, model, "middle_frame", False)
    twice = inflate(pack, inflate(pack, model, "first_frame", True), "middle_frame", False)
    assert torch.equal(comfy_eps(once, x, 300, ctx), comfy_eps(twice, x, 300, ctx))
    state = twice.get_attachment("vp2p_t2s")
    assert state.settings.frame_attention.value == "middle_frame" and not state.patch.previous
    assert "vp2p_temporal" not in twice.injections
    wrappers = twice.model_options["transformer_options"]["wrappers"]["diffusion_model"]
    assert len(wrappers["vp2p_video_norm"]) == 1 and len(twice.injections["vp2p_video_norm"]) == 1


def test_foreign_replace_is_chained(pack, small_models):
    import comfy.ldm.modules.attention as attention

    _, model = small_models
    calls = []

    def foreign(q, k, v, extra_options):
        calls.append(tuple(extra_options["block"]))
        return attention.optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5

    patched = model.clone()
    patched.set_model_attn2_replace(foreign, "input", 1, 0)
    x, ctx = batch()
    ref = comfy_eps(patched, x, 500, ctx)
    calls.clear()
    inflated = inflate(pack, patched, "none", False, group_norm="frame")  # nothing else changes: the image model
    out = comfy_eps(inflated, x, 500, ctx)
    assert calls == [("input", 1)]
    assert (out - ref).abs().max() <= 1e-5


def test_non_sd_model_gets_a_clear_error(pack, comfy_path):
    import comfy.model_patcher

    class NotAUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Linear(4, 4)

    patcher = comfy.model_patcher.ModelPatcher(NotAUNet(), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="no SD-style spatial transformer blocks"):
        inflate(pack, patcher)


def test_min_channels_keeps_narrow_blocks_per_frame_on_both_hosts(pack, small_models):
    """FateZero's least_sc_channel: with 640 the 320-channel blocks of the 2-level SD1.5 UNet keep
    plain self-attention, the 640-channel middle block frame attention; the same numbers as the
    diffusers host; another MODEL fingerprint than the default (caches keep them apart)."""
    from vp2p import FrameMode, T2SSettings
    from vp2p.diffusers_host import DiffusersT2S

    vp2p = pack.vp2p
    unet, model = small_models
    modes = {}

    class Modes(vp2p.AttentionController):
        def needs_probabilities(self, call):
            if call.kind == "attn1":
                modes[(call.key.block, call.key.id)] = call.frame_mode.value
            return False

    narrowed = inflate(pack, model, "middle_frame", False, frame_attention_min_channels=640)
    every = inflate(pack, model, "middle_frame", False)
    plain = inflate(pack, model, "none", False)
    x, ctx = batch(chunks=2)
    out = comfy_eps(narrowed, x, 500, ctx, [1, 0], extra={vp2p.RUN_STATE_KEY: vp2p.RunState(controller=Modes())})
    assert modes == {("input", 1): "none", ("input", 2): "none", ("middle", 0): "middle_frame",
                     ("output", 3): "none", ("output", 4): "none", ("output", 5): "none"}
    with DiffusersT2S(unet, T2SSettings(FrameMode.MIDDLE_FRAME, False, frame_attention_min_channels=640)) as host:
        with torch.no_grad():
            d_out = host(x, 500, ctx, cond_or_uncond=[1, 0])
    assert (d_out - out).abs().max() <= 1e-4
    for other in (every, plain):
        assert (comfy_eps(other, x, 500, ctx, [1, 0]) - out).abs().max() > 1e-3
    facts = host_module(pack, "model_facts")
    assert facts.model_fingerprint(narrowed) != facts.model_fingerprint(every)
    state = narrowed.get_attachment("vp2p_t2s")
    assert state.settings.frame_attention_min_channels == 640 and "640" in state.settings.describe()
