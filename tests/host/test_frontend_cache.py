"""The cache in the real ComfyUI frontend (headless Chromium, as :mod:`tests.host.test_frontend`): the
'Video-P2P › Cache' settings — the size limit and the 'Clear Video-P2P cache' button, which shows the
cache's size, clears it and toasts what it freed — and the same action as a menu command."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.host.server import ComfyClient, comfy_server
from tests.host.test_frontend import FRONTEND_SETTINGS, FrontendPage, _post_settings, chromium  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_MS = 15_000


def _cache_file(path: Path, nbytes: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * nbytes)
    os.utime(path, (time.time() - 3600,) * 2)


@pytest.fixture(scope="module")
def cache_server(comfy_path, chromium, tmp_path_factory) -> Iterator[tuple[ComfyClient, Path]]:  # noqa: F811
    """A server whose models/vp2p folder the test sees; yields (client, models/vp2p/cache)."""
    vp2p = tmp_path_factory.mktemp("frontend_vp2p")
    with comfy_server(comfy_path, ROOT, tmp_path_factory.mktemp("frontend_cache_models"),
                      tmp_path_factory.mktemp("frontend_cache_output"), vp2p_dir=vp2p) as client:
        _post_settings(client, FRONTEND_SETTINGS)
        yield client, vp2p / "cache"


@pytest.fixture
def page(chromium, cache_server) -> Iterator[FrontendPage]:  # noqa: F811
    fp = FrontendPage(chromium, cache_server[0])
    try:
        fp.open([])
        yield fp
    finally:
        fp.close()


def _toast(fp: FrontendPage, text: str) -> str:
    toast = fp.page.locator(".p-toast-message", has_text=text).first
    toast.wait_for(timeout=TIMEOUT_MS)
    return toast.inner_text()


def test_settings_panel_shows_the_limit_and_clears_the_cache(page: FrontendPage, cache_server: tuple[ComfyClient, Any]):
    client, cache = cache_server
    _cache_file(cache / "tune_a.safetensors", 4000)
    _cache_file(cache / "inversion_b.safetensors", 1000)
    fp = page
    assert fp.page.evaluate("() => window.app.extensionManager.setting.get('VideoP2P.Cache.LimitGB')") == 20

    fp.page.evaluate("() => window.app.extensionManager.command.execute('Comfy.ShowSettingsDialog')")
    fp.page.get_by_text("Video-P2P", exact=True).first.click(timeout=TIMEOUT_MS)
    fp.page.get_by_text("Cache size limit (GB)").wait_for(timeout=TIMEOUT_MS)
    usage = fp.page.locator(".vp2p-cache-usage")
    usage.filter(has_text="5.0 kB in 2 entries (limit 20.00 GB)").wait_for(timeout=TIMEOUT_MS)

    fp.page.get_by_role("button", name="Clear Video-P2P cache").click()
    assert "Freed 2 files, 5.0 kB." in _toast(fp, "Video-P2P cache cleared")
    usage.filter(has_text="0 B in 0 entries").wait_for(timeout=TIMEOUT_MS)
    assert [p for p in cache.iterdir() if p.name != ".locks"] == []  # lock files stay (never deleted)

    # a limit set in the panel is what the server applies (it reads the saved setting)
    fp.page.evaluate("() => window.app.extensionManager.setting.set('VideoP2P.Cache.LimitGB', 7)")
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while client.get("/vp2p/cache")["limit_bytes"] != 7 * 1000**3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.get("/vp2p/cache")["limit_source"] == "settings"
    assert client.get("/vp2p/cache")["limit_bytes"] == 7 * 1000**3
    assert not fp.page_errors, fp.report()


def test_clear_command_in_the_menu(page: FrontendPage, cache_server: tuple[ComfyClient, Any]):
    _, cache = cache_server
    _cache_file(cache / "tune_c.safetensors", 2500)
    fp = page
    assert fp.page.evaluate("""() => window.app.extensionManager.command.commands
                                 .some((c) => c.id === 'VideoP2P.ClearCache' && c.label === 'Clear Video-P2P cache')""")
    fp.page.evaluate("() => window.app.extensionManager.command.execute('VideoP2P.ClearCache')")
    assert "Freed 1 file, 2.5 kB." in _toast(fp, "Video-P2P cache cleared")
    assert [p for p in cache.iterdir() if p.name != ".locks"] == []  # lock files stay (never deleted)
    assert not fp.page_errors, fp.report()
