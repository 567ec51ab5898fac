"""Test groups: counting one pytest run's results per group, and the one-line-per-group summary.

``scripts/test.sh`` runs the suite in two environments (core + diffusers host in ``.venv``, the ComfyUI
host group in ``.venv-comfy``). Each pytest run prints its own group lines (``tests/conftest.py``) and,
when ``VP2P_SUMMARY_JSON`` names a file, writes its counts there; ``python -m tests.group_summary``
merges those files with what the script knows about groups it did not run, prints the final summary
(one line per group) and decides the exit status:

* a group that failed, errored or (when no pytest arguments narrowed the run) collected nothing fails;
* in CI (``CI`` set to anything but ``false``/``0``) a ComfyUI host group that was skipped fails unless
  ``VP2P_SKIP_COMFY=1`` skipped it on purpose; frontend tests that were skipped fail unless
  ``VP2P_SKIP_FRONTEND=1`` did (``tests/host/test_frontend*.py`` already fail them; this is the net).

Standard library only: it runs under either environment's Python.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

CORE, DIFFUSERS, COMFY = "core", "diffusers host", "ComfyUI host"
GROUPS: dict[str, Callable[[str], bool]] = {
    CORE: lambda p: "/tests/host/" not in p and not p.endswith("test_diffusers_host.py"),
    DIFFUSERS: lambda p: p.endswith("test_diffusers_host.py"),
    COMFY: lambda p: "/tests/host/" in p,
}
# Reported inside the ComfyUI host line: the tests that need a browser (tests/host/test_frontend*.py).
FRONTEND_FILE = "/tests/host/test_frontend"

SKIP_COMFY_ENV = "VP2P_SKIP_COMFY"
SKIP_FRONTEND_ENV = "VP2P_SKIP_FRONTEND"
SUMMARY_JSON_ENV = "VP2P_SUMMARY_JSON"


def in_ci() -> bool:
    """Whether this is a CI run (``CI`` set, as CI services do, and not ``false``/``0``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "false", "0", "no")


def skipped_on_purpose(env_var: str) -> bool:
    return os.environ.get(env_var, "").strip() == "1"


def _empty() -> dict:
    return {"passed": 0, "failed": 0, "skipped": 0, "reasons": [], "frontend": {"passed": 0, "failed": 0, "skipped": 0}}


def count_reports(stats: dict) -> dict[str, dict]:
    """Per-group counts from a terminal reporter's ``stats`` (outcome → reports)."""
    counts = {g: _empty() for g in GROUPS}
    reasons: dict[str, set[str]] = {g: set() for g in GROUPS}
    for outcome in ("passed", "failed", "error", "skipped"):
        for rep in stats.get(outcome, []):
            nodeid = getattr(rep, "nodeid", None)
            if nodeid is None:
                continue
            path = "/" + str(nodeid).split("::")[0].replace("\\", "/")
            key = "failed" if outcome == "error" else outcome
            for g, match in GROUPS.items():
                if not match(path):
                    continue
                counts[g][key] += 1
                if FRONTEND_FILE in path and path.endswith(".py"):
                    counts[g]["frontend"][key] += 1
                if outcome == "skipped" and isinstance(rep.longrepr, tuple):
                    reasons[g].add(str(rep.longrepr[2]).removeprefix("Skipped: "))
    for g in GROUPS:
        counts[g]["reasons"] = sorted(reasons[g])
    return counts


def group_line(group: str, c: Optional[dict], not_run: Optional[str] = None) -> str:
    """``<group> tests ran: …`` / ``<group> tests skipped: <reason>`` / ``<group> tests: <why not run>``."""
    if c is None or sum(c[k] for k in ("passed", "failed", "skipped")) == 0:
        return f"{group} tests: {not_run or 'not collected'}"
    total = c["passed"] + c["failed"] + c["skipped"]
    if c["skipped"] == total:
        return f"{group} tests skipped: {'; '.join(c['reasons']) or 'skipped'}"
    line = f"{group} tests ran: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
    fe = c.get("frontend") or {}
    if sum(fe.values()):
        line += f" (frontend in Chromium: {fe['passed']} passed, {fe['failed']} failed, {fe['skipped']} skipped)"
    if c["skipped"] and c["reasons"]:
        line += f" — skipped because: {'; '.join(c['reasons'])}"
    return line


