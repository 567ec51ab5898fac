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
    if out and not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller has every worker's reports
        Path(out).write_text(json.dumps({"exitstatus": int(exitstatus), "groups": counts}, indent=1), encoding="utf-8")
