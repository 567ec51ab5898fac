"""The pack's disk cache inside ComfyUI: its size limit, least-recently-used eviction, and the
routes behind the settings panel's 'Clear Video-P2P cache' button.

Everything the pack caches lives in ``models/vp2p/cache`` (``storage.cache_dir``): tuned models
(``tune_*.safetensors``), inversions (``inversion_*.safetensors``) and attention stores kept on
disk (``attention_*/``). After every write the least recently used entries are removed until the
folder is within the limit (never the entry just written).

The limit, in GB (decimal), is, first found:

1. the environment variable ``VP2P_CACHE_LIMIT_GB`` (for headless servers);
2. the setting ``VideoP2P.Cache.LimitGB`` of ComfyUI's settings panel, which the frontend stores in
   the default user's ``comfy.settings.json`` (``<user directory>/default/``) — read on every
   check, so a change applies to the next write without a restart;
3. 20 GB.

Routes: ``GET /vp2p/cache`` (location, size, entries, limit) and ``POST /vp2p/cache/clear``
(→ ``{files, bytes, freed_text, skipped, kept: {name: why}, ...}``: an entry in use — being computed by
any process sharing the folder, or a store an edit reads — is kept and removed by its last user,
``vp2p.cache_lock``). A lowered limit applies at the next write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

from ..vp2p.cache_budget import Freed, clear, evict, format_bytes, parse_limit_gb, usage
from ..vp2p.cache_lock import LOCK_DIR

log = logging.getLogger("VideoP2P")

SETTING_ID = "VideoP2P.Cache.LimitGB"
ENV_LIMIT = "VP2P_CACHE_LIMIT_GB"
DEFAULT_LIMIT_GB = 20.0
ROUTE = "/vp2p/cache"


def settings_file() -> Optional[Path]:
    """The default user's ``comfy.settings.json`` (None when ComfyUI has no user directory)."""
    import folder_paths

    get_user_directory = getattr(folder_paths, "get_user_directory", None)
    if get_user_directory is None:
        return None
    return Path(get_user_directory()) / "default" / "comfy.settings.json"


def limit() -> tuple[int, str]:
    """(limit in bytes, where it came from: ``env``, ``settings`` or ``default``).

    A value that is not a number of GB ≥ 0 is reported in the log and the next source is used."""
    env = os.environ.get(ENV_LIMIT, "").strip()
    if env:
        try:
            return parse_limit_gb(env, f"The environment variable {ENV_LIMIT}"), "env"
        except ValueError as e:
            log.warning("%s Using the settings panel's limit instead.", e)
    path = settings_file()
    if path is not None and path.is_file():
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get(SETTING_ID)
        except (OSError, ValueError, AttributeError) as e:
            log.warning("Video-P2P: could not read the cache limit from %s (%s); using %g GB.", path, e, DEFAULT_LIMIT_GB)
            value = None
        if value is not None:
            try:
                return parse_limit_gb(value, f"The setting {SETTING_ID}"), "settings"
            except ValueError as e:
                log.warning("%s Using %g GB.", e, DEFAULT_LIMIT_GB)
    return int(DEFAULT_LIMIT_GB * 1000**3), "default"


def enforce_limit(directory: Optional[Path], keep: Iterable[Optional[Path]] = (), limit_bytes: Optional[int] = None) -> Freed:
    """Evict the least recently used entries of ``directory`` down to the limit, keeping ``keep``."""
    if directory is None:
        return Freed()
    limit_bytes = limit()[0] if limit_bytes is None else limit_bytes
    freed = evict(Path(directory), limit_bytes, keep)
    if freed.entries:
        log.info("Video-P2P cache: over its limit of %s; removed the %d least recently used entr%s (%s) from %s.",
                 format_bytes(limit_bytes), len(freed.entries), "y" if len(freed.entries) == 1 else "ies", freed.text(), directory)
    if freed.remaining_bytes > limit_bytes:
        log.warning("Video-P2P cache: %s holds %s, above its limit of %s, in entries just written or in use. Raise the limit "
                    "(settings panel: Video-P2P › Cache, or %s) or clear the cache.", directory, format_bytes(freed.remaining_bytes),
                    format_bytes(limit_bytes), ENV_LIMIT)
    return freed


def after_write(directory: Optional[Path], *keep: Optional[Path]):
    """An ``after_save`` hook for ``load_or_compute``: enforce the limit keeping the file written (and ``keep``)."""
    return lambda path: enforce_limit(directory, (path, *keep))


def _dirs() -> tuple[Path, Path]:
    from .storage import cache_dir, legacy_inversion_cache_dir

    return cache_dir(), legacy_inversion_cache_dir()


def report() -> dict[str, Any]:
    """What ``GET /vp2p/cache`` answers."""
    cache, legacy = _dirs()
    nbytes, n_entries, files = usage(cache)
    legacy_bytes, _, legacy_files = usage(legacy)
    limit_bytes, source = limit()
    return {"location": str(cache), "bytes": nbytes, "entries": n_entries, "files": files, "size_text": format_bytes(nbytes),
            "limit_bytes": limit_bytes, "limit_text": format_bytes(limit_bytes), "limit_source": source,
            "setting_id": SETTING_ID, "env": ENV_LIMIT,
            "legacy_location": str(legacy), "legacy_bytes": legacy_bytes, "legacy_files": legacy_files}


def clear_all() -> dict[str, Any]:
    """Remove everything the pack cached (also the inversion cache older versions kept in ``output/``)."""
    cache, legacy = _dirs()
    freed = clear(cache)
    old = clear(legacy)
    if legacy.is_dir() and all(p.name == LOCK_DIR for p in legacy.iterdir()):
        shutil.rmtree(legacy, ignore_errors=True)  # nothing of this version writes there: its lock files can go too
    files, nbytes = freed.files + old.files, freed.nbytes + old.nbytes
    text = Freed(files, nbytes).text()
    skipped = freed.skipped + old.skipped
    kept = {**old.reasons, **freed.reasons}
    log.info("Video-P2P cache cleared: freed %s in %s%s.", text, cache,
             f" ({len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} in use kept)" if skipped else "")
    return {"files": files, "bytes": nbytes, "freed_text": text, "skipped": skipped, "kept": kept, "location": str(cache),
            "remaining_bytes": freed.remaining_bytes + old.remaining_bytes}


def register_cache_routes() -> None:
    """Add the cache routes to ComfyUI's server (no-op without a running server, e.g. in scripts)."""
    from .routes import pack_server

    server = pack_server("_vp2p_cache_routes")
    if server is None:
        return
    from aiohttp import web

    def failed(what: str, e: Exception) -> "web.Response":
        log.exception("Video-P2P cache: %s failed.", what)
        return web.json_response({"error": f"{what} failed: {e}"}, status=500)

    @server.routes.get(ROUTE)
    async def cache_info(request: "web.Request") -> "web.Response":
        try:
            return web.json_response(await asyncio.to_thread(report))  # walks the folder: off the event loop
        except OSError as e:
            return failed("Reading the cache", e)

    @server.routes.post(ROUTE + "/clear")
    async def cache_clear(request: "web.Request") -> "web.Response":
        try:
            return web.json_response(await asyncio.to_thread(clear_all))
        except OSError as e:
            return failed("Clearing the cache", e)
