# Sourced by scripts/run.sh and scripts/test.sh: make .venv and install what the headless
# runs and the tests need. Sets PY to the venv's python.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
# torch==2.13.0 exactly: a CPU build; a looser pin would pull a multi-GB CUDA build.
"$PY" -m pip install --quiet --disable-pip-version-check torch==2.13.0
"$PY" -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
# Only the CLIP BPE vocabulary file of this wheel is used (read without importing it).
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps open_clip_torch
