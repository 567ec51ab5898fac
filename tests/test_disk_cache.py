"""Load-or-compute behind content-addressed files: hits, misses, damaged files."""

from __future__ import annotations

import logging

import torch

from vp2p.disk_cache import load_or_compute
from vp2p.errors import VP2PError
from vp2p.safetensors_io import read_checked, write_atomic


class BadFile(VP2PError):
    pass


def save(path, t):
    write_atomic(path, {"t": t}, {"format": "test/1"})


def load(path):
    return read_checked(path, "test/1", "test", BadFile)[0]["t"]


def test_hit_miss_and_damaged_file(tmp_path, caplog):
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(1000, dtype=torch.float32)

    path = tmp_path / "x.safetensors"
    first, hit = load_or_compute(path, load, compute, save, "Test")
    assert not hit and len(calls) == 1 and path.is_file()
    again, hit = load_or_compute(path, load, compute, save, "Test")
    assert hit and len(calls) == 1 and torch.equal(again, first)

    path.write_bytes(path.read_bytes()[:50])  # truncated
    with caplog.at_level(logging.WARNING, logger="VideoP2P"):
        repaired, hit = load_or_compute(path, load, compute, save, "Test")
    assert not hit and len(calls) == 2 and "damaged cache file" in caplog.text
    assert torch.equal(load(path), first)  # rewritten whole

    write_atomic(path, {"t": first}, {"format": "other/1"})  # a foreign file under the name
    _, hit = load_or_compute(path, load, compute, save, "Test")
    assert not hit and len(calls) == 3

    _, hit = load_or_compute(None, load, compute, save, "Test")  # no cache
    assert not hit and len(calls) == 4
    assert [p.name for p in tmp_path.iterdir() if p.name != ".locks"] == ["x.safetensors"]  # no temporary files left behind
