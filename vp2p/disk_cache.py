"""Load-or-compute behind a content-addressed file (tuned weights, inversions).

The caller names the file by a content fingerprint of every input, so a hit can only be
the same computation. A file that cannot be read (truncated, damaged, foreign) is reported
as a warning and recomputed; the new result replaces it atomically (the writers are atomic).
A hit refreshes the file's last-use time (``cache_budget.touch``) so that least-recently-used
eviction takes it last; ``after_save`` (e.g. enforcing the cache's size limit) runs after a write.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from .cache_budget import touch
from .errors import VP2PError

log = logging.getLogger("VideoP2P")

T = TypeVar("T")


def load_or_compute(path: Optional[Path], load: Callable[[Path], T], compute: Callable[[], T],
                    save: Callable[[Path, T], Any], what: str,
                    after_save: Optional[Callable[[Path], Any]] = None) -> tuple[T, bool]:
    """(result, hit). ``path`` None: no cache. ``load`` raises a ``VP2PError`` for a bad file.
    ``after_save(path)`` runs once a computed result is written."""
    if path is not None and path.is_file():
        try:
            result = load(path)
            log.info("%s: cache hit %s (nothing recomputed).", what, path.name)
            touch(path)
            return result, True
        except VP2PError as e:
            log.warning("%s: ignoring a damaged cache file (%s); computing again.", what, e)
    result = compute()
    if path is not None:
        save(path, result)
        if after_save is not None:
            after_save(path)
    return result, False
