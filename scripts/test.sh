#!/usr/bin/env bash
# Runs the test suite on a fresh machine: makes .venv, installs the test requirements,
# runs pytest and says which test groups ran and which were skipped.
# ComfyUI host tests run when COMFYUI_PATH points at a ComfyUI checkout and PYTHON names a
# Python with ComfyUI's requirements (+ pytest, diffusers); otherwise they are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
else
  source scripts/setup_venv.sh
fi

set +e
"$PY" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests (exit 5): treated as a failure, the suite must never be empty." >&2
  exit 1
fi
exit "$rc"
