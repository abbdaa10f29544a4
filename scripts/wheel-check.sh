#!/usr/bin/env bash
# Build the wheel, install it into a fresh venv (no editable path on sys.path),
# and check every subpackage imports from site-packages and the CLI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$VENV/bin/python" -m build --wheel --outdir "$tmp/dist" . >"$tmp/build.log" 2>&1 || {
  tail -20 "$tmp/build.log"; exit 1; }
python3 -m venv "$tmp/venv" >/dev/null
# With its dependencies, as a user would get it (served from the local wheel cache).
"$tmp/venv/bin/pip" install --quiet "$tmp"/dist/sealstore-*.whl 2>&1 | grep -v "^WARNING: Location" || true
"$tmp/venv/bin/python" -c "import sealstore" 
cd "$tmp"
"$tmp/venv/bin/python" - <<'PY'
import importlib, pathlib
import sealstore
root = pathlib.Path(sealstore.__file__).parent
assert "site-packages" in str(root), root
for name in ["sealstore.native", "sealstore.kms", "sealstore.kms.local", "sealstore.kms.x25519",
             "sealstore.vault", "sealstore.vault.backup", "sealstore.enclave", "sealstore.loaders",
             "sealstore.loaders.inference_guard", "sealstore.bench.runner", "sealstore.cli.main"]:
    mod = importlib.import_module(name)
    assert str(root) in mod.__file__, (name, mod.__file__)
# The fsspec entry points ship with the wheel (sealed-dataset URLs).
import fsspec
for proto in ["sealstore", "sealstore+file", "sealstore+s3"]:
    assert fsspec.get_filesystem_class(proto).__module__ == "sealstore.loaders.fsspec_fs", proto
# NVIDIA's pinned GPU attestation roots are package data.
from sealstore.enclave.attestation import nvgpu, nvgpu_rim
from sealstore.enclave.attestation.certs import spki_sha256
assert spki_sha256(nvgpu.device_root()) == nvgpu.DEVICE_ROOT_SPKI_SHA256
assert spki_sha256(nvgpu_rim.rim_root()) == nvgpu_rim.RIM_ROOT_SPKI_SHA256
# The PEP 561 marker ships: type checkers read the package's hints.
assert (root / "py.typed").is_file(), "py.typed is not in the wheel"
print("wheel ok:", root)
PY
"$tmp/venv/bin/sealstore" --version
# sealstore bench on the fresh install (no torch here: the loads say they are skipped).
"$tmp/venv/bin/sealstore" bench --size 8MiB --repeat 1 --no-progress >"$tmp/bench.txt"
grep -q "loading into CPU tensors: skipped (torch is not installed" "$tmp/bench.txt"
echo "bench ok: $(tail -1 "$tmp/bench.txt")"
