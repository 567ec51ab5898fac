"""The example workflows, run end to end on a real ComfyUI server with a random-weight SD1.5 checkpoint.

Each ``example_workflows/*.json`` (UI format, as the frontend saves it) must load without missing
nodes, convert to an API prompt, and execute to written output files. The prompt is shrunk for the
CPU by node type (64×64, 3 frames, 2 steps) and its model files are replaced by random-weight ones (an
SD1.5 checkpoint, an SD1.5 ControlNet); the JSON files are never changed. The ``animatediff_*`` templates
(AnimateDiff-Evolved and VideoHelperSuite nodes, SD1.5's full UNet) run in a server of their own:
``test_workflows_animatediff.py``, with the helpers of this module.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import pytest
import torch

from tests.host.animatediff import MOTION_MODULE
from tests.host.checkpoint import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, write_random_sd15_checkpoint, write_random_sdxl_checkpoint
from tests.host.controlnet import write_random_controlnet
from tests.host.server import ComfyClient, comfy_server
from tests.host.workflow_api import WorkflowConversionError, missing_node_types, ui_to_api

ROOT = Path(__file__).resolve().parents[2]
# heavy_memory: the server holding the SD1.5 and SDXL random checkpoints while the templates run peaks at ~6.7 GB
# (measured, 2-core machine), above the 6 GB per file: it runs on the worker of the other heavy files, one after another.
pytestmark = pytest.mark.heavy_memory
ALL_WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
# Templates built on AnimateDiff-Evolved + VideoHelperSuite: run by test_workflows_animatediff.py in a server with both
# packs and SD1.5's full UNet (a motion module needs it), which this module's server does not load.
ANIMATEDIFF_PREFIX = "animatediff_"
WORKFLOWS = [p for p in ALL_WORKFLOWS if not p.stem.startswith(ANIMATEDIFF_PREFIX)]
CKPT_NAME = "vp2p_random_sd15.safetensors"
CN_NAME = "vp2p_random_controlnet_sd15.safetensors"
SDXL_CKPT_NAME = "vp2p_random_sdxl.safetensors"  # for the *_sdxl templates
# 3 frames: the smallest video on which first-frame, sparse-causal and middle-frame attention all differ.
FRAMES = 3
RUN_TIMEOUT_S = 240.0

# Literal inputs overridden by node type so a workflow runs in seconds on a CPU: every node still does its
# work (a tuning step, a null-text iteration per step), the least of it.
SHRINK: dict[str, dict[str, int]] = {
    "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": FRAMES},
    "KSampler": {"steps": 2},
    "VP2P_SelectFrames": {"start": 0, "stride": 2, "cap": FRAMES},  # frames 0, 2, 4 of the 5-frame input clip
    "ImageScale": {"width": 64, "height": 64},
    "VP2P_TuneOnVideo": {"steps": 1},
    "VP2P_NullTextInvert": {"steps": 2, "inner_steps": 1},
    "KSamplerAdvanced": {"steps": 2},
    "VP2P_BoxTrajectory": {"width": 64, "height": 64, "frames": FRAMES},
    "BasicScheduler": {"steps": 2},
    "VP2P_NoiseInversion": {"width": 64, "height": 64, "frames": FRAMES, "steps": 2},
    # VideoHelperSuite's loader: frames 0, 2, 4 of the 5-frame input clip, resized to 64×64
    "VHS_LoadVideo": {"custom_width": 64, "custom_height": 64, "frame_load_cap": FRAMES, "skip_first_frames": 0, "select_every_nth": 2},
}
# Input widgets naming a file in ComfyUI's input folder, by node type: the test writes the generated clip there.
INPUT_VIDEOS = {"LoadVideo": "file", "VHS_LoadVideo": "video"}
# How many frames a node type loads or makes, and every how many frames of the clip it takes (by input name).
FRAME_COUNT_INPUTS = {"EmptyLatentImage": "batch_size", "VP2P_SelectFrames": "cap", "VHS_LoadVideo": "frame_load_cap"}
FRAME_STRIDE_INPUTS = {"VP2P_SelectFrames": "stride", "VHS_LoadVideo": "select_every_nth"}


INPUT_FPS = 8


def write_input_video(path: Path, frames: int = 2 * FRAMES - 1, size: int = 48) -> None:
    """A small generated clip (a square moving over a gradient), as an H.264 mp4 through PyAV."""
    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=INPUT_FPS)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        yy, xx = np.mgrid[0:size, 0:size]
        for f in range(frames):
            img = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 90)], -1).astype(np.uint8)
            x0 = 4 + f * 4
            img[16:32, x0:x0 + 12] = (250, 120, 20)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_checkpoint(comfy_path, tmp_path_factory) -> Iterator[Path]:
    """A random-weight SD1.5 checkpoint in a folder of its own (the server's checkpoints folder)."""
    path = write_random_sd15_checkpoint(tmp_path_factory.mktemp("checkpoints") / CKPT_NAME, seed=0, levels=2)
    yield path
    # ~640 MB, and pytest keeps the last few session folders: do not let them pile up.
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def random_sdxl_checkpoint(random_checkpoint: Path) -> Iterator[Path]:
    """A random-weight SDXL-family checkpoint (detected as Segmind_Vega; full-size CLIP-L + CLIP-G, ~2 GB) next to
    the SD1.5 one, for the *_sdxl templates."""
    path = write_random_sdxl_checkpoint(random_checkpoint.parent / SDXL_CKPT_NAME, seed=0)
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def random_controlnet(comfy_path, tmp_path_factory) -> Iterator[Path]:
    """A random-weight SD1.5 ControlNet fitting the random checkpoint's UNet, in a folder of its own (the
    server's controlnet folder)."""
    path = write_random_controlnet(tmp_path_factory.mktemp("controlnet") / CN_NAME, levels=2, seed=0)
    yield path
    path.unlink(missing_ok=True)  # ~110 MB


@pytest.fixture(scope="module")
def comfy_client(comfy_path, random_checkpoint: Path, random_sdxl_checkpoint: Path, random_controlnet: Path,
                 tmp_path_factory) -> Iterator[ComfyClient]:
    """A running ComfyUI server with the pack loaded and the random checkpoint and ControlNet available.

    Module scope: the server (~6.7 GB at its peak) is stopped when this file is done; in session scope it lived on
    while the same worker ran the AnimateDiff templates' server, and the worker ran out of memory."""
    output_dir = tmp_path_factory.mktemp("comfy_output")
    with comfy_server(comfy_path, ROOT, random_checkpoint.parent, output_dir, controlnet_dir=random_controlnet.parent) as client:
        yield client


# -- the checkpoint ---------------------------------------------------------------------------------

def test_random_sdxl_checkpoint_loads_as_sdxl_family(random_sdxl_checkpoint, caplog):
    """ComfyUI's own loader detects the SDXL file as an SDXL-family model (pooled + size conditioning, SDXL latent
    format), finds every weight, and its CLIP gives the pooled output."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.sd

    import nodes

    with caplog.at_level(logging.WARNING):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(random_sdxl_checkpoint))
    assert type(model.model.model_config).__name__ == "Segmind_Vega" and isinstance(model.model, comfy.model_base.SDXL)
    assert isinstance(model.model.latent_format, comfy.latent_formats.SDXL)
    warned = [r.getMessage() for r in caplog.records
              if r.getMessage().lower().startswith(("unet missing", "unet unexpected", "missing vae keys", "clip missing"))]
    assert not warned, f"ComfyUI reported missing weights: {warned}"
    cond = nodes.CLIPTextEncode().encode(clip, "a cat running")[0]
    assert cond[0][0].shape == (1, 77, 2048) and cond[0][1]["pooled_output"].shape == (1, 1280)
    assert torch.isfinite(cond[0][0]).all() and float(cond[0][0].std()) > 0.1


def test_random_checkpoint_loads_as_sd15(random_checkpoint, caplog):
    """ComfyUI's own loader detects the file as SD15, finds every weight, and CLIP/VAE give real outputs."""
    import comfy.sd
    from safetensors import safe_open

    import nodes

    with safe_open(str(random_checkpoint), "pt") as f:
        keys = set(f.keys())
    with caplog.at_level(logging.WARNING):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(random_checkpoint))
    assert type(model.model.model_config).__name__ == "SD15"
    # The loader's own warnings (comfy/model_base.py load_model_weights, comfy/sd.py VAE and CLIP).
    warned = [r.getMessage() for r in caplog.records
              if r.getMessage().lower().startswith(("unet missing", "unet unexpected", "missing vae keys", "clip missing"))]
    assert not warned, f"ComfyUI reported missing weights: {warned}"

    # Belt and braces: every parameter/buffer the built models hold must come from the file.
    def absent(module_keys, prefix: str, allowed: tuple = ()) -> list[str]:
        return sorted(k for k in module_keys if prefix + k not in keys and k not in allowed)

    assert not absent(model.model.diffusion_model.state_dict(), UNET_PREFIX)
    assert not absent(vae.first_stage_model.state_dict(), VAE_PREFIX)
    clip_keys = [k.removeprefix("clip_l.transformer.") for k in clip.cond_stage_model.state_dict()]
    # SD1.x checkpoints never carry these two; ComfyUI does not use them for SD1 conditioning.
    assert not absent(clip_keys, CLIP_PREFIX, allowed=("text_projection.weight", "clip_l.logit_scale"))

    (cond,) = nodes.CLIPTextEncode().encode(clip, "a red car")
    a = cond[0][0]
    (cond_b,) = nodes.CLIPTextEncode().encode(clip, "a blue boat at night")
    b = cond_b[0][0]
    assert a.shape == (1, 77, 768)
    assert torch.isfinite(a).all() and a.std() > 1e-3
    assert not torch.allclose(a, b), "different prompts give the same conditioning"

    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    (images,) = nodes.VAEDecode().decode(vae, {"samples": latent})
    assert images.shape == (2, 64, 64, 3)
    assert torch.isfinite(images).all() and images.std() > 1e-3
    assert not torch.allclose(images[0], images[1]), "different latents decode to the same image"


