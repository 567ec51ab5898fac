"""The disk cache under concurrency and faults, with real processes (issue 26, items 1–3).

Two processes share one cache folder; a process is SIGKILLed in the middle of a write; the disk is
full (a file-size limit, RLIMIT_FSIZE, which any user may set, and a 1 MB tmpfs where this machine
lets the test mount one). What must hold: an entry is computed at most once at a time, nobody reads
a torn file, eviction and clearing never delete an entry another process uses (it is removed once
released), a killed write is detected and recomputed, a full disk gives a clear error and leaves
nothing behind.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cache_procs import load, record_store, save, spec
from vp2p import cache_budget as cb
from vp2p.attention_store import abandon_recording, claim_folder
from vp2p.cache_lock import doomed_marker
from vp2p.errors import VP2PError
from vp2p.disk_cache import load_or_compute

ROOT = Path(__file__).resolve().parents[1]


def _spawn(action: str, *args: object) -> subprocess.Popen:
    """Another process of the shared cache (``tests/cache_procs.py``)."""
    return subprocess.Popen([sys.executable, "-m", "tests.cache_procs", action, *map(str, args)], cwd=ROOT)


def _join(p: subprocess.Popen, timeout: float = 120.0) -> int:
    return p.wait(timeout)


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    t0 = time.time()
    while not path.exists():
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_two_processes_asking_for_one_entry_compute_it_once(tmp_path):
    entry, log_file = tmp_path / "cache" / "inversion_same.safetensors", tmp_path / "computed.txt"
    procs = [_spawn("compute", entry, log_file, 7.0, 1.5, tmp_path / f"out{i}.safetensors") for i in range(2)]
    for p in procs:
        assert _join(p) == 0
    outs = [load_file(tmp_path / f"out{i}.safetensors") for i in range(2)]
    outs = [{"result": o["result"], "hit": bool(o["hit"])} for o in outs]
    assert len(log_file.read_text().split()) == 1  # computed once: the other process waited, then read the file
    assert sorted(o["hit"] for o in outs) == [False, True]
    assert torch.equal(outs[0]["result"], outs[1]["result"]) and torch.equal(load(entry), outs[0]["result"])
    assert sorted(p.name for p in entry.parent.iterdir()) == [".locks", entry.name]  # no partial file left


def test_two_processes_with_different_entries_do_not_wait_for_each_other(tmp_path):
    log_file = tmp_path / "computed.txt"
    t0 = time.perf_counter()
    procs = [_spawn("compute", tmp_path / f"inversion_{i}.safetensors", log_file, float(i), 4.0, tmp_path / f"out{i}.safetensors")
             for i in range(2)]
    for p in procs:
        assert _join(p) == 0
    assert len(log_file.read_text().split()) == 2
    # Both computed at the same time: under two sequential computations (plus two process start-ups).
    assert time.perf_counter() - t0 < 2 * 4.0 + 6.0
    for i in range(2):
        assert torch.equal(load(tmp_path / f"inversion_{i}.safetensors"), torch.full((256, 256), float(i)))


def test_clearing_keeps_a_store_another_process_reads_and_removes_it_once_released(tmp_path):
    cache = tmp_path / "cache"
    folder = cache / "attention_shared"
    store = record_store(folder, 3, finish=True)
    del store  # this process's pin goes with its store
    other = cache / "tune_unused.safetensors"
    save(other, torch.ones(3))
    reader = _spawn("pin", folder, tmp_path / "ready", 3.0)
    _wait_for(tmp_path / "ready")
    freed = cb.clear(cache)
    assert freed.entries == ["tune_unused.safetensors"] and freed.skipped == ["attention_shared"]
    assert freed.reasons["attention_shared"].startswith(cb.IN_USE) and "removed when" in freed.reasons["attention_shared"]
    assert folder.is_dir() and doomed_marker(folder).exists()
    evicted = cb.evict(cache, 0)
    assert evicted.entries == [] and evicted.reasons == {"attention_shared": cb.IN_USE}
    assert _join(reader) == 0  # the reader finished with every step readable
    # Its pin went with its store (at exit), and the last user removes an entry cleared while in use.
    assert not folder.exists() and not doomed_marker(folder).exists()


def test_the_last_user_in_a_process_removes_a_store_cleared_while_in_use(tmp_path):
    folder = tmp_path / "attention_a"
    store = record_store(folder, 3, finish=True)
    freed = cb.clear(tmp_path)
    assert freed.skipped == ["attention_a"] and folder.is_dir()
    assert float(store.get(1, "attn1.input_4_0.q")[0, 0]) == 1.0
    del store  # the pin is released: the entry marked by the clear goes now
    assert not folder.exists() and not doomed_marker(folder).exists()


def test_a_write_killed_midway_is_detected_and_computed_again(tmp_path, caplog):
    cache = tmp_path / "cache"
    cache.mkdir()
    entry = cache / "tune_abc.safetensors"
    p = _spawn("write_and_hang", entry, tmp_path / "ready")
    _wait_for(tmp_path / "ready")
    freed = cb.evict(cache, 0)  # while it writes, its partial file is kept
    assert freed.entries == [] and list(freed.reasons.values()) == [cb.BEING_WRITTEN]
    p.send_signal(signal.SIGKILL)
    _join(p)
    assert (cache / ".tmp_tune_abc.safetensors.partial").exists() and not entry.exists()
    with caplog.at_level(logging.WARNING, logger="VideoP2P"):
        result, hit = load_or_compute(entry, load, lambda: torch.arange(5.0), save, "Tune on Video")
    assert not hit and torch.equal(load(entry), torch.arange(5.0))
    assert "partial file of tune_abc.safetensors left by a write that was interrupted" in caplog.text
    assert sorted(p.name for p in cache.iterdir() if p.name != ".locks") == [entry.name]


def test_a_store_recording_killed_midway_is_removed_and_recorded_again(tmp_path, caplog):
    folder = tmp_path / "cache" / "attention_k"
    p = _spawn("record_and_hang", folder, tmp_path / "ready")
    _wait_for(tmp_path / "ready")
    assert cb.evict(folder.parent, 0).reasons == {"attention_k": cb.IN_USE}  # recording: kept
    p.send_signal(signal.SIGKILL)
    _join(p)
    assert folder.is_dir() and not (folder / "spec.json").exists()
    with caplog.at_level(logging.WARNING, logger="VideoP2P"):
        store = record_store(folder, 3, finish=True)
    assert "whose recording did not finish" in caplog.text
    assert (folder / "spec.json").is_file() and float(store.get(2, "attn1.input_4_0.q")[0, 0]) == 2.0
    assert sorted(q.name for q in folder.iterdir()) == ["spec.json", "step_0000.safetensors", "step_0001.safetensors",
                                                       "step_0002.safetensors"]


_FULL_DISK_CHILD = r"""
import json, resource, signal, sys
from pathlib import Path
import torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from vp2p.safetensors_io import DiskFullError, write_atomic
from tests.cache_procs import spec as make_spec
from vp2p.attention_store import abandon_recording, claim_folder, finish_recording
folder = Path(sys.argv[1])
out = {}
try:
    write_atomic(folder / "inversion_big.safetensors", {"t": torch.zeros(500_000)}, {"format": "x"})
