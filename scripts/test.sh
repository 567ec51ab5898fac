#!/usr/bin/env bash
# Runs the test suite on a fresh machine: makes .venv, installs the test requirements,
# runs pytest and says which test groups ran and which were skipped.
# ComfyUI host tests run when COMFYUI_PATH points at a ComfyUI checkout (and this
# script is run with that ComfyUI's Python via PYTHON=...); otherwise they are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  PYTHON=.venv/bin/python
  # torch==2.13.0 exactly: a CPU build; a looser pin would pull a multi-GB CUDA build.
  "$PYTHON" -m pip install --quiet --disable-pip-version-check torch==2.13.0
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
  # Only the CLIP BPE vocabulary file of this wheel is used (read without importing it).
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps open_clip_torch
fi

set +e
"$PYTHON" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests (exit 5): treat as a failure, the suite must never be empty." >&2
  exit 1
fi
exit "$rc"