# -- UI → API conversion ----------------------------------------------------------------------------

FAKE_INFO = {
    "Loader": {"input": {"required": {"name": [["a.ckpt", "b.ckpt"], {}]}}, "input_order": {"required": ["name"]}},
    "Sampler": {
        "input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
                               "steps": ["INT", {}], "mode": ["COMBO", {"options": ["x", "y"]}]},
                  "optional": {"note": ["STRING", {}], "extra": ["LATENT", {}]},
                  "hidden": {"prompt": ["PROMPT"]}},
        "input_order": {"required": ["model", "seed", "steps", "mode"], "optional": ["note", "extra"]},
    },
    "Patch": {"input": {"required": {"model": ["MODEL", {}], "strength": ["FLOAT", {}]}},
              "input_order": {"required": ["model", "strength"]}},
    "Loadimg": {"input": {"required": {"image": [["i.png"], {"image_upload": True}]}}},
}


def _node(nid: int, ntype: str, inputs: tuple = (), outputs: tuple = (), widgets: tuple | list = (), mode: int = 0) -> dict:
    """A UI-format node as the frontend saves it."""
    return {"id": nid, "type": ntype, "mode": mode, "inputs": [dict(i) for i in inputs],
            "outputs": [dict(o) for o in outputs], "widgets_values": list(widgets)}


