"""Static errors are refused when the graph is queued, not after minutes: the server's ``/prompt``
answers with the node's error (``validate_inputs`` of the P2P Controller, the FateZero Controller
and Cross-Attention Guidance); and the token view route picks the connected CLIP's tokenizer."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from tests.host.comfy_env import nodes_of
from tests.host.server import ComfyClient, comfy_server

ROOT = Path(__file__).resolve().parents[2]
CKPT = "sd15_header.safetensors"

# Only the headers of these files are read by the token view; the tensors are stand-ins.
HEADERS = {
    CKPT: "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight",
    "sd21_header.safetensors": "cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight",
    "sdxl_header.safetensors": "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight",
    "no_clip.safetensors": "model.diffusion_model.out.0.weight",
}


@pytest.fixture(scope="module")
def server(comfy_path, tmp_path_factory) -> Iterator[ComfyClient]:
    from safetensors.torch import save_file

    models = tmp_path_factory.mktemp("validate_models")
    for name, key in HEADERS.items():
        save_file({key: torch.zeros(1)}, str(models / name))
    with comfy_server(comfy_path, ROOT, models, tmp_path_factory.mktemp("validate_output")) as client:
        yield client


class Graph:
    """An API-format prompt built from the server's node definitions: widgets at their defaults."""

    def __init__(self, info: dict) -> None:
        self.info, self.nodes = info, {}

    def add(self, class_type: str, **inputs: Any) -> str:
        node_id = str(len(self.nodes) + 1)
        spec = self.info[class_type]["input"]
        values: dict[str, Any] = {}
        for name, (kind, *rest) in spec.get("required", {}).items():
            opts = rest[0] if rest else {}
            if isinstance(kind, list):
                values[name] = kind[0]
            elif kind == "COMBO":
                values[name] = opts["options"][0]
            elif "default" in opts:
                values[name] = opts["default"]
        values.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in inputs.items()})
        self.nodes[node_id] = {"class_type": class_type, "inputs": values}
        return node_id


def p2p_graph(info: dict, **controller: Any) -> tuple[dict, str]:
    """Checkpoint → invert → P2P Controller → Decoupled Sampler → Save Latent; returns (prompt, controller id)."""
    g = Graph(info)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    pos = g.add("CLIPTextEncode", clip=(ckpt, 1), text="a cat running")
    neg = g.add("CLIPTextEncode", clip=(ckpt, 1), text="")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=2)
    inv = g.add("VP2P_NullTextInvert", model=(ckpt, 0), positive=(pos, 0), negative=(neg, 0), latent=(latent, 0))
    ctl = g.add(controller.pop("class_type", "VP2P_P2PController"), clip=(ckpt, 1), **controller)
    sampler = g.add("VP2P_DecoupledSampler", model=(ckpt, 0), inversion=(inv, 0), control=(ctl, 0))
    g.add("SaveLatent", samples=(sampler, 0))
    return g.nodes, ctl


def refused(client: ComfyClient, prompt: dict) -> dict:
    """The ``node_errors`` of a prompt the server must refuse."""
    try:
        answer = client.post("/prompt", {"prompt": prompt, "client_id": client.client_id})
    except urllib.error.HTTPError as e:
        return json.loads(e.read().decode("utf-8"))["node_errors"]
    raise AssertionError(f"the server accepted the prompt: {answer}")


def messages(node_errors: dict, node_id: str) -> str:
    return " | ".join(e["details"] for e in node_errors.get(node_id, {}).get("errors", []))


P2P_CASES = [
    (dict(edit="replace", source_prompt="a cat running", target_prompt="a big tiger running"),
     "source has 3 words and the target 4"),
    (dict(reweight="tiger=2"), "'tiger=2' is not 'word:number'"),
    (dict(reweight="tiger:20"), "out of range"),
    (dict(reweight="cat:2"), "reweight: 'cat' is not a word of the target prompt"),
    (dict(blend_source_words="dog"), "blend_source_words: 'dog' is not a word of the source prompt"),
    (dict(blend_target_words="cat"), "blend_target_words: 'cat' is not a word of the target prompt"),
    (dict(cross_replace_words="tiger:2"), "cross_replace_words: 'tiger:2' is out of range"),
    (dict(target_prompt="a (tiger:1.2) running", reweight="(tiger:1.2):2"), "not a word of the target prompt"),
    (dict(edit="swap"), "edit"),
]


def test_p2p_controller_static_errors_refused_at_queue_time(server):
    info = server.object_info()
    base = dict(source_prompt="a cat running", target_prompt="a tiger running")
    for change, message in P2P_CASES:
        prompt, ctl = p2p_graph(info, **{**base, **change})
        errors = refused(server, prompt)
        assert message in messages(errors, ctl), (change, errors)
        assert set(errors) == {ctl}, errors  # only the controller is at fault


