"""``sealstore backup | restore | safe-mode``: backups, restores, and safe mode."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from sealstore.cli.progress import Progress, counted, human_bytes
from sealstore.cli.store import _open, _say, _where

__all__ = ["register"]

BACKUP_ENV = "SEALSTORE_BACKUP"


def _location(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument(
        flag,
        dest="location",
        metavar="URL",
        default=os.environ.get(BACKUP_ENV),
        help=f"the backup location: file://PATH, s3://BUCKET/PREFIX (default: ${BACKUP_ENV})",
    )
    p.add_argument(
        "--backup-endpoint",
        metavar="URL",
        help="S3 endpoint of the backup location when it differs from the store's",
    )
    p.add_argument("--threads", type=int, default=4, help="objects copied at once (default 4)")
    p.add_argument("--no-progress", action="store_true")


def _root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", metavar="KEY", help="the store's root key, if not pinned here")


def _restore_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("snapshot", nargs="?", default="latest", help="snapshot id (default: latest)")
    _location(p, "--from")
    p.add_argument(
        "--to", metavar="STORE", help="restore into this store URL (default: --store, or the "
        "default store); an empty location becomes the snapshot's store"
    )  # fmt: skip
    p.add_argument(
        "--artifact", action="append", metavar="NAME[:VERSION]", help="only this (repeatable)"
    )
    p.add_argument("--known-good", action="store_true",
                   help="only each artifact's known-good version; latest points at it and the "
                   "artifact's other tags are removed")  # fmt: skip
    p.add_argument(
        "--recovery-identity",
        action="append",
        default=[],
        metavar="FILE",
        help="x25519 identity of the recovery recipient: adds the escrow slots to the "
        "restored manifests, so they open with it when the KMS/Vault key is gone",
    )
    _root(p)
    _where(p)
    p.set_defaults(func=_restore)


def register(sub: Any) -> None:
    bk = sub.add_parser("backup", help="incremental, signed backups of a store; verify; restore")
    bsub = bk.add_subparsers(dest="backup_command", metavar="ACTION", required=True)
    create = bsub.add_parser(
        "create",
        help="back the store up (only what the location lacks is copied)",
        description="Copy every tenant's manifests, BoMs, tags and sealed objects (ciphertext "
        "only) to URL and write a signed snapshot naming them. Incremental: objects are named "
        "by their digest and copied only when the location lacks them.",
    )
    _location(create, "--to")
    create.add_argument(
        "--recovery-recipient",
        action="append",
        default=[],
        metavar="x25519:KEY",
        help="also wrap each version's key to this offline recovery key (key escrow)",
    )
    create.add_argument(
        "-i", "--identity", action="append", default=[], metavar="FILE",
        help="identity or keyring that opens the versions (for escrow)",
    )  # fmt: skip
    create.add_argument("--force", action="store_true", help="run even if a prune is recorded")
    _where(create)
    create.set_defaults(func=_create)

    ls = bsub.add_parser("list", help="the snapshots at a backup location")
    _location(ls, "--from")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)

    ver = bsub.add_parser(
        "verify",
        help="check a snapshot with no key: signatures and every object's hash",
    )
    ver.add_argument("snapshot", nargs="?", default="latest")
    _location(ver, "--from")
    _root(ver)
    ver.add_argument("--json", action="store_true")
    ver.set_defaults(func=_verify)

    res = bsub.add_parser(
        "restore",
        help="bring the store back to a snapshot (point in time, tags included, idempotent)",
    )
    _restore_options(res)

    pr = bsub.add_parser("prune", help="keep the newest N snapshots; delete what only others need")
    _location(pr, "--from")
    pr.add_argument("--keep", type=int, required=True, metavar="N")
    _root(pr)
    pr.add_argument("--force", action="store_true", help="run even if a backup is recorded")
    pr.add_argument(
        "--grace", type=float, default=3600.0, metavar="SECONDS",
        help="spare unreferenced blobs younger than this (a running backup's; default 3600)",
    )  # fmt: skip
    pr.set_defaults(func=_prune)

    top = sub.add_parser(
        "restore",
        help="restore from a snapshot; --known-good returns the store to its known-good state",
    )
    _restore_options(top)

    sm = sub.add_parser("safe-mode", help="serve only known-good versions (enter, exit, status)")
    ssub = sm.add_subparsers(dest="safe_command", metavar="ACTION", required=True)
    for action, text in (
        ("enter", "serve only each artifact's signed known-good version"),
        ("exit", "serve every verified version again"),
        ("status", "whether the store is in safe mode"),
    ):
        p = ssub.add_parser(action, help=text)
        if action != "status":
            p.add_argument("--reason", default="", help="recorded in the signed state")
        else:
            p.add_argument("--json", action="store_true")
        _where(p)
        p.set_defaults(func=_safe_mode, action=action)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {"endpoint_url": args.backup_endpoint} if args.backup_endpoint else {}


def _need_location(args: argparse.Namespace) -> str:
    if not args.location:
        raise ValueError(f"no backup location: give --to/--from URL or set ${BACKUP_ENV}")
    if args.threads < 1:
        raise ValueError("--threads must be at least 1")
    return str(args.location)


class _Bars:
    """Makes the progress bar once the total is known, and closes it at the end."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.enabled = not args.no_progress and not args.quiet
        self.bars: list[Progress] = []

    def __call__(self, label: str, total: int) -> Progress:
        bar = Progress(label, total, enabled=self.enabled)
        self.bars.append(bar)
        return bar

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


