"""Content fingerprints for caches and compatibility checks.

A fingerprint is a SHA-256 over tensors' names, shapes, dtypes and bytes (full content:
a cache must never hit on different weights) plus any settings. Hashing the weights of an
SD1.5 UNet reads ~1.7 GB once; results are memoised per tensor version, so repeated runs
on the same loaded model do not hash again.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

import torch
from torch.utils.weak import WeakIdKeyDictionary

# A cache of digests, not run state: keyed weakly by tensor identity, checked against the
# tensor's version so an in-place change re-hashes.
_memo = WeakIdKeyDictionary()


def _tensor_digest(t: torch.Tensor) -> bytes:
    """SHA-256 of one tensor's bytes, memoised per (storage, version) for ordinary tensors."""
    stamp = None
    if not t.is_inference():
        stamp = (t.data_ptr(), t._version, tuple(t.shape), t.dtype)
        hit = _memo.get(t)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)  # any dtype, as bytes
    digest = hashlib.sha256(raw.numpy().tobytes()).digest()
    if stamp is not None:
        try:
            _memo[t] = (stamp, digest)
        except TypeError:  # some tensor subclasses cannot be weakly referenced
            pass
    return digest


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor]] = (), settings: Mapping[str, Any] | None = None) -> str:
    """Hex SHA-256 over named tensors (order-independent) and JSON-able settings."""
    h = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(_tensor_digest(t))
    if settings:
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()
