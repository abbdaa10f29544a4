"""``sealstore audit show | verify | export | key``: the tamper-evident audit log."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from sealstore.cli.commands import CommandFailed, command, emit, group, json_mode, say

__all__ = ["register"]


def _log_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log",
        metavar="URL",
        help="the log's location: a path or URL holding audit/ (default: $SEALSTORE_AUDIT, "
        "else --store, $SEALSTORE_STORE or the default store)",
    )
    p.add_argument("--store", metavar="URL", help="read the log of this store")


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--since",
        metavar="WHEN",
        help="records at or after WHEN: 2026-11-24, 2026-11-24T10:00, or 30m, 6h, 2d ago",
    )
    p.add_argument("--artifact", metavar="NAME", help="only this artifact's records")
    p.add_argument("--tenant", metavar="T", help="only this tenant's records")
    p.add_argument("--action", metavar="ACTION", help="only this action (push, release, ...)")


def register(sub: Any) -> None:
    asub = group(sub, "audit", "the audit log: show, verify, export")
    show = command(asub, "show", _show, help="records, oldest first, one line each")
    _log_options(show)
    _filters(show)
    export = command(
        asub, "export", _export, reports=False, help="records as JSON lines (for a SIEM)"
    )
    _log_options(export)
    _filters(export)
    export.add_argument("-o", "--output", metavar="FILE", help="default (or -): stdout")
    verify = command(
        asub,
        "verify",
        _verify,
        help="check every stream's hash chain and signed checkpoints",
        description="Detects an edited, deleted, reordered or moved record and a removed "
        "segment; with the last checkpoint seen (kept on this machine per log, or "
        "--anchor FILE) also a truncated tail or a deleted stream. Exit 1 on any FAIL.",
    )
    _log_options(verify)
    verify.add_argument(
        "--anchor",
        type=Path,
        metavar="FILE",
        help="checkpoints seen earlier (a file --save-anchor wrote)",
    )
    verify.add_argument(
        "--save-anchor",
        type=Path,
        metavar="FILE",
        help="write the verified heads to FILE (keep it elsewhere)",
    )
    verify.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="KEY",
        help="only checkpoints signed by these keys (repeatable)",
    )
    command(asub, "key", _key, help="this machine's audit key id (it signs its checkpoints)")


def _storage(args: argparse.Namespace) -> Any:
    from sealstore.vault.auditing import AUDIT_ENV
    from sealstore.vault.storage import open_storage
    from sealstore.vault.store import default_store_url

    where = args.log or (None if args.store else os.environ.get(AUDIT_ENV))
    return open_storage(where or args.store or default_store_url())


_AGO = re.compile(r"^(\d+)([smhd])$")


def _since(text: str | None) -> str | None:
    """WHEN as the records' time format (ISO, UTC), for a string comparison."""
    if text is None:
        return None
    from datetime import UTC, datetime

    m = _AGO.match(text)
    if m:
        secs = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        t = datetime.fromtimestamp(time.time() - secs, UTC)
    else:
        try:
            t = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"--since {text!r}: expected a date, a time or 30m/6h/2d") from None
        t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _selected(args: argparse.Namespace, records: Any = None) -> Any:
    """The records (default: the log's) that --since, --artifact, --tenant, --action keep."""
    from sealstore.audit import read_records

    since = _since(args.since)
    for r in read_records(_storage(args)) if records is None else records:
        if since and r["time"] < since:
            continue
        if args.artifact and r.get("artifact") != args.artifact:
            continue
        if args.tenant and r.get("tenant") != args.tenant:
            continue
        if args.action and r.get("action") != args.action:
            continue
        yield r


_UNVERIFIED = "UNVERIFIED "


def _vouched(
    args: argparse.Namespace, records: list[dict[str, Any]]
) -> tuple[list[bool], set[str]]:
    """Which records a verified stream vouches for, and the streams that fail.

    ``show`` reads records without checking them. A record is vouched for when
    the stream it names verifies (chain, checkpoints, this machine's anchors),
    its seq lies within that stream's last verified checkpoint, and no other
    record claims the same stream and seq (a copy planted in another stream's
    folder would otherwise borrow a clean stream's name).
    """
    from collections import Counter

    from sealstore.audit import verify_log

    storage = _storage(args)
    anchors = _read_json(_anchors_file(), "audit anchors file").get(str(storage.url), {})
    reports = verify_log(storage, anchors=anchors)
    bad = {r.stream for r in reports if r.problems}
    last = {r.stream: r.seq for r in reports if not r.problems}
    claims = Counter((r.get("stream"), r.get("seq")) for r in records)
    ok = []
    for r in records:
        stream, seq = r.get("stream"), r.get("seq")
        ok.append(
            isinstance(stream, str)
            and stream in last
            and isinstance(seq, int)
            and 0 <= seq <= last[stream]
            and claims[(stream, seq)] == 1
        )
    return ok, bad


