"""``sealstore store | push | pull | ls | show | tag | rm | bom`` (and store ``verify``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

from sealstore.cli.main import printable
from sealstore.cli.progress import Progress, human_bytes

__all__ = ["register", "verify_store"]


def _where(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        metavar="URL",
        help="store URL: file://PATH, s3://BUCKET/PREFIX, memory://NAME "
        "(default: $SEALSTORE_STORE or file://$SEALSTORE_HOME/store)",
    )
    p.add_argument(
        "--tenant", metavar="T", help="tenant namespace (default: $SEALSTORE_TENANT or 'default')"
    )


def _open(args: argparse.Namespace) -> Any:
    from sealstore.vault.store import Store

    return Store.open(args.store)


def register(sub: Any) -> None:
    st = sub.add_parser("store", help="create, trust and maintain a store")
    ssub = st.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    init = ssub.add_parser(
        "init",
        help="create a store; your keyring's signing key becomes its root",
        description="Create a store at URL. The local keyring's Ed25519 signing key becomes "
        "the store's root key and first trusted signer.",
    )
    init.add_argument("url", nargs="?", help="store URL (default: the embedded file:// store)")
    init.set_defaults(func=_init)
    trust = ssub.add_parser(
        "trust",
        help="pin a store's root key on this machine (needed before using someone else's store)",
    )
    trust.add_argument("url")
    trust.add_argument("--root", required=True, metavar="KEY", help="the root key, ed25519:...")
    trust.set_defaults(func=_trust)
    info = ssub.add_parser("info", help="the store's id, root key and signers")
    _where(info)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_info)
    add = ssub.add_parser("add-signer", help="trust another signing key (root only)")
    add.add_argument("key", metavar="KEY")
    _where(add)
    add.add_argument("--role", choices=("reader", "publisher", "admin"), default="publisher",
                     help="its role (default: publisher)")  # fmt: skip
    add.set_defaults(func=_add_signer)
    grant = ssub.add_parser(
        "grant",
        help="give a signing key a role in a tenant (root only)",
        description="Roles per tenant: reader < publisher (push, tag) < admin (rotate, rm, "
        "safe mode). A manifest or tag is accepted only if a publisher of its tenant signed "
        "it; a shred only if an admin did. --tenant '*' grants it in every tenant.",
    )
    grant.add_argument("key", metavar="KEY")
    grant.add_argument("role", choices=("reader", "publisher", "admin"))
    _where(grant)
    grant.set_defaults(func=_grant)
    revoke = ssub.add_parser("revoke", help="take a signing key's role in a tenant away")
    revoke.add_argument("key", metavar="KEY")
    _where(revoke)
    revoke.set_defaults(func=_grant, role=None)
    rot = ssub.add_parser(
        "rotate",
        help="re-wrap a version's key to other keys; rewrites only its manifest",
    )
    rot.add_argument("ref", metavar="NAME[:VERSION|@TAG]")
    rot.add_argument("--to", action="append", default=[], metavar="URI")
    rot.add_argument("--remove", action="append", default=[], metavar="URI")
    rot.add_argument("-i", "--identity", action="append", default=[], metavar="FILE")
    _where(rot)
    rot.set_defaults(func=_rotate)
    ref = ssub.add_parser(
        "refresh",
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
    _where(ref)
    ref.set_defaults(func=_refresh)
    gc = ssub.add_parser("gc", help="delete objects left by interrupted pushes")
    gc.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="keep unreferenced objects younger than this (pushes in flight; default 3600)",
    )
    _where(gc)
    gc.set_defaults(func=_gc)

    push = sub.add_parser(
        "push",
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
        "keyring), x25519:RECIPIENT, vault-transit://..., aws-kms://KEY (repeatable; at least one)",
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
    push.add_argument("--threads", type=int, default=2)
    push.add_argument("--no-progress", action="store_true")
    _where(push)
    push.set_defaults(func=_push)

    pull = sub.add_parser(
        "pull",
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
    pull.add_argument("--threads", type=int, default=2)
    pull.add_argument("--no-progress", action="store_true")
    _where(pull)
    pull.set_defaults(func=_pull)

    ls = sub.add_parser("ls", help="list the tenant's artifacts, or one artifact's versions")
    ls.add_argument("name", nargs="?")
    ls.add_argument("--json", action="store_true")
    _where(ls)
    ls.set_defaults(func=_ls)

    show = sub.add_parser("show", help="a version's verified manifest (no key needed)")
    show.add_argument("ref", metavar="NAME[:VERSION|@TAG]")
    show.add_argument("--json", action="store_true")
    _where(show)
    show.set_defaults(func=_show)

    tag = sub.add_parser("tag", help="point a tag at a version")
    tag.add_argument("ref", metavar="NAME:VERSION")
    tag.add_argument("tag")
    _where(tag)
    tag.set_defaults(func=_tag)

    rm = sub.add_parser(
        "rm",
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
    _where(rm)
    rm.set_defaults(func=_rm)

    bom = sub.add_parser("bom", help="a version's CycloneDX 1.6 ML-BOM")
    bsub = bom.add_subparsers(dest="bom_command", metavar="ACTION", required=True)
    bshow = bsub.add_parser("show", help="summarise the BoM")
    bshow.add_argument("ref", metavar="NAME[:VERSION|@TAG]")
    _where(bshow)
    bshow.set_defaults(func=_bom_show)
    bexp = bsub.add_parser("export", help="write the BoM JSON (checked against the manifest)")
    bexp.add_argument("ref", metavar="NAME[:VERSION|@TAG]")
    bexp.add_argument("-o", "--output", default="-", metavar="FILE")
    bexp.add_argument(
        "--validate",
        action="store_true",
        help="also check it against the CycloneDX 1.6 JSON schema (about a second to load)",
    )
    _where(bexp)
    bexp.set_defaults(func=_bom_export)


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)


def _init(args: argparse.Namespace) -> int:
    from sealstore.vault.store import Store

    store = Store.init(args.url)
    _say(args, f"created store {store.url} (id {store.id})")
    print(f"root key {store.root_key}")
    return 0


def _trust(args: argparse.Namespace) -> int:
    from sealstore.vault.store import trust_store

    store = trust_store(args.url, args.root)
    _say(args, f"trusting store {store.url} (id {store.id}) with root key {store.root_key}")
    return 0


def _info(args: argparse.Namespace) -> int:
    store = _open(args)
    info = {"url": store.url, "id": store.id, "root": store.root_key, "signers": store.signers,
            "roles": store.roles}  # fmt: skip
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"store    {info['url']}\nid       {info['id']}\nroot     {info['root']}")
    for s in info["signers"]:
        roles = ", ".join(f"{t}={r}" for t, r in sorted(info["roles"].get(s, {}).items()))
        print(f"signer   {s}  {roles}")
    return 0


def _add_signer(args: argparse.Namespace) -> int:
    _open(args).add_signer(args.key, tenant=args.tenant or "*", role=args.role)
    _say(args, f"added signer {args.key} ({args.role} in {args.tenant or 'every tenant'})")
    return 0


def _grant(args: argparse.Namespace) -> int:
    tenant = args.tenant or "*"
    _open(args).grant(args.key, args.role, tenant=tenant)
    where = "every tenant" if tenant == "*" else f"tenant {tenant}"
    _say(args, f"{args.key}: {args.role or 'no role'} in {where}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    m = _open(args).rotate(
        args.ref, args.to, remove=args.remove, identities=args.identity, tenant=args.tenant
    )
    _say(args, f"{m.name}:{m.version}: {len(m.slots)} slot(s): "
               + ", ".join(s.key_id for s in m.slots))  # fmt: skip
    return 0


def _refresh(args: argparse.Namespace) -> int:
    from sealstore.vault.freshness import refresh
    from sealstore.vault.store import default_tenant

    tenant = args.tenant or default_tenant()
    lifetime = None if args.lifetime is None else round(args.lifetime * 86400)
    seq = refresh(_open(args), tenant, lifetime=lifetime, rebuild=args.rebuild)
    _say(args, f"tenant {tenant}: sequence {seq.serial}, expires {seq.expires}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from sealstore.vault.lifecycle import gc

    deleted = gc(_open(args), tenant=args.tenant, grace=args.grace)
    _say(args, f"deleted {len(deleted)} unreferenced object(s)")
    return 0


def _push(args: argparse.Namespace) -> int:
    from sealstore.vault.push import collect_files

    if args.path == "-":
        # A version's files need names and sizes up front; stdin has neither.
        # Never fall back to a folder that happens to be called "-".
        raise ValueError("push does not read stdin: name a file or folder (./- for one named -)")
    if not args.keys and not args.dek_from:
        raise ValueError("push needs at least one key: -k URI (e.g. -k local:)")
    if args.threads < 1:
        raise ValueError("--threads must be at least 1")
    bom = args.bom
    if args.dataset:
        from sealstore.vault.bom import BomSpec, check_spec, load_bom_spec

        bom = dataclasses.replace(load_bom_spec(bom) if bom else BomSpec(), kind="dataset")
        check_spec(bom, f"BoM spec {args.bom}" if args.bom else "--dataset")
    store = _open(args)
    outside = args.follow_outside_links
    total = sum(size for _, _, size in collect_files(args.path, follow_outside_links=outside))
    start = time.perf_counter()
    with Progress("push", total, enabled=not args.no_progress and not args.quiet) as bar:
        m = store.push(
            args.path,
            args.ref,
            tenant=args.tenant,
            keys=args.keys,
            dek_from=args.dek_from,
            parent=None if args.no_parent else (args.parent or "auto"),
            bom=bom,
            threads=args.threads,
            progress=bar,
            follow_outside_links=outside,
            sign_key=args.sign_key,
            sign_cert=args.sign_cert,
            require_signature=args.require_signature,
            public_key=args.public_key,
            signature=args.signature,
        )
    took = time.perf_counter() - start
    _say(args, f"pushed {m.name}:{m.version} ({m.tenant}): {len(m.files)} file(s), "
               f"{human_bytes(m.size)} in {took:.2f} s")  # fmt: skip
    print(f"{m.name}:{m.version}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise ValueError("--threads must be at least 1")
    from sealstore.vault.pull import check_destination, served

    # Before the store is even opened: a refused destination costs nothing.
    check_destination(args.output, files=args.file, force=args.force)
    store = _open(args)
    from sealstore.vault.store import default_tenant

    m = served(store, args.ref, args.tenant or default_tenant(), "pull", granted=False)
    total = sum(f.size for f in m.files if not args.file or f.path in args.file)
    start = time.perf_counter()
    with Progress("pull", total, enabled=not args.no_progress and not args.quiet) as bar:
        m = store.pull(
            args.ref,  # resolved again inside, with the tag's manifest-hash check
            args.output,
            tenant=args.tenant,
            identities=args.identity,
            threads=args.threads,
            progress=bar,
            files=args.file,
            force=args.force,
            signature=args.signature,
        )
    took = time.perf_counter() - start
    where = "stdout" if args.output == "-" else args.output
    _say(args, f"pulled {m.name}:{m.version} into {where}: "
               f"{human_bytes(total)} in {took:.2f} s, every file verified")  # fmt: skip
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
            rows.append({
                "name": name,
                "versions": versions,
                "tags": {t: v for t, v in tags.items() if checked.get(t) is None},
                "damaged_tags": sorted(t for t, p in checked.items() if p is not None),
            })  # fmt: skip
        if args.json:
            print(json.dumps(rows, indent=2))
        for row in [] if args.json else rows:
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
    if args.json:
        print(json.dumps(out, indent=2))
    for row in [] if args.json else out:
        if "tag" in row:
            print(f"{args.name}@{row['tag']}\tDAMAGED\t{row['damaged']}")
        elif "damaged" in row:
            print(f"{args.name}:{row['version']}\tDAMAGED\t{row['damaged']}")
        else:
            state = f"SHREDDED {row['shredded']}" if row["shredded"] else human_bytes(row["size"])
            tagtext = " ".join(row["tags"])
            print(f"{args.name}:{row['version']}\t{row['created']}\t{row['files']} file(s)\t"
                  f"{state}\t{tagtext}".rstrip())  # fmt: skip
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
    if args.json:
        print(json.dumps(body, indent=2))
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
    _say(args, f"tagged {parse_ref(args.ref).name}:{version} as {args.tag}")
    return 0


def _confirm_shred(store: Any, args: argparse.Namespace) -> str:
    """Ask before an irreversible shred; refuse without a terminal unless --yes.

    Returns:
        What else goes with the version (its tags), for the final message.

    Raises:
        ValueError: no terminal and no --yes, or the answer was not yes.
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
        return goes
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
    return goes


