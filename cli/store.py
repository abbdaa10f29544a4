"""``sealstore store | push | pull | ls | show | tag | rm | bom`` (and store ``verify``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

from sealstore.cli.commands import bar, command, emit, group, json_mode, say
from sealstore.cli.main import printable
from sealstore.cli.progress import human_bytes

__all__ = ["register", "verify_store"]


def _slots(m: Any) -> list[dict[str, str]]:
    """A manifest's key slots for a report: kind and key id (never the wrapped blob)."""
    return [{"kind": slot.kind, "key_id": slot.key_id} for slot in m.slots]


def _open(args: argparse.Namespace) -> Any:
    from sealstore.vault.store import Store

    return Store.open(args.store)


def register(sub: Any) -> None:
    ssub = group(sub, "store", "create, trust and maintain a store")
    init = command(
        ssub,
        "init",
        _init,
        help="create a store; your keyring's signing key becomes its root",
        description="Create a store at URL. The local keyring's Ed25519 signing key becomes "
        "the store's root key and first trusted signer.",
    )
    init.add_argument("url", nargs="?", help="store URL (default: the embedded file:// store)")
    trust = command(
        ssub,
        "trust",
        _trust,
        help="pin a store's root key on this machine (needed before using someone else's store)",
    )
    trust.add_argument("url")
    trust.add_argument("--root", required=True, metavar="KEY", help="the root key, ed25519:...")
    command(ssub, "info", _info, help="the store's id, root key and signers", store=True)
    add = command(
        ssub, "add-signer", _add_signer, help="trust another signing key (root only)", store=True
    )
    add.add_argument("key", metavar="KEY")
    add.add_argument(
        "--role",
        choices=("reader", "publisher", "admin"),
        default="publisher",
        help="its role (default: publisher)",
    )
    grant = command(
        ssub,
        "grant",
        _grant,
        store=True,
        help="give a signing key a role in a tenant (root only)",
        description="Roles per tenant: reader < publisher (push, tag) < admin (rotate, rm, "
        "safe mode). A manifest or tag is accepted only if a publisher of its tenant signed "
        "it; a shred only if an admin did. --tenant '*' grants it in every tenant.",
    )
    grant.add_argument("key", metavar="KEY")
    grant.add_argument("role", choices=("reader", "publisher", "admin"))
    revoke = command(
        ssub,
        "revoke",
        _grant,
        help="take a signing key's role in a tenant away",
        store=True,
        role=None,
    )
    revoke.add_argument("key", metavar="KEY")
    rot = command(
        ssub,
        "rotate",
        _rotate,
        help="re-wrap a version's key to other keys; rewrites only its manifest",
        store=True,
    )
    rot.add_argument("ref", metavar="NAME[:VERSION|@TAG]")
    rot.add_argument("--to", action="append", default=[], metavar="URI")
    rot.add_argument("--remove", action="append", default=[], metavar="URI")
    rot.add_argument("-i", "--identity", action="append", default=[], metavar="FILE")
    rk = command(
        ssub,
        "rekey",
        _rekey,
        store=True,
        threads=2,
        threads_help="AEAD threads per file",
        progress=True,
        help="write a new version of the same files, each re-encrypted under a fresh data key",
        description="Re-encrypt every file of NAME[:VERSION|@TAG] under a fresh data key "
        "into a new version (default: the next number): same plaintext digests, model "
        "signature and BoM carried over, the tags naming the old version moved to the new "
        "one. Nothing is visible until its signed manifest is written. --shred-old then "
        "crypto-shreds the old version (admin; irreversible).",
    )
    rk.add_argument("ref", metavar="NAME[:VERSION|@TAG]")
    rk.add_argument(
        "--version", dest="new_version", metavar="V", help="the new version's name (default: next)"
    )
    rk.add_argument(
        "--to",
        action="append",
        default=[],
        metavar="URI",
        help="wrap the new key to this key (repeat; default: the keys of the old slots)",
    )
    rk.add_argument("-i", "--identity", action="append", default=[], metavar="FILE")
    rk.add_argument(
        "--keep-tags", action="store_true", help="leave the old version's tags where they are"
    )
    rk.add_argument(
        "--shred-old",
        action="store_true",
        help="then crypto-shred the old version: its key slots destroyed, objects deleted",
    )
    ref = command(
        ssub,
        "refresh",
        _refresh,
        store=True,
        help="re-sign the tenant's sequence with a new expiry (publisher; run before it expires)",
        description="Every tag and manifest write re-signs the tenant's sequence (the signed "
        "list of current tags and manifests that readers check for rollback); it expires "
        "after a week by default, and an expired one is refused. Refresh it where a tenant "
        "sees no writes for that long (e.g. daily from cron).",
    )
    ref.add_argument(
        "--lifetime", type=float, metavar="DAYS", help="days until it expires (default: a week)"
    )
    ref.add_argument(
        "--rebuild",
        action="store_true",
        help="admin: list what the storage holds now (after a rollback with no backup)",
    )
    gc = command(ssub, "gc", _gc, help="delete objects left by interrupted pushes", store=True)
    gc.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="keep unreferenced objects younger than this (pushes in flight; default 3600)",
    )

    push = command(
        sub,
        "push",
        _push,
        store=True,
        threads=2,
        threads_help="chunks (or files) sealed at once",
        progress=True,
        help="seal a file or a model directory into the store as a new version",
        description="Seal PATH (a file, or every file under a directory) as NAME:VERSION "
        "(default: the next number). Nothing is visible until the signed manifest is written.",
    )
    push.add_argument("path", help="a file or a folder (not - : push reads no stdin)")
    push.add_argument("ref", metavar="NAME[:VERSION]")
    push.add_argument(
        "-k",
        "--key",
        dest="keys",
        action="append",
        default=[],
        metavar="URI",
        help="key to wrap the version's data key with: local:PATH (local: alone is your "
        "keyring), hpke:RECIPIENT, age1..., x25519:RECIPIENT, vault-transit://..., aws-kms://KEY "
        "(repeatable; at least one)",
    )
    push.add_argument("--dek-from", metavar="URI", help="let this key service generate the DEK")
    push.add_argument("--bom", metavar="FILE.yaml", help="datasets and training parameters")
    push.add_argument(
        "--dataset",
        action="store_true",
        help="this version is a dataset: its BoM has a CycloneDX data component (kind: dataset)",
    )
    parent = push.add_mutually_exclusive_group()
    parent.add_argument(
        "--parent", metavar="VERSION", help="the version this one derives from (default: newest)"
    )
    parent.add_argument("--no-parent", action="store_true")
    push.add_argument(
        "--follow-outside-links",
        action="store_true",
        help="also follow symlinks that point outside PATH (e.g. a Hugging Face cache "
        "snapshot, whose files link to ../../blobs); refused by default",
    )
    push.add_argument(
        "--sign-key",
        metavar="KEY",
        help="sign the version's plaintext files with this EC private key (PEM; password in "
        "$SEALSTORE_SIGN_KEY_PASSWORD): an OpenSSF Model Signing (OMS) signature, written "
        "as model.sig by pull",
    )
    push.add_argument(
        "--require-signature",
        action="store_true",
        help="PATH is a model folder signed with OMS (model_signing sign key): verify it "
        "with --public-key before sealing anything, refuse it otherwise, keep the signature",
    )
    push.add_argument(
        "--sign-cert",
        metavar="CERT",
        help="with --sign-key: its certificate, then the rest of its chain (PEM); the "
        "signature carries the chain (model_signing verify certificate)",
    )
    trust = push.add_mutually_exclusive_group()
    trust.add_argument("--public-key", metavar="KEY", help="the signer's EC public key (PEM)")
    trust.add_argument(
        "--certificate-chain",
        dest="public_key",
        metavar="ROOTS",
        help="for a model signed with a certificate: the trusted root certificates (PEM)",
    )
    push.add_argument(
        "--signature", metavar="SIG", help="the OMS signature (default: PATH/model.sig)"
    )

    pull = command(
        sub,
        "pull",
        _pull,
        store=True,
        threads=2,
        threads_help="chunks decrypted at once",
        progress=True,
        help="decrypt a version into a directory, all verified first",
        description="Decrypt a version into DIR (new or empty; --force to replace files of "
        "the same name in a folder that has some). Files appear only after every file passed "
        "every check. With one --file PATH, -o - (stdout), a device, FIFO or /dev/fd/N "
        "receives that file as each chunk authenticates.",
    )
    pull.add_argument("ref", metavar="NAME[:VERSION|@TAG]")
    pull.add_argument("-o", "--output", required=True, metavar="DIR")
    pull.add_argument(
        "--force", action="store_true", help="pull into a non-empty DIR, replacing files"
    )
    pull.add_argument("-i", "--identity", action="append", default=[], metavar="FILE")
    pull.add_argument(
        "--file",
        action="append",
        metavar="PATH",
        help="only this file, folder or glob (train/*.parquet, **/*.json; repeatable)",
    )
    pull.add_argument(
        "--signature",
        metavar="SIG",
        help="where to write the version's OMS model signature (default: DIR/model.sig)",
    )

    ls = command(
        sub,
        "ls",
        _ls,
        help="list the tenant's artifacts, or one artifact's versions",
        store=True,
    )
    ls.add_argument("name", nargs="?")

    show = command(
        sub, "show", _show, help="a version's verified manifest (no key needed)", store=True
    )
    show.add_argument("ref", metavar="NAME[:VERSION|@TAG]")

    tag = command(sub, "tag", _tag, help="point a tag at a version", store=True)
    tag.add_argument("ref", metavar="NAME:VERSION")
    tag.add_argument("tag")

    rm = command(
        sub,
        "rm",
        _rm,
        store=True,
        help="crypto-shred a version: destroy its key slots and delete its objects (irreversible)",
        description="Crypto-shred NAME:VERSION: its key slots are destroyed and its objects "
        "deleted, and every tag naming it (known-good included) is removed. This cannot be "
        "undone: the store keeps no wrapped copy of the version's key (only a backup "
        "snapshot taken before the shred still holds one). Asks for confirmation on a "
        "terminal; without one, --yes is required.",
    )
    rm.add_argument("ref", metavar="NAME:VERSION")
    rm.add_argument(
        "-y", "--yes", action="store_true", help="do not ask: shred (needed without a terminal)"
    )

    bsub = group(sub, "bom", "a version's CycloneDX 1.6 ML-BOM")
    bshow = command(bsub, "show", _bom_show, help="summarise the BoM", store=True)
    bshow.add_argument("ref", metavar="NAME[:VERSION|@TAG]")
    bexp = command(
        bsub,
        "export",
        _bom_export,
        reports=False,
        store=True,
        help="write the BoM JSON (checked against the manifest)",
    )
    bexp.add_argument("ref", metavar="NAME[:VERSION|@TAG]")
    bexp.add_argument("-o", "--output", default="-", metavar="FILE")
    bexp.add_argument(
        "--validate",
        action="store_true",
        help="also check it against the CycloneDX 1.6 JSON schema (about a second to load)",
    )
    bschema = command(
        bsub,
        "schema",
        _bom_schema,
        reports=False,
        help="print the JSON Schema of the push --bom spec file (for editors)",
    )
    bschema.add_argument("-o", "--output", default="-", metavar="FILE")