def test_fatezero_and_guidance_static_errors_refused(server):
    info = server.object_info()
    fz = dict(class_type="VP2P_FateZeroController", source_prompt="a silver jeep on a road", target_prompt="a red jeep on a road")
    for change, message in [
        (dict(blend_words="car"), "blend_words: 'car' is not a word of the source prompt"),
        (dict(latent_blend=True), "needs blend_words"),
        (dict(blend_words="jeep", latent_blend=True, latent_blend_target_words="car"),
         "latent_blend_target_words: 'car' is not a word of the target prompt"),
        (dict(blend_words="jeep", latent_blend=True, latent_blend_start=0.8, latent_blend_end=0.2), "use 0 ≤ start < end ≤ 1"),
        (dict(reweight="red:x"), "is not 'word:number'"),
        (dict(edit="replace", target_prompt="a shiny red jeep on a road"), "source has 6 words and the target 7"),
    ]:
        prompt, ctl = p2p_graph(info, **{**fz, **change})
        assert message in messages(refused(server, prompt), ctl), change

    g = Graph(info)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    pos = g.add("CLIPTextEncode", clip=(ckpt, 1), text="a (red ball:1.2) on a table")
    neg = g.add("CLIPTextEncode", clip=(ckpt, 1), text="")
    masks = g.add("VP2P_BoxTrajectory", width=64, height=64, frames=2)
    guider = g.add("VP2P_CrossAttentionGuidance", model=(ckpt, 0), positive=(pos, 0), negative=(neg, 0), clip=(ckpt, 1),
                   prompt="a (red ball:1.2) on a table", word="cube", target_masks=(masks, 0))
    sched = g.add("BasicScheduler", model=(ckpt, 0), steps=2)
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=2)
    sample = g.add("SamplerCustomAdvanced", noise=(g.add("RandomNoise"), 0), guider=(guider, 0),
                   sampler=(g.add("KSamplerSelect"), 0), sigmas=(sched, 0), latent_image=(latent, 0))
    g.add("SaveLatent", samples=(sample, 0))
    assert "word: 'cube' is not a word of the positive prompt" in messages(refused(server, g.nodes), guider)


def test_linked_prompts_skip_their_checks(pack):
    """A linked input reaches validate_inputs as None: the checks that need it wait for the run."""
    p2p = nodes_of(pack)["VP2P_P2PController"]
    assert p2p.validate_inputs(source_prompt=None, target_prompt="a tiger running", edit="replace", reweight="tiger:2",
                               blend_source_words="anything", blend_target_words="tiger") is True
    assert "not a word of the target" in p2p.validate_inputs(source_prompt=None, target_prompt="a tiger", reweight="dog:2")
    assert p2p.validate_inputs(source_prompt="a (cat:1.2) running", target_prompt="a ((tiger)) running", edit="replace",
                               reweight="tiger:2", blend_source_words="cat", blend_target_words="tiger", cross_replace_words="") is True
    guidance = nodes_of(pack)["VP2P_CrossAttentionGuidance"]
    assert guidance.validate_inputs(prompt=None, word="ball") is True
    assert guidance.validate_inputs(prompt="a [red] (ball:1.3)", word="ball") is True


def test_token_view_uses_the_connected_clips_tokenizer(server):
    def view(clip: Any, **body: Any) -> dict:
        return server.post("/vp2p/tokenize", {"source": "a cat running", "target": "a (tiger:1.3) running", "clip": clip, **body})

    ckpt = lambda name: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}
    sd1, sd2, sdxl = view(ckpt(CKPT)), view(ckpt("sd21_header.safetensors")), view(ckpt("sdxl_header.safetensors"))
    assert (sd1["tokenizer"], sd2["tokenizer"], sdxl["tokenizer"]) == ("SD1.x CLIP-L", "SD2.x OpenCLIP-H", "SDXL CLIP-L + CLIP-G")
    assert sd1["notes"] == sd2["notes"] == sdxl["notes"] == []
    assert sd1["target"][1]["word"] == "tiger" and sd1["target"][1]["weight"] == 1.3 and sd1["kind"] == "replace"
    assert view({"class_type": "DualCLIPLoader", "inputs": {"type": "sdxl"}})["tokenizer"] == "SDXL CLIP-L + CLIP-G"
    for clip in (None, ckpt("no_clip.safetensors"), {"class_type": "CLIPLoader", "inputs": {"type": "wan", "clip_name": "x"}}):
        answer = view(clip)
        assert answer["tokenizer"] == "SD1.x CLIP-L" and "assumed" in answer["notes"][0], answer
    fz = view(ckpt(CKPT), blend_source_words="dog")
    assert any("'dog' is not a word of the source prompt" in w for w in fz["warnings"])


def test_inflate_chunk_settings_refused_at_queue_time(server):
    info = server.object_info()
    cases = [(dict(frames_per_chunk=4, chunk_overlap=4), "chunk_overlap=4 must be smaller than frames_per_chunk=4"),
             (dict(frames_per_chunk=0, chunk_overlap=2), "chunk_overlap=2 needs frames_per_chunk"),
             (dict(frames_per_chunk=-1, chunk_overlap=0), "frames_per_chunk=-1 must be ≥ 0")]
    for settings, message in cases:
        g = Graph(info)
        ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CKPT)
        inflate = g.add("VP2P_InflateT2S", model=(ckpt, 0), frame_attention="first_frame", temporal_attention=True, **settings)
        pos = g.add("CLIPTextEncode", clip=(ckpt, 1), text="a cat running")
        neg = g.add("CLIPTextEncode", clip=(ckpt, 1), text="")
        latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=2)
        sampler = g.add("KSampler", model=(inflate, 0), positive=(pos, 0), negative=(neg, 0), latent_image=(latent, 0), seed=0, steps=1,
                        cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
        g.add("SaveLatent", samples=(sampler, 0))
        errors = refused(server, g.nodes)
        assert message in messages(errors, inflate), (settings, errors)