def test_ui_to_api_widgets_links_reroute_primitive_note():
    wf = {
        "nodes": [
            _node(1, "Loader", outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]}], widgets=["b.ckpt"]),
            _node(2, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}], outputs=[{"type": "MODEL", "links": [2]}]),
            _node(3, "PrimitiveNode", outputs=[{"type": "INT", "links": [3], "widget": {"name": "steps"}}],
                  widgets=[7, "fixed"]),
            _node(4, "Sampler", inputs=[{"name": "model", "type": "MODEL", "link": 2},
                                        {"name": "steps", "type": "INT", "link": 3, "widget": {"name": "steps"}},
                                        {"name": "seed", "type": "INT", "link": None, "widget": {"name": "seed"}}],
                  widgets=[123, "randomize", 30, "y", "hello"]),
            _node(5, "MarkdownNote", widgets=["# notes"]),
        ],
        "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 4, 0, "MODEL"], {"id": 3, "origin_id": 3, "origin_slot": 0,
                                                                      "target_id": 4, "target_slot": 1, "type": "INT"}],
    }
    assert missing_node_types(wf, FAKE_INFO) == []
    api = ui_to_api(wf, FAKE_INFO)
    assert set(api) == {"1", "4"}
    assert api["1"]["inputs"] == {"name": "b.ckpt"}
    # The control value after the seed is skipped; the primitive's value replaces the converted widget's.
    assert api["4"]["inputs"] == {"model": ["1", 0], "seed": 123, "steps": 7, "mode": "y", "note": "hello"}
    assert api["4"]["class_type"] == "Sampler"


