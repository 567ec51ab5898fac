"""Shared fixtures: tiny random-weight models initialised as DESIGN §6 asks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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


GROUPS = {
    "core": lambda p: "/tests/host/" not in p and not p.endswith("test_diffusers_host.py"),
    "diffusers host": lambda p: p.endswith("test_diffusers_host.py"),
    "ComfyUI host": lambda p: "/tests/host/" in p,
}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line per test group: ran (with counts) or skipped (with the reason)."""
    counts = {g: {"passed": 0, "failed": 0, "skipped": 0} for g in GROUPS}
    reasons: dict[str, set[str]] = {g: set() for g in GROUPS}
    for outcome in ("passed", "failed", "error", "skipped"):
        for rep in terminalreporter.stats.get(outcome, []):
            path = "/" + str(getattr(rep, "nodeid", "")).split("::")[0].replace("\\", "/")
            for g, match in GROUPS.items():
                if match(path):
                    key = "failed" if outcome == "error" else outcome
                    counts[g][key] += 1
                    if outcome == "skipped" and isinstance(rep.longrepr, tuple):
                        reasons[g].add(str(rep.longrepr[2]).removeprefix("Skipped: "))
    terminalreporter.write_sep("-", "test groups")
    for g, c in counts.items():
        total = sum(c.values())
        if total == 0:
            terminalreporter.write_line(f"{g} tests: not collected")
        elif c["skipped"] == total:
            terminalreporter.write_line(f"{g} tests skipped: {'; '.join(sorted(reasons[g])) or 'skipped'}")
        else:
            terminalreporter.write_line(f"{g} tests ran: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped")