def _init(args: argparse.Namespace) -> int:
    from sealstore.vault.store import Store

    store = Store.init(args.url)
    if json_mode(args):
        emit(args, {"url": store.url, "id": store.id, "root": store.root_key})
        return 0
    say(args, f"created store {store.url} (id {store.id})")
    print(f"root key {store.root_key}")
    return 0


def _trust(args: argparse.Namespace) -> int:
    from sealstore.vault.store import trust_store

    store = trust_store(args.url, args.root)
    if json_mode(args):
        emit(args, {"url": store.url, "id": store.id, "root": store.root_key, "trusted": True})
    say(args, f"trusting store {store.url} (id {store.id}) with root key {store.root_key}")
    return 0


def _info(args: argparse.Namespace) -> int:
    store = _open(args)
    info = {
        "url": store.url,
        "id": store.id,
        "root": store.root_key,
        "signers": store.signers,
        "roles": store.roles,
    }
    if json_mode(args):
        emit(args, info)
        return 0
    print(f"store    {info['url']}\nid       {info['id']}\nroot     {info['root']}")
    for s in info["signers"]:
        roles = ", ".join(f"{t}={r}" for t, r in sorted(info["roles"].get(s, {}).items()))
        print(f"signer   {s}  {roles}")
    return 0


def _add_signer(args: argparse.Namespace) -> int:
    _open(args).add_signer(args.key, tenant=args.tenant or "*", role=args.role)
    if json_mode(args):
        emit(args, {"key": args.key, "role": args.role, "tenant": args.tenant or "*"})
    say(args, f"added signer {args.key} ({args.role} in {args.tenant or 'every tenant'})")
    return 0


