"""A size budget for a cache folder: least-recently-used eviction and clearing.

An *entry* is one child of the cache folder: a file (a tuned model, an inversion) or a folder
(an attention store on disk). Its size is the bytes of every file in it; its *last use* is its
own modification time, which the cache refreshes with :func:`touch` on every hit (the files are
content-addressed and never rewritten, so the time says when the entry was last written or read).

Entries in use are left alone, so that nobody loses a file they are writing or reading: an entry
whose lock (``vp2p.cache_lock``) another thread or process holds — being computed, or pinned by a
run that reads it — is kept (``clear`` marks it, and the last user removes it). Without working
locks (no ``flock``), a partial file (``.tmp_*``, the atomic writers' temporary name) or an unfinished
folder (no ``spec.json``, which the attention store writes last) younger than ``grace_s`` counts as
busy. A partial file whose entry nobody holds is a leftover of an interrupted write and is removed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from .cache_lock import LOCK_DIR, doomed_marker, fcntl, remove_entry, try_exclusive

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
    reasons: dict[str, str] = field(default_factory=dict)  # why each skipped name was kept

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
        if child.name == LOCK_DIR or (child.name.startswith(".") and not child.name.startswith(TMP_PREFIX)):
            continue
        try:
            st = child.lstat()
        except FileNotFoundError:
            continue
        young = now - st.st_mtime < grace_s
        if child.is_dir() and not child.is_symlink():
            nbytes, files = _walk_size(child)
            # With flock, a recording holds the folder's lock (``_take`` sees it); without, trust its age.
            busy = fcntl is None and young and not (child / FINISHED_MARKER).is_file()
        else:
            nbytes, files = st.st_size, 1
            busy = child.name.startswith(TMP_PREFIX) and (young if fcntl is None else _owner_busy(child))
        found.append(CacheEntry(child, nbytes, files, st.st_mtime, busy))
    return sorted(found, key=lambda e: (e.last_used, e.path.name))


def tmp_owner(tmp: Path) -> Optional[Path]:
    """The entry a temporary file is being written for (``.tmp_<entry name>.<random>``), or None."""
    name = tmp.name[len(TMP_PREFIX):]
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    return tmp.parent / owner if owner.endswith(".safetensors") else None


def _owner_busy(tmp: Path) -> bool:
    owner = tmp_owner(tmp)
    if owner is None:
        return False
    lock = try_exclusive(owner)
    if lock is None:
        return True
    lock.release()
    return False


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


IN_USE = "in use (being computed, or read by a running or cached stage)"
BEING_WRITTEN = "being written"


def _take(e: CacheEntry, kept: set[Path]) -> Optional[str]:
    """Remove ``e`` unless it is in use; None when removed, else why it was kept."""
    if e.busy:
        return BEING_WRITTEN
    if e.path.resolve() in kept:
        return "just written or read by this run"
    lock = try_exclusive(e.path)
    if lock is None:
        return IN_USE
    try:
        remove_entry(e.path)
        return None
    except OSError as err:
        log.warning("Could not remove the cache entry %s (%s).", e.path, err)
        return f"could not be removed ({err})"
    finally:
        lock.release()


def _resolved(paths: Iterable[Optional[Path]]) -> set[Path]:
    return {Path(p).resolve() for p in paths if p is not None}


def evict(directory: Path, limit_bytes: int, keep: Iterable[Optional[Path]] = (), now: Optional[float] = None,
          grace_s: float = GRACE_S) -> Freed:
    """Remove the least recently used entries of ``directory`` until it holds at most ``limit_bytes``.

    Entries in ``keep`` (the one just written or read) and entries in use (locked by any process) are
    never removed, so the folder can stay above the limit when they alone exceed it (``remaining_bytes``
    says so).
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
        why = _take(e, kept)
        if why is not None:
            freed.skipped.append(e.path.name)
            freed.reasons[e.path.name] = why
            continue
        total -= e.nbytes
        freed.files += e.files
        freed.nbytes += e.nbytes
        freed.entries.append(e.path.name)
    freed.remaining_bytes = total
    return freed


def clear(directory: Path, keep: Iterable[Optional[Path]] = (), now: Optional[float] = None, grace_s: float = GRACE_S) -> Freed:
    """Remove every entry of ``directory`` but those in ``keep`` and those in use; an entry in use
    is marked, and removed by its last user when it lets go of it (``vp2p.cache_lock``)."""
    kept = _resolved(keep)
    freed = Freed()
    for e in entries(directory, now, grace_s):
        why = _take(e, kept)
        if why is not None:
            if why == IN_USE:
                try:
                    marker = doomed_marker(e.path)
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.touch()
                    why += "; removed when that stage lets go of it"
                except OSError:
                    pass
            freed.skipped.append(e.path.name)
            freed.reasons[e.path.name] = why
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