def ci_problems(group: str, c: Optional[dict], skipped: bool, narrowed: bool = False) -> list[str]:
    """What makes this group a failure in CI (empty outside CI). ``skipped``: the group was wanted but could
    not run (no ComfyUI); ``narrowed``: pytest arguments chose the tests, so none selected is no skip."""
    if not in_ci():
        return []
    problems = []
    total = 0 if c is None else c["passed"] + c["failed"] + c["skipped"]
    if group == COMFY and not skipped_on_purpose(SKIP_COMFY_ENV):
        if skipped or (total and c["skipped"] == total) or (not total and not narrowed):
            problems.append(f"CI: the ComfyUI host tests did not run (set {SKIP_COMFY_ENV}=1 to skip them on purpose)")
    if group == COMFY and c is not None and c["frontend"]["skipped"] and not skipped_on_purpose(SKIP_FRONTEND_ENV):
        problems.append(f"CI: {c['frontend']['skipped']} frontend test(s) skipped (set {SKIP_FRONTEND_ENV}=1 to skip them on purpose)")
    return problems


def _parse_pairs(values: Iterable[str]) -> dict[str, str]:
    out = {}
    for v in values:
        group, _, text = v.partition("=")
        if group not in GROUPS:
            raise SystemExit(f"unknown test group {group!r} (expected one of {sorted(GROUPS)})")
        out[group] = text
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Merge the per-environment pytest summaries into one line per group.")
    ap.add_argument("--run", action="append", default=[], metavar="GROUP[,GROUP]=RC:FILE",
                    help="a pytest run: the groups it was responsible for, its exit status and its VP2P_SUMMARY_JSON file")
    ap.add_argument("--not-run", action="append", default=[], metavar="GROUP=WHY",
                    help="a group the arguments did not select (never a failure)")
    ap.add_argument("--skipped", action="append", default=[], metavar="GROUP=WHY",
                    help="a group that was wanted but could not run, and why (a failure in CI for the ComfyUI host group)")
    ap.add_argument("--on-purpose", action="append", default=[], metavar="GROUP=WHY",
                    help="a group skipped on purpose (never a failure)")
    ap.add_argument("--broken", action="append", default=[], metavar="GROUP=WHY",
                    help="a group that could not run because its setup failed (always a failure)")
    ap.add_argument("--narrowed", action="store_true",
                    help="pytest arguments narrowed the selection: a group with no selected test is no failure")
    args = ap.parse_args(argv)

    counts: dict[str, dict] = {}
    exit_codes: dict[str, int] = {}
    for spec in args.run:
        groups, _, rest = spec.partition("=")
        rc, _, file = rest.partition(":")
        path = Path(file)
        data = json.loads(path.read_text(encoding="utf-8")) if file and path.is_file() else {"groups": {}}
        for g in groups.split(","):
            if g not in GROUPS:
                raise SystemExit(f"unknown test group {g!r} (expected one of {sorted(GROUPS)})")
            exit_codes[g] = int(rc)
            if g in data["groups"]:
                counts[g] = data["groups"][g]
    not_run, skipped, on_purpose, broken = (_parse_pairs(x) for x in (args.not_run, args.skipped, args.on_purpose, args.broken))

    failures: list[str] = []
    lines: list[str] = []
    for g in GROUPS:
        c = counts.get(g)
        total = 0 if c is None else c["passed"] + c["failed"] + c["skipped"]
        if g in broken:
            lines.append(f"{g} tests: FAILED TO SET UP: {broken[g]}")
            failures.append(f"{g}: {broken[g]}")
            continue
        if g in on_purpose:
            lines.append(f"{g} tests skipped on purpose: {on_purpose[g]}")
            continue
        if g in skipped:
            lines.append(f"{g} tests skipped: {skipped[g]}")
            failures += [f"{g}: {p}" for p in ci_problems(g, None, True)]
            continue
        ran = g in exit_codes
        lines.append(group_line(g, c, not_run.get(g) or (None if ran else "not run")))
        if c is not None and c["failed"]:
            failures.append(f"{g}: {c['failed']} failed")
        elif ran and exit_codes[g] not in (0, 5):
            failures.append(f"{g}: pytest exited with status {exit_codes[g]}")
        if ran and total == 0 and exit_codes[g] == 5 and not args.narrowed:
            failures.append(f"{g}: pytest collected no tests (exit 5); the suite must never be empty")
        failures += [f"{g}: {p}" for p in ci_problems(g, c, False, args.narrowed)]
    if not any(c["passed"] + c["failed"] for c in counts.values()):
        failures.append("no test ran at all: the suite must never be empty")

    print("=" * 32 + " test groups (all environments) " + "=" * 32)
    for line in lines:
        print(line)
    if failures:
        print("FAILED: " + "; ".join(failures))
    print("=" * 96)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
