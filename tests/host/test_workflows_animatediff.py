"""The AnimateDiff example workflows (``example_workflows/animatediff_*.json``), run end to end in a real ComfyUI server
with AnimateDiff-Evolved (ADE) and VideoHelperSuite (VHS) beside the pack.

A server of its own, started for this module only and stopped after it: a motion module needs SD1.5's full UNet
(ADE hard-codes its block widths), so its checkpoint is the full layout (random weights, fp16 on disk, ~2 GB), 860 M
parameters that the other templates' server need not hold. The server keeps the UNet's weights in fp16
(``--fp16-unet``: ComfyUI then casts each layer to fp32 as it computes on a CPU, ``manual_cast``, as on a GPU without
fp16 compute), as the in-process AnimateDiff tests do: measured on the 2-core machine, the server peaked at 9.1 GB with
the UNet in fp32 (3.6 GB of weights, the motion module 1.4 GB) and at 7.2 GB with ``--fp16-unet`` (1.8 GB + 0.7 GB), the
video edit (tuning and null-text, both backpropagating through the UNet and the motion module) being the peak. Besides
the checkpoint: a random motion module in ``mm_sd_v15_v2``'s layout (:mod:`tests.host.animatediff`) in a folder the
server sees as ``animatediff_models``, and the generated input clip for VHS's Load Video. The templates are shrunk for
the CPU as in ``test_workflows.py`` (64×64, 3 frames, 2 steps), whose helpers run them.

The server's peak memory (VmHWM of its process) is measured after the templates ran and reported by the last test.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pytest

from tests.host.animatediff import ADE_DIR, MOTION_MODULE, VHS_DIR, community_available, load_pack_module, write_motion_module
from tests.host.checkpoint import write_random_sd15_checkpoint
from tests.host.server import ComfyClient, comfy_server
from tests.host.test_workflows import ALL_WORKFLOWS, ANIMATEDIFF_PREFIX, ROOT, run_example_workflow

# heavy_memory: the server peaks at ~7 GB (measured 6.9 GB, 2-core machine), above the 6 GB per file; it runs on the
# worker that runs the other heavy files, one after another.
pytestmark = [pytest.mark.skipif(not community_available(), reason="no ../shared/community (AnimateDiff-Evolved, VideoHelperSuite)"),
              pytest.mark.heavy_memory]

log = logging.getLogger(__name__)

WORKFLOWS = [p for p in ALL_WORKFLOWS if p.stem.startswith(ANIMATEDIFF_PREFIX)]
FULL_CKPT_NAME = "vp2p_random_sd15_full.safetensors"
SERVER_ARGS = ("--fp16-unet",)
# SD1.5's full UNet on 2 CPU cores: the video edit (a tuning step and null-text, both with backward passes, then the edit)
# took 325–345 s on a loaded machine.
RUN_TIMEOUT_S = 900.0
# Peak resident memory of the server process running the three templates: 7.2 GB measured (above). The bound leaves
# room for allocator noise and fails on a real regression.
SERVER_PEAK_BUDGET_GB = 9.0


@pytest.fixture(scope="module")
def full_checkpoint(comfy_path, tmp_path_factory) -> Iterator[Path]:
    """A random-weight SD1.5 checkpoint with the full UNet layout, in a folder of its own (the server's checkpoints)."""
    path = write_random_sd15_checkpoint(tmp_path_factory.mktemp("checkpoints_full") / FULL_CKPT_NAME, seed=0, full=True)
    yield path
    path.unlink(missing_ok=True)  # ~2 GB


@pytest.fixture(scope="module")
def motion_module_dir(pack, tmp_path_factory) -> Iterator[Path]:
    """A folder holding the random motion module (written with ADE's own model class, loaded in this process), the
    server's ``animatediff_models`` folder."""
    folder = tmp_path_factory.mktemp("animatediff_models")
    path = write_motion_module(load_pack_module(ADE_DIR), folder)
    yield folder
    path.unlink(missing_ok=True)  # ~580 MB


@pytest.fixture(scope="module")
def animatediff_client(comfy_path, full_checkpoint: Path, motion_module_dir: Path, tmp_path_factory) -> Iterator[ComfyClient]:
    """A running ComfyUI server with the pack, ADE and VHS loaded, the full SD1.5 checkpoint and the motion module."""
    output_dir = tmp_path_factory.mktemp("comfy_output_animatediff")
    with comfy_server(comfy_path, ROOT, full_checkpoint.parent, output_dir, extra_args=SERVER_ARGS, extra_custom_nodes=(ADE_DIR, VHS_DIR),
                      model_folders={"animatediff_models": motion_module_dir}) as client:
        yield client


def peak_rss_bytes(pid: int) -> int:
    """The peak resident set size of a process so far (``VmHWM`` in /proc/<pid>/status)."""
    from tests.proc_memory import status_kb

    kb = status_kb("VmHWM", pid)
    if kb is not None:
        return kb * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def test_animatediff_templates_exist():
    assert {p.stem for p in WORKFLOWS} >= {"animatediff_video_p2p_edit", "animatediff_fatezero_edit", "animatediff_guided_generation"}


def test_server_offers_the_motion_module_and_the_community_nodes(animatediff_client: ComfyClient):
    info = animatediff_client.object_info()
    for node_type in ("ADE_LoadAnimateDiffModel", "ADE_ApplyAnimateDiffModel", "ADE_UseEvolvedSampling", "VHS_LoadVideo",
                      "VHS_VideoCombine", "VHS_VideoInfoLoaded", "VP2P_InflateT2S"):
        assert node_type in info, f"{node_type} not loaded:\n{animatediff_client.log_tail()}"
    assert MOTION_MODULE in info["ADE_LoadAnimateDiffModel"]["input"]["required"]["model_name"][0]
    assert FULL_CKPT_NAME in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]


@pytest.mark.parametrize("workflow_path", [pytest.param(p, id=p.stem) for p in WORKFLOWS])
def test_animatediff_workflow_runs(workflow_path: Path, animatediff_client: ComfyClient):
    written = run_example_workflow(animatediff_client, workflow_path, FULL_CKPT_NAME, timeout=RUN_TIMEOUT_S)
    assert any(p.suffix == ".mp4" for p in written), f"no video written by VHS's Video Combine: {written}"
    server_log = animatediff_client.log()
    assert f"AnimateDiff motion module {MOTION_MODULE}" in server_log, "Inflate to T2S did not see the motion module"
    assert "model weight dtype torch.float16, manual cast: torch.float32" in server_log  # SERVER_ARGS took


def test_server_peak_memory(animatediff_client: ComfyClient, record_property):
    """Reports the server's peak resident memory after the templates ran (CI runs two test workers on 24 GB)."""
    peak = peak_rss_bytes(animatediff_client.process.pid) / 1e9
    record_property("server_peak_rss_gb", round(peak, 2))
    log.warning("AnimateDiff templates: ComfyUI server peak RSS %.2f GB", peak)
    print(f"\nAnimateDiff templates: ComfyUI server peak RSS {peak:.2f} GB")
    assert peak < SERVER_PEAK_BUDGET_GB, f"the server peaked at {peak:.2f} GB running the AnimateDiff templates"