def _grant(args: argparse.Namespace) -> int:
    tenant = args.tenant or "*"
    _open(args).grant(args.key, args.role, tenant=tenant)
    if json_mode(args):
        emit(args, {"key": args.key, "role": args.role, "tenant": tenant})
    where = "every tenant" if tenant == "*" else f"tenant {tenant}"
    say(args, f"{args.key}: {args.role or 'no role'} in {where}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    m = _open(args).rotate(
        args.ref, args.to, remove=args.remove, identities=args.identity, tenant=args.tenant
    )
    if json_mode(args):
        emit(args, {"ref": f"{m.name}:{m.version}", "tenant": m.tenant, "slots": _slots(m)})
    say(
        args,
        f"{m.name}:{m.version}: {len(m.slots)} slot(s): " + ", ".join(s.key_id for s in m.slots),
    )
    return 0


def _rekey(args: argparse.Namespace) -> int:
    from sealstore.vault.rekey import rekey_version

    store = _open(args)
    old = store.manifest(args.ref, tenant=args.tenant)  # NotFound before the bar
    progress = bar(args, "rekey", old.size)
    with progress:
        done = rekey_version(
            store,
            args.ref,
            tenant=args.tenant,
            version=args.new_version,
            to=args.to,
            identities=args.identity,
            move_tags=not args.keep_tags,
            shred_old=args.shred_old,
            threads=args.threads,
            progress=progress,
        )
    new = done.new
    if json_mode(args):
        emit(
            args,
            {
                "from": f"{done.old.name}:{done.old.version}",
                "ref": f"{new.name}:{new.version}",
                "tenant": new.tenant,
                "files": len(new.files),
                "bytes": new.size,
                "slots": _slots(new),
                "tags_moved": done.tags,
                "old_shredded": done.shredded.shredded if done.shredded else None,
            },
        )
        return 0
    moved = f"; tags moved: {', '.join(done.tags)}" if done.tags else ""
    say(
        args,
        f"re-keyed {done.old.name}:{done.old.version} as {new.name}:{new.version}: "
        f"{len(new.files)} file(s), {human_bytes(new.size)}{moved}",
    )
    if done.shredded is not None:
        say(args, f"shredded {done.old.name}:{done.old.version}: key slots destroyed")
    return 0


