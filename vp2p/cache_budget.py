"""A size budget for a cache folder: least-recently-used eviction and clearing.

An *entry* is one child of the cache folder: a file (a tuned model, an inversion) or a folder
(an attention store on disk). Its size is the bytes of every file in it; its *last use* is its
own modification time, which the cache refreshes with :func:`touch` on every hit (the files are
content-addressed and never rewritten, so the time says when the entry was last written or read).

Entries being written are left alone, so that a writer in another thread never loses its file:
a partial file (``.tmp_*``, the atomic writers' temporary name) younger than ``grace_s``, and a
folder younger than ``grace_s`` that is not finished yet (no ``spec.json``, which the attention
store writes last). Older partial files are leftovers of an interrupted run and are removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger("VideoP2P")

TMP_PREFIX = ".tmp_"
FINISHED_MARKER = "spec.json"
GRACE_S = 30 * 60.0
GB = 1000**3


@dataclass(frozen=True)
class CacheEntry:
    """One child of a cache folder."""

    path: Path
    nbytes: int
    files: int
    last_used: float  # seconds since the epoch
    busy: bool  # being written right now: never removed


@dataclass
class Freed:
    """What :func:`evict` or :func:`clear` removed, and what it left."""

    files: int = 0
    nbytes: int = 0
    entries: list[str] = field(default_factory=list)  # names removed, oldest first
    skipped: list[str] = field(default_factory=list)  # names kept because they are in use
    remaining_bytes: int = 0

    def text(self) -> str:
        """``"3 files, 1.20 GB"``: for logs and the user."""
        return f"{self.files} file{'s' if self.files != 1 else ''}, {format_bytes(self.nbytes)}"


def format_bytes(n: int) -> str:
    """Decimal units, as disks are sold: ``1.20 GB``, ``350.0 MB``, ``12 B``."""
    for unit, size in (("TB", 1000**4), ("GB", GB), ("MB", 1000**2), ("kB", 1000)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit in ("TB", "GB") else f"{n / size:.1f} {unit}"
    return f"{n} B"


def _walk_size(path: Path) -> tuple[int, int]:
    """(bytes, files) of a folder, ignoring files that vanish meanwhile."""
    nbytes = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                nbytes += os.stat(os.path.join(root, name)).st_size
                files += 1
            except FileNotFoundError:
                pass
    return nbytes, files


def entries(directory: Path, now: Optional[float] = None, grace_s: float = GRACE_S) -> list[CacheEntry]:
    """The entries of ``directory`` (none when it does not exist), least recently used first."""
    now = time.time() if now is None else now
    found = []
    try:
        children = list(Path(directory).iterdir())
    except FileNotFoundError:
        return []
    for child in children:
        try:
            st = child.lstat()
        except FileNotFoundError:
            continue
        young = now - st.st_mtime < grace_s
        if child.is_dir() and not child.is_symlink():
            nbytes, files = _walk_size(child)
            busy = young and not (child / FINISHED_MARKER).is_file()
        else:
            nbytes, files = st.st_size, 1
            busy = young and child.name.startswith(TMP_PREFIX)
        found.append(CacheEntry(child, nbytes, files, st.st_mtime, busy))
    return sorted(found, key=lambda e: (e.last_used, e.path.name))


def usage(directory: Path) -> tuple[int, int, int]:
    """(bytes, entries, files) in ``directory``."""
    es = entries(directory)
    return sum(e.nbytes for e in es), len(es), sum(e.files for e in es)


def touch(path: Optional[Path]) -> None:
    """Mark an entry used now (a cache hit), so that eviction takes it last. Never raises."""
    if path is None:
        return
    try:
        os.utime(path)
    except OSError as e:
        log.debug("Could not refresh the last-use time of %s (%s).", path, e)


def _remove(entry: CacheEntry) -> bool:
    try:
        if entry.path.is_dir() and not entry.path.is_symlink():
            shutil.rmtree(entry.path)
        else:
            entry.path.unlink()
        return True
    except FileNotFoundError:
        return True  # someone else removed it: freed all the same
    except OSError as e:
        log.warning("Could not remove the cache entry %s (%s).", entry.path, e)
        return False


def _resolved(paths: Iterable[Optional[Path]]) -> set[Path]:
    return {Path(p).resolve() for p in paths if p is not None}


def evict(directory: Path, limit_bytes: int, keep: Iterable[Optional[Path]] = (), now: Optional[float] = None,
          grace_s: float = GRACE_S) -> Freed:
    """Remove the least recently used entries of ``directory`` until it holds at most ``limit_bytes``.

    Entries in ``keep`` (the one just written or read) and busy entries are never removed, so the
    folder can stay above the limit when they alone exceed it (``remaining_bytes`` says so).
    """
    if limit_bytes < 0:
        raise ValueError(f"A cache limit must be 0 bytes or more; {limit_bytes} was given.")
    kept = _resolved(keep)
    es = entries(directory, now, grace_s)
    total = sum(e.nbytes for e in es)
    freed = Freed()
    for e in es:
        if total <= limit_bytes:
            break
        if e.busy or e.path.resolve() in kept:
            freed.skipped.append(e.path.name)
            continue
        if _remove(e):
            total -= e.nbytes
            freed.files += e.files
            freed.nbytes += e.nbytes
            freed.entries.append(e.path.name)
    freed.remaining_bytes = total
    return freed


def clear(directory: Path, keep: Iterable[Optional[Path]] = (), now: Optional[float] = None, grace_s: float = GRACE_S) -> Freed:
    """Remove every entry of ``directory`` but those in ``keep`` and those being written."""
    kept = _resolved(keep)
    freed = Freed()
    for e in entries(directory, now, grace_s):
        if e.busy or e.path.resolve() in kept or not _remove(e):
            freed.skipped.append(e.path.name)
            freed.remaining_bytes += e.nbytes
            continue
        freed.files += e.files
        freed.nbytes += e.nbytes
        freed.entries.append(e.path.name)
    return freed


def parse_limit_gb(value: object, what: str) -> int:
    """A limit in GB (a number ≥ 0, or a string of one) as bytes; ``what`` names its source in the error."""
    try:
        gb = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of GB (e.g. 20); {value!r} was given.") from None
    if not gb >= 0 or gb == float("inf"):
        raise ValueError(f"{what} must be a finite number of GB, 0 or more; {value!r} was given.")
    return int(gb * GB)
