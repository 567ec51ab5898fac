"""ComfyUI host: the pack's HTTP routes under hostile requests (issue 26 item 5), against a real server.

``POST /vp2p/tokenize`` reads the safetensors header of the checkpoint a controller's CLIP comes from; it is sent
``..`` components, absolute paths, URL-encoded separators, NUL bytes, bad and non-object JSON, malformed ``clip``
objects, huge bodies (with and without a length). ``GET /vp2p/cache`` and ``POST /vp2p/cache/clear`` are sent paths
with encoded ``..``, bodies naming outside files, wrong methods, and a cache holding links to outside files. Every answer
is a 4xx or a 200 whose notes say what was refused, no answer carries a traceback, no file outside the models folder
is read (a sentinel checkpoint outside it with an SDXL header would switch the tokenizer if it were), nothing outside
the cache is deleted, and the server serves afterwards."""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

import pytest
import torch

from tests.host.server import ComfyClient, comfy_server

ROOT = Path(__file__).resolve().parents[2]
SD1_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
SDXL_KEY = "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight"
SD1, SDXL = "SD1.x CLIP-L", "SDXL CLIP-L + CLIP-G"


@pytest.fixture(scope="module")
def served(comfy_path, tmp_path_factory) -> Iterator[tuple[ComfyClient, Path]]:
    """A server whose checkpoints folder is ``<root>/models`` (one SD1 header file); ``<root>/outside`` holds SDXL-header
    sentinels that must never be read."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("routes")
    for d in ("models", "outside", "vp2p/cache"):
        (root / d).mkdir(parents=True)
    save_file({SD1_KEY: torch.zeros(1)}, str(root / "models" / "sd1_header.safetensors"))
    save_file({SDXL_KEY: torch.zeros(1)}, str(root / "outside" / "secret.safetensors"))
    save_file({SDXL_KEY: torch.zeros(1)}, str(root / "sibling.safetensors"))
    with comfy_server(comfy_path, ROOT, root / "models", root / "output", vp2p_dir=root / "vp2p") as client:
        yield client, root


def request(client: ComfyClient, method: str, path: str, body: Optional[bytes] = None, chunked: bool = False,
            content_type: str = "application/json") -> tuple[int, str]:
    """(status, body text) of a raw HTTP request: the path is sent exactly as given (no client-side normalisation)."""
    url = urlparse(client.base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    try:
        headers = {"Content-Type": content_type} if body is not None else {}
        if chunked:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in {**headers, "Transfer-Encoding": "chunked"}.items():
                conn.putheader(k, v)
            conn.endheaders()
            for i in range(0, len(body), 65536):
                part = body[i:i + 65536]
                try:
                    conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    break  # the server answered and closed early: read its answer
            else:
                conn.send(b"0\r\n\r\n")
        else:
            try:
                conn.request(method, path, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                pass
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", errors="replace")
    finally:
        conn.close()


def assert_clean(status: int, text: str, allowed: tuple[int, ...]) -> None:
    assert status in allowed, (status, text[:500])
    for marker in ("Traceback", 'File "', "Error:", "site-packages"):
        assert marker not in text, (status, text[:2000])


def tokenize(client: ComfyClient, clip: object, **extra) -> tuple[int, dict]:
    body = {"source": "a cat running", "target": "a dog running", "clip": clip, **extra}
    status, text = request(client, "POST", "/vp2p/tokenize", json.dumps(body).encode())
    assert_clean(status, text, (200,))
    return status, json.loads(text)


def ckpt(name: object) -> dict:
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}


def test_token_view_reads_only_checkpoints_inside_the_models_folder(served):
    client, root = served
    _, answer = tokenize(client, ckpt("sd1_header.safetensors"))
    assert answer["tokenizer"] == SD1 and answer["notes"] == []  # the route works
    secret = root / "outside" / "secret.safetensors"
    names = ["../outside/secret.safetensors", "../../outside/secret.safetensors", str(secret), "/" + str(secret).lstrip("/"),
             "..\\outside\\secret.safetensors", "../sibling.safetensors", "../models/sd1_header.safetensors",
             "%2e%2e%2foutside%2fsecret.safetensors", "..%2foutside%2fsecret.safetensors",
             "sub/../../outside/secret.safetensors", "../../../../../../../../etc/passwd", "/etc/passwd",
             "sd1_header.safetensors\0.txt", "C:\\Windows\\win.ini", "x" * 5000]
    for name in names:
        _, answer = tokenize(client, ckpt(name))
        # were the SDXL sentinel read, the view would use SDXL's tokenizer without a note
        assert answer["tokenizer"] == SD1, (name, answer)
        assert len(answer["notes"]) == 1 and "assumed" in answer["notes"][0], (name, answer)
        assert "source" in answer and answer["warnings"] == []
    _, answer = tokenize(client, ckpt("../outside/secret.safetensors"))
    assert "leaves the models folder" in answer["notes"][0]
    _, answer = tokenize(client, ckpt(str(secret)))
    assert "absolute path" in answer["notes"][0]
    _, answer = tokenize(client, ckpt("%2e%2e%2foutside%2fsecret.safetensors"))
    assert "is not in the checkpoints folder" in answer["notes"][0]
    for text_encoder in ("../outside/secret.safetensors", str(secret)):
        _, answer = tokenize(client, {"class_type": "CLIPLoader", "inputs": {"clip_name": text_encoder, "type": "stable_diffusion"}})
        assert answer["tokenizer"] == SD1 and "text_encoders" in answer["notes"][0], answer


def test_token_view_malformed_requests(served):
    client, _ = served
    for body, status in ((b"{not json", 400), (b"\xff\xfe", 400), (b"[1, 2]", 400), (b'"text"', 400), (b"null", 400),
                         (b"", 400), (b"1e999999", 400)):
        got, text = request(client, "POST", "/vp2p/tokenize", body)
        assert_clean(got, text, (status,))
        assert "warnings" in json.loads(text)
    odd_clips = [[], "CheckpointLoaderSimple", {"class_type": "CheckpointLoaderSimple", "inputs": ["ckpt_name"]},
                 {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": {"path": "/etc/passwd"}}},
                 {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ["../outside/secret.safetensors"]}},
                 {"class_type": ["x"], "inputs": None}, {"class_type": "CLIPLoader", "inputs": {"type": ["sd"], "clip_name": 3}},
                 {"class_type": "DualCLIPLoader", "inputs": {"type": {"a": 1}}}]
    for clip in odd_clips:
        _, answer = tokenize(client, clip)
        assert answer["tokenizer"] == SD1 and "assumed" in answer["notes"][0], (clip, answer)
    _, answer = tokenize(client, None, source=["a", {"b": 1}], target=12, edit="sideways", reweight="cat:lots")
    assert answer["warnings"], answer  # bad fields are reported, not crashed on


def test_token_view_refuses_huge_bodies(served):
    client, _ = served
    huge = json.dumps({"source": "cat " * 300_000, "target": "dog", "clip": None}).encode()  # 1.2 MB
    status, text = request(client, "POST", "/vp2p/tokenize", huge)
    assert_clean(status, text, (413,))
    status, text = request(client, "POST", "/vp2p/tokenize", huge, chunked=True)  # no Content-Length to check up front
    assert_clean(status, text, (413,))
    _, answer = tokenize(client, ckpt("sd1_header.safetensors"))
    assert answer["tokenizer"] == SD1


def test_wrong_methods_and_paths(served):
    client, _ = served
    for method, path in (("GET", "/vp2p/tokenize"), ("PUT", "/vp2p/tokenize"), ("DELETE", "/vp2p/cache"),
                         ("POST", "/vp2p/cache"), ("GET", "/vp2p/cache/clear"), ("DELETE", "/vp2p/cache/clear"),
                         ("GET", "/vp2p/cache/..%2f..%2f..%2fetc%2fpasswd"), ("POST", "/vp2p/cache/%2e%2e/clear"),
                         ("POST", "/vp2p/cache/clear/..%2f..%2foutside"), ("GET", "/vp2p/%2e%2e/%2e%2e/outside/secret.safetensors"),
                         ("POST", "/vp2p/tokenize/..%2f..%2f")):
        status, text = request(client, method, path, b"{}" if method in ("POST", "PUT") else None)
        assert_clean(status, text, (404, 405))
        assert "secret" not in text and "root:" not in text


def test_cache_clear_deletes_nothing_outside_the_cache(served):
    client, root = served
    cache = root / "vp2p" / "cache"
    keep = [root / "outside" / "keep.safetensors", root / "vp2p" / "named.safetensors", root / "outside" / "dir" / "inner.bin",
            root / "models" / "sd1_header.safetensors"]
    for path in keep[:3]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"sentinel")
    (cache / "tune_x.safetensors").write_bytes(b"x" * 100)
    (cache / "inversion_link.safetensors").symlink_to(keep[0])  # links in the cache to outside files and folders
    (cache / "attention_link").symlink_to(keep[2].parent, target_is_directory=True)
    for method, path, body in (("POST", "/vp2p/cache/clear", json.dumps({"path": str(root / "outside")}).encode()),
                               ("POST", "/vp2p/cache/clear", json.dumps({"directory": "../../outside", "files": ["../named.safetensors"]}).encode()),
                               ("POST", "/vp2p/cache/clear", b"{not json"), ("POST", "/vp2p/cache/clear", b"[1]"),
                               ("POST", "/vp2p/cache/clear?path=..%2f..%2foutside", b"{}"),
                               ("GET", "/vp2p/cache?path=%2e%2e%2f%2e%2e%2foutside", None)):
        status, text = request(client, method, path, body)
        assert_clean(status, text, (200,))
        answer = json.loads(text)
        assert Path(answer["location"]).resolve() == cache.resolve()
    for path in keep:
        assert path.is_file(), f"{path} was deleted"
    assert not (cache / "tune_x.safetensors").exists()  # the clear did run
    assert not os.path.lexists(cache / "inversion_link.safetensors") and not os.path.lexists(cache / "attention_link")
    info = client.get("/vp2p/cache")
    assert info["bytes"] == 0 and info["entries"] == 0


def test_the_server_still_serves(served):
    client, _ = served
    test_token_view_malformed_requests(served)
    assert client.alive()
    assert "VP2P_LoadInversion" in client.get("/object_info/VP2P_LoadInversion")
    assert client.get("/vp2p/cache")["location"]
    assert "Traceback" not in client.log() or "Video-P2P token view failed" not in client.log()
