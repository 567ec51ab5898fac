"""ComfyUI host: Load Inversion pointed at damaged files in output/vp2p_inversions through a real server (issue 26
item 4). Each prompt fails with the pack's clear error (the exception raised by the pack's own check, naming the file
and the problem), and the next, valid prompt runs on the same server."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import pytest

from tests.host.checkpoint import write_random_sd15_checkpoint
from tests.host.server import ComfyClient, ComfyServerError, comfy_server

ROOT = Path(__file__).resolve().parents[2]
CKPT = "hostile_sd15.safetensors"


@pytest.fixture(scope="module")
def client(comfy_path, tmp_path_factory) -> Iterator[ComfyClient]:
    models = tmp_path_factory.mktemp("hostile_models")
    write_random_sd15_checkpoint(models / CKPT, seed=0, levels=2)
    try:
        with comfy_server(comfy_path, ROOT, models, tmp_path_factory.mktemp("hostile_output")) as c:
            yield c
    finally:
        (models / CKPT).unlink(missing_ok=True)


def load_and_save(name: str, save_as: str) -> dict:
    """Checkpoint → Load Inversion(``name``) → Save Inversion(``save_as``)."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
            "2": {"class_type": "VP2P_LoadInversion", "inputs": {"model": ["1", 0], "inversion_name": name}},
            "3": {"class_type": "VP2P_SaveInversion", "inputs": {"inversion": ["2", 0], "name": save_as}}}


def failure(client: ComfyClient, prompt: dict) -> dict:
    """The execution_error message of a prompt that must fail."""
    prompt_id = client.queue_prompt(prompt)
    with pytest.raises(ComfyServerError):
        client.wait(prompt_id, timeout=300)
    status = client.get(f"/history/{prompt_id}")[prompt_id]["status"]
    errors = [data for kind, data in status["messages"] if kind == "execution_error"]
    assert len(errors) == 1, status
    return errors[0]


def test_damaged_inversion_files_fail_clearly_and_the_server_serves_on(client: ComfyClient):
    folder = client.output_dir / "vp2p_inversions"
    make = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
            "3": {"class_type": "VP2P_NoiseInversion", "inputs": {"seed": 1, "width": 64, "height": 64, "frames": 2,
                                                                   "negative": ["2", 0], "steps": 2, "model": ["1", 0]}},
            "4": {"class_type": "VP2P_SaveInversion", "inputs": {"inversion": ["3", 0], "name": "good"}}}
    client.run(make, timeout=300)
    good = (folder / "good.safetensors").read_bytes()

    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])
    header["trajectory"]["shape"] = [10**6, 10**6, 4, 8, 8]  # 3.2e13 elements declared
    text = json.dumps(header).encode()
    (folder / "huge_shape.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + good[8 + n:])
    flipped = bytearray(good)
    flipped[-5] ^= 0x04
    (folder / "flipped.safetensors").write_bytes(bytes(flipped))
    outside = client.output_dir.parent / "outside.safetensors"
    outside.write_bytes(good)
    (folder / "link_out.safetensors").symlink_to(outside)

    cases = {"truncated.safetensors": "truncated", "huge_shape.safetensors": "needs",
             "flipped.safetensors": "checksum", "link_out.safetensors": "outside the inversion folder"}
    for name, problem in cases.items():
        error = failure(client, load_and_save(name, "never"))
        assert error["node_type"] == "VP2P_LoadInversion"
        assert error["exception_type"].endswith("InversionFileError"), error
        assert name in error["exception_message"] and problem in error["exception_message"], error["exception_message"]
        # raised by the pack's own check of the file, not by torch or safetensors deep inside a load
        last_frame = [line for line in error["traceback"] if line.lstrip().startswith("File ")][-1]
        assert "/vp2p/" in last_frame and ("safetensors_io.py" in last_frame or "inversion_file.py" in last_frame), last_frame
        assert client.alive()
    assert not (folder / "never.safetensors").exists()

    entry = client.run(load_and_save("good.safetensors", "copy"), timeout=300)
    assert entry["status"]["status_str"] == "success"
    assert (folder / "copy.safetensors").stat().st_size == len(good)