def test_ui_to_api_bypass_mute_and_errors():
    def wf(patch_mode: int) -> dict:
        return {"nodes": [
            _node(1, "Loader", outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]}], widgets=["a.ckpt"]),
            _node(2, "Patch", inputs=[{"name": "model", "type": "MODEL", "link": 1}],
                  outputs=[{"name": "MODEL", "type": "MODEL", "links": [2]}], widgets=[0.5], mode=patch_mode),
            _node(3, "Sampler", inputs=[{"name": "model", "type": "MODEL", "link": 2}], widgets=[1, "fixed", 2, "x", ""]),
        ], "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"]]}

    assert ui_to_api(wf(0), FAKE_INFO)["3"]["inputs"]["model"] == ["2", 0]
    bypassed = ui_to_api(wf(4), FAKE_INFO)
    assert "2" not in bypassed and bypassed["3"]["inputs"]["model"] == ["1", 0]
    muted = ui_to_api(wf(2), FAKE_INFO)
    assert "2" not in muted and "model" not in muted["3"]["inputs"]

    bad = wf(0)
    bad["nodes"][2]["widgets_values"] = [1, 2, "x"]  # the control value is missing
    with pytest.raises(WorkflowConversionError, match="widgets_values"):
        ui_to_api(bad, FAKE_INFO)
    unknown = wf(0)
    unknown["nodes"].append(_node(9, "NoSuchNode"))
    assert missing_node_types(unknown, FAKE_INFO) == ["NoSuchNode"]
    with pytest.raises(WorkflowConversionError, match="NoSuchNode"):
        ui_to_api(unknown, FAKE_INFO)


def test_ui_to_api_upload_widget_value_is_optional():
    for widgets in (["i.png", "image"], ["i.png"]):
        api = ui_to_api({"nodes": [_node(1, "Loadimg", widgets=widgets)], "links": []}, FAKE_INFO)
        assert api["1"]["inputs"] == {"image": "i.png"}


# -- the example workflows --------------------------------------------------------------------------

def test_example_workflows_exist():
    assert WORKFLOWS, "no example_workflows/*.json"


def shrink_for_cpu(prompt: dict, ckpt_name: str, controlnet_name: str = CN_NAME, motion_module_name: str = MOTION_MODULE) -> dict:
    """A copy of ``prompt`` sized for a CPU and pointed at the random checkpoint, ControlNet and AnimateDiff motion
    module (by node type)."""
    prompt = json.loads(json.dumps(prompt))
    model_files = {"CheckpointLoaderSimple": ("ckpt_name", ckpt_name), "ControlNetLoader": ("control_net_name", controlnet_name),
                   "ADE_LoadAnimateDiffModel": ("model_name", motion_module_name)}
    for node in prompt.values():
        inputs = node["inputs"]
        for name, value in SHRINK.get(node["class_type"], {}).items():
            if name in inputs and not isinstance(inputs[name], list):  # leave linked inputs alone
                inputs[name] = value
        if node["class_type"] == "VP2P_InflateT2S" and isinstance(inputs.get("frames_per_chunk"), int) and inputs["frames_per_chunk"] > 0:
            # a long-clip template keeps running in chunks at the test's 3 frames: 2 per chunk, 1 shared
            inputs["frames_per_chunk"], inputs["chunk_overlap"] = 2, min(int(inputs.get("chunk_overlap") or 0), 1)
        if node["class_type"] in model_files:
            name, value = model_files[node["class_type"]]
            inputs[name] = value
    return prompt


def _frames(path: Path) -> int:
    if path.suffix.lower() in (".mp4", ".webm", ".mov", ".mkv"):
        import av

        with av.open(str(path)) as container:
            return sum(1 for _ in container.decode(video=0))
    from PIL import Image

    with Image.open(path) as im:
        return getattr(im, "n_frames", 1)


