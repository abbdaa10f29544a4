#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what `scripts/gpu-check.sh` needs on a GPU machine that
# has no network but an image with torch's CUDA build, numba-cuda and the CUDA toolkit
# (python 3.12, x86_64): a sealstore wheel built from this tree, and the cp312 manylinux
# x86_64 wheels of sealstore's dependencies that such an image lacks, at the versions
# this project's .venv holds (the versions its tests pass with).
#
# Run it HERE, where pip reaches an index; then carry .whl to the GPU machine (the
# exact call is in docs/NATIVE.md, "gpu-check"). It fails when the folder would be
# over GPU_WHEELS_MAX_MIB (default 48: the carry limit is 64 MiB with the working tree).
#
# GPU_WHEELS_EXTRA: more NAME==VERSION to fetch (not nvidia-nvvm: ~60 MiB, over the
# limit; gpu-check points CUDA_HOME at the image's toolkit instead).
set -euo pipefail

cd "$(dirname "$0")/.." || exit 1
DEST=.whl
MAX_MIB=${GPU_WHEELS_MAX_MIB:-48}
PY=${PYTHON:-.venv/bin/python}
# sealstore's runtime dependencies (pyproject's `dependencies`, cyclonedx's
# json-validation included) that the image lacks; the image already has fsspec,
# safetensors, numba, pyyaml, numpy, attrs, sortedcontainers, typing-extensions.
NEED=(cryptography cffi pycparser pynacl blake3
    cyclonedx-python-lib py-serializable defusedxml license-expression boolean.py
    packageurl-python jsonschema jsonschema-specifications referencing rpds-py)

rm -rf "$DEST"
mkdir -p "$DEST"
PINS=()
for name in "${NEED[@]}"; do
    v=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name") || {
        echo "gpu-wheels: $name is not installed in $PY (run make install first)" >&2
        exit 1
    }
    PINS+=("$name==$v")
done
# shellcheck disable=SC2206  # a space-separated list, split on purpose
PINS+=(${GPU_WHEELS_EXTRA:-})
echo "gpu-wheels: ${PINS[*]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PINS[@]}"
# The project itself: a pure-Python wheel (py3-none-any).
"$PY" -m build --wheel --outdir "$DEST" . >/dev/null
rm -rf build

ls -l "$DEST"
kib=$(du -sk "$DEST" | cut -f1)
echo "gpu-wheels: $(find "$DEST" -type f -name '*.whl' | wc -l) wheels, $((kib / 1024)) MiB ($kib KiB) in $DEST"
if [ "$kib" -gt $((MAX_MIB * 1024)) ]; then
    echo "gpu-wheels: $DEST is over $MAX_MIB MiB: it would not travel with the tree" >&2
    exit 1
fi
