#!/usr/bin/env bash
# The pack's main job, headless, on a fresh machine: makes .venv, installs what it needs,
# runs scripts/video_p2p.py (arguments are passed through; see --help).
# With no arguments it uses an embedded default: a generated clip and a small random-weight
# SD1.5-shaped model (no weights are downloaded; the output is noise by design).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh
exec "$PY" scripts/video_p2p.py "$@"