def _fps(path: Path) -> float:
    import av

    with av.open(str(path)) as container:
        return float(container.streams.video[0].average_rate)


def _workflow_params(paths: list[Path]) -> list:
    """One pytest param per workflow, named by its file."""
    return [pytest.param(p, id=p.stem) for p in paths]


def test_random_controlnet_is_offered_by_the_server(comfy_client: ComfyClient):
    """The server reads the random ControlNet's folder: its ControlNetLoader lists the file."""
    options = comfy_client.object_info()["ControlNetLoader"]["input"]["required"]["control_net_name"][0]
    assert CN_NAME in options, f"the server's ControlNetLoader offers {options}"


def vhs_format_widgets(workflow: dict, prompt: dict, object_info: dict) -> dict:
    """``prompt`` with the format widgets of VideoHelperSuite's Video Combine nodes (``crf``, ``pix_fmt``, … of the chosen
    format), which its frontend extension adds to the node and sends with the prompt but /object_info does not declare
    as inputs (they are in the ``formats`` option of its ``format`` input), taken from the node's saved widget values."""
    for node in workflow.get("nodes") or []:
        api = prompt.get(str(node["id"]))
        values = node.get("widgets_values")
        if api is None or api["class_type"] != "VHS_VideoCombine" or not isinstance(values, dict):
            continue
        spec = object_info[api["class_type"]]["input"]["required"]["format"]
        widgets = ((spec[1] if len(spec) > 1 else {}).get("formats") or {}).get(api["inputs"].get("format"), [])
        for widget in widgets:
            name = widget[0]
            if name in values and name not in api["inputs"]:
                api["inputs"][name] = values[name]
    return prompt


def run_example_workflow(client: ComfyClient, workflow_path: Path, ckpt_name: str, timeout: float = RUN_TIMEOUT_S) -> list[Path]:
    """Run one template in ``client``'s server, shrunk for the CPU (``ckpt_name`` as its checkpoint), and check what it
    wrote: files that exist, videos with the frame count of the latent batch and the clip's real speed. Returns the
    files written."""
    workflow = json.loads(workflow_path.read_text(encoding="utf-8"))
    object_info = client.object_info()
    assert "VP2P_InflateT2S" in object_info, "the server did not load the pack:\n" + client.log_tail()
    assert missing_node_types(workflow, object_info) == [], "the frontend would report missing nodes"

    prompt = shrink_for_cpu(vhs_format_widgets(workflow, ui_to_api(workflow, object_info), object_info), ckpt_name)
    assert prompt, "the workflow has no executable nodes"
    for node in prompt.values():  # inputs the workflow expects in ComfyUI's input folder
        if node["class_type"] in INPUT_VIDEOS:
            write_input_video(client.input_dir / node["inputs"][INPUT_VIDEOS[node["class_type"]]])
    entry = client.run(prompt, timeout=timeout)
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]

    batch = {n["inputs"].get(FRAME_COUNT_INPUTS[n["class_type"]]) for n in prompt.values() if n["class_type"] in FRAME_COUNT_INPUTS}
    strides = {n["inputs"].get(FRAME_STRIDE_INPUTS[n["class_type"]]) for n in prompt.values() if n["class_type"] in FRAME_STRIDE_INPUTS}
    written = []
    for node_id, out in entry["outputs"].items():
        animated = any(out.get("animated") or [])
        for item in out.get("images", []) + out.get("gifs", []) + out.get("videos", []):
            if item.get("type") != "output":
                continue  # previews go to the temp folder
            path = client.output_dir / item.get("subfolder", "") / item["filename"]
            assert path.is_file() and path.stat().st_size > 0, f"node {node_id} did not write {path}"
            if (animated or path.suffix == ".mp4") and len(batch) == 1:
                assert _frames(path) == next(iter(batch)), f"{path.name}: frame count differs from the latent batch"
            if path.suffix == ".mp4" and strides:  # frames taken every `stride` play at the clip's real speed
                assert _fps(path) == pytest.approx(INPUT_FPS / next(iter(strides))), path.name
            written.append(path)
    assert written, f"the workflow wrote no output files; outputs: {entry['outputs']}"
    return written


