"""``sealstore keys ...``: keyrings and HPKE / X25519 identities."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from sealstore.cli.commands import command, emit, group, json_mode, say
from sealstore.cli.main import printable
from sealstore.kms.local import LocalKeyring, create_keyring
from sealstore.kms.registry import default_keyring_path, load_identity
from sealstore.kms.x25519 import X25519Identity

__all__ = ["register"]


def register(sub: Any) -> None:
    ksub = group(sub, "keys", "create and list keys")
    init = command(
        ksub,
        "init",
        _init,
        help="create a local keyring (or, with --identity, an HPKE identity file)",
        description="Create a passphrase-protected local keyring holding a fresh KEK. The "
        "passphrase comes from SEALSTORE_PASSPHRASE or a prompt.",
    )
    init.add_argument(
        "--keyring",
        type=Path,
        help="keyring path (default: $SEALSTORE_KEYRING, "
        "$SEALSTORE_HOME/keyring.json or ~/.config/sealstore/keyring.json)",
    )
    init.add_argument(
        "--identity",
        type=Path,
        metavar="FILE",
        help="create an HPKE identity file instead of a keyring",
    )
    init.add_argument(
        "--kem",
        choices=("x25519", "mlkem768x25519"),
        help="with --identity: the HPKE KEM; mlkem768x25519 (ML-KEM-768 + X25519) for escrow "
        "and recovery keys that must outlive a quantum computer (default: x25519)",
    )
    init.add_argument(
        "--insecure-no-passphrase",
        action="store_true",
        help="store the keyring unprotected (throwaway use only)",
    )
    init.add_argument(
        "--tpm-pcrs",
        metavar="LIST",
        help="no passphrase: seal the keyring to this machine's TPM under these PCRs "
        "(e.g. 7,16); it then opens only here, in this measured boot state",
    )
    init.add_argument("--tcti", help="the TPM for --tpm-pcrs (default: $SEALSTORE_TPM_TCTI)")
    init.add_argument(
        "--force",
        action="store_true",
        help="replace an existing file; the old one is kept beside it as FILE.TIME.bak "
        "(a keyring holds the store's root signing key and every KEK: deleting the backup "
        "loses them)",
    )

    lst = command(ksub, "list", _list, help="show a keyring's public facts (no passphrase needed)")
    lst.add_argument("--keyring", type=Path)

    rec = command(
        ksub,
        "recipient",
        _recipient,
        help="print the public recipient of an hpke or x25519 identity file",
    )
    rec.add_argument("identity", type=Path)

    rot = command(
        ksub,
        "rotate",
        _rotate,
        help="re-wrap files' data keys to other keys; the payload bytes stay identical",
        description="Rewrite only the key-slot section of each FILE: add a slot for every "
        "--to key (a key that already has a slot is re-wrapped in place, e.g. to a new "
        "Vault key version), drop the slots of every --remove key.",
    )
    rot.add_argument("files", nargs="+", metavar="FILE")
    rot.add_argument("--to", action="append", default=[], metavar="URI")
    rot.add_argument("--remove", action="append", default=[], metavar="URI")
    rot.add_argument(
        "-i",
        "--identity",
        action="append",
        default=[],
        metavar="FILE",
        help="identity or keyring file to open the current slots with",
    )

    add = command(
        ksub,
        "add-kek",
        _add_kek,
        help="add a fresh KEK to a keyring and make it current (the old ones still unwrap)",
        description="Add a fresh KEK and make it the current one: new slots are wrapped "
        "under it, existing slots still open under the KEK that made them. Move a file's "
        "slot onto it with: sealstore keys rotate FILE --to local:RING.",
    )
    add.add_argument("--keyring", type=Path)

    ret = command(
        ksub,
        "retire",
        _retire,
        help="destroy a KEK of a keyring: slots under it no longer open",
        description="Remove KEK_ID's key from the keyring for good (no backup is kept: it "
        "would hold the KEK). Its id stays listed as retired and is never reused. The current "
        "KEK cannot be retired (add-kek first). Each FILE given is checked first: if one still "
        "has a slot under KEK_ID, nothing is retired unless --force.",
    )
    ret.add_argument("kek_id", metavar="KEK_ID")
    ret.add_argument("files", nargs="*", metavar="FILE", help="sealed files to check first")
    ret.add_argument("--keyring", type=Path)
    ret.add_argument(
        "--force",
        action="store_true",
        help="retire even if a FILE still needs the KEK (it then opens only by another slot)",
    )

    pw = command(
        ksub,
        "passwd",
        _passwd,
        help="change a keyring's passphrase (the old file is kept as FILE.TIME.bak)",
        description="Re-seal the keyring under a new passphrase and a fresh salt. The current "
        "passphrase comes from SEALSTORE_PASSPHRASE or a prompt, the new one from "
        "SEALSTORE_NEW_PASSPHRASE or a prompt (asked twice). The old file is kept beside it "
        "as FILE.TIME.bak, which the OLD passphrase still opens: delete it once the new one "
        "works if the old passphrase leaked. A TPM-sealed keyring has no passphrase.",
    )
    pw.add_argument("--keyring", type=Path)

    rk = command(
        ksub,
        "rekey",
        _rekey,
        help="re-encrypt files under a fresh data key (after a suspected DEK compromise)",
        description="Decrypt each FILE under its current data key and re-encrypt it under a "
        "fresh one, wrapped to the keys its slots name (or to the --to keys), then replace it "
        "atomically and overwrite the old file's bytes with zeros (best effort on "
        "copy-on-write file systems and SSDs). Unlike rotate, the payload changes.",
        threads=1,
    )
    rk.add_argument("files", nargs="+", metavar="FILE")
    rk.add_argument(
        "--to",
        action="append",
        default=[],
        metavar="URI",
        help="wrap the new data key to these keys instead of the current slots' keys",
    )
    rk.add_argument(
        "-i",
        "--identity",
        action="append",
        default=[],
        metavar="FILE",
        help="identity or keyring file to open the current slots with",
    )


def _backup(args: argparse.Namespace, path: Path, what: str) -> str | None:
    """Keep a copy of *path* beside it before --force replaces it (mode 0600).

    A keyring holds the KEKs of every file sealed to it and the store's root
    signing key; an identity, the key of every escrow slot. Replacing one by
    mistake must not lose them.
    """
    if not path.is_file():
        return None  # nothing to keep (and create_keyring refuses what is not a file)
    from datetime import UTC, datetime

    from sealstore.fsutil import atomic_file

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    backup = path.with_name(f"{path.name}.{stamp}.bak")
    n = 1
    while backup.exists():  # two --force runs in one second: never overwrite a backup
        n += 1
        backup = path.with_name(f"{path.name}.{stamp}-{n}.bak")
    with atomic_file(backup, mode=0o600) as fp:
        fp.write(path.read_bytes())
    say(args, f"kept the {what} it replaces as {printable(backup)}")
    return str(backup)


def _init(args: argparse.Namespace) -> int:
    if args.identity is None and args.kem is not None:
        raise ValueError("--kem goes with --identity")
    if args.identity is not None:
        kept = _backup(args, args.identity, "identity") if args.force else None
        from sealstore.kms.hpke import generate_identity

        ident = generate_identity(args.identity, kem=args.kem or "x25519", overwrite=args.force)
        if json_mode(args):
            emit(
                args,
                {
                    "identity": str(args.identity),
                    "recipient": ident.recipient,
                    "replaced_kept_as": kept,
                },
            )
            return 0
        say(args, f"created identity {args.identity} (keep it secret and offline)")
        print(ident.recipient)
        return 0
    path = args.keyring or default_keyring_path()
    if args.insecure_no_passphrase:
        logging.getLogger(__name__).warning("keyring %s is not protected by a passphrase", path)
    import warnings

    kept = _backup(args, path, "keyring") if args.force else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said once above, not twice
        ring = create_keyring(
            path,
            insecure_no_passphrase=args.insecure_no_passphrase,
            overwrite=args.force,
            tpm_pcrs=args.tpm_pcrs,
            tcti=args.tcti,
        )
    if json_mode(args):
        emit(
            args,
            {
                "keyring": str(ring.path),
                "id": ring.id,
                "key_uri": f"local:{ring.path}",
                "signing_key": ring.signing_key_id,
                "replaced_kept_as": kept,
            },
        )
        return 0
    say(args, f"created keyring {ring.path} (id {ring.id})")
    say(args, f"signing key {ring.signing_key_id}")
    print(f"local:{ring.path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    ring = LocalKeyring.open(args.keyring or default_keyring_path())
    info = ring.describe()
    if json_mode(args):
        emit(args, info)
        return 0
    print(f"keyring   {info['path']}")
    print(f"id        {info['id']}")
    how = {"argon2id": "yes (argon2id passphrase)", "tpm": "yes (sealed to this TPM)"}
    print(f"protected {how.get(info['kdf'], 'yes') if info['protected'] else 'NO'}")
    print(f"key uri   local:{info['path']}")
    print(f"signing   {info['signing_key'] or '(none: an old keyring; create a new one to sign)'}")
    for kek in info["keks"]:
        mark = "*" if kek["id"] == info["current"] else ("x" if kek.get("retired") else " ")
        retired = f"  retired {kek['retired']}" if kek.get("retired") else ""
        print(printable(f"  {mark} {kek['id']}  created {kek.get('created')}{retired}"))
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from sealstore.kms.rotate import rotate_file

    done = []
    for path in args.files:
        slots = rotate_file(path, args.to, remove=args.remove, identities=args.identity)
        done.append({"file": path, "slots": [{"kind": s.kind, "key_id": s.key_id} for s in slots]})
        kinds = ", ".join(slot.key_id for slot in slots)
        say(args, printable(f"{path}: {len(slots)} slot(s): {kinds}"))
    if json_mode(args):
        emit(args, {"files": done})
    return 0


def _recipient(args: argparse.Namespace) -> int:
    ident = load_identity(args.identity)
    from sealstore.kms.hpke import HpkeIdentity

    if not isinstance(ident, X25519Identity | HpkeIdentity):
        raise ValueError(f"{args.identity} is not an hpke or x25519 identity")
    if json_mode(args):
        emit(args, {"identity": str(args.identity), "recipient": ident.recipient})
        return 0
    print(ident.recipient)
    return 0


def _ring(args: argparse.Namespace) -> LocalKeyring:
    return LocalKeyring.open(args.keyring or default_keyring_path())


def _add_kek(args: argparse.Namespace) -> int:
    ring = _ring(args)
    kek_id = ring.add_kek()
    if json_mode(args):
        emit(args, {"keyring": str(ring.path), "id": ring.id, "kek": kek_id, "current": kek_id})
        return 0
    say(args, printable(f"keyring {ring.path}: added KEK {kek_id}, now current"))
    return 0


def _slots_under(path: str, ring: LocalKeyring, kek_id: str) -> bool | None:
    """Whether the sealed file *path* has a slot under *kek_id* of *ring* (None: no slots here)."""
    from sealstore.errors import FormatError
    from sealstore.format import read_preamble

    with open(path, "rb") as fp:
        try:
            preamble = read_preamble(fp)
        except FormatError as exc:
            raise type(exc)(printable(f"{path}: {exc}")) from None
    if preamble.slots_size == 0:
        return None
    return any(
        s.kind == "local" and s.params.get("keyring") == ring.id and s.params.get("kek") == kek_id
        for s in preamble.slots
    )


def _retire(args: argparse.Namespace) -> int:
    ring = _ring(args)
    needing: list[str] = []
    unknown: list[str] = []
    for path in args.files:
        uses = _slots_under(path, ring, args.kek_id)
        if uses:
            needing.append(path)
        elif uses is None:
            unknown.append(path)
    for path in unknown:
        say(args, printable(f"{path}: its slots are in a store manifest; not checked"))
    if needing and not args.force:
        raise ValueError(
            printable(
                f"KEK {args.kek_id} still wraps the data key of: {', '.join(needing)} "
                f"(move them first: sealstore keys rotate FILE --to local:{ring.path}; "
                "or --force)"
            )
        )
    ring.retire_kek(args.kek_id)
    if json_mode(args):
        emit(
            args,
            {
                "keyring": str(ring.path),
                "id": ring.id,
                "retired": args.kek_id,
                "current": ring.current,
                "still_needed_by": needing,
                "not_checked": unknown,
            },
        )
        return 0
    say(args, printable(f"keyring {ring.path}: KEK {args.kek_id} retired (destroyed)"))
    for path in needing:
        say(args, printable(f"warning: {path} had a slot under {args.kek_id}; it no longer opens"))
    return 0


def _passwd(args: argparse.Namespace) -> int:
    from sealstore.kms.local import prompt_new_passphrase

    ring = _ring(args)
    if ring.describe()["kdf"] == "tpm":
        raise ValueError(
            printable(f"keyring {ring.path} is sealed to the TPM and has no passphrase")
        )
    kept = ring.change_passphrase(prompt_new_passphrase(ring.path))
    if json_mode(args):
        emit(args, {"keyring": str(ring.path), "id": ring.id, "replaced_kept_as": str(kept)})
        return 0
    say(args, printable(f"keyring {ring.path}: passphrase changed"))
    say(args, printable(f"kept the old keyring as {kept} (it opens with the OLD passphrase)"))
    return 0


def _rekey(args: argparse.Namespace) -> int:
    from sealstore.kms.rekey import rekey_file

    done = []
    for path in args.files:
        slots = rekey_file(path, identities=args.identity, to=args.to, threads=args.threads)
        done.append({"file": path, "slots": [{"kind": s.kind, "key_id": s.key_id} for s in slots]})
        keys = ", ".join(slot.key_id for slot in slots)
        say(args, printable(f"{path}: re-keyed; new data key wrapped to {keys}"))
    if json_mode(args):
        emit(args, {"files": done})
    return 0
