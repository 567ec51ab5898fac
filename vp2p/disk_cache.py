"""Load-or-compute behind a content-addressed file (tuned weights, inversions).

The caller names the file by a content fingerprint of every input, so a hit can only be
the same computation. A file that cannot be read (truncated, damaged, foreign) is reported
as a warning and recomputed; the new result replaces it atomically (the writers are atomic).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from .errors import VP2PError

log = logging.getLogger("VideoP2P")

T = TypeVar("T")


def load_or_compute(path: Optional[Path], load: Callable[[Path], T], compute: Callable[[], T],
                    save: Callable[[Path, T], Any], what: str) -> tuple[T, bool]:
    """(result, hit). ``path`` None: no cache. ``load`` raises a ``VP2PError`` for a bad file."""
    if path is not None and path.is_file():
        try:
            result = load(path)
            log.info("%s: cache hit %s (nothing recomputed).", what, path.name)
            return result, True
        except VP2PError as e:
            log.warning("%s: ignoring a damaged cache file (%s); computing again.", what, e)
    result = compute()
    if path is not None:
        save(path, result)
    return result, False