@pytest.mark.parametrize("workflow_path", _workflow_params(WORKFLOWS))
def test_example_workflow_runs(workflow_path: Path, comfy_client: ComfyClient):
    run_example_workflow(comfy_client, workflow_path, SDXL_CKPT_NAME if workflow_path.stem.endswith("_sdxl") else CKPT_NAME)


def test_inversion_survives_a_server_restart(comfy_path, random_checkpoint: Path, tmp_path: Path):
    """The inversion's disk cache (models/vp2p/cache) survives a restart: a restarted server inverts nothing."""
    workflow = json.loads((ROOT / "example_workflows" / "invert_and_reconstruct.json").read_text(encoding="utf-8"))
    output_dir = tmp_path / "output"
    logs, saved = [], []
    for _ in range(2):
        with comfy_server(comfy_path, ROOT, random_checkpoint.parent, output_dir, vp2p_dir=tmp_path / "vp2p") as client:
            prompt = shrink_for_cpu(ui_to_api(workflow, client.object_info()), CKPT_NAME)
            for node in prompt.values():
                if node["class_type"] == "LoadVideo":
                    write_input_video(client.input_dir / node["inputs"]["file"])
            entry = client.run(prompt, timeout=RUN_TIMEOUT_S)
            assert entry["status"]["status_str"] == "success"
            logs.append(client.log())
        saved.append(_tensors_and_metadata(output_dir / "vp2p_inversions" / "video_p2p" / "inversion.safetensors"))
    hit = "Shared Null-Text Invert: cache hit"
    assert hit not in logs[0] and "inner iterations per step" in logs[0], logs[0][-3000:]
    assert hit in logs[1], logs[1][-3000:]
    assert "inner iterations per step" not in logs[1]
    assert len(list((tmp_path / "vp2p" / "cache").glob("inversion_*.safetensors"))) == 1
    assert not (output_dir / "vp2p_inversions" / "cache").exists()  # caches are not outputs
    (first, meta0), (second, meta1) = saved
    assert meta0 == meta1 and first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)  # the same inversion, bit for bit