def _rm(args: argparse.Namespace) -> int:
    store = _open(args)
    goes = _confirm_shred(store, args)
    tomb = store.shred(args.ref, tenant=args.tenant)
    _say(
        args,
        f"shredded {tomb.name}:{tomb.version}: key slots destroyed, {len(tomb.files)} "
        f"object(s) deleted{goes}; the data can no longer be decrypted",
    )
    return 0


def _bom_show(args: argparse.Namespace) -> int:
    from sealstore.vault.bom import summarize

    data = _open(args).bom(args.ref, tenant=args.tenant)
    s = summarize(json.loads(data))
    print(f"{s['kind']:<9} {s['model']}")
    print(f"parent    {', '.join(s['parent']) or '-'}")
    print(f"datasets  {', '.join(s['datasets']) or '-'}")
    print(f"task      {s['task'] or '-'}")
    for k, v in s["training"].items():
        print(f"training  {k} = {v}")
    for name, digest in s["files"]:
        print(f"  {name}\tsha256:{digest}")
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
    _say(args, f"wrote {args.output}")
    return 0


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
    with Progress("verify", None, enabled=not args.no_progress and not args.quiet) as bar:
        results = store.verify(
            args.file,
            tenant=tenant,
            identities=args.identity,
            threads=args.threads,
            decrypt=not args.keyless,
            progress=bar,
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
            _say(args, f"{r.ref}: OK ({r.files} file(s), {human_bytes(r.bytes)})")
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
    for ref, p in damage:
        where = "" if p.startswith(ref.split(" ")[0].split("@")[0]) else f"{ref}: "
        print(f"sealstore: error: {where}{p}", file=sys.stderr)
    for ref, p in unchecked:
        print(f"sealstore: not checked: {ref}: {p}", file=sys.stderr)
    took = time.perf_counter() - start
    bad = len({ref for ref, _ in damage})
    _say(
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