except DiskFullError as e:
    out["file"] = str(e)
_, rec = claim_folder(folder / "attention_big", make_spec(2), in_memory=False)
try:
    for s in range(2):
        rec.put(s, "attn1.input_4_0.q", torch.zeros(300_000))
    finish_recording(rec)
except DiskFullError as e:  # as the inversion does: a failed recording is abandoned
    abandon_recording(rec)
    out["store"] = str(e)
print(json.dumps(out))
"""


def _full_disk_checks(folder: Path, messages: dict) -> None:
    assert set(messages) == {"file", "store"}, messages
    for text in messages.values():
        assert str(folder) in text and "needs" in text and "VP2P_CACHE_LIMIT_GB" in text and "Nothing half-written" in text
    assert "2.0 MB" in messages["file"]  # the bytes the file needed (500 000 float32)
    assert sorted(p.name for p in folder.iterdir() if p.name != ".locks") == []  # nothing started is left


def test_a_full_disk_gives_a_clear_error_and_leaves_nothing(tmp_path):
    """File-size limit (RLIMIT_FSIZE, errno EFBIG): works without privileges."""
    folder = tmp_path / "cache"
    folder.mkdir()
    run = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(folder)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    _full_disk_checks(folder, json.loads(run.stdout.strip().splitlines()[-1]))


def test_a_full_tmpfs_gives_the_same_error(tmp_path):
    """A real full filesystem (ENOSPC): a 1 MB tmpfs, where this machine lets the test mount one."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE test covers the same path")
    try:
        child = _FULL_DISK_CHILD.replace("resource.setrlimit", "(lambda *a: None)")
        run = subprocess.run([sys.executable, "-c", child, str(folder)], capture_output=True, text=True, timeout=120,
                             cwd=Path(__file__).resolve().parents[1])
        assert run.returncode == 0, run.stderr[-2000:]
        messages = json.loads(run.stdout.strip().splitlines()[-1])
        assert all("No space left" in m for m in messages.values()), messages
        _full_disk_checks(folder, messages)
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_an_abandoned_recording_leaves_no_folder(tmp_path):
    folder = tmp_path / "attention_x"
    recording = record_store(folder, 1, finish=False)
    assert folder.is_dir()
    abandon_recording(recording)  # an interrupted inversion
    assert not folder.exists()
    assert claim_folder(folder, spec(), in_memory=False)[1] is not None  # the lock was let go


def test_a_process_that_still_reads_a_store_can_claim_it_again_without_waiting_for_itself(tmp_path):
    """Found by the host suite: a second inversion with the same store in one process (the first one's store
    still alive and pinned) used to wait for ever on its own pin."""
    folder = tmp_path / "attention_s"
    first = record_store(folder, 3, finish=True)
    t0 = time.perf_counter()
    again, recording = claim_folder(folder, spec(), in_memory=False)
    assert recording is None and again is not None and time.perf_counter() - t0 < 5.0
    assert float(again.get(2, "attn1.input_4_0.q")[0, 0]) == 2.0 and float(first.get(1, "attn1.input_4_0.q")[0, 0]) == 1.0
    (folder / "spec.json").write_text("{")  # damaged while this process still reads it: a clear error, no wait
    with pytest.raises(VP2PError, match="an earlier run of this process still reads it"):
        claim_folder(folder, spec(), in_memory=False)
    del first, again
    assert claim_folder(folder, spec(), in_memory=False)[1] is not None  # once released, it is recorded again
