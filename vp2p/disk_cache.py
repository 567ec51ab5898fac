"""Load-or-compute behind a content-addressed file (tuned weights, inversions).

The caller names the file by a content fingerprint of every input, so a hit can only be
the same computation. The entry's exclusive lock (``vp2p.cache_lock``) is held while it is looked
up, computed and written, so two processes sharing the cache compute it once: the second waits and
then reads the first one's file. A partial file left by a write that was killed is removed (and
reported) before the lookup; a file that cannot be read (truncated, damaged, foreign) is reported
as a warning and recomputed; the new result replaces it atomically (the writers are atomic).
A hit refreshes the file's last-use time (``cache_budget.touch``) so that least-recently-used
eviction takes it last; ``after_save`` (e.g. enforcing the cache's size limit) runs after a write.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from .cache_budget import TMP_PREFIX, touch
from .cache_lock import acquire
from .errors import VP2PError

log = logging.getLogger("VideoP2P")

T = TypeVar("T")


def remove_leftovers(path: Path, what: str) -> int:
    """Delete temporary files of ``path`` that a killed writer left (the caller holds the entry's lock,
    so no live writer owns them); returns how many."""
    n = 0
    for tmp in path.parent.glob(f"{TMP_PREFIX}{path.name}.*"):
        try:
            size = tmp.stat().st_size
            tmp.unlink()
            n += 1
            log.warning("%s: removed %s (%d bytes), a partial file of %s left by a write that was interrupted "
                        "(the process stopped or the disk filled); computing it again.", what, tmp.name, size, path.name)
        except FileNotFoundError:
            pass
    return n


def load_or_compute(path: Optional[Path], load: Callable[[Path], T], compute: Callable[[], T],
                    save: Callable[[Path, T], Any], what: str,
                    after_save: Optional[Callable[[Path], Any]] = None,
                    on_wait: Optional[Callable[[], None]] = None) -> tuple[T, bool]:
    """(result, hit). ``path`` None: no cache. ``load`` raises a ``VP2PError`` for a bad file.
    ``after_save(path)`` runs once a computed result is written. ``on_wait`` is called while another
    process holds the entry (it may raise, e.g. on the user's interrupt)."""
    if path is None:
        return compute(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    with acquire(path, exclusive=True, on_wait=on_wait):
        remove_leftovers(path, what)
        if path.is_file():
            try:
                result = load(path)
                log.info("%s: cache hit %s (nothing recomputed).", what, path.name)
                touch(path)
                return result, True
            except VP2PError as e:
                log.warning("%s: ignoring a damaged cache file (%s); computing again.", what, e)
        result = compute()
        save(path, result)
    if after_save is not None:
        after_save(path)
    return result, False