def _create(args: argparse.Namespace) -> int:
    from sealstore.vault.backup import create

    url = _need_location(args)
    if args.tenant:
        raise ValueError("a backup covers every tenant of the store; --tenant does not apply")
    store = _open(args)
    bars = _Bars(args)
    try:
        snap, stats = create(
            store,
            url,
            recovery_recipients=args.recovery_recipient,
            identities=args.identity,
            threads=args.threads,
            progress_for=bars,
            force=args.force,
            **_options(args),
        )
    finally:
        bars.close()
    for problem in snap.damaged:
        print(f"sealstore: damaged: {problem}", file=sys.stderr)
    _say(args, stats.summary(f"backup {snap.id}") + f", {human_bytes(stats.read_bytes)} read")
    print(snap.id)
    if snap.damaged:
        print(
            f"sealstore: error: {len(snap.damaged)} damaged item(s) in the store; the snapshot "
            "holds the rest (repair with: sealstore backup restore)",
            file=sys.stderr,
        )
        return 1
    return 0


def _list(args: argparse.Namespace) -> int:
    from sealstore.vault.backup import list_snapshots

    rows = list_snapshots(_need_location(args), **_options(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        if "error" in r:
            print(f"{r['id']}  unreadable: {r['error']}")
            continue
        extra = f"  escrow to {len(r['recipients'])} recipient(s)" if r["recipients"] else ""
        extra += f"  {r['damaged']} damaged" if r["damaged"] else ""
        print(f"{r['id']}  {r['created']}  {counted(r['versions'], 'version')}  "
              f"{counted(r['objects'], 'object')}  "
              f"{human_bytes(r['bytes'])}{extra}")  # fmt: skip
    return 0


def _verify(args: argparse.Namespace) -> int:
    from sealstore.vault.backup import verify

    bars = _Bars(args)
    try:
        res = verify(_need_location(args), args.snapshot, root=args.root, threads=args.threads,
                     progress_for=bars, **_options(args))  # fmt: skip
    finally:
        bars.close()
    if args.json:
        print(json.dumps(res.__dict__ | {"ok": res.ok}, indent=2))
    else:
        for p in res.problems:
            print(f"FAIL  {p}")
        state = "ok" if res.ok else f"{len(res.problems)} problem(s)"
        print(f"snapshot {res.snapshot}: {counted(res.versions, 'version')}, "
              f"{counted(res.objects, 'object')}, "
              f"{human_bytes(res.bytes)}: {state}")  # fmt: skip
    return 0 if res.ok else 1


def _restore(args: argparse.Namespace) -> int:
    from sealstore.vault.backup import restore

    url = _need_location(args)
    bars = _Bars(args)
    try:
        report = restore(
            url,
            args.snapshot,
            to=args.to or args.store,
            artifacts=args.artifact,
            tenant=args.tenant,
            identities=args.recovery_identity,
            known_good=args.known_good,
            root=args.root,
            threads=args.threads,
            progress_for=bars,
            **_options(args),
        )
    finally:
        bars.close()
    for line in report.repaired:
        _say(args, f"repaired: {line}")
    for line in report.tags + [f"{t} removed" for t in report.untagged]:
        _say(args, f"tag: {line}")
    for line in report.skipped:
        _say(args, f"skipped: {line}")
    for line in report.problems:
        print(f"sealstore: problem: {line}", file=sys.stderr)
    what = (
        "nothing to change"
        if not report.changed
        else f"{counted(len(report.restored), 'version')} written"
    )
    _say(args, report.stats.summary(f"restore {report.snapshot} into {report.store}")
         + f"; {what}")  # fmt: skip
    if report.problems:
        print(f"sealstore: error: {len(report.problems)} problem(s); nothing else was lost, "
              "re-run once they are fixed", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _prune(args: argparse.Namespace) -> int:
    from sealstore.vault.backup import prune

    report = prune(_need_location(args), args.keep, root=args.root, force=args.force,
                   grace=args.grace, **_options(args))  # fmt: skip
    freed = human_bytes(report.bytes_freed)
    _say(args, f"kept {len(report.kept)} snapshot(s), removed {len(report.removed)}; "
               f"{report.blobs_removed} blob(s), {freed} freed")  # fmt: skip
    return 0


def _safe_mode(args: argparse.Namespace) -> int:
    from sealstore.vault import safemode

    store = _open(args)
    if args.action == "enter":
        state = safemode.enter(store, args.reason)
    elif args.action == "exit":
        state = safemode.exit_safe_mode(store, args.reason)
    else:
        state = safemode.status(store)
        if args.json:
            print(json.dumps(state.__dict__, indent=2))
            return 0
    if state.enabled:
        why = f" ({state.reason})" if state.reason else ""
        print(f"safe mode: on since {state.since}{why}; only known-good versions are served")
    else:
        print("safe mode: off")
    return 0
