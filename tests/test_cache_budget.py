"""The cache's size budget: least-recently-used eviction, clearing, busy entries, the limit's parsing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from vp2p import cache_budget as cb
from vp2p.cache_lock import acquire
from vp2p.disk_cache import load_or_compute
from vp2p.errors import VP2PError
from vp2p.safetensors_io import read_checked, write_atomic

HOUR = 3600.0


def put(path, nbytes, age_s, now):
    """A cache file of ``nbytes`` last used ``age_s`` seconds before ``now``."""
    path.write_bytes(b"x" * nbytes)
    os.utime(path, (now - age_s, now - age_s))
    return path


def store_folder(path, nbytes, age_s, now, finished=True):
    path.mkdir()
    put(path / "step_0000.safetensors", nbytes, age_s, now)
    if finished:
        put(path / cb.FINISHED_MARKER, 0, age_s, now)
    os.utime(path, (now - age_s, now - age_s))
    return path


def test_eviction_removes_the_oldest_entries_until_under_the_limit(tmp_path):
    now = time.time()
    oldest = put(tmp_path / "tune_a.safetensors", 400, 5 * HOUR, now)
    store = store_folder(tmp_path / "attention_b", 300, 4 * HOUR, now)
    middle = put(tmp_path / "inversion_c.safetensors", 200, 3 * HOUR, now)
    newest = put(tmp_path / "inversion_d.safetensors", 100, 2 * HOUR, now)
    assert [e.path for e in cb.entries(tmp_path, now)] == [oldest, store, middle, newest]
    assert cb.usage(tmp_path) == (1000, 4, 5)

    freed = cb.evict(tmp_path, 350, now=now)  # 1000 → 600 (without the oldest) → 300 (without the store)
    assert freed.entries == ["tune_a.safetensors", "attention_b"]
    assert (freed.files, freed.nbytes, freed.remaining_bytes) == (3, 700, 300)
    assert not oldest.exists() and not store.exists() and middle.is_file() and newest.is_file()
    assert freed.text() == "3 files, 700 B"

    assert cb.evict(tmp_path, 300, now=now).entries == []  # already within the limit: nothing removed


def test_a_hit_makes_an_entry_the_last_to_go(tmp_path):
    now = time.time()
    old = put(tmp_path / "a.safetensors", 100, 3 * HOUR, now)
    put(tmp_path / "b.safetensors", 100, 2 * HOUR, now)
    cb.touch(old)  # read just now
    assert cb.evict(tmp_path, 100).entries == ["b.safetensors"]
    assert old.is_file()
    cb.touch(tmp_path / "missing")  # never raises
    cb.touch(None)


def test_the_entry_just_written_and_entries_in_use_are_kept(tmp_path):
    now = time.time()
    just_written = put(tmp_path / "big.safetensors", 1000, 10 * HOUR, now)  # alone above the limit
    # A writer holds its entry's lock while its partial file grows (here: this test, through another descriptor).
    writer = acquire(tmp_path / "new.safetensors")
    writing = put(tmp_path / ".tmp_new.safetensors.k3j", 50, 2 * HOUR, now)
    recorder = acquire(tmp_path / "attention_rec")  # a store being recorded
    recording = store_folder(tmp_path / "attention_rec", 50, 3 * HOUR, now, finished=False)
    leftover = put(tmp_path / ".tmp_gone.safetensors.x1", 50, 60, now)  # its writer was killed: nobody holds gone.safetensors
    stale = store_folder(tmp_path / "attention_stale", 50, 60, now, finished=False)  # a killed recording's, a minute old
    freed = cb.evict(tmp_path, 0, keep=[just_written], now=now)
    assert sorted(freed.entries) == [".tmp_gone.safetensors.x1", "attention_stale"]
    assert just_written.is_file() and writing.is_file() and recording.is_dir()
    assert not leftover.exists() and not stale.exists()
    assert freed.remaining_bytes == 1100 and "big.safetensors" in freed.skipped
    assert freed.reasons == {"big.safetensors": "just written or read by this run", ".tmp_new.safetensors.k3j": cb.BEING_WRITTEN,
                             "attention_rec": cb.IN_USE}
    writer.release(), recorder.release()
    assert sorted(cb.evict(tmp_path, 0, now=now).entries) == [".tmp_new.safetensors.k3j", "attention_rec", "big.safetensors"]


def test_clear_reports_what_it_freed_and_keeps_what_is_being_written(tmp_path):
    now = time.time()
    put(tmp_path / "tune_a.safetensors", 400, HOUR, now)
    store_folder(tmp_path / "attention_b", 300, 0, now)  # finished just now: cleared all the same
    writer = acquire(tmp_path / "x.safetensors")
    writing = put(tmp_path / ".tmp_x.safetensors.abc", 7, 10, now)
    freed = cb.clear(tmp_path, now=now)
    assert (freed.files, freed.nbytes) == (3, 700) and freed.skipped == [".tmp_x.safetensors.abc"]
    assert [p.name for p in tmp_path.iterdir() if p.name != ".locks"] == [writing.name]
    writer.release()
    assert cb.clear(tmp_path / "nowhere").files == 0  # a cache never written: nothing to clear


def test_load_or_compute_touches_hits_and_runs_after_save_once(tmp_path):
    class Bad(VP2PError):
        pass

    path, written = tmp_path / "x.safetensors", []
    save = lambda p, t: write_atomic(p, {"t": t}, {"format": "test/1"})
    load = lambda p: read_checked(p, "test/1", "test", Bad)[0]["t"]
    compute = lambda: torch.ones(3)
    load_or_compute(path, load, compute, save, "Test", after_save=written.append)
    assert written == [path]
    os.utime(path, (1, 1))
    _, hit = load_or_compute(path, load, compute, save, "Test", after_save=written.append)
    assert hit and written == [path] and time.time() - path.stat().st_mtime < HOUR


def test_limit_parsing_and_sizes():
    assert cb.parse_limit_gb(20, "the limit") == 20 * cb.GB
    assert cb.parse_limit_gb("0.5", "the limit") == cb.GB // 2
    assert cb.parse_limit_gb(0, "the limit") == 0
    for bad in ("lots", -1, float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match="VP2P_CACHE_LIMIT_GB must be"):
            cb.parse_limit_gb(bad, "VP2P_CACHE_LIMIT_GB")
    with pytest.raises(ValueError, match="0 bytes or more"):
        cb.evict(Path("."), -1)
    assert [cb.format_bytes(n) for n in (12, 3500, 2_500_000, 20 * cb.GB)] == ["12 B", "3.5 kB", "2.5 MB", "20.00 GB"]
