"""Atomic safetensors files with a format tag: the one writer and reader behind tuned-weights
and inversion files (and the disk caches). Never pickle."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import VP2PError


def write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".safetensors", dir=str(path.parent))
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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
