#!/usr/bin/env python3
"""Loading a sealed state dict into CPU tensors, against plaintext safetensors and tensorizer.

One run, warm page cache, on a ``--size`` state dict of transformer-like tensors
(fp16: token embeddings, per layer q/k/v/o, MLP up/down, layer norms):

* ``safetensors``      -- ``safetensors.torch.load_file`` of the plaintext with every
  tensor materialised (``clone()``: ``load_file`` alone only maps the file).
* ``sealstore``        -- ``sealstore.loaders.load_file`` of the sealed file
  (AES-256-GCM, 1 MiB chunks, ``--threads``): decrypted and authenticated into
  one buffer that backs the tensors.
* ``tensorizer``       -- ``TensorDeserializer`` of tensorizer's plaintext file, all tensors.
* ``tensorizer_enc``   -- the same, encrypted (``EncryptionParams.random()``).
* ``safe_open_one``    -- ``safe_open`` + ``get_tensor`` of one mid-file tensor
  (sealstore and safetensors), the lazy path.

The full loads run interleaved (one of each per round, ``--repeat`` rounds) so
every loader meets the same memory state; each figure is the median.
Targets (issue 5): sealstore <= 1.25x the safetensors time, and >= 2.5x faster
than tensorizer encrypted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.format_throughput import parse_size


def make_state(size: int) -> dict[str, Any]:
    import torch

    hidden, vocab = 2048, 32000
    per_layer = (4 * hidden * hidden + 2 * hidden * 4 * hidden) * 2  # fp16 bytes
    layers = max(1, (size - vocab * hidden * 2) // per_layer)
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(torch.float16)

    state = {"embed_tokens.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{name}.weight"] = rand(hidden, hidden)
        state[p + "mlp.up_proj.weight"] = rand(4 * hidden, hidden)
        state[p + "mlp.down_proj.weight"] = rand(hidden, 4 * hidden)
        state[p + "input_layernorm.weight"] = rand(hidden)
        state[p + "post_attention_layernorm.weight"] = rand(hidden)
    state["norm.weight"] = rand(hidden)
    return state


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        result = fn()
        out.append(time.perf_counter() - t)
        del result
    return out


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, list[float]]:
    """Round-robin the loaders, *repeat* rounds: each sees the same memory state.

    On these VMs the cost of filling fresh memory swings by 1.5x with what
    ran just before (measured: the same load 398-517 ms), so running one
    loader's samples back to back and then the next one's compares states,
    not loaders.
    """
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            out[name] += timed(fn, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--no-tensorizer", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/load_cpu.json")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file as st_load
    from safetensors.torch import safe_open as st_open
    from safetensors.torch import save_file as st_save

    from sealstore.kms.envelope import seal_file
    from sealstore.kms.local import create_keyring
    from sealstore.loaders import load_file, safe_open

    tmp = Path(tempfile.mkdtemp(prefix="sealstore-load-", dir=args.tmpdir))
    os.environ["SEALSTORE_HOME"] = str(tmp / "home")
    os.environ.setdefault("SEALSTORE_PASSPHRASE", "benchmark")
    from nacl import pwhash

    create_keyring(
        tmp / "home" / "keyring.json",
        opslimit=pwhash.argon2id.OPSLIMIT_MIN,
        memlimit=pwhash.argon2id.MEMLIMIT_MIN,
    )
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    try:
        state = make_state(parse_size(args.size))
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        plain = tmp / "model.safetensors"
        st_save(state, plain)
        sealed = tmp / "model.safetensors.seal"
        seal_file(plain, sealed, ["local:"], threads=args.threads)
        one = sorted(state)[len(state) // 2]

        def materialised() -> dict[str, Any]:
            return {k: v.clone() for k, v in st_load(plain).items()}

        reference = materialised()
        got = load_file(sealed, threads=args.threads)
        assert reference.keys() == got.keys() and all(
            torch.equal(reference[k], got[k]) for k in got
        )
        del got, reference
        loaders: dict[str, Callable[[], Any]] = {
            "safetensors": materialised,
            "sealstore": lambda: load_file(sealed, threads=args.threads),
        }

        def st_one() -> Any:
            with st_open(plain, "pt") as f:
                return f.get_tensor(one).clone()

        def ss_one() -> Any:
            with safe_open(sealed) as f:
                return f.get_tensor(one)

        results["safe_open_one_safetensors_s"] = timed(st_one, args.repeat)
        results["safe_open_one_sealstore_s"] = timed(ss_one, args.repeat)
        results["safe_open_one_tensor_bytes"] = state[one].numel() * state[one].element_size()

        if not args.no_tensorizer:
            from tensorizer import (
                DecryptionParams,
                EncryptionParams,
                TensorDeserializer,
                TensorSerializer,
            )

            tz_plain = tmp / "model.tensors"
            tz_enc = tmp / "model.enc.tensors"
            ser = TensorSerializer(str(tz_plain))
            ser.write_state_dict(state)
            ser.close()
            enc = EncryptionParams.random()
            ser = TensorSerializer(str(tz_enc), encryption=enc)
            ser.write_state_dict(state)
            ser.close()
            dec = DecryptionParams.from_key(enc.key)

            def tz_load(path: Path, **kw: Any) -> dict[str, Any]:
                with TensorDeserializer(str(path), device="cpu", **kw) as d:
                    return dict(d.items())

            loaders["tensorizer"] = lambda: tz_load(tz_plain)
            loaders["tensorizer_enc"] = lambda: tz_load(tz_enc, encryption=dec)
        for name, samples in interleaved(loaders, args.repeat).items():
            results[f"{name}_s"] = samples
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k[:-2]: statistics.median(v) for k, v in results.items() if k.endswith("_s")}
    report: dict[str, Any] = {
        "benchmark": "load_cpu",
        "bytes": nbytes,
        "tensors": len(state),
        "threads": args.threads,
        "repeat": args.repeat,
        "median_s": med,
        "GBps": {k: nbytes / v / 1e9 for k, v in med.items() if not k.startswith("safe_open")},
        "sealstore_time_vs_safetensors": med["sealstore"] / med["safetensors"],
        "targets": "sealstore <= 1.25x safetensors time; >= 2.5x faster than tensorizer encrypted",
        "raw": results,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    if "tensorizer_enc" in med:
        report["tensorizer_enc_vs_sealstore"] = med["tensorizer_enc"] / med["sealstore"]
    print(f"\nstate dict {nbytes / 2**30:.2f} GiB, {len(state)} tensors, median of {args.repeat}")
    for k, v in med.items():
        extra = "" if k.startswith("safe_open") else f"  {nbytes / v / 1e9:6.2f} GB/s"
        print(f"{k:32} {v * 1e3:9.1f} ms{extra}")
    print(
        f"sealstore time / safetensors time: {report['sealstore_time_vs_safetensors']:.2f}"
        " (target <= 1.25)"
    )
    if "tensorizer_enc_vs_sealstore" in report:
        print(
            f"tensorizer encrypted / sealstore:  {report['tensorizer_enc_vs_sealstore']:.2f}"
            " (target >= 2.5)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
