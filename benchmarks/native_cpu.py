#!/usr/bin/env python3
"""The numba CPU kernels against OpenSSL, one thread, 1 MiB chunks.

In one run, interleaved rounds, medians:

* ``chacha20``  -- ``sealstore.native.chacha.chacha20_xor`` vs OpenSSL's raw ChaCha20;
* ``poly1305``  -- ``sealstore.native.chacha.poly1305`` vs ``cryptography``'s Poly1305;
* ``aead``      -- native ChaCha20-Poly1305 ``decrypt_into`` vs OpenSSL's.

Target (issue 6): the numba kernel >= 0.8x OpenSSL's ChaCha20-Poly1305 per
thread. The first call compiles (or loads numba's cache); it is not timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.format_throughput import write_report


def rate(fn: Callable[[], Any], nbytes: int, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return nbytes * reps / (time.perf_counter() - t) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunk", type=int, default=1 << 20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/native_cpu.json")
    args = ap.parse_args()

    import numba
    import numpy as np
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305 as OpenSSLAead
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    from sealstore.native import chacha
    from sealstore.native.aead import ChaCha20Poly1305

    n = args.chunk
    key, nonce, otk = os.urandom(32), os.urandom(12), os.urandom(32)
    data = np.frombuffer(os.urandom(n), dtype=np.uint8)
    out = np.empty(n, dtype=np.uint8)
    tag = np.empty(16, dtype=np.uint8)
    kw = np.frombuffer(key, "<u4").astype(np.uint32)
    nw = np.frombuffer(nonce, "<u4").astype(np.uint32)
    otk8 = np.frombuffer(otk, dtype=np.uint8)
    native, openssl = ChaCha20Poly1305(key), OpenSSLAead(key)
    sealed = openssl.encrypt(nonce, data.tobytes(), b"aad")
    stream = Cipher(algorithms.ChaCha20(key, b"\1\0\0\0" + nonce), None).encryptor()
    cases: dict[str, Callable[[], Any]] = {
        "chacha20_native": lambda: chacha.chacha20_xor(kw, nw, 1, data, out),
        "chacha20_openssl": lambda: stream.update_into(data, out),
        "poly1305_native": lambda: chacha.poly1305(otk8, data, tag),
        "poly1305_openssl": lambda: Poly1305.generate_tag(otk, data),
        "aead_native": lambda: native.decrypt_into(nonce, sealed, b"aad", out),
        "aead_openssl": lambda: openssl.decrypt_into(nonce, sealed, b"aad", out),
    }
    for fn in cases.values():
        fn()  # compile / load the cache, warm the buffers
    out.fill(0)
    native.decrypt_into(nonce, sealed, b"aad", out)
    assert out.tobytes() == data.tobytes()
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            samples[name].append(rate(fn, n, args.reps))
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratios = {p: med[f"{p}_native"] / med[f"{p}_openssl"] for p in ("chacha20", "poly1305", "aead")}
    report = {
        "benchmark": "native_cpu",
        "chunk": n,
        "threads": 1,
        "rounds": args.rounds,
        "median_GBps": med,
        "native_vs_openssl": ratios,
        "target": "aead native >= 0.8x OpenSSL per thread",
        "raw_GBps": samples,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numba": numba.__version__,
        },
    }
    for k, v in med.items():
        print(f"{k:18} {v:6.2f} GB/s")
    for k, v in ratios.items():
        print(f"{k:9} native / OpenSSL: {v:.2f}")
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
