"""bench/gpu.py, the first GPU session's one command, on its CPU path (``--tiny``): every stage is measured and
reported, and its loud checks fail the run. The same code runs on a GPU without ``--tiny``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu.py"


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu.json"
    # one torch thread: the suite runs test files side by side (and the bench's numbers are not asserted)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text()) if out.is_file() else {}
    return proc, report


def test_tiny_run_reports_every_stage(tmp_path):
    from bench.gpu import STAGES

    proc, report = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(report["stages"]) == set(STAGES)
    for name, row in report["stages"].items():
        for key in ("wall_s", "s_per_step", "unet_rows_per_step", "peak_gb"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
        assert row["steps"] > 0 and row["failures"] == []
        assert row["copies_htod_per_step"] is None  # profiler copy counting is CUDA-only
    stages = report["stages"]
    assert stages["p2p_edit"]["unet_rows_per_step"] == 4 * report["config"]["frames"]  # source and target, uncond and cond, one call
    assert stages["fatezero_edit"]["unet_rows_per_step"] == 2 * report["config"]["frames"]  # the target only
    assert stages["tune"]["extra"]["extrapolated_s_for_300_steps"] > 0
    assert report["failures"] == []
    for name in STAGES:  # the printed table has a row per stage
        assert any(line.startswith(name + " ") and line.rstrip().endswith("ok") for line in proc.stdout.splitlines()), name


def test_a_stage_over_the_memory_limit_fails_loudly(tmp_path):
    proc, report = _run(tmp_path, "--stages", "ddim_invert", "--max-gb", "1e-9")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "ddim_invert: peak memory" in proc.stderr and "--max-gb" in proc.stderr
    assert list(report["stages"]) == ["ddim_invert"] and report["failures"]


def test_live_tensor_bytes_count_the_weights_and_what_each_stage_adds(tmp_path):
    """``--memory tensors``: the CPU allocator's events give each stage's peak of live tensor bytes, weights included
    (what the README's memory table is computed with at the full shape)."""
    from bench.gpu import build_setup, tiny_config

    proc, report = _run(tmp_path, "--memory", "tensors", "--stages", "ddim_invert,null_text")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["peak_kind"] == "cpu_live_tensor_bytes"
    torch.manual_seed(0)
    weights_gb = sum(p.numel() * p.element_size() for p in build_setup(tiny_config(12.0), torch.device("cpu")).unet.parameters()) / 1e9
    ddim, null = report["stages"]["ddim_invert"], report["stages"]["null_text"]
    for row in (ddim, null):
        assert weights_gb <= row["held_before_gb"] <= row["peak_gb"] < 1.0, row  # the weights are held throughout
    # null-text holds the inversion's trajectory and runs a backward pass: more than the inversion at its peak
    assert null["held_before_gb"] > ddim["held_before_gb"] and null["peak_gb"] > ddim["peak_gb"]


def test_the_full_run_uses_sd15s_unet():
    """The GPU run's UNet is SD1.5's: built on the meta device (no memory), its parameter count is SD1.5's."""
    from bench.gpu import SD15_UNET_CONFIG, unet_class

    with torch.device("meta"):
        unet = unet_class()(**SD15_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert unet.config.cross_attention_dim == 768


def test_pack_wheel_makes_an_installable_diffusers_wheel(tmp_path):
    """--pack-wheel zips this environment's diffusers for a GPU machine without it (no network)."""
    import zipfile

    from bench.gpu import pack_wheel

    wheel = pack_wheel(tmp_path)
    assert wheel.name.startswith("diffusers-") and wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        listed = {line.split(",")[0] for line in z.read(record).decode().splitlines() if line}
    assert "diffusers/__init__.py" in names and any(n.endswith(".dist-info/WHEEL") for n in names)
    assert listed == names and not any(n.endswith(".pyc") for n in names)
