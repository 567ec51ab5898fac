"""Atomic safetensors files with a format tag: the one writer and reader behind tuned-weights
and inversion files (and the disk caches). Never pickle."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import VP2PError

# Errors that mean "no room": a full disk, a quota, a file-size limit (RLIMIT_FSIZE).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(VP2PError):
    """A file could not be written for lack of space; what was started is deleted."""


def no_space_error(folder: Path, what: str, needed: int, cause: OSError) -> DiskFullError:
    """The message of a write that ran out of space: the folder, the bytes needed and free, what to do."""
    from .cache_budget import format_bytes

    try:
        free = format_bytes(int(os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize))
    except (OSError, AttributeError):
        free = "unknown"
    return DiskFullError(
        f"No room to write {what} in {folder}: it needs {format_bytes(needed)}, the disk has {free} free ({cause.strerror}). "
        "Nothing half-written was kept. Free space there, lower the Video-P2P cache limit (settings panel: Video-P2P › Cache, "
        "or VP2P_CACHE_LIMIT_GB) or clear the cache, or run with use_cache off / store_location cpu.")


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write to a temporary file in the same folder (``.tmp_<name>.<random>``: eviction can tell whose it
    is), then rename: readers never see half a file. Out of space: ``DiskFullError``, nothing left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp_{path.name}.", dir=str(path.parent))
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise no_space_error(path.parent, path.name, tensor_bytes(tensors), e) from e
        raise
    except Exception as e:  # safetensors reports a failed write as its own error; find the OSError behind it
        if _is_no_space(e):
            raise no_space_error(path.parent, path.name, tensor_bytes(tensors), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _is_no_space(e: BaseException) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("no space left", "quota exceeded", "file too large", "os error 28", "os error 27", "os error 122"))


def read_checked(path: Path, fmt: str, what: str, error: type[VP2PError]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written with format tag ``fmt``; ``error`` says what is wrong."""
    if not path.is_file():
        raise error(f"No {what} file at {path}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{path.name} is not a readable safetensors file ({e}); it may be truncated. Delete it and make it again.") from e
    found = meta.get("format") or ""
    if found != fmt and found.split("/")[0] == fmt.split("/")[0]:
        raise error(f"{path.name} is a {what} file of another version of the pack (format {found!r}; this version reads {fmt!r}), "
                    "whose results differ from this version's. Make it again with this version.")
    if found != fmt:
        raise error(f"{path.name} is not a {what} file (format {meta.get('format')!r}, expected {fmt!r}).")
    return tensors, meta
