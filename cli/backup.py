"""``sealstore backup | restore | safe-mode``: backups, restores, and safe mode."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from sealstore.cli.commands import CommandFailed, bar, command, emit, group, json_mode, say
from sealstore.cli.progress import Progress, counted, human_bytes
from sealstore.cli.store import _open

__all__ = ["register"]

BACKUP_ENV = "SEALSTORE_BACKUP"


def _location(p: argparse.ArgumentParser, flag: str) -> None:
    """The backup location (--to or --from URL) and its endpoint."""
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


def _copies(sub: Any, name: str, func: Any, help: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A command that copies or hashes objects: threads, a progress bar, the store options."""
    return command(
        sub,
        name,
        func,
        help=help,
        threads=4,
        threads_help="objects copied at once",
        progress=True,
        **kwargs,
    )


def _root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", metavar="KEY", help="the store's root key, if not pinned here")


def _restore_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("snapshot", nargs="?", default="latest", help="snapshot id (default: latest)")
    _location(p, "--from")
    p.add_argument(
        "--to",
        metavar="STORE",
        help="restore into this store URL (default: --store, or the "
        "default store); an empty location becomes the snapshot's store",
    )
    p.add_argument(
        "--artifact", action="append", metavar="NAME[:VERSION]", help="only this (repeatable)"
    )
    p.add_argument(
        "--known-good",
        action="store_true",
        help="only each artifact's known-good version; latest points at it and the "
        "artifact's other tags are removed",
    )
    p.add_argument(
        "--recovery-identity",
        action="append",
        default=[],
        metavar="FILE",
        help="hpke or x25519 identity of the recovery recipient: adds the escrow slots to the "
        "restored manifests, so they open with it when the KMS/Vault key is gone",
    )
    _root(p)


def register(sub: Any) -> None:
    bsub = group(sub, "backup", "incremental, signed backups of a store; verify; restore")
    create = _copies(
        bsub,
        "create",
        _create,
        help="back the store up (only what the location lacks is copied)",
        description="Copy every tenant's manifests, BoMs, tags and sealed objects (ciphertext "
        "only) to URL and write a signed snapshot naming them. Incremental: objects are named "
        "by their digest and copied only when the location lacks them.",
        store=True,
    )
    _location(create, "--to")
    create.add_argument(
        "--recovery-recipient",
        action="append",
        default=[],
        metavar="RECIPIENT",
        help="also wrap each version's key to this offline recovery key (key escrow)",
    )
    create.add_argument(
        "-i",
        "--identity",
        action="append",
        default=[],
        metavar="FILE",
        help="identity or keyring that opens the versions (for escrow)",
    )
    create.add_argument("--force", action="store_true", help="run even if a prune is recorded")

    # list and prune take --threads and --no-progress as they always did (scripts pass them).
    ls = _copies(bsub, "list", _list, help="the snapshots at a backup location")
    _location(ls, "--from")

    ver = _copies(
        bsub,
        "verify",
        _verify,
        help="check a snapshot with no key: signatures and every object's hash",
    )
    ver.add_argument("snapshot", nargs="?", default="latest")
    _location(ver, "--from")
    _root(ver)

    res = _copies(
        bsub,
        "restore",
        _restore,
        help="bring the store back to a snapshot (point in time, tags included, idempotent)",
        store=True,
    )
    _restore_options(res)

    pr = _copies(
        bsub, "prune", _prune, help="keep the newest N snapshots; delete what only others need"
    )
    _location(pr, "--from")
    pr.add_argument("--keep", type=int, required=True, metavar="N")
    _root(pr)
    pr.add_argument("--force", action="store_true", help="run even if a backup is recorded")
    pr.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="spare unreferenced blobs younger than this (a running backup's; default 3600)",
    )

    top = _copies(
        sub,
        "restore",
        _restore,
        help="restore from a snapshot; --known-good returns the store to its known-good state",
        store=True,
    )
    _restore_options(top)

    ssub = group(sub, "safe-mode", "serve only known-good versions (enter, exit, status)")
    for action, text in (
        ("enter", "serve only each artifact's signed known-good version"),
        ("exit", "serve every verified version again"),
        ("status", "whether the store is in safe mode"),
    ):
        p = command(ssub, action, _safe_mode, help=text, store=True, action=action)
        if action != "status":
            p.add_argument("--reason", default="", help="recorded in the signed state")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {"endpoint_url": args.backup_endpoint} if args.backup_endpoint else {}


def _stats(stats: Any) -> dict[str, Any]:
    """A copy's counts for a JSON report."""
    names = ("versions", "objects", "copied", "copied_bytes", "read_bytes", "docs_written")
    return {n: getattr(stats, n) for n in names} | {"seconds": round(stats.seconds, 3)}


def _need_location(args: argparse.Namespace) -> str:
    if not args.location:
        raise ValueError(f"no backup location: give --to/--from URL or set ${BACKUP_ENV}")
    return str(args.location)


