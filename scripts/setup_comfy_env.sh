#!/usr/bin/env bash
# Usage: scripts/setup_comfy_env.sh COMFYUI_DIR [VENV_DIR]    (run by scripts/test.sh)
# Makes the ComfyUI host tests' environment VENV_DIR (default .venv-comfy), kept apart from .venv
# (ComfyUI needs torchvision, and the only torchvision builds on this package index are CUDA builds that
# need the matching CUDA torch, not .venv's CPU torch 2.13.0).
#
# Installs torch==2.14.1 + torchvision==0.29.1 first, then ComfyUI's requirements.txt without its
# torch/torchvision/torchaudio lines (torch==2.14.1 passed alongside so nothing upgrades it; torchaudio is
# left out: ComfyUI needs it only for its audio nodes), then what the host tests need (pytest, pytest-xdist, diffusers,
# playwright — the python driver only, never `playwright install`) and open_clip_torch without its
# dependencies (only its CLIP vocabulary file is read). ~6-7 GB, a few minutes from a local package index.
# A stamp file records what was installed: an unchanged environment is reused without calling pip.
set -euo pipefail
COMFY_SRC="$1"
COMFY_VENV="${2:-.venv-comfy}"
COMFY_TORCH="torch==2.14.1"
COMFY_TORCHVISION="torchvision==0.29.1"
COMFY_TEST_REQS="pytest pytest-xdist diffusers playwright opencv-python-headless imageio-ffmpeg"

_comfy_reqs="$(mktemp)"
trap 'rm -f "$_comfy_reqs"' EXIT
# Every requirement line except torch, torchvision and torchaudio (torchsde and the others stay).
grep -v -E '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;[#].*)?$' "$COMFY_SRC/requirements.txt" > "$_comfy_reqs"
_comfy_stamp="$( { echo "setup_comfy_env v1 $COMFY_TORCH $COMFY_TORCHVISION $COMFY_TEST_REQS open_clip_torch";
                   python3 --version; cat "$_comfy_reqs"; } | sha256sum | cut -d' ' -f1)"

if [ -x "$COMFY_VENV/bin/python" ] && [ "$(cat "$COMFY_VENV/.vp2p-stamp" 2>/dev/null)" = "$_comfy_stamp" ]; then
  echo "== ComfyUI test environment: $COMFY_VENV is up to date (reused)"
else
  echo "== ComfyUI test environment: installing into $COMFY_VENV ($COMFY_TORCH, $COMFY_TORCHVISION, ComfyUI's requirements," \
       "$COMFY_TEST_REQS; several GB, a few minutes)"
  [ -x "$COMFY_VENV/bin/python" ] || python3 -m venv "$COMFY_VENV"
  # pip's notes about index folders that do not exist on this machine are dropped; everything else shows.
  _pip() {
    "$COMFY_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --progress-bar off "$@" \
      2> >(grep -v "^WARNING: Location 'file://.*' is ignored" >&2)
  }
  _pip "$COMFY_TORCH" "$COMFY_TORCHVISION"
  _pip -r "$_comfy_reqs" "$COMFY_TORCH"
  # shellcheck disable=SC2086  # a list of package names
  _pip $COMFY_TEST_REQS "$COMFY_TORCH"
  _pip --no-deps open_clip_torch
  echo "$_comfy_stamp" > "$COMFY_VENV/.vp2p-stamp"
fi
