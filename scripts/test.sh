#!/usr/bin/env bash
# The test suite, on a fresh machine or an old one — the one command (README, CI):
#
#   bash scripts/test.sh [pytest options and test paths]
#
# 1. core + diffusers host tests: makes/updates .venv (CPU torch 2.13.0 + requirements-test.txt), runs
#    pytest there (tests/ without tests/host/).
# 2. ComfyUI host tests (tests/host/), when a ComfyUI is found: COMFYUI_PATH, else ../shared/comfyui, else
#    the ComfyUI whose custom_nodes/ holds this pack. Makes/reuses .venv-comfy (ComfyUI's requirements,
#    scripts/setup_comfy_env.sh), copies the ComfyUI code into a scratch folder (ComfyUI writes into its
#    own folder; the source may be read-only), installs Debian's chromium for the frontend tests if it is
#    missing and apt-get can (root), and runs pytest there.
# 3. One summary line per group (core, diffusers host, ComfyUI host): ran with counts, or skipped and why.
#
# Environment:
#   VP2P_SKIP_COMFY=1     skip the ComfyUI host group (no .venv-comfy, no ComfyUI copy)
#   VP2P_SKIP_FRONTEND=1  skip the frontend tests (headless Chromium) inside the host group
#   COMFY_PYTHON=…        use this Python (with ComfyUI's requirements, pytest, diffusers, playwright)
#                         for the host group instead of making .venv-comfy
#   VP2P_TEST_WORKERS=N   pytest-xdist workers per group (default: the number of cores, at most 4); 1 runs
#                         plain pytest (needed for --pdb); torch gets cores/N threads in each
#   CI=true               a skipped ComfyUI host group or skipped frontend tests fail the run, unless
#                         skipped on purpose with the variables above
# Arguments go to pytest. Test paths choose the groups: paths under tests/host/ go to the ComfyUI run,
# others to the core run; a group with no path is not run. Options (-q, -x, -k expr, …) go to both runs.
# Exit status: 0 only if every group that ran passed and collected tests (pytest's exit 5 — nothing
# collected — is a failure unless pytest arguments narrowed the selection and another group ran tests).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd -P)"
T0=$SECONDS
declare -a TIMES=()
phase_done() { TIMES+=("$1: $(( SECONDS - $2 )) s"); }

# -- arguments: options to both runs, paths routed by group ---------------------------------------------
declare -a OPTS=() CORE_PATHS=() HOST_PATHS=()
NARROWED=0
for a in "$@"; do
  p="${a%%::*}"
  if [[ "$a" != -* ]] && [ -e "$p" ]; then
    NARROWED=1
    rp="$(realpath "$p")"
    case "$rp/" in
      "$ROOT/tests/host/"*) HOST_PATHS+=("$a") ;;
      "$ROOT/" | "$ROOT/tests/") CORE_PATHS+=("$a"); HOST_PATHS+=("$ROOT/tests/host") ;;
      *) CORE_PATHS+=("$a") ;;
    esac
  else
    OPTS+=("$a")
    [[ "$a" == -k* || "$a" == -m* ]] && NARROWED=1
  fi
