"""Key release latency: what opening a sealed file pays to get its data key, per key.

For each key (a URI given with ``-k``, as ``sealstore encrypt -k`` takes them, or
a wrapper object), a small file is sealed to that key alone; then the timed
call is ``open_sealed`` of it -- read the slots, release the key (unwrap at
the local keyring, Vault, KMS, the TPM or the attesting broker), check the
key commitment:

* ``uncached`` -- every call asks the key's service (``cache=None``);
* ``cached``   -- through a ``DekCache``, as a process that opens the same
  version again gets it: every timed call is a hit.

The first call of each is untimed (imports, connections, TLS sessions, a
keyring's unlock). ``benchmarks/unwrap_latency.py`` and
``benchmarks/release_latency.py`` measure the providers' own calls apart, on
the test services.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["release_latency"]

CONTEXT = {"tenant": "bench", "artifact": "sealstore-bench", "version": "1"}


def _percentiles(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "p50_ms": statistics.median(ordered) * 1e3,
        "p95_ms": p95 * 1e3,
        "samples_ms": [s * 1e3 for s in samples],
    }


def _time(fn: Callable[[], Any], calls: int, tick: Callable[[int], None] | None) -> list[float]:
    fn()  # untimed warm-up
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if tick is not None:
            tick(1)
    return out


def release_latency(
    key: Any,
    *,
    identities: Sequence[Any] = (),
    calls: int = 5,
    tick: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """p50 / p95 milliseconds of a key's release, uncached and cached.

    Args:
        key: a key URI (``local:PATH``, ``vault-transit://...``, ``aws-kms://...``,
            ``tpm:FILE``, ``broker+https://...``) or a wrapper object.
        identities: identity files or unwrappers, for keys whose URI only wraps
            (``x25519:``, ``age1...``, ``hpke:``).
        calls: timed calls of each.
        tick: called with 1 after each timed call (a progress bar).

    Raises:
        KeyUnavailable, KeyReleaseDenied, BackendError: the key could not be
            released (the first, untimed call says so).
    """
    from sealstore.dekcache import DekCache
    from sealstore.kms.envelope import open_sealed, seal_stream

    sealed = io.BytesIO()
    seal_stream(io.BytesIO(b"sealstore bench"), sealed, [key], context=CONTEXT, chunk_size=65536)
    data = sealed.getvalue()

    def uncached() -> None:
        open_sealed(data, identities, cache=None).close()

    cache = DekCache(ttl=3600, max_uses=10**9)

    def cached() -> None:
        open_sealed(data, identities, cache=cache).close()

    try:
        return {
            "uncached": _percentiles(_time(uncached, calls, tick)),
            "cached": _percentiles(_time(cached, calls, tick)),
            "calls": calls,
        }
    finally:
        cache.clear()
