#!/usr/bin/env bash
# The GPU window in one command: bench/gpu_window.sh OUT_DIR [options of the window]
#
# Installs tritonbn offline (editable, no dependencies, no build isolation) unless this tree
# is already what an outside `import tritonbn` finds, then runs `python -m bench.gpu_window`
# with the time left of GPU_WINDOW_BUDGET_S (default 420 s: the whole command, install
# included). OUT_DIR gets summary.json, report.md and raw.tar.gz. Options pass through,
# e.g. --dry-run (CPU, Triton interpreter, tiny shapes). See bench/README.md, "GPU window".
set -u
START=$(date +%s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${1:-}
if [ -z "$OUT_DIR" ] || [ "${OUT_DIR#-}" != "$OUT_DIR" ]; then
    echo "usage: bench/gpu_window.sh OUT_DIR [--dry-run] [--budget-s S]" >&2
    exit 2
fi
shift
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
BUDGET=${GPU_WINDOW_BUDGET_S:-420}

# $PYTHON as given, else the first interpreter that has torch and triton: python3 / python
# on PATH, then the GPU machines' own environment.
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for cand in python3 python /opt/torch/.venv/bin/python3; do
        command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || continue
        if "$cand" -c "import torch, triton" >/dev/null 2>&1; then PY=$cand; break; fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu_window: no python with torch and triton found (set PYTHON)" >&2
    exit 2
fi

# Installed already when `import tritonbn` from outside the tree finds this tree.
# GPU_WINDOW_NO_INSTALL=1: never install (the tests, which must not change the environment).
LOG=$(mktemp "${TMPDIR:-/tmp}/tritonbn-install.XXXXXX.log")
if [ -n "${GPU_WINDOW_NO_INSTALL:-}" ]; then
    echo "install skipped (GPU_WINDOW_NO_INSTALL)" >"$LOG"
elif (cd / && "$PY" -c 'import os, sys, tritonbn
sys.exit(0 if os.path.realpath(tritonbn.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep) else 1)' "$ROOT") >"$LOG" 2>&1; then
    echo "tritonbn already installed from $ROOT" >>"$LOG"
else
    echo "installing tritonbn from $ROOT (offline, editable)" | tee -a "$LOG"
    if ! (cd "$ROOT" && "$PY" -m pip install --no-build-isolation --no-deps -e .) >>"$LOG" 2>&1; then
        # the window runs from the source tree anyway (steps start in it): record and go on
        echo "gpu_window: pip install failed (log bundled); running from the source tree" | tee -a "$LOG" >&2
    fi
fi
LEFT=$(( BUDGET - ($(date +%s) - START) ))
cd "$ROOT" || exit 2
"$PY" -m bench.gpu_window --out "$OUT_DIR" --budget-s "$LEFT" --attach "$LOG" "$@"
RC=$?
rm -f "$LOG"
exit $RC
