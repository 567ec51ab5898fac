"""Inter-process locks on cache entries: one writer per entry, pins that keep an entry while it is used.

Several processes (two ComfyUI servers, one per GPU) may share one cache folder. Each entry (a file
``tune_….safetensors``, ``inversion_….safetensors`` or a store folder ``attention_…``) has a lock file
``<cache>/.locks/<entry name>.lock``, locked with ``flock``:

* **exclusive** while the entry is looked up, computed and written: a second process asking for the
  same entry waits and then finds it finished (each entry is computed at most once at a time);
* **shared** (a *pin*) while it is in use after that — a FateZero store on disk is read step by step
  for as long as the inversion that owns it lives; any number of processes can pin an entry;
* eviction and clearing take the exclusive lock **without waiting**: an entry they cannot lock is in
  use and is kept. ``clear`` marks such an entry (``<name>.doomed``); the last pin removes it when
  released.

The kernel drops a process's locks when it dies (SIGKILL included), so there are no stale locks to
recover; the lock files (empty) are never deleted, since deleting a lock file another process has open
would let two processes hold "the" lock at once. Where ``flock`` does not exist (Windows) or a network
filesystem ignores it, the locks are no-ops and the guarantees above do not hold (logged once).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
import weakref
from pathlib import Path
from typing import Callable, Optional

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("VideoP2P")

LOCK_DIR = ".locks"
_warned = False
_pinned_here: dict[str, int] = {}  # entries this process pins, by path: it must never wait for itself


def pinned_here(entry: Path) -> bool:
    """Whether this process itself holds a pin on ``entry`` (an exclusive lock would wait for ever)."""
    return _pinned_here.get(str(entry), 0) > 0


def _lock_file(entry: Path) -> Path:
    return entry.parent / LOCK_DIR / f"{entry.name}.lock"


def doomed_marker(entry: Path) -> Path:
    """The marker ``clear`` leaves for an entry in use: remove it once nobody uses it."""
    return entry.parent / LOCK_DIR / f"{entry.name}.doomed"


def _open(entry: Path) -> Optional[int]:
    global _warned
    if fcntl is None:
        if not _warned:
            log.warning("Video-P2P cache: this system has no flock; processes sharing one cache folder are not "
                        "coordinated (keep one ComfyUI per cache folder).")
            _warned = True
        return None
    path = _lock_file(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


class EntryLock:
    """A held lock on one cache entry (exclusive or shared). ``release()`` is idempotent; the
    kernel releases it too when the process ends."""

    def __init__(self, entry: Path, fd: Optional[int], exclusive: bool) -> None:
        self.entry = entry
        self._fd = fd
        self.exclusive = exclusive
        self._pin = False  # counted in _pinned_here while held (pin_for)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def share(self) -> "EntryLock":
        """Turn an exclusive lock into a pin (shared): readers elsewhere may now use the entry."""
        if self._fd is not None and self.exclusive:
            fcntl.flock(self._fd, fcntl.LOCK_SH)
            self.exclusive = False
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if getattr(self, "_pin", False):
            self._pin = False
            _pinned_here[str(self.entry)] = _pinned_here.get(str(self.entry), 1) - 1
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        if doomed_marker(self.entry).exists():
            remove_if_unused(self.entry)

    def __enter__(self) -> "EntryLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(entry: Path, exclusive: bool = True, on_wait: Optional[Callable[[], None]] = None,
            poll_s: float = 0.2) -> EntryLock:
    """Lock ``entry``, waiting while another process holds a conflicting lock. ``on_wait`` is called
    once per poll while waiting (it may raise to give up, e.g. when the user interrupts)."""
    fd = _open(entry)
    if fd is None:
        return EntryLock(entry, None, exclusive)
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    waited = False
    try:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            if not waited:
                log.info("Video-P2P cache: %s is being %s by another process; waiting for it.", entry.name,
                         "written or read" if exclusive else "written")
                waited = True
            if on_wait is not None:
                on_wait()
            time.sleep(poll_s)
    except BaseException:
        os.close(fd)
        raise
    return EntryLock(entry, fd, exclusive)


def try_exclusive(entry: Path) -> Optional[EntryLock]:
    """The exclusive lock of ``entry`` if nobody uses it right now, else None (never waits)."""
    fd = _open(entry)
    if fd is None:
        return EntryLock(entry, None, True)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return EntryLock(entry, fd, True)


def remove_entry(entry: Path) -> None:
    """Delete a file or folder entry (the caller holds its exclusive lock); gone already is fine."""
    try:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    except FileNotFoundError:
        pass
    try:
        doomed_marker(entry).unlink()
    except FileNotFoundError:
        pass


def remove_if_unused(entry: Path) -> bool:
    """Remove ``entry`` if no process uses it now (True when it is gone)."""
    lock = try_exclusive(entry)
    if lock is None:
        return False
    try:
        remove_entry(entry)  # the doomed marker too, so releasing the lock below does not come back here
    except OSError as e:
        log.warning("Video-P2P cache: could not remove %s (%s).", entry, e)
        try:  # give up on it, so that releasing the lock does not try again and again
            doomed_marker(entry).unlink(missing_ok=True)
        except OSError:
            pass
        return False
    finally:
        lock.release()
    log.info("Video-P2P cache: removed %s, which was cleared while in use.", entry.name)
    return True


def pin_for(owner: object, lock: EntryLock) -> EntryLock:
    """Keep ``lock`` (made shared) for as long as ``owner`` lives; released when it is collected."""
    lock.share()
    lock._pin = True
    _pinned_here[str(lock.entry)] = _pinned_here.get(str(lock.entry), 0) + 1
    weakref.finalize(owner, lock.release)
    return lock
