"""Shared fixtures: tiny random-weight models initialised as DESIGN §6 asks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.group_summary import GROUPS, SUMMARY_JSON_ENV, count_reports, group_line  # noqa: E402
from tests.helpers import tiny_unet  # noqa: E402


@pytest.fixture(scope="session")
def unet():
    """A tiny diffusers UNet2DConditionModel with SD1.x's block structure (keys input 1,2 · middle 0 · output 3,4,5)."""
    return tiny_unet(seed=0)


@pytest.fixture(scope="session")
def prompt():
    """Tokenise a prompt word by word with the real CLIP BPE (77-token context)."""
    from vp2p.clip_vocab import clip_tokenizer
    from vp2p.prompt_align import hf_encoder, tokenize_prompt

    enc = hf_encoder(clip_tokenizer())
    return lambda text: tokenize_prompt(text, enc, 77)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line per test group: ran (with counts) or skipped (with the reason).

    Under ``scripts/test.sh`` (``VP2P_SUMMARY_JSON`` set) the counts are also written to that file, the
    groups this run did not collect are left out here, and the script prints the final summary of
    both environments (``tests/group_summary.py``).
    """
    counts = count_reports(terminalreporter.stats)
    out = os.environ.get(SUMMARY_JSON_ENV)
    terminalreporter.write_sep("-", "test groups")
    for g in GROUPS:
        c = counts[g]
        if out and not (c["passed"] + c["failed"] + c["skipped"]):
            continue
        terminalreporter.write_line(group_line(g, c))
    peaks = file_peaks(terminalreporter.stats)
    if peaks and not os.environ.get("PYTEST_XDIST_WORKER"):
        terminalreporter.write_sep("-", f"peak resident memory per test file (budget {MEMORY_BUDGET_MB} MB)")
        for e in peaks:
            over = ""
            if max(e["own"], e["children"]) > MEMORY_BUDGET_MB:
                over = " over budget: heavy_memory, runs on one worker after the other heavy files" if e.get("heavy") else " OVER BUDGET"
            child = f", its server/child processes {e['children']} MB" if e["children"] else ""
            terminalreporter.write_line(f"{e['file']}: {e['own']} MB{child}{over}")
    if out and not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller has every worker's reports
        Path(out).write_text(json.dumps({"exitstatus": int(exitstatus), "groups": counts}, indent=1), encoding="utf-8")


# -- peak memory per test file -------------------------------------------------------------------------------------
# Each test file's peak resident memory, reported in the summary (one line per file): the process's own peak since the
# file's first test (Linux: VmHWM, reset by writing 5 to /proc/self/clear_refs) and the peak of the child processes it
# started and waited for (a ComfyUI server), when it raised theirs. CI runs two workers on a 24 GB machine: every file
# should stay under MEMORY_BUDGET_MB.
MEMORY_BUDGET_MB = 6 * 1024
_PEAK_KEY = "peak_rss_mb"


def _vm_hwm_mb() -> "float | None":
    from tests.proc_memory import status_kb

    kb = status_kb("VmHWM")
    return None if kb is None else kb / 1024


def _children_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


_file_start: dict = {}
# Under ``--dist loadgroup`` (scripts/test.sh) each file is one group, as ``--dist loadfile`` would make it, except the
# files marked ``heavy_memory``: they share one group, so one worker runs them one after another and two of them never
# hold their peaks at the same time (CI: 2 workers, 24 GB; the heaviest file beside the heaviest ordinary one fits).
HEAVY_MEMORY_GROUP = "heavy_memory"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook turns the groups into node-id suffixes
def pytest_collection_modifyitems(config, items):
    # Files marked runs_long first (stable otherwise): with --no-loadscope-reorder the groups are handed out in this
    # order, so the longest files do not start last and leave one worker running alone at the end.
    items.sort(key=lambda item: item.get_closest_marker("runs_long") is None)
    for item in items:
        group = HEAVY_MEMORY_GROUP if item.get_closest_marker("heavy_memory") else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_runtest_setup(item):
    path = str(item.path)
    if _file_start.get("path") != path:
        from tests.proc_memory import reset_peak

        reset_peak()
        _file_start.update(path=path, children=_children_peak_mb())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the file's fixtures (a server among them) are torn down when the next test is in another file
    if nextitem is not None and nextitem.path == item.path:
        return
    own = _vm_hwm_mb()
    children = _children_peak_mb()
    child = children if children > _file_start.get("children", 0.0) else 0.0
    if own is not None:
        item.user_properties.append((_PEAK_KEY, json.dumps({"file": item.path.name, "own": round(own), "children": round(child),
                                                            "heavy": item.get_closest_marker("heavy_memory") is not None})))


def file_peaks(stats: dict) -> list[dict]:
    """The per-file peaks the reports carry (workers included), largest first."""
    peaks = {}
    for reports in stats.values():
        for rep in reports:
            for name, value in getattr(rep, "user_properties", []) or []:
                if name == _PEAK_KEY:
                    entry = json.loads(value)
                    peaks[entry["file"]] = entry
    return sorted(peaks.values(), key=lambda e: -max(e["own"], e["children"]))