done
if [ "$NARROWED" = 0 ] || { [ ${#CORE_PATHS[@]} -eq 0 ] && [ ${#HOST_PATHS[@]} -eq 0 ]; }; then
  RUN_CORE=1; RUN_HOST=1; CORE_PATHS=(tests); HOST_PATHS=(tests/host)
else
  RUN_CORE=$(( ${#CORE_PATHS[@]} > 0 )); RUN_HOST=$(( ${#HOST_PATHS[@]} > 0 ))
fi

# -- parallel workers: whole test files spread over pytest-xdist workers, each with its share of the cores ------
# (small random models: torch's own threads help little, and oversubscribed threads cost more than they give;
# every file stays under 6 GB, except those marked heavy_memory, which one worker runs one after another (groups:
# tests/conftest.py); at most 4 workers by default)
CORES="$(nproc 2>/dev/null || echo 1)"
WORKERS="${VP2P_TEST_WORKERS:-$(( CORES < 4 ? CORES : 4 ))}"
[ "$WORKERS" -ge 1 ] 2>/dev/null || WORKERS=1
THREADS=$(( CORES / WORKERS > 0 ? CORES / WORKERS : 1 ))
xdist_args() {  # $1: the python; prints nothing (plain pytest) for one worker or without pytest-xdist
  if [ "$WORKERS" -gt 1 ] && "$1" -c "import xdist" 2>/dev/null; then
    echo "-n $WORKERS --dist loadgroup --no-loadscope-reorder"
  fi
}
run_pytest() {  # $1: the python, the rest: pytest arguments
  local py="$1"; shift
  # shellcheck disable=SC2046  # xdist_args is a list of options
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-$THREADS}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-$THREADS}" \
    "$py" -m pytest $(xdist_args "$py") "$@"
}

RESULTS="$(mktemp -d "${TMPDIR:-/tmp}/vp2p-test-results.XXXXXX")"
SCRATCH=""
cleanup() { rm -rf "$RESULTS"; [ -z "$SCRATCH" ] || rm -rf "$SCRATCH"; }
trap cleanup EXIT
declare -a SUMMARY_ARGS=()
[ "$NARROWED" = 1 ] && SUMMARY_ARGS+=(--narrowed)

# -- 1. core + diffusers host, in .venv ------------------------------------------------------------------
t=$SECONDS
echo "== core environment: .venv"
source scripts/setup_venv.sh
phase_done "core environment (.venv)" "$t"
if [ "$RUN_CORE" = 1 ]; then
  t=$SECONDS
  echo "== core + diffusers host tests (.venv; $WORKERS worker(s) × $THREADS thread(s))"
  set +e
  VP2P_SUMMARY_JSON="$RESULTS/core.json" run_pytest "$PY" --ignore=tests/host "${OPTS[@]}" "${CORE_PATHS[@]}"
  rc=$?
  set -e
  SUMMARY_ARGS+=(--run "core,diffusers host=$rc:$RESULTS/core.json")
  phase_done "core + diffusers host tests" "$t"
else
  SUMMARY_ARGS+=(--not-run "core=not selected by the arguments" --not-run "diffusers host=not selected by the arguments")
fi

# -- 2. ComfyUI host, in .venv-comfy on a scratch copy of ComfyUI -----------------------------------------
find_comfy_src() {
  if [ -n "${COMFYUI_PATH:-}" ]; then
    echo "$COMFYUI_PATH"
  elif [ -f ../shared/comfyui/comfy/model_patcher.py ]; then
    echo "../shared/comfyui"
  elif [ -f ../../comfy/model_patcher.py ] && [ -f ../../nodes.py ]; then
    echo "../.."
  fi
}

ensure_chromium() {
  if [ -n "${CHROMIUM_PATH:-}" ] || [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1 \
      || command -v chromium-browser >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== frontend tests: installing Debian's chromium (apt-get install chromium)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
      || echo "== frontend tests: could not install chromium; they will be skipped (a failure in CI)" >&2
  else
    echo "== frontend tests: no Chromium, and apt-get is not usable here (not root); they will be skipped" \
         "(a failure in CI). Install Debian's chromium or set CHROMIUM_PATH." >&2
  fi
}

# ComfyUI's code without data folders (models, outputs, user data) and other custom nodes: the server
# loads the pack from an extra custom_nodes folder, and a second copy of it must not be there.
copy_comfy() {
  mkdir -p "$2"
  tar -C "$1" -cf - --exclude=./.git --exclude=./models --exclude=./output --exclude=./input --exclude=./temp \
      --exclude=./user --exclude=./custom_nodes --exclude=./.venv --exclude=./venv --exclude='*.safetensors' \
      --exclude='*.ckpt' --exclude='*.pt' --exclude='*.pth' --exclude='__pycache__' . | tar -C "$2" -xf -
  chmod -R u+w "$2"
  mkdir -p "$2/custom_nodes"
}

if [ "$RUN_HOST" = 0 ]; then
  SUMMARY_ARGS+=(--not-run "ComfyUI host=not selected by the arguments")
elif [ "${VP2P_SKIP_COMFY:-}" = 1 ]; then
  echo "== ComfyUI host tests: skipped on purpose (VP2P_SKIP_COMFY=1)"
  SUMMARY_ARGS+=(--on-purpose "ComfyUI host=VP2P_SKIP_COMFY=1")
else
  COMFY_SRC="$(find_comfy_src)"
  if [ -z "$COMFY_SRC" ] || [ ! -f "$COMFY_SRC/comfy/model_patcher.py" ]; then
    why="no ComfyUI found (${COMFYUI_PATH:+COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout; }set COMFYUI_PATH, or have ../shared/comfyui)"
    echo "== ComfyUI host tests: $why"
    SUMMARY_ARGS+=(--skipped "ComfyUI host=$why")
  else
    t=$SECONDS
    setup_ok=1
    if [ -n "${COMFY_PYTHON:-}" ]; then
      COMFY_PY="$COMFY_PYTHON"
      echo "== ComfyUI test environment: COMFY_PYTHON=$COMFY_PY (nothing installed)"
    else
      COMFY_PY=".venv-comfy/bin/python"
      bash scripts/setup_comfy_env.sh "$COMFY_SRC" .venv-comfy || setup_ok=0
    fi
    phase_done "ComfyUI environment (.venv-comfy)" "$t"
    if [ "$setup_ok" = 0 ]; then
      SUMMARY_ARGS+=(--broken "ComfyUI host=installing ComfyUI's requirements into .venv-comfy failed (see above; VP2P_SKIP_COMFY=1 skips the group)")
    else
      t=$SECONDS
      [ "${VP2P_SKIP_FRONTEND:-}" = 1 ] || ensure_chromium
      SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/vp2p-comfyui.XXXXXX")"
      copy_comfy "$COMFY_SRC" "$SCRATCH/ComfyUI"
      phase_done "chromium + ComfyUI scratch copy" "$t"
      t=$SECONDS
      echo "== ComfyUI host tests ($COMFY_PY, $WORKERS worker(s) × $THREADS thread(s); ComfyUI $(sed -n 's/^__version__ = //p' "$SCRATCH/ComfyUI/comfyui_version.py" | tr -d "\"'")" \
           "from $COMFY_SRC, copied to $SCRATCH/ComfyUI)"
      set +e
      COMFYUI_PATH="$SCRATCH/ComfyUI" VP2P_SUMMARY_JSON="$RESULTS/host.json" \
        run_pytest "$COMFY_PY" "${OPTS[@]}" "${HOST_PATHS[@]}"
      rc=$?
      set -e
      SUMMARY_ARGS+=(--run "ComfyUI host=$rc:$RESULTS/host.json")
      phase_done "ComfyUI host tests" "$t"
    fi
  fi
fi

# -- 3. one line per group ---------------------------------------------------------------------------------
phase_done "total" "$T0"
set +e
"$PY" -m tests.group_summary "${SUMMARY_ARGS[@]}"
status=$?
set -e
echo "wall times: $(IFS=';'; echo "${TIMES[*]}" | sed 's/;/; /g')"
exit "$status"
