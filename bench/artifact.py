"""A real artifact instead of synthetic data: storage and decryption measured apart.

The artifact is anything ``sealstore.loaders.load_file`` takes: a sealed file's
path, an ``s3://`` (or other fsspec) URL of one, or a store reference
(``sealstore+URL#NAME[:VERSION|@TAG][/FILE]``, or ``NAME...`` with *store*).
Each timed round opens it afresh (``open_source``: the manifest and signature
checks of a store, the key's release) and then:

* ``open``      -- the open alone (milliseconds);
* ``storage``   -- the sealed bytes of every chunk read from where they live,
  nothing decrypted (``SealedFile.read_raw_chunks``: the same reads a load does,
  ranged GETs on S3);
* ``decrypt``   -- those bytes, already in memory, decrypted and authenticated
  chunk by chunk with the file's payload key (the CPU's share);
* ``end_to_end`` -- ``decrypt_into`` from the source: reads and decryption overlapped,
  as a load does.

Whichever of ``storage`` and ``decrypt`` is slower is what limits the load.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from sealstore.bench.aead import run_split
from sealstore.bench.timing import summary
from sealstore.format import TAG_SIZE

__all__ = ["measure_artifact"]


def _decrypt_in_memory(sf: Any, sealed: memoryview, out: memoryview, threads: int) -> None:
    """Every chunk of *sealed* (the file's chunks, back to back) decrypted into *out*."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    key = sf.device_key()
    try:
        aead = (AESGCM if sf.header.suite == "AES-256-GCM" else ChaCha20Poly1305)(bytes(key))
    finally:
        key[:] = bytes(len(key))
    layout, aad, cs = sf.layout, sf.preamble.aad, sf.layout.chunk_size
    base = layout.offset(0)

    def work(k: int) -> None:
        for i in range(k, layout.count, threads):
            n = layout.plain_len(i)
            off = layout.offset(i) - base
            aead.decrypt_into(
                sf.chunk_nonce(i), sealed[off : off + n + TAG_SIZE], aad, out[i * cs : i * cs + n]
            )

    run_split(work, threads)


def measure_artifact(
    src: str,
    *,
    threads: int,
    repeat: int,
    store: str | None = None,
    tenant: str | None = None,
    identities: Sequence[Any] = (),
    tick: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Open, storage, in-memory decryption and end-to-end figures of one sealed artifact.

    Raises:
        NotFound, KeyUnavailable, AuthenticationError, FormatError, BackendError:
            as opening or reading the artifact raises them.
    """
    from sealstore.loaders.sources import open_source

    def opened() -> Any:
        return open_source(src, store=store, tenant=tenant, identities=identities)

    with opened() as sf:
        size, count = sf.size, sf.layout.count
        sealed_len = sf.layout.offset(count - 1) + sf.layout.plain_len(count - 1) + TAG_SIZE
        sealed_len -= sf.layout.offset(0)
        suite, chunk_size = sf.header.suite, sf.layout.chunk_size
    raw = bytearray(sealed_len)
    out = bytearray(size)
    samples: dict[str, list[float]] = {"open": [], "storage": [], "decrypt": [], "end_to_end": []}
    for _ in range(repeat):
        t0 = time.perf_counter()
        sf = opened()
        samples["open"].append(time.perf_counter() - t0)
        try:
            t0 = time.perf_counter()
            sf.read_raw_chunks(0, count, raw)
            samples["storage"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _decrypt_in_memory(sf, memoryview(raw), memoryview(out), threads)
            samples["decrypt"].append(time.perf_counter() - t0)
        finally:
            sf.close()
        with opened() as sf:
            t0 = time.perf_counter()
            sf.decrypt_into(out, threads=threads)
            samples["end_to_end"].append(time.perf_counter() - t0)
        if tick is not None:
            tick(1)
    res = {
        "open": summary(samples["open"], None),
        "storage": summary(samples["storage"], sealed_len),
        "decrypt": summary(samples["decrypt"], size),
        "end_to_end": summary(samples["end_to_end"], size),
    }
    slower = "storage" if res["storage"]["median_s"] > res["decrypt"]["median_s"] else "decrypt"
    return {
        "source": src,
        "plaintext_bytes": size,
        "sealed_bytes": sealed_len,
        "suite": suite,
        "chunk_size": chunk_size,
        "threads": threads,
        "results": res,
        "limited_by": "storage" if slower == "storage" else "decryption (CPU)",
        "open_ms": statistics.median(samples["open"]) * 1e3,
    }
