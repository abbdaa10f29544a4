"""``sealstore encrypt | decrypt | inspect | verify``."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from sealstore.cli.commands import bar, command, emit, json_mode, say
from sealstore.cli.main import printable
from sealstore.cli.progress import human_bytes
from sealstore.format import DEFAULT_CHUNK_SIZE, DEFAULT_SUITE, SUITES
from sealstore.inspect import inspect_file
from sealstore.kms.envelope import seal_file, unseal_file, verify_file

__all__ = ["parse_size", "register"]

_UNITS = {"": 1, "K": 1024, "KI": 1024, "M": 1024**2, "MI": 1024**2, "G": 1024**3, "GI": 1024**3}


def parse_size(text: str) -> int:
    """``65536``, ``64K``, ``64KiB``, ``1M``, ``1MiB`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?)?B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1MiB, 64K, 65536)")
    return int(m.group(1)) * _UNITS[(m.group(2) or "").upper()]


def _context(items: list[str]) -> dict[str, str]:
    ctx: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--context takes KEY=VALUE, not {item!r}")
        if key in ctx and ctx[key] != value:
            raise ValueError(f"--context {key} is given twice with different values")
        ctx[key] = value
    return ctx


def _expect_context(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="require this encryption context entry in the file (repeatable): a file sealed "
        "for anything else (a renamed or copied file) is refused before any key is asked for",
    )


_CPUS = os.cpu_count() or 1
# Decrypting scales with threads; sealing is bound by memory bandwidth sooner
# (no gain measured from 2 threads on 2 vCPUs), so it asks for half the CPUs.
DECRYPT_THREADS = min(4, _CPUS)
ENCRYPT_THREADS = max(1, min(4, _CPUS // 2))


def register(sub: Any) -> None:
    enc = command(
        sub,
        "encrypt",
        _encrypt,
        help="seal a file (one key slot per -k)",
        threads=ENCRYPT_THREADS,
        progress=True,
    )
    enc.add_argument(
        "-k",
        "--key",
        dest="keys",
        action="append",
        default=[],
        metavar="URI",
        help="key to wrap the data key with: local:PATH, x25519:RECIPIENT (repeatable)",
    )
    enc.add_argument(
        "--dek-from",
        metavar="URI",
        help="let this key's service make the data key (Vault datakey/wrapped, KMS "
        "GenerateDataKey); it also gets the first slot",
    )
    enc.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="encryption context entry, authenticated and bound to every slot",
    )
    enc.add_argument("--suite", choices=SUITES, default=DEFAULT_SUITE)
    enc.add_argument(
        "--chunk-size",
        type=parse_size,
        default=DEFAULT_CHUNK_SIZE,
        help="plaintext bytes per chunk, a power of two, 64KiB..64MiB (default 1MiB)",
    )
    enc.add_argument("-o", "--output", required=True, help="output file, or - for stdout")
    enc.add_argument("input", help="input file, or - for stdin")

    dec = command(
        sub,
        "decrypt",
        _decrypt,
        help="decrypt a sealed file; no output file unless it all authenticates",
        threads=DECRYPT_THREADS,
        progress=True,
    )
    dec.add_argument(
        "-i",
        "--identity",
        action="append",
        default=[],
        metavar="FILE",
        help="identity or keyring file to unwrap with (repeatable)",
    )
    dec.add_argument(
        "-o",
        "--output",
        default="-",
        help="output file, or - for stdout (the default, as age does; never a terminal)",
    )
    dec.add_argument("input", help="sealed file, or - for stdin")
    _expect_context(dec)

    ins = command(
        sub, "inspect", _inspect, help="show a sealed file's header and slots (no key needed)"
    )
    ins.add_argument("file", help="sealed file, or - for stdin")

    ver = command(
        sub,
        "verify",
        _verify,
        threads=DECRYPT_THREADS,
        progress=True,
        help="authenticate every chunk of a sealed file, or a store version; writes nothing",
        description="With a FILE: authenticate every chunk. With a store reference (or "
        "--store, or no argument): check every signature, object hash, chunk and plaintext "
        "hash of that version (or of every version of the tenant).",
    )
    ver.add_argument("-i", "--identity", action="append", default=[], metavar="FILE")
    ver.add_argument(
        "file", nargs="?", metavar="FILE|NAME[:VERSION]", help="sealed file (- for stdin)"
    )
    ver.add_argument("--store", metavar="URL", help="verify in this store")
    ver.add_argument("--tenant", metavar="T")
    ver.add_argument(
        "--keyless", action="store_true", help="store: signatures and object hashes only, no key"
    )
    _expect_context(ver)


def _size_of(path: str) -> int | None:
    return None if path == "-" or not Path(path).is_file() else Path(path).stat().st_size


def _report(args: argparse.Namespace, verb: str, nbytes: int, start: float, **facts: Any) -> None:
    """The summary: a line on stderr, or with --json the report (on stderr if stdout is data)."""
    took = time.perf_counter() - start
    if json_mode(args):
        out = getattr(args, "output", None)
        facts.update(bytes=nbytes, seconds=round(took, 3))
        emit(args, facts, stdout_is_data=out == "-")
        return
    rate = human_bytes(nbytes / took) + "/s" if took > 0 else ""
    say(args, f"{verb} {human_bytes(nbytes)} in {took:.2f} s ({rate})")


def _check_output(args: argparse.Namespace) -> None:
    if (
        args.output != "-"
        and args.input != "-"
        and Path(args.output).resolve() == Path(args.input).resolve()
    ):
        raise ValueError("output and input are the same file")


def _encrypt(args: argparse.Namespace) -> int:
    if not args.keys and not args.dek_from:
        raise ValueError("give at least one key: -k URI (or --dek-from URI)")
    _check_output(args)
    start = time.perf_counter()
    with bar(args, "encrypt", _size_of(args.input)) as shown:
        header = seal_file(
            args.input,
            args.output,
            args.keys,
            context=_context(args.context),
            suite=args.suite,
            chunk_size=args.chunk_size,
            threads=args.threads,
            progress=shown,
            dek_from=args.dek_from,
        )
    slots = list(dict.fromkeys(([args.dek_from] if args.dek_from else []) + args.keys))
    _report(
        args,
        f"sealed ({header.suite}, {len(slots)} slot(s))",
        shown.done,
        start,
        output=args.output,
        suite=header.suite,
        chunk_size=header.chunk_size,
        slots=slots,
    )
    return 0


def _decrypt(args: argparse.Namespace) -> int:
    if args.output == "-" and sys.stdout.isatty():
        # As age: decrypted bytes are not for a terminal (and a model's are not text).
        raise ValueError("refusing to write decrypted bytes to a terminal: -o FILE, or redirect")
    _check_output(args)
    start = time.perf_counter()
    total = _size_of(args.input)
    with bar(args, "decrypt", total) as shown:
        n = unseal_file(
            args.input,
            args.output,
            args.identity,
            threads=args.threads,
            progress=shown,
            expect_context=_context(args.context),
        )
    _report(args, "decrypted", n, start, output=args.output, authenticated=True)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    info = inspect_file(sys.stdin.buffer if args.file == "-" else args.file)
    if json_mode(args):
        emit(args, info)
        return 1 if "layout_error" in info else 0
    rows = [
        ("format", f"sealstore v{info['version']}"),
        ("suite", info["suite"]),
        ("chunk size", human_bytes(info["chunk_size"])),
        ("chunks", info.get("chunk_count", "?")),
        ("plaintext", f"{info['plaintext_size']} bytes" if "plaintext_size" in info else "?"),
        ("file", f"{info['file_size']} bytes"),
        ("context", ", ".join(f"{k}={v}" for k, v in sorted(info["context"].items())) or "-"),
    ]
    # Everything below comes from the file, unauthenticated: escaped for the terminal.
    for key, value in rows:
        print(f"{key:<11}{printable(value)}")
    if info["slots_detached"]:
        print("slots      detached (held in a store manifest)")
    width = max((len(printable(slot["kind"])) for slot in info["slots"]), default=0)
    for i, slot in enumerate(info["slots"]):
        print(f"slot {i:<6}{printable(slot['kind']):<{width}}  {printable(slot['key_id'])}")
    if "layout_error" in info:
        print(f"warning    {printable(info['layout_error'])}")
        return 1
    return 0


def _is_store_target(args: argparse.Namespace) -> bool:
    if args.store or args.file is None or args.keyless or args.tenant:
        return True
    return (
        args.file != "-"
        and not Path(args.file).is_file()
        and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*([:@][A-Za-z0-9][A-Za-z0-9._-]*)?", args.file)
        is not None
    )


def _verify(args: argparse.Namespace) -> int:
    if _is_store_target(args):
        if args.context:
            # A store version's context is in its signed manifest; not checked here.
            raise ValueError("--context applies to a sealed FILE, not to a store version")
        from sealstore.cli.store import verify_store

        return verify_store(args)
    start = time.perf_counter()
    expect = _context(args.context)
    with bar(args, "verify", _size_of(args.file)) as shown:
        verify_file(
            args.file, args.identity, threads=args.threads, progress=shown, expect_context=expect
        )
    say(args, f"{printable(args.file)}: OK")
    _report(args, "verified", shown.done, start, file=args.file, ok=True)
    return 0
