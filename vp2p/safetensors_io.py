"""Atomic safetensors files with a format tag: the one writer and reader behind tuned-weights
and inversion files (and the disk caches). Never pickle."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Optional

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
    is), then rename: readers never see half a file. Out of space: ``DiskFullError``, nothing left behind.
    (``read_checked`` files also record ``tensor_digest`` in their metadata: see ``save_checked``.)"""
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


def save_checked(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """``write_atomic`` with the tensors' digest in the metadata, which ``read_checked`` verifies. Tensors that share
    memory (e.g. Start From Noise's ``cond`` and ``negative``, one tensor) are copied apart: safetensors refuses them."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    tensors = out
    return write_atomic(path, tensors, {**metadata, DIGEST_KEY: tensor_digest(tensors)})


def read_checked(path: Path, fmt: str, what: str, error: type[VP2PError],
                 folder: Optional[Path] = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written with format tag ``fmt``; ``error`` says what is wrong. The header is
    checked before any tensor is read (``read_header``), floating-point tensors must be finite, and with ``folder``
    the file must lie inside it (``check_inside``: no symlink out of it)."""
    check_inside(path, folder, what, error)
    _, meta = read_header(path, what, error)
    found = meta.get("format") or ""
    if found != fmt and found.split("/")[0] == fmt.split("/")[0]:
        raise error(f"{path.name} is a {what} file of another version of the pack (format {found!r}; this version reads {fmt!r}), "
                    "whose results differ from this version's. Make it again with this version.")
    if found != fmt:
        raise error(f"{path.name} is not a {what} file (format {meta.get('format')!r}, expected {fmt!r}).")
    tensors, meta = load_tensors(path, what, error)
    check_digest(tensors, meta, path.name, error)
    return tensors, meta


# -- reading hostile files ----------------------------------------------------------------------------

MAX_HEADER_BYTES = 100 * 1000**2  # safetensors' own bound on the JSON header
# safetensors' dtype names -> bytes per element (the ones torch can hold)
DTYPE_SIZES: dict[str, int] = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def check_inside(path: Path, folder: Optional[Path], what: str, error: type[VP2PError]) -> None:
    """Refuse ``path`` when it (after following symlinks) lies outside ``folder`` (also resolved); None: no check."""
    if folder is None:
        return
    real, root = os.path.realpath(path), os.path.realpath(folder)
    if os.path.commonpath([real, root]) != root:
        raise error(f"{Path(path).name} is a link to {real}, outside the {what} folder {root}; the pack reads only files inside "
                    "it. Copy the file into the folder instead of linking it.")


def read_header(path: Path, what: str, error: type[VP2PError]) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries ``{name: {dtype, shape, data_offsets}}`` and string metadata of a safetensors file, checked
    before anything proportional to the sizes the header declares is allocated: the header length within the file
    and ``MAX_HEADER_BYTES``, JSON of the documented form, known dtypes, shapes of non-negative integers, and data
    offsets that tile the data section exactly (each ``end − begin`` = elements × dtype size, in order, no gaps, no
    overlaps). Raises ``error`` naming the file and what is wrong."""
    name = Path(path).name

    def bad(problem: str) -> VP2PError:
        return error(f"{name} is not a valid {what} file: {problem}. It is damaged or was not written by this pack; delete it "
                     "and make it again.")

    if not Path(path).is_file():
        raise error(f"No {what} file at {path}.")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"it holds {size} bytes, fewer than a safetensors header's 8-byte length (truncated)")
            n = int.from_bytes(head, "little")
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise bad(f"its header declares {n} bytes of JSON, but the file holds {size - 8} after the length"
                          f"{'' if n <= MAX_HEADER_BYTES else f' (and at most {MAX_HEADER_BYTES} are accepted)'} (truncated or damaged)")
            raw = f.read(n)
    except OSError as e:
        raise error(f"{name} could not be read ({e}).") from e
    if len(raw) != n:
        raise bad("it ended while its header was read (truncated)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("its metadata is not a map of strings")
    data = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"the header entry of tensor {key!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise bad(f"tensor {key!r} has the unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {key!r} has the shape {shape!r}, not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data):
            raise bad(f"tensor {key!r} has the data offsets {offsets!r}, outside the file's {data} bytes of tensor data (truncated or damaged)")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]  # Python ints: a declared 1e30 elements cannot overflow
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"tensor {key!r} of shape {shape} and dtype {dtype} needs {nbytes} bytes, but its offsets span "
                      f"{offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise bad(f"tensor {key!r} starts at byte {begin} of the data, {'overlapping the one before' if begin < end else 'after a gap'}")
        end = stop
    if end != data:
        raise bad(f"its tensors cover {end} of the {data} bytes of tensor data (bytes were added or the header is damaged)")
    return header, meta


def load_tensors(path: Path, what: str, error: type[VP2PError], finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file whose header ``read_header`` accepted; ``finite``: refuse a
    floating-point tensor holding NaN or ±inf."""
    _, meta = read_header(path, what, error)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise error(f"{Path(path).name} is not a readable safetensors file ({e}); it may be truncated. Delete it and make it "
                    "again.") from e
    if finite:
        for key, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise error(f"{Path(path).name}: tensor {key!r} holds NaN or infinite values; the file is damaged. Delete it and "
                            "make it again.")
    return tensors, meta


DIGEST_KEY = "tensor_digest"  # metadata key of ``tensor_digest``: files without it (older versions) are not checked


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A BLAKE2b digest of tensors' names, dtypes, shapes and bytes (CPU, contiguous), in name order: written into a
    file's metadata so that flipped bytes in its tensor data are found on load (``check_digest``)."""
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def check_digest(tensors: dict[str, torch.Tensor], meta: dict[str, str], name: str, error: type[VP2PError]) -> None:
    """Refuse tensors that do not match the digest their file recorded (none recorded: nothing to check)."""
    recorded = meta.get(DIGEST_KEY)
    if recorded is not None and recorded != tensor_digest(tensors):
        raise error(f"{name}: its tensor data does not match the checksum it was written with (bytes were flipped or "
                    "overwritten); the file is damaged. Delete it and make it again.")