def _refresh(args: argparse.Namespace) -> int:
    from sealstore.vault.freshness import refresh
    from sealstore.vault.store import default_tenant

    tenant = args.tenant or default_tenant()
    lifetime = None if args.lifetime is None else round(args.lifetime * 86400)
    seq = refresh(_open(args), tenant, lifetime=lifetime, rebuild=args.rebuild)
    if json_mode(args):
        emit(args, {"tenant": tenant, "serial": seq.serial, "expires": seq.expires})
    say(args, f"tenant {tenant}: sequence {seq.serial}, expires {seq.expires}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from sealstore.vault.lifecycle import gc

    deleted = gc(_open(args), tenant=args.tenant, grace=args.grace)
    if json_mode(args):
        emit(args, {"deleted": sorted(map(str, deleted)), "count": len(deleted)})
    say(args, f"deleted {len(deleted)} unreferenced object(s)")
    return 0


def _push(args: argparse.Namespace) -> int:
    from sealstore.vault.push import collect_files

    if args.path == "-":
        # A version's files need names and sizes up front; stdin has neither.
        # Never fall back to a folder that happens to be called "-".
        raise ValueError("push does not read stdin: name a file or folder (./- for one named -)")
    if not args.keys and not args.dek_from:
        raise ValueError("push needs at least one key: -k URI (e.g. -k local:)")
    bom = args.bom
    if args.dataset:
        from sealstore.vault.bom import BomSpec, check_spec, load_bom_spec

        bom = dataclasses.replace(load_bom_spec(bom) if bom else BomSpec(), kind="dataset")
        check_spec(bom, f"BoM spec {args.bom}" if args.bom else "--dataset")
    store = _open(args)
    outside = args.follow_outside_links
    total = sum(size for _, _, size in collect_files(args.path, follow_outside_links=outside))
    start = time.perf_counter()
    with bar(args, "push", total) as shown:
        m = store.push(
            args.path,
            args.ref,
            tenant=args.tenant,
            keys=args.keys,
            dek_from=args.dek_from,
            parent=None if args.no_parent else (args.parent or "auto"),
            bom=bom,
            threads=args.threads,
            progress=shown,
            follow_outside_links=outside,
            sign_key=args.sign_key,
            sign_cert=args.sign_cert,
            require_signature=args.require_signature,
            public_key=args.public_key,
            signature=args.signature,
        )
    took = time.perf_counter() - start
    if json_mode(args):
        emit(
            args,
            {
                "ref": f"{m.name}:{m.version}",
                "name": m.name,
                "version": m.version,
                "tenant": m.tenant,
                "files": len(m.files),
                "bytes": m.size,
                "parent": m.parent,
                "seconds": round(took, 3),
            },
        )
        return 0
    say(
        args,
        f"pushed {m.name}:{m.version} ({m.tenant}): {len(m.files)} file(s), "
        f"{human_bytes(m.size)} in {took:.2f} s",
    )
    print(f"{m.name}:{m.version}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from sealstore.vault.pull import check_destination, select_files, served

    # Before the store is even opened: a refused destination costs nothing.
    check_destination(args.output, files=args.file, force=args.force)
    store = _open(args)
    from sealstore.vault.store import default_tenant

    m = served(store, args.ref, args.tenant or default_tenant(), "pull", granted=False)
    # The files --file names (paths, folders, globs), selected as pull selects them.
    ref = f"{m.name}:{m.version}"
    chosen = select_files(m.files, args.file, ref) if args.file else list(m.files)
    total = sum(f.size for f in chosen)
    start = time.perf_counter()
    with bar(args, "pull", total) as shown:
        m = store.pull(
            args.ref,  # resolved again inside, with the tag's manifest-hash check
            args.output,
            tenant=args.tenant,
            identities=args.identity,
            threads=args.threads,
            progress=shown,
            files=args.file,
            force=args.force,
            signature=args.signature,
        )
    took = time.perf_counter() - start
    where = "stdout" if args.output == "-" else args.output
    if json_mode(args):
        ref = f"{m.name}:{m.version}"  # the version pulled (a tag is resolved once more inside)
        report = {
            "ref": ref,
            "tenant": m.tenant,
            "output": args.output,
            "files": [
                f.path for f in (select_files(m.files, args.file, ref) if args.file else m.files)
            ],
            "bytes": total,
            "seconds": round(took, 3),
            "verified": True,
        }
        emit(args, report, stdout_is_data=args.output == "-")
        return 0
    say(
        args,
        f"pulled {m.name}:{m.version} into {where}: "
        f"{human_bytes(total)} in {took:.2f} s, every file verified",
    )
    return 0


def _ls(args: argparse.Namespace) -> int:
    from sealstore.errors import AuthenticationError, NotFound, SealstoreError
    from sealstore.vault.store import default_tenant

    store = _open(args)
    tenant = args.tenant or default_tenant()
    if args.name is None:
        rows = []
        for name in store.artifacts(tenant=tenant):
            versions = store.versions(name, tenant=tenant)
            checked = store.check_tags(name, tenant=tenant)
            tags = store.tags(name, tenant=tenant, skip_damaged=True)
            rows.append(
                {
                    "name": name,
                    "versions": versions,
                    "tags": {t: v for t, v in tags.items() if checked.get(t) is None},
                    "damaged_tags": sorted(t for t, p in checked.items() if p is not None),
                }
            )
        if json_mode(args):
            print(json.dumps(rows, indent=2))
        for row in [] if json_mode(args) else rows:
            tags = " ".join(f"{t}={v}" for t, v in sorted(row["tags"].items()))
            tags += "".join(f" {t}=DAMAGED" for t in row["damaged_tags"])
            print(f"{row['name']}\t{len(row['versions'])} version(s)\t{tags}".rstrip())
        return 0
    versions = store.versions(args.name, tenant=tenant)
    problems = store.check_tags(args.name, tenant=tenant)
    if not versions and not problems:
        raise NotFound(f"artifact {args.name} not found in tenant {tenant}")
    tags = store.tags(args.name, tenant=tenant, skip_damaged=True)
    out: list[dict[str, Any]] = []
    for v in versions:
        row: dict[str, Any] = {
            "version": v,
            "tags": sorted(t for t, tv in tags.items() if tv == v and problems.get(t) is None),
        }
        try:
            m = store.manifest(f"{args.name}:{v}", tenant=tenant)
        except SealstoreError as exc:
            # One bad manifest is marked, never a reason to hide the good ones.
            out.append(dict(row, damaged=str(exc)))
            continue
        row.update(created=m.created, files=len(m.files), size=m.size, shredded=m.shredded)
        out.append(row)
    # Tags whose version is missing or unreadable: damage, shown where they point.
    for tag, problem in sorted(problems.items()):
        if problem is not None:
            out.append({"tag": tag, "version": tags.get(tag), "damaged": problem})
    if json_mode(args):
        print(json.dumps(out, indent=2))
    for row in [] if json_mode(args) else out:
        if "tag" in row:
            print(f"{args.name}@{row['tag']}\tDAMAGED\t{row['damaged']}")
        elif "damaged" in row:
            print(f"{args.name}:{row['version']}\tDAMAGED\t{row['damaged']}")
        else:
            state = f"SHREDDED {row['shredded']}" if row["shredded"] else human_bytes(row["size"])
            tagtext = " ".join(row["tags"])
            print(
                f"{args.name}:{row['version']}\t{row['created']}\t{row['files']} file(s)\t"
                f"{state}\t{tagtext}".rstrip()
            )
    bad = [r for r in out if "damaged" in r]
    if bad:
        raise AuthenticationError(
            f"{args.name}: {len(bad)} damaged entr{'y' if len(bad) == 1 else 'ies'} "
            f"(details: sealstore verify {args.name})"
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    store = _open(args)
    m = store.manifest(args.ref, tenant=args.tenant)
    body = m.body()
    body["signer"] = m.signer
    for slot in body["slots"]:
        slot.pop("blob", None)  # wrapped keys are opaque; no reason to print them
    if json_mode(args):
        emit(args, body)
        return 0
    print(f"artifact  {m.name}:{m.version}  (tenant {m.tenant})")
    print(f"created   {m.created}")
    print(f"signed by {m.signer}  (verified)")
    print(f"parent    {m.parent or '-'}")
    if m.shredded:
        print(f"SHREDDED  {m.shredded}: key slots destroyed, objects deleted")
    for slot in m.slots:
        print(f"slot      {slot.kind}  {slot.key_id}")
    print(f"bom       sha256:{m.bom_sha256}")
    for f in m.files:
        print(f"  {f.path}\t{human_bytes(f.size)}\tsha256:{f.sha256}")
    return 0


def _tag(args: argparse.Namespace) -> int:
    from sealstore.vault.manifest import parse_ref

    version = _open(args).tag(args.ref, args.tag, tenant=args.tenant)
    if json_mode(args):
        name = parse_ref(args.ref).name
        emit(args, {"name": name, "version": version, "tag": args.tag})
    say(args, f"tagged {parse_ref(args.ref).name}:{version} as {args.tag}")
    return 0


def _confirm_shred(store: Any, args: argparse.Namespace) -> tuple[str, list[str]]:
    """Ask before an irreversible shred; refuse without a terminal (or with --json) unless --yes.

    Returns:
        What else goes with the version (its tags), for the final message, and those tags.

    Raises:
        ValueError: no terminal (or --json) and no --yes, or the answer was not yes.
    """
    from sealstore.errors import SealstoreError
    from sealstore.vault.safemode import KNOWN_GOOD

    m = store.manifest(args.ref, tenant=args.tenant)  # NotFound before asking anything
    name, version = m.name, m.version
    try:
        tags = sorted(t for t, v in store.tags(name, tenant=args.tenant).items() if v == version)
    except SealstoreError:  # a tag that does not verify: the shred removes it all the same
        tags = []
    goes = f"; its tags go too: {', '.join(tags)}" if tags else ""
    if KNOWN_GOOD in tags:
        goes += f" (safe mode will have no {KNOWN_GOOD} version of {name} to serve)"
    what = f"{name}:{version}"
    if args.yes:
        return goes, tags
    if json_mode(args):
        raise ValueError(f"rm --json destroys {what}'s keys for good{goes}: pass --yes too")
    if not sys.stdin.isatty():
        raise ValueError(
            f"rm destroys {what}'s keys for good{goes}: pass --yes to confirm "
            "(no terminal to ask on)"
        )
    print(
        f"Shred {printable(what)}: destroy its key slots and delete its objects{printable(goes)}."
        " This cannot be undone.",
        file=sys.stderr,
    )
    print("Type yes to shred: ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() != "yes":
        raise ValueError(f"not confirmed: {what} was not shredded")
    return goes, tags


def _rm(args: argparse.Namespace) -> int:
    store = _open(args)
    goes, tags = _confirm_shred(store, args)
    tomb = store.shred(args.ref, tenant=args.tenant)
    if json_mode(args):
        emit(
            args,
            {
                "ref": f"{tomb.name}:{tomb.version}",
                "tenant": tomb.tenant,
                "shredded": tomb.shredded,
                "objects_deleted": len(tomb.files),
                "tags_removed": tags,
            },
        )
        return 0
    say(
        args,
        f"shredded {tomb.name}:{tomb.version}: key slots destroyed, {len(tomb.files)} "
        f"object(s) deleted{goes}; the data can no longer be decrypted",
    )
    return 0


def _bom_show(args: argparse.Namespace) -> int:
    from sealstore.vault.bom import summarize

    data = _open(args).bom(args.ref, tenant=args.tenant)
    s = summarize(json.loads(data))
    if json_mode(args):
        emit(args, dict(s, files=[{"path": n, "sha256": d} for n, d in s["files"]]))
        return 0
    print(f"{s['kind']:<9} {s['model']}")
    print(f"parent    {', '.join(s['parent']) or '-'}")
    print(f"datasets  {', '.join(s['datasets']) or '-'}")
    print(f"task      {s['task'] or '-'}")
    for k, v in s["training"].items():
        print(f"training  {k} = {v}")
    for name, digest in s["files"]:
        print(f"  {name}\tsha256:{digest}")
    return 0


def _bom_schema(args: argparse.Namespace) -> int:
    from sealstore.docmodel import write_schema
    from sealstore.vault.bom_spec import json_schema

    write_schema(json_schema(), args.output)
    return 0


def _bom_export(args: argparse.Namespace) -> int:
    from sealstore.fsutil import atomic_file

    data = _open(args).bom(args.ref, tenant=args.tenant)
    if args.validate:
        from sealstore.errors import FormatError
        from sealstore.vault.bom import validate_bom

        problem = validate_bom(data)
        if problem:
            raise FormatError(f"the BoM of {args.ref} is not valid CycloneDX 1.6: {problem}")
    if args.output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0
    # A regular file is replaced atomically; a device, FIFO or /dev/fd/N is
    # written through, never renamed over.
    with atomic_file(args.output, mode=0o644) as fp:
        fp.write(data)
    say(args, f"wrote {args.output}")
    return 0


def _verify_total(store: Any, ref: str | None, tenant: str) -> int | None:
    """The bytes a store verify will check, for the bar's percentage and ETA.

    Read from the signed manifests before the verify reads them again: a
    damaged one is left out here (the verify reports it), and a store that
    cannot be listed gives no total (a bar without a percentage).
    """
    from sealstore.errors import SealstoreError
    from sealstore.vault.pull import verify_refs

    try:
        refs = verify_refs(store, ref, tenant)
    except SealstoreError:
        return None
    total = 0
    for r in refs:
        try:
            m = store.manifest(r, tenant=tenant)
        except SealstoreError:
            continue
        if not m.shredded:
            total += sum(f.size for f in m.files)
    return total


def verify_store(args: argparse.Namespace) -> int:
    """``sealstore verify [NAME[:VERSION]] --store URL``: every signature, hash and chunk.

    Every problem is reported, not only the first. Damage wins the exit code:
    1 if anything is damaged (a version, or a tag naming a missing or
    unreadable version), else 4 if some versions could not be opened with
    this machine's keys (listed separately as not checked), else 0.
    """
    from sealstore.errors import AuthenticationError, KeyUnavailable
    from sealstore.vault.manifest import parse_ref
    from sealstore.vault.store import default_tenant

    store = _open(args)
    tenant = args.tenant or default_tenant()
    start = time.perf_counter()
    with bar(args, "verify", _verify_total(store, args.file, tenant)) as shown:
        results = store.verify(
            args.file,
            tenant=tenant,
            identities=args.identity,
            threads=args.threads,
            decrypt=not args.keyless,
            progress=shown,
        )
        # A version no key opens here is still checked without one: its
        # signatures and object hashes can show damage all the same.
        keyless = {
            r.ref: store.verify(r.ref, tenant=tenant, decrypt=False)[0] for r in results if r.no_key
        }
    damage: list[tuple[str, str]] = []
    unchecked: list[tuple[str, str]] = []
    for r in results:
        problems = list(r.problems)
        if r.no_key:
            # verify() stops a version at the first slot failure, so that one
            # is the last problem; any before it is damage.
            unchecked.append((r.ref, problems.pop()))
            problems += [p for p in keyless[r.ref].problems if p not in problems]
        damage += [(r.ref, p) for p in problems]
        if r.ok:
            say(args, f"{r.ref}: OK ({r.files} file(s), {human_bytes(r.bytes)})")
    names: list[str] = []
    if args.file is None:
        names = store.tagged_names(tenant=tenant)
    elif parse_ref(args.file).version is None:
        names = [parse_ref(args.file).name]
    if args.file is None or names:
        problem = store.check_sequence(tenant)
        if problem is not None:
            damage.append((f"sequence of tenant {tenant}", problem))
    ntags = 0
    for name in names:
        for tag, problem in store.check_tags(name, tenant=tenant).items():
            ntags += 1
            if problem is not None:
                damage.append((f"{name}@{tag}", problem))
    took = time.perf_counter() - start
    bad = len({ref for ref, _ in damage})
    if json_mode(args):
        emit(
            args,
            {
                "tenant": tenant,
                "versions": [
                    {
                        "ref": r.ref,
                        "ok": r.ok,
                        "files": r.files,
                        "bytes": r.bytes,
                        "problems": r.problems,
                    }
                    for r in results
                ],
                "tags": ntags,
                "damaged": [{"ref": ref, "problem": p} for ref, p in damage],
                "not_checked": [{"ref": ref, "problem": p} for ref, p in unchecked],
                "keyless": bool(args.keyless),
                "ok": not damage and not unchecked and bool(results or ntags),
                "seconds": round(took, 3),
            },
        )
    for ref, p in [] if json_mode(args) else damage:
        where = "" if p.startswith(ref.split(" ")[0].split("@")[0]) else f"{ref}: "
        print(f"sealstore: error: {where}{p}", file=sys.stderr)
    for ref, p in [] if json_mode(args) else unchecked:
        print(f"sealstore: not checked: {ref}: {p}", file=sys.stderr)
    say(
        args,
        f"verified {len(results)} version(s) and {ntags} tag(s) in {took:.2f} s: "
        f"{bad} damaged, {len(unchecked)} not checked",
    )
    if not results and not ntags:
        raise ValueError("nothing to verify: the tenant has no artifacts")
    if damage:
        also = f" ({len(unchecked)} more could not be checked here)" if unchecked else ""
        raise AuthenticationError(
            f"{bad} of {len(results) + ntags} version(s) and tag(s) failed verification{also}"
        )
    if unchecked:
        raise KeyUnavailable(
            f"{len(unchecked)} of {len(results)} version(s) could not be opened to verify"
        )
    return 0
