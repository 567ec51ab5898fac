"""ComfyUI host: the pack's cache in models/vp2p/cache — its limit (environment, ComfyUI's settings file,
default), least-recently-used eviction after real cache writes, and the cache routes in a real server."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.host.comfy_env import host_module, inflated
from tests.host.server import comfy_server

ROOT = Path(__file__).resolve().parents[2]
HOUR = 3600.0
SETTING = "VideoP2P.Cache.LimitGB"
ENV = "VP2P_CACHE_LIMIT_GB"


def aged(path: Path, nbytes: int, age_s: float) -> Path:
    """A cache file of ``nbytes`` last used ``age_s`` seconds ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * nbytes)
    os.utime(path, (time.time() - age_s,) * 2)
    return path


def aged_store(path: Path, nbytes: int, age_s: float) -> Path:
    """A finished attention store folder (a shard and spec.json) last used ``age_s`` seconds ago."""
    aged(path / "step_0000.safetensors", nbytes, age_s)
    aged(path / "spec.json", 10, age_s)
    os.utime(path, (time.time() - age_s,) * 2)
    return path


@pytest.fixture
def user_dir(comfy_path, tmp_path, monkeypatch):
    """ComfyUI's user directory in a temporary folder, no limit in the environment; yields the settings file."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "user_directory", str(tmp_path / "user"))
    monkeypatch.delenv(ENV, raising=False)
    path = tmp_path / "user" / "default" / "comfy.settings.json"
    path.parent.mkdir(parents=True)
    return path


def test_the_limit_comes_from_the_environment_the_settings_file_or_the_default(pack, user_dir, monkeypatch, caplog):
    admin = host_module(pack, "cache_admin")
    assert admin.settings_file() == user_dir
    assert admin.limit() == (20 * 1000**3, "default")
    user_dir.write_text(json.dumps({"Comfy.Other": 1, SETTING: 2.5}))
    assert admin.limit() == (2_500_000_000, "settings")
    monkeypatch.setenv(ENV, "1")
    assert admin.limit() == (1000**3, "env")
    with caplog.at_level(logging.WARNING, logger="VideoP2P"):
        monkeypatch.setenv(ENV, "lots")
        assert admin.limit() == (2_500_000_000, "settings")
        monkeypatch.delenv(ENV)
        user_dir.write_text(json.dumps({SETTING: -3}))
        assert admin.limit() == (20 * 1000**3, "default")
        user_dir.write_text("{not json")
        assert admin.limit() == (20 * 1000**3, "default")
    assert "VP2P_CACHE_LIMIT_GB must be a number" in caplog.text and "0 or more; -3 was given" in caplog.text
    assert "could not read the cache limit" in caplog.text


def test_an_inversion_write_evicts_the_oldest_entries_past_the_limit(pack, small_models, user_dir, tmp_path, caplog):
    _, base = small_models
    model = inflated(pack, base)
    host = host_module(pack, "invert_host")
    cache = tmp_path / "cache"
    oldest = aged(cache / "tune_old.safetensors", 400_000, 5 * HOUR)
    older = aged_store(cache / "attention_old", 400_000, 4 * HOUR)
    recent = aged(cache / "inversion_recent.safetensors", 100_000, 60)
    user_dir.write_text(json.dumps({SETTING: 0.00025}))  # 250 kB: the new inversion (~50 kB) and the recent one fit
    settings = pack.vp2p.inversion.InversionSettings(steps=2, mode=pack.vp2p.inversion.InversionMode.DDIM_ONLY, cfg=1.0)
    g = torch.Generator().manual_seed(3)
    latents, positive, negative = torch.randn(2, 4, 8, 8, generator=g), [[torch.randn(1, 7, 768, generator=g), {}]], [[torch.zeros(1, 7, 768), {}]]
    with torch.inference_mode(), caplog.at_level(logging.INFO, logger="VideoP2P"):
        host.invert_cached(model, positive, negative, latents, settings, cache)
    written = [p for p in cache.glob("inversion_*.safetensors") if p != recent]
    assert len(written) == 1 and recent.is_file()
    assert not oldest.exists() and not older.exists()
    assert "removed the 2 least recently used entries (3 files" in caplog.text

    # a hit refreshes the entry's last use: the next eviction takes the other one first
    os.utime(written[0], (time.time() - 2 * HOUR,) * 2)
    with torch.inference_mode():
        host.invert_cached(model, positive, negative, latents, settings, cache)
    assert time.time() - written[0].stat().st_mtime < HOUR
    admin = host_module(pack, "cache_admin")
    admin.enforce_limit(cache, limit_bytes=written[0].stat().st_size)
    assert written[0].is_file() and not recent.exists()


def test_a_tuning_write_keeps_itself_even_with_a_zero_limit(pack, small_models, user_dir, tmp_path, monkeypatch, caplog):
    import folder_paths

    _, base = small_models
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    folder_paths.folder_names_and_paths.pop("vp2p", None)
    old = aged(tmp_path / "vp2p" / "cache" / "inversion_old.safetensors", 1000, HOUR)
    saved = aged(tmp_path / "vp2p" / "mine.safetensors", 1000, HOUR)  # a named tuned model: not the cache's
    monkeypatch.setenv(ENV, "0")  # keeps only the entry just written
    g = torch.Generator().manual_seed(0)
    latents, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(1, 7, 768, generator=g)
    settings = pack.vp2p.tuning.TuneSettings(steps=1, learning_rate=1e-4, seed=1)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="VideoP2P"):
        host_module(pack, "tune_nodes").tune_cached(inflated(pack, base), [[cond, {}]], latents, settings, None)
    assert [p.name[:5] for p in (tmp_path / "vp2p" / "cache").iterdir() if p.name != ".locks"] == ["tune_"]
    assert not old.exists() and saved.is_file()
    assert "above its limit of 0 B" in caplog.text


def _post_empty_answer(base_url: str, path: str, body: object) -> None:
    """POST JSON to a route that answers with an empty body (ComfyUI's /settings/{id}); loopback only."""
    req = urllib.request.Request(base_url + path, data=json.dumps(body).encode("utf-8"), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=30) as resp:
        assert resp.status == 200


def test_cache_routes_report_read_the_setting_and_clear(comfy_path, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    vp2p, output = tmp_path / "vp2p", tmp_path / "output"
    aged(vp2p / "cache" / "tune_a.safetensors", 3000, HOUR)
    aged_store(vp2p / "cache" / "attention_b", 2000, 2 * HOUR)
    aged(output / "vp2p_inversions" / "cache" / "inversion_c.safetensors", 500, HOUR)  # where older versions cached
    mine = aged(output / "vp2p_inversions" / "mine.safetensors", 700, HOUR)  # a saved inversion: a result, kept
    named = aged(vp2p / "car.safetensors", 900, HOUR)  # a saved tuned model, kept
    (tmp_path / "ckpt").mkdir()
    with comfy_server(comfy_path, ROOT, tmp_path / "ckpt", output, vp2p_dir=vp2p) as client:
        info = client.get("/vp2p/cache")
        assert (info["bytes"], info["entries"], info["files"]) == (5010, 2, 3)
        assert Path(info["location"]).resolve() == (vp2p / "cache").resolve()
        assert (info["limit_bytes"], info["limit_source"], info["limit_text"]) == (20 * 1000**3, "default", "20.00 GB")
        assert info["legacy_bytes"] == 500

        _post_empty_answer(client.base_url, f"/settings/{SETTING}", 5)  # as the settings panel stores it
        info = client.get("/vp2p/cache")
        assert (info["limit_bytes"], info["limit_source"]) == (5 * 1000**3, "settings")

        freed = client.post("/vp2p/cache/clear", {})
        assert (freed["files"], freed["bytes"], freed["freed_text"]) == (4, 5510, "4 files, 5.5 kB")
        assert freed["skipped"] == []
        assert [p for p in (vp2p / "cache").iterdir() if p.name != ".locks"] == [] and not (output / "vp2p_inversions" / "cache").exists()
        assert mine.is_file() and named.is_file()
        assert client.post("/vp2p/cache/clear", {})["freed_text"] == "0 files, 0 B"
        assert client.get("/vp2p/cache")["bytes"] == 0
        assert "Video-P2P cache cleared: freed 4 files, 5.5 kB" in client.log()
