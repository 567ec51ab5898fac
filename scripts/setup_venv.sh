# Sourced by scripts/run.sh and scripts/test.sh: make .venv and install what the headless
# runs and the tests need. Sets PY to the venv's python.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
# pip's notes about package-index folders that do not exist on this machine are dropped; all else shows.
_venv_pip() {
  "$PY" -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location 'file://.*' is ignored" >&2)
}
# torch==2.13.0 exactly: a CPU build; a looser pin would pull a multi-GB CUDA build.
_venv_pip torch==2.13.0
_venv_pip -r requirements-test.txt
# Only the CLIP BPE vocabulary file of this wheel is used (read without importing it).
_venv_pip --no-deps open_clip_torch