class _Bars:
    """Makes the progress bar once the total is known, and closes it at the end."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bars: list[Progress] = []

    def __call__(self, label: str, total: int) -> Progress:
        made = bar(self.args, label, total)
        self.bars.append(made)
        return made

    def close(self) -> None:
        for made in self.bars:
            made.close()


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
    if json_mode(args):
        emit(
            args,
            {
                "snapshot": snap.id,
                "store": snap.store,
                "created": snap.created,
                "damaged": list(snap.damaged),
                "recipients": list(snap.recipients),
                **_stats(stats),
            },
        )
    else:
        for problem in snap.damaged:
            print(f"sealstore: damaged: {problem}", file=sys.stderr)
        say(args, stats.summary(f"backup {snap.id}") + f", {human_bytes(stats.read_bytes)} read")
        print(snap.id)
    if snap.damaged:
        # The report named them; the error line (or object) gives the count and exit 1.
        raise CommandFailed(
            f"{len(snap.damaged)} damaged item(s) in the store; the snapshot holds the "
            "rest (repair with: sealstore backup restore)",
            exit_code=1,
            kind="Damaged",
        )
    return 0


def _list(args: argparse.Namespace) -> int:
    from sealstore.vault.backup import list_snapshots

    rows = list_snapshots(_need_location(args), **_options(args))
    if json_mode(args):
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        if "error" in r:
            print(f"{r['id']}  unreadable: {r['error']}")
            continue
        extra = f"  escrow to {len(r['recipients'])} recipient(s)" if r["recipients"] else ""
        extra += f"  {r['damaged']} damaged" if r["damaged"] else ""
        print(
            f"{r['id']}  {r['created']}  {counted(r['versions'], 'version')}  "
            f"{counted(r['objects'], 'object')}  "
            f"{human_bytes(r['bytes'])}{extra}"
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from sealstore.vault.backup import verify

    bars = _Bars(args)
    try:
        res = verify(
            _need_location(args),
            args.snapshot,
            root=args.root,
            threads=args.threads,
            progress_for=bars,
            **_options(args),
        )
    finally:
        bars.close()
    if json_mode(args):
        emit(args, res.__dict__ | {"ok": res.ok})
        if not res.ok:
            raise CommandFailed(
                f"snapshot {res.snapshot}: {len(res.problems)} problem(s)",
                exit_code=1,
                kind="AuthenticationError",
            )
    else:
        for p in res.problems:
            print(f"FAIL  {p}")
        state = "ok" if res.ok else f"{len(res.problems)} problem(s)"
        print(
            f"snapshot {res.snapshot}: {counted(res.versions, 'version')}, "
            f"{counted(res.objects, 'object')}, "
            f"{human_bytes(res.bytes)}: {state}"
        )
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
    if json_mode(args):
        emit(
            args,
            {
                "snapshot": report.snapshot,
                "store": report.store,
                "versions": report.versions,
                "restored": report.restored,
                "repaired": report.repaired,
                "tags": report.tags,
                "untagged": report.untagged,
                "skipped": report.skipped,
                "problems": report.problems,
                "changed": report.changed,
                **_stats(report.stats),
            },
        )
    else:
        _say_restore(args, report)
    if report.problems:
        raise CommandFailed(
            f"{len(report.problems)} problem(s); nothing else was lost, re-run once they are fixed",
            exit_code=1,
            kind="RestoreProblems",
        )
    return 0


def _say_restore(args: argparse.Namespace, report: Any) -> None:
    for line in report.repaired:
        say(args, f"repaired: {line}")
    for line in report.tags + [f"{t} removed" for t in report.untagged]:
        say(args, f"tag: {line}")
    for line in report.skipped:
        say(args, f"skipped: {line}")
    for line in report.problems:
        print(f"sealstore: problem: {line}", file=sys.stderr)
    what = (
        "nothing to change"
        if not report.changed
        else f"{counted(len(report.restored), 'version')} written"
    )
    say(args, report.stats.summary(f"restore {report.snapshot} into {report.store}") + f"; {what}")


def _prune(args: argparse.Namespace) -> int:
    from sealstore.vault.backup import prune

    report = prune(
        _need_location(args),
        args.keep,
        root=args.root,
        force=args.force,
        grace=args.grace,
        **_options(args),
    )
    if json_mode(args):
        emit(
            args,
            {
                "kept": report.kept,
                "removed": report.removed,
                "blobs_removed": report.blobs_removed,
                "bytes_freed": report.bytes_freed,
            },
        )
        return 0
    freed = human_bytes(report.bytes_freed)
    say(
        args,
        f"kept {len(report.kept)} snapshot(s), removed {len(report.removed)}; "
        f"{report.blobs_removed} blob(s), {freed} freed",
    )
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
    if json_mode(args):
        emit(args, dict(state.__dict__))
        return 0
    if state.enabled:
        why = f" ({state.reason})" if state.reason else ""
        print(f"safe mode: on since {state.since}{why}; only known-good versions are served")
    else:
        print("safe mode: off")
    return 0
