"""``sealstore bench``: what encryption costs on this machine, in one run.

A thin layer over :mod:`sealstore.bench`: options in, the report out as a
table (stdout) or ``--json``. Nothing heavy is imported until it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sealstore.cli.commands import bar, command, emit, json_mode, say

__all__ = ["register"]

_PEERS = ("cryptotensors", "tensorizer", "runai_streamer", "fastsafetensors")
_PEER_ALIASES = {"runai": "runai_streamer", "run:ai": "runai_streamer"}


def _typed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__.removeprefix("parse_")
    return convert


def _size(text: str) -> int:
    from sealstore.bench.timing import parse_size

    return parse_size(text)


def _threads(text: str) -> list[int]:
    from sealstore.bench.timing import parse_threads

    return parse_threads(text)


def _suites(text: str) -> list[str]:
    from sealstore.bench.timing import parse_suites

    return parse_suites(text)


def _peers(text: str) -> list[str]:
    if text.strip().lower() == "all":
        return list(_PEERS)
    out = []
    for part in text.split(","):
        name = _PEER_ALIASES.get(part.strip().lower(), part.strip().lower())
        if not name:
            continue
        if name not in _PEERS:
            raise ValueError(f"unknown peer {part.strip()!r}; choose from {', '.join(_PEERS)}")
        if name not in out:
            out.append(name)
    return out


def _sections(text: str) -> list[str]:
    from sealstore.bench.runner import skipped_sections

    return skipped_sections([s.strip() for s in text.split(",") if s.strip()])


def register(sub: Any) -> None:
    p = command(
        sub,
        "bench",
        _bench,
        help="measure decryption throughput on this machine (table, or --json)",
        description="Measure what encryption costs here, in one run: the raw AEAD per suite and "
        "thread count (the ceiling); streaming and random-access decryption of a sealed file, "
        "and sealing; loading into tensors against plaintext safetensors on the CPU and, with "
        "a CUDA device, GPU-direct against plaintext and the decrypt kernel alone; key release "
        "latency, uncached and cached. With ARTIFACT (a sealed file, an s3:// URL or a store "
        "reference) its storage reads and its decryption are measured apart instead of the "
        "synthetic file and loads. Every figure is a median of --repeat interleaved rounds; "
        "the summary says what limited a figure where it can tell.",
        store=True,
        progress=True,
    )
    p.add_argument(
        "artifact",
        nargs="?",
        metavar="ARTIFACT",
        help="a sealed file, an s3:// URL or a store reference (sealstore+URL#NAME..., or "
        "NAME[:VERSION|@TAG] with --store) to measure instead of synthetic data",
    )
    p.add_argument(
        "--size", type=_typed(_size), default="64MiB", help="synthetic data size (default 64MiB)"
    )
    p.add_argument(
        "--suite",
        type=_typed(_suites),
        default="all",
        help="aes, chacha or all (default), comma-separated",
    )
    p.add_argument(
        "--chunk-size", type=_typed(_size), default="1MiB", help="chunk size (default 1MiB)"
    )
    p.add_argument(
        "--threads",
        type=_typed(_threads),
        default=None,
        metavar="LIST",
        help="thread counts, e.g. 1,2,4,8 (default: 1,2,4,8 up to the CPUs here)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda or cuda:N (default: the CPU, and cuda:0 when torch sees a GPU)",
    )
    p.add_argument("--repeat", type=int, default=3, help="rounds; medians reported (default 3)")
    p.add_argument(
        "-k",
        "--key",
        action="append",
        default=[],
        metavar="URI",
        help="a key to time the release of (repeatable; as encrypt -k). "
        "Default: a throwaway local keyring",
    )
    p.add_argument(
        "-i",
        "--identity",
        action="append",
        default=[],
        metavar="FILE",
        help="identity file for keys whose URI only wraps (x25519, age, hpke), and for ARTIFACT",
    )
    p.add_argument("--key-calls", type=int, default=5, help="timed releases per key (default 5)")
    p.add_argument(
        "--compare",
        nargs="?",
        const="all",
        type=_typed(_peers),
        default=[],
        metavar="PEERS",
        help="also load with the peers installed here, as ratios to the same plaintext "
        f"baseline: {', '.join(_PEERS)} (default with no list: all; the rest are skipped, "
        "with the reason)",
    )
    p.add_argument(
        "--skip",
        type=_typed(_sections),
        default=[],
        metavar="SECTIONS",
        help="leave out sections: aead, file, load, gpu, keys (comma-separated)",
    )
    p.add_argument("--tmpdir", metavar="DIR", help="where the sealed files go (default: temp dir)")
    p.add_argument("-o", "--out", type=Path, metavar="FILE", help="also write the JSON report here")


def _bench(args: argparse.Namespace) -> int:
    from sealstore.bench.runner import BenchOptions, default_threads, run
    from sealstore.bench.table import render

    skip = list(args.skip)
    if args.artifact:
        skip += [s for s in ("file", "load", "gpu") if s not in skip]
    opts = BenchOptions(
        size=args.size,
        suites=args.suite,
        chunk_size=args.chunk_size,
        threads=args.threads or default_threads(),
        device=args.device,
        repeat=args.repeat,
        keys=list(args.key),
        identities=list(args.identity),
        artifact=args.artifact,
        store=args.store,
        tenant=args.tenant,
        compare=list(args.compare),
        key_calls=args.key_calls,
        tmpdir=args.tmpdir,
        skip=skip,
    )
    report = run(opts, bar=lambda label, total: bar(args, label, total), say=lambda t: say(args, t))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    if json_mode(args):
        emit(args, report)
    else:
        print(render(report), file=sys.stdout)
    return 0