def _tensors_and_metadata(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        return load_file(str(path)), dict(f.metadata())


def test_changing_only_the_target_reruns_only_controller_and_sampler(comfy_client: ComfyClient):
    """Graph topology keeps re-edits cheap: the inversion does not depend on the target prompt, so ComfyUI
    serves loading, tuning and inverting from its cache when only the controller changes."""
    workflow = json.loads((ROOT / "example_workflows" / "video_p2p_edit.json").read_text(encoding="utf-8"))
    object_info = comfy_client.object_info()
    prompt = shrink_for_cpu(ui_to_api(workflow, object_info), CKPT_NAME)
    for node in prompt.values():
        if node["class_type"] == "LoadVideo":
            write_input_video(comfy_client.input_dir / node["inputs"]["file"])
    comfy_client.run(prompt, timeout=RUN_TIMEOUT_S)
    controller = next(k for k, n in prompt.items() if n["class_type"] == "VP2P_P2PController")
    prompt[controller]["inputs"]["target_prompt"] = "a dog is running on the beach"
    prompt[controller]["inputs"]["blend_target_words"] = "dog"
    entry = comfy_client.run(prompt, timeout=RUN_TIMEOUT_S)
    cached = set()
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_cached":
            cached |= {str(n) for n in data.get("nodes", [])}
    by_type = {k: n["class_type"] for k, n in prompt.items()}
    for kind in ("VP2P_TuneOnVideo", "VP2P_NullTextInvert", "VAEEncode", "CheckpointLoaderSimple"):
        ids = {k for k, t in by_type.items() if t == kind}
        assert ids <= cached, f"{kind} ran again though only the target prompt changed (cached: {sorted(cached)})"
    reran = set(by_type) - cached
    assert {controller} | {k for k, t in by_type.items() if t == "VP2P_DecoupledSampler"} <= reran


# -- API prompts written to each node's contract --------------------------------------------------------

# Each node's required inputs as published (DESIGN §3 for the first five; the README's node table for the
# rest, as first released). Inputs added since are optional: an API prompt written to a node's contract
# must keep working.
CONTRACT: dict[str, set[str]] = {
    "VP2P_InflateT2S": {"model", "frame_attention", "temporal_attention"},
    "VP2P_TuneOnVideo": {"model", "positive", "latent", "steps", "learning_rate", "seed"},
    "VP2P_NullTextInvert": {"model", "positive", "negative", "latent", "steps", "cfg", "mode", "inner_steps", "early_stop",
                            "store_attention"},
    "VP2P_P2PController": {"clip", "source_prompt", "target_prompt", "edit", "cross_replace", "self_replace", "blend_source_words",
                           "blend_target_words", "blend_threshold", "reweight"},
    "VP2P_DecoupledSampler": {"model", "inversion", "control", "cfg", "guidance"},
    "VP2P_LoadTuned": {"model", "tuned_name"},
    "VP2P_SaveInversion": {"inversion", "name"},
    "VP2P_LoadInversion": {"model", "inversion_name"},
    "VP2P_AttentionMaps": {"model", "inversion", "control", "source_words", "target_words", "at_step", "threshold"},
    "VP2P_BoxTrajectory": {"width", "height", "frames", "start_x", "start_y", "start_w", "start_h", "end_x", "end_y", "end_w",
                           "end_h", "shape", "easing"},
    "VP2P_CrossAttentionGuidance": {"model", "positive", "negative", "cfg", "clip", "prompt", "word", "target_masks", "strength"},
    "VP2P_NoiseInversion": {"seed", "width", "height", "frames", "negative"},
    "VP2P_FateZeroController": {"clip", "source_prompt", "target_prompt", "cross_replace", "self_replace", "blend_words",
                                "blend_threshold", "reweight", "latent_blend"},
    "VP2P_Guider": {"model", "inversion", "control", "cfg", "guidance"},
    "VP2P_SelectFrames": {"images", "start", "stride", "cap"},
}


def _contract_node(info: dict, node_type: str, links: dict, values: dict) -> dict:
    """An API node with exactly the contract's inputs: ``links`` for sockets, ``values`` for some widgets, every other
    contract widget at the default the server publishes."""
    required = info[node_type]["input"]["required"]
    inputs = {}
    for name in CONTRACT[node_type]:
        if name in links:
            inputs[name] = links[name]
        elif name in values:
            inputs[name] = values[name]
        else:
            spec = required[name]
            options = spec[0] if isinstance(spec[0], list) else (spec[1] or {}).get("options")
            default = (spec[1] if len(spec) > 1 and spec[1] else {}).get("default")
            inputs[name] = default if default is not None else options[0]
    return {"class_type": node_type, "inputs": inputs}


def test_api_prompts_written_to_the_contract_run(comfy_client: ComfyClient, tmp_path: Path):
    """Every node's required inputs are its published contract (no later input is required), and one API prompt
    using every pack node with only those inputs is accepted and runs in the server."""
    info = comfy_client.object_info()
    for node_type, names in CONTRACT.items():
        assert set(info[node_type]["input"]["required"]) == names, f"{node_type}: required inputs beyond its contract"
    assert {k for k in info if k.startswith("VP2P_")} == set(CONTRACT), "a pack node without a published contract"

    src, tgt = "a cat running", "a tiger running"
    core = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": src}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "video": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": FRAMES}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "no_noise": {"class_type": "DisableNoise", "inputs": {}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["t2s", 0], "scheduler": "normal", "steps": 2, "denoise": 1.0}},
    }
    pack = {
        "t2s": ("VP2P_InflateT2S", {"model": ["ckpt", 0]}, {}),
        "tuned": ("VP2P_TuneOnVideo", {"model": ["t2s", 0], "positive": ["pos", 0], "latent": ["video", 0]},
                  {"steps": 1, "learning_rate": 1e-4}),
        "inv": ("VP2P_NullTextInvert", {"model": ["tuned", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent": ["video", 0]},
                {"steps": 2, "inner_steps": 1, "store_attention": True}),
        "p2p": ("VP2P_P2PController", {"clip": ["ckpt", 1]},
                {"source_prompt": src, "target_prompt": tgt, "blend_source_words": "cat", "blend_target_words": "tiger"}),
        "edit": ("VP2P_DecoupledSampler", {"model": ["tuned", 0], "inversion": ["inv", 0], "control": ["p2p", 0]}, {}),
        "fz": ("VP2P_FateZeroController", {"clip": ["ckpt", 1]}, {"source_prompt": src, "target_prompt": tgt}),
        "fz_edit": ("VP2P_DecoupledSampler", {"model": ["tuned", 0], "inversion": ["inv", 0], "control": ["fz", 0]}, {}),
        "maps": ("VP2P_AttentionMaps", {"model": ["tuned", 0], "inversion": ["inv", 0], "control": ["p2p", 0]}, {}),
        "save_inv": ("VP2P_SaveInversion", {"inversion": ["inv", 0]}, {"name": f"contract_{tmp_path.name}"}),
        "guider": ("VP2P_Guider", {"model": ["tuned", 0], "inversion": ["inv", 0], "control": ["p2p", 0]}, {}),
        "start": ("VP2P_NoiseInversion", {"negative": ["neg", 0]}, {"width": 64, "height": 64, "frames": FRAMES}),
        "gen_edit": ("VP2P_DecoupledSampler", {"model": ["t2s", 0], "inversion": ["start", 0], "control": ["p2p", 0]}, {}),
        "boxes": ("VP2P_BoxTrajectory", {}, {"width": 64, "height": 64, "frames": FRAMES}),
        "cag": ("VP2P_CrossAttentionGuidance", {"model": ["t2s", 0], "positive": ["pos", 0], "negative": ["neg", 0], "clip": ["ckpt", 1],
                                               "target_masks": ["boxes", 0]}, {"prompt": src, "word": "cat"}),
        "frames": ("VP2P_SelectFrames", {"images": ["decode_edit", 0]}, {"stride": 2}),
    }
    prompt = dict(core)
    for node_id, (node_type, links, values) in pack.items():
        prompt[node_id] = _contract_node(info, node_type, links, values)
    prompt.update({
        "guided": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["noise", 0], "guider": ["cag", 0], "sampler": ["sampler", 0],
                                                                    "sigmas": ["sigmas", 0], "latent_image": ["video", 0]}},
        "via_guider": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["no_noise", 0], "guider": ["guider", 0],
                                                                        "sampler": ["sampler", 0], "sigmas": ["guider", 1],
                                                                        "latent_image": ["guider", 2]}},
    })
    for name, latent in (("edit", ["edit", 0]), ("fz_edit", ["fz_edit", 0]), ("gen_edit", ["gen_edit", 0]), ("guided", ["guided", 0]),
                         ("via_guider", ["via_guider", 0])):
        prompt[f"decode_{name}"] = {"class_type": "VAEDecode", "inputs": {"samples": latent, "vae": ["ckpt", 2]}}
        if name != "edit":
            prompt[f"show_{name}"] = {"class_type": "PreviewImage", "inputs": {"images": [f"decode_{name}", 0]}}
    prompt["show_frames"] = {"class_type": "PreviewImage", "inputs": {"images": ["frames", 0]}}
    prompt["show_maps"] = {"class_type": "PreviewImage", "inputs": {"images": ["maps", 0]}}
    assert {n["class_type"] for n in prompt.values()} >= set(CONTRACT) - {"VP2P_LoadTuned", "VP2P_LoadInversion"}

    entry = comfy_client.run(prompt, timeout=RUN_TIMEOUT_S)
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
    frames_shown = entry["outputs"]["show_frames"]["images"]
    assert len(frames_shown) == (FRAMES + 1) // 2  # frames 0 and 2 of the 3-frame edit

    # the loaders' contract: the saved inversion loads back by its name (a second prompt: the combo lists saved files)
    saved = f"contract_{tmp_path.name}.safetensors"
    info = comfy_client.get("/object_info/VP2P_LoadInversion")  # not the client's cached /object_info
    spec = info["VP2P_LoadInversion"]["input"]["required"]["inversion_name"]
    assert saved in (spec[0] if isinstance(spec[0], list) else spec[1]["options"]), spec
    load = {k: prompt[k] for k in ("ckpt", "pos", "video", "t2s", "tuned")}  # the tuning is a cache hit now
    load.update({"loaded": _contract_node(info, "VP2P_LoadInversion", {"model": ["tuned", 0]}, {"inversion_name": saved}),
                 "show": {"class_type": "PreviewAny", "inputs": {"source": ["loaded", 1]}}})
    assert comfy_client.run(load, timeout=RUN_TIMEOUT_S)["status"]["status_str"] == "success"
