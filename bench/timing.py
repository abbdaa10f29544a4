"""How every figure of ``sealstore bench`` (and of ``benchmarks/``) is taken.

Sizes and lists parsed from the command line, interleaved rounds with medians
(:func:`run_rounds`), what else ran on the machine meanwhile (:class:`NoiseMeter`),
and a description of the machine (:func:`machine_info`). Nothing here imports
torch or any key provider: ``sealstore bench --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from sealstore.format import SUITES

__all__ = [
    "MiB",
    "NoiseMeter",
    "machine_info",
    "parse_size",
    "parse_suites",
    "parse_threads",
    "run_rounds",
    "summary",
]

MiB = 1024 * 1024
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "m": MiB,
    "mib": MiB,
    "g": 1024 * MiB,
    "gib": 1024 * MiB,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}
SUITE_ALIASES = {
    "aes": "AES-256-GCM",
    "aes-256-gcm": "AES-256-GCM",
    "chacha": "CHACHA20-POLY1305",
    "chacha20": "CHACHA20-POLY1305",
    "chacha20-poly1305": "CHACHA20-POLY1305",
}


def parse_size(text: str) -> int:
    """``64MiB``, ``1GiB``, ``1e9``, ``512K`` -> bytes (K/M/G binary, KB/MB/GB decimal).

    Raises:
        ValueError: not a size, or not positive.
    """
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"bad size {text!r} (e.g. 64MiB, 1GiB, 1e9)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return n


def parse_threads(text: str) -> list[int]:
    """``1,2,4,8`` -> ``[1, 2, 4, 8]`` (sorted, no repeats).

    Raises:
        ValueError: not a list of whole numbers >= 1.
    """
    try:
        out = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"bad thread list {text!r} (e.g. 1,2,4,8)") from None
    if not out or out[0] < 1:
        raise ValueError(f"thread counts must be whole numbers >= 1: {text!r}")
    return out


def parse_suites(text: str) -> list[str]:
    """``aes,chacha`` (or the full names, or ``all``) -> the suites' names.

    Raises:
        ValueError: an unknown suite.
    """
    if text.strip().lower() == "all":
        return list(SUITES)
    out: list[str] = []
    for part in text.split(","):
        key = part.strip()
        if not key:
            continue
        suite = SUITE_ALIASES.get(key.lower(), key.upper())
        if suite not in SUITES:
            raise ValueError(f"unknown suite {key!r}; choose from aes, chacha, all")
        if suite not in out:
            out.append(suite)
    if not out:
        raise ValueError("no suite given")
    return out


def _cpu_ticks() -> tuple[float, float, float] | None:
    """(busy, steal, total) seconds of all CPUs from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return busy / hz, steal / hz, (busy + idle + iowait + steal) / hz


class NoiseMeter:
    """How much of the machine others took while a group ran: host steal, other processes."""

    def __enter__(self) -> NoiseMeter:
        self._t0, self._own0, self.result = _cpu_ticks(), os.times(), {}
        return self

    def __exit__(self, *exc: object) -> None:
        t1, own1 = _cpu_ticks(), os.times()
        if self._t0 is None or t1 is None:
            return
        busy, steal, total = (b - a for a, b in zip(self._t0, t1, strict=True))
        own = (own1.user + own1.system) - (self._own0.user + self._own0.system)
        if total > 0:
            self.result = {
                "steal_pct": round(100 * steal / total, 1),
                "other_processes_pct": round(100 * max(0.0, busy - own) / total, 1),
                "this_process_pct": round(100 * own / total, 1),
            }


def summary(samples: Sequence[float], nbytes: int | None) -> dict[str, Any]:
    """Median seconds (and GB/s of *nbytes*: 1e9 bytes per second), with every sample."""
    med = statistics.median(samples)
    out: dict[str, Any] = {"median_s": med, "samples_s": list(samples)}
    if nbytes:
        out["gbps"] = nbytes / med / 1e9
        out["best_gbps"] = nbytes / min(samples) / 1e9
    return out


Entry = tuple[str, int, Callable[[], Any]]


def run_rounds(
    entries: Sequence[Entry],
    repeat: int,
    nbytes: int,
    *,
    tick: Callable[[int], None] | None = None,
    disable_gc: bool = False,
) -> dict[str, Any]:
    """Time every entry once per round, *repeat* rounds; odd rounds run in reverse order.

    Interleaving puts every variant under the same background load, so the
    ratios between them stay meaningful on a noisy machine even when absolute
    figures drift.

    Args:
        entries: ``(name, threads, fn)``; *fn* does the work once.
        repeat: rounds.
        nbytes: bytes one call processes (for GB/s).
        tick: called with *nbytes* after every timed call (a progress bar).
        disable_gc: no cyclic garbage collection while timing (as timeit): with
            torch imported a full collection costs ~90 ms, a lottery for a load.

    Returns:
        ``{name: {str(threads): summary}}`` and ``"_noise"``: :class:`NoiseMeter`'s figures.
    """
    samples: dict[tuple[str, int], list[float]] = {(name, n): [] for name, n, _ in entries}
    # Everything alive now is set aside from the collector (gc.freeze): the
    # collection before each call then walks only what the calls made, not
    # torch's hundreds of thousands of objects (~0.2 s a collection).
    gc.collect()
    gc.freeze()
    try:
        with NoiseMeter() as noise:
            for r in range(repeat):
                for name, n, fn in entries if r % 2 == 0 else entries[::-1]:
                    gc.collect()
                    if disable_gc:
                        gc.disable()
                    try:
                        t0 = time.perf_counter()
                        result = fn()
                        samples[name, n].append(time.perf_counter() - t0)
                    finally:
                        gc.enable()
                    del result
                    if tick is not None:
                        tick(nbytes)
    finally:
        gc.unfreeze()
    out: dict[str, Any] = {"_noise": noise.result}
    for (name, n), s in samples.items():
        out.setdefault(name, {})[str(n)] = summary(s, nbytes)
    return out


_VERSIONS = (
    "sealstore",
    "cryptography",
    "numpy",
    "numba",
    "numba-cuda",
    "torch",
    "safetensors",
    "s3fs",
    "fsspec",
)


def versions(names: Sequence[str] = _VERSIONS) -> dict[str, str | None]:
    """Installed versions of *names* (None where not installed), without importing them."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


_FLAGS = ("aes", "pclmulqdq", "vaes", "vpclmulqdq", "avx2", "avx512f", "avx512vl", "sha_ni")


def machine_info() -> dict[str, Any]:
    """CPU model and the flags the ciphers use, cores, memory, OpenSSL and library versions."""
    import cryptography

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cryptography": cryptography.__version__,
        "versions": versions(),
    }
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        info["openssl"] = backend.openssl_version_text()
    except Exception as exc:  # informational only
        info["openssl"] = f"unknown ({exc.__class__.__name__})"
    info["cpu_model"] = platform.processor() or None
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
        if model:
            info["cpu_model"] = model.group(1).strip()
        if flags:
            have = set(flags.group(1).split())
            info["cpu_flags"] = [f for f in _FLAGS if f in have]
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["mem_total_gib"] = round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1
        )
    with contextlib.suppress(OSError):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return info
