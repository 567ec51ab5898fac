"""Child processes of tests/test_cache_reliability.py: ``python -m tests.cache_procs <action> <args…>`` from the
repository root. Each action does one thing another process of a shared cache would do."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from vp2p.attention_store import AttentionStore, StoreSpec, claim_folder, finish_recording
from vp2p.cache_lock import acquire
from vp2p.disk_cache import load_or_compute
from vp2p.errors import VP2PError
from vp2p.frame_attention import FrameMode
from vp2p.safetensors_io import read_checked, write_atomic

FMT = "test-entry/1"


class Bad(VP2PError):
    pass


def load(p: Path) -> torch.Tensor:
    return read_checked(p, FMT, "test", Bad)[0]["t"]


def save(p: Path, t: torch.Tensor) -> None:
    write_atomic(p, {"t": t}, {"format": FMT})


def spec(steps: int = 3) -> StoreSpec:
    return StoreSpec(steps=steps, stored_steps=steps, max_tokens=64, frames=2, frame_mode=FrameMode.FIRST_FRAME.value, cond_digest="d")


def record_store(folder: Path, steps_written: int, finish: bool) -> AttentionStore:
    """Record a 3-step store into ``folder`` (through the cache's claim), ``steps_written`` steps of it on disk."""
    store, recording = claim_folder(folder, spec(), in_memory=False)
    assert store is None and recording is not None
    for s in range(steps_written):
        recording.put(s, "attn1.input_4_0.q", torch.full((2, 4), float(s)))
    if steps_written:
        recording._flush(recording._recording)
    return finish_recording(recording) if finish else recording


def compute(path: str, log_file: str, value: str, seconds: str, out: str) -> None:
    """load_or_compute of ``path`` whose computation is logged (one line per computation) and slow."""
    def slow() -> torch.Tensor:
        with open(log_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(float(seconds))
        return torch.full((256, 256), float(value))

    result, hit = load_or_compute(Path(path), load, slow, save, "Test")
    save_file({"result": result.contiguous(), "hit": torch.tensor(int(hit))}, out)  # safetensors: never pickle


def pin(folder: str, ready: str, seconds: str) -> None:
    """Open a finished store kept on disk (pinned while it lives), read it for a while like an edit."""
    store, recording = claim_folder(Path(folder), spec(), in_memory=False)
    assert store is not None and recording is None
    Path(ready).write_text("pinned")
    time.sleep(float(seconds))
    for s in range(3):
        assert float(store.get(s, "attn1.input_4_0.q")[0, 0]) == float(s)


def write_and_hang(path: str, ready: str) -> None:
    """Begin writing ``path`` as the atomic writer does (its lock, a partial temporary file), then wait to be killed."""
    with acquire(Path(path)):
        tmp = Path(path).parent / f".tmp_{Path(path).name}.partial"
        with open(tmp, "wb") as f:
            f.write(b"\x00" * 100_000)
            f.flush()
            Path(ready).write_text("writing")
            time.sleep(120)


def record_and_hang(folder: str, ready: str) -> None:
    """Record a store with one step on disk and the next pending, then wait to be killed."""
    recording = record_store(Path(folder), 1, finish=False)
    recording.put(1, "attn1.input_4_0.q", torch.ones(2, 4))
    Path(ready).write_text("recording")
    time.sleep(120)


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