def _show(args: argparse.Namespace) -> int:
    from sealstore.audit import read_records
    from sealstore.cli.main import printable

    records = list(read_records(_storage(args)))
    vouched, bad = _vouched(args, records)
    flags = {id(r): good for r, good in zip(records, vouched, strict=True)}
    if json_mode(args):
        # The records as the log holds them (JSON escapes what a terminal must not
        # see), each with whether a verified stream vouches for it.
        shown = [dict(r, verified=flags[id(r)]) for r in _selected(args, records)]
        emit(args, {"records": shown, "failing_streams": sorted(bad)})
        return 0
    if not all(vouched):
        streams = f" ({printable(', '.join(sorted(bad)))})" if bad else ""
        print(
            f"sealstore: warning: {len(bad)} stream(s) do not verify{streams}; records no "
            f"verified stream vouches for are marked {_UNVERIFIED.strip()} (run sealstore "
            "audit verify)",
            file=sys.stderr,
        )
    for r in _selected(args, records):
        what = "/".join(str(r[k]) for k in ("tenant", "artifact") if r.get(k))
        if r.get("version"):
            what += f":{r['version']}"
        code = f" {r['code']}" if r.get("code") else ""
        reason = f" ({r['reason']})" if r.get("reason") else ""
        line = (
            f"{r['time']} {r.get('action')} {r.get('decision', 'ok')}{code} "
            f"{what or '-'} by {r.get('who', '-')}{reason}"
        )
        # Every field comes from the log's files: escaped before it reaches a terminal.
        print(("" if flags[id(r)] else _UNVERIFIED) + printable(line))
    return 0


def _export(args: argparse.Namespace) -> int:
    from sealstore.audit import export_lines

    lines = export_lines(_selected(args))
    if args.output in (None, "-"):
        for line in lines:
            sys.stdout.buffer.write(line)
        return 0
    from sealstore.fsutil import atomic_file

    # A regular file is replaced atomically; a device, FIFO or /dev/fd/N is
    # written through, never renamed over.
    with atomic_file(args.output, mode=0o644) as fp:
        for line in lines:
            fp.write(line)
    return 0


def _anchors_file() -> Path:
    from sealstore.kms.registry import sealstore_home

    return sealstore_home() / "audit-anchors.json"


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        raise ValueError(f"{what} {path} is not readable JSON") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{what} {path} is not a JSON object")
    return doc


def _verify(args: argparse.Namespace) -> int:
    from sealstore.audit import verify_log
    from sealstore.fsutil import atomic_file

    storage = _storage(args)
    pins = _read_json(_anchors_file(), "audit anchors file")
    anchors = dict(pins.get(str(storage.url), {}))
    if args.anchor is not None:
        if not args.anchor.exists():
            raise FileNotFoundError(2, "No such file", str(args.anchor))
        given = _read_json(args.anchor, "anchor file")
        anchors.update(given.get("streams", given))
    reports = verify_log(storage, trusted=args.trust or None, anchors=anchors)
    failed = 0
    for rep in [] if json_mode(args) else reports:
        for p in rep.problems:
            print(f"FAIL {p}")
            failed += 1
        if not rep.problems:
            print(f"ok   {rep.stream}: {rep.records} records, signed by {rep.signer}")
    heads = {
        r.stream: {"seq": r.seq, "head": r.head, "signer": r.signer}
        for r in reports
        if r.head is not None
    }
    if json_mode(args):
        failed = sum(len(r.problems) for r in reports)
        emit(
            args,
            {
                "log": str(storage.url),
                "ok": not failed,
                "streams": [
                    {
                        "stream": r.stream,
                        "records": r.records,
                        "signer": r.signer,
                        "seq": r.seq,
                        "head": r.head,
                        "problems": [{"where": p.where, "what": p.what} for p in r.problems],
                    }
                    for r in reports
                ],
                "problems": failed,
            },
        )
        if failed:
            raise CommandFailed(
                f"{failed} problem(s) in {storage.url}", exit_code=1, kind="AuthenticationError"
            )
    if failed:
        print(f"{failed} problem(s) in {storage.url}", file=sys.stderr)
        return 1
    # Remember how far each stream reached: a later truncation shows against it.
    pins[str(storage.url)] = {**anchors, **heads}
    path = _anchors_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as fp:
        fp.write(json.dumps(pins, indent=1, sort_keys=True).encode() + b"\n")
    if args.save_anchor is not None:
        with atomic_file(args.save_anchor, mode=0o644) as fp:
            fp.write(
                json.dumps(
                    {"log": str(storage.url), "streams": heads}, indent=1, sort_keys=True
                ).encode()
                + b"\n"
            )
    say(args, f"{len(reports)} stream(s), {sum(r.records for r in reports)} records: ok")
    return 0


def _key(args: argparse.Namespace) -> int:
    from sealstore.vault.auditing import machine_key

    key_id = machine_key().signing_key_id
    if json_mode(args):
        emit(args, {"key_id": key_id})
        return 0
    print(key_id)
    return 0
