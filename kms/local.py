"""``local:PATH`` -- key-encryption keys in a passphrase-protected keyring file.

The keyring is JSON. Its public part (id, KEK ids, KDF parameters) is in the
clear so ``keys list`` needs no passphrase; the KEKs themselves are sealed
with AES-256-GCM under a key stretched from the passphrase with Argon2id
(PyNaCl / libsodium), and the public part is the AAD, so editing it breaks
the seal. ``--insecure-no-passphrase`` keyrings use an all-zero sealing key:
same format, no protection, a warning on every open. A keyring made with
``tpm_pcrs`` (``sealstore keys init --tpm-pcrs 7,16``) has a random sealing
key sealed to the TPM under those PCRs instead: no passphrase, and it opens
only on this machine in its measured boot state.

A slot made here is ``AES-256-GCM(KEK, nonce, DEK, aad)`` with the AAD naming
the keyring, the KEK and the encryption context, so a slot only opens under
the context it was made for.
"""

from __future__ import annotations

import base64
import getpass
import json
import logging
import os
import stat
import sys
import threading
import uuid
import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealstore.errors import (
    AuthenticationError,
    FormatError,
    KeyUnavailable,
    NotFound,
    SealstoreError,
)
from sealstore.format import canonical_json
from sealstore.fsutil import atomic_file
from sealstore.keys import DEK_SIZE, DataKey, KeySlot, Refusal

__all__ = ["LocalKeyring", "create_keyring", "prompt_new_passphrase"]

log = logging.getLogger(__name__)

FORMAT = "sealstore-keyring-v1"
PASSPHRASE_ENV = "SEALSTORE_PASSPHRASE"  # noqa: S105 -- a variable name, not a secret
NEW_PASSPHRASE_ENV = "SEALSTORE_NEW_PASSPHRASE"  # noqa: S105 -- a variable name
_SLOT_AAD = b"sealstore/v1/slot/local\x00"
_ZERO_KEY = bytes(32)
_MAX_KEYRING_SIZE = 1 << 20
# The Ed25519 signing seed shares the sealed secret with the KEKs under a name
# no KEK can have ("!" is never a KEK id), so a slot can never select it.
_SIGNING = "!sign"


def _signing_key_id(seed: bytes) -> str:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from sealstore.signing import key_id_for

    pub = Ed25519PrivateKey.from_private_bytes(seed).public_key()
    return key_id_for(pub.public_bytes(Encoding.Raw, PublicFormat.Raw))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


# The TPM code lives on the enclave/ floor: named here by path only, as the
# registry names key providers, so kms/ never imports it.
_TPM_SEALER = "sealstore.enclave.attestation.tpm_kek"


def _tpm_sealer() -> Any:
    import importlib

    try:
        return importlib.import_module(_TPM_SEALER)
    except ImportError as exc:
        raise KeyUnavailable(
            f'a TPM-sealed keyring needs TPM support ({exc}): pip install "sealstore[tpm]"'
        ) from None


def _argon2id(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    from nacl import pwhash

    return bytes(
        pwhash.argon2id.kdf(
            32, passphrase.encode("utf-8"), salt, opslimit=opslimit, memlimit=memlimit
        )
    )


def _prompt(path: Path, *, confirm: bool) -> str:
    env = os.environ.get(PASSPHRASE_ENV)
    if env is not None:
        return env
    if not sys.stdin.isatty():
        raise KeyUnavailable(
            f"keyring {path} is passphrase-protected: set {PASSPHRASE_ENV} or run in a terminal"
        )
    first = getpass.getpass(f"Passphrase for keyring {path}: ")
    if confirm and getpass.getpass("Repeat passphrase: ") != first:
        raise ValueError("passphrases do not match")
    return first


def _keep_backup(path: Path) -> Path:
    """Copy *path* beside itself as ``FILE.TIME.bak`` (mode 0600), never over another."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    backup = path.with_name(f"{path.name}.{stamp}.bak")
    n = 1
    while backup.exists():
        n += 1
        backup = path.with_name(f"{path.name}.{stamp}-{n}.bak")
    with atomic_file(backup, mode=0o600) as fp:
        fp.write(path.read_bytes())
    return backup


def prompt_new_passphrase(path: Path) -> str:
    """A new passphrase: ``SEALSTORE_NEW_PASSPHRASE``, or asked twice on a terminal."""
    env = os.environ.get(NEW_PASSPHRASE_ENV)
    if env is not None:
        return env
    if not sys.stdin.isatty():
        raise KeyUnavailable(
            f"a new passphrase for keyring {path}: set {NEW_PASSPHRASE_ENV} or run in a terminal"
        )
    first = getpass.getpass(f"New passphrase for keyring {path}: ")
    if getpass.getpass("Repeat new passphrase: ") != first:
        raise ValueError("passphrases do not match")
    return first


def create_keyring(
    path: str | os.PathLike[str],
    *,
    passphrase: str | None = None,
    insecure_no_passphrase: bool = False,
    overwrite: bool = False,
    opslimit: int | None = None,
    memlimit: int | None = None,
    tpm_pcrs: str | None = None,
    tcti: str | None = None,
) -> LocalKeyring:
    """Create a keyring file holding one fresh KEK.

    Args:
        path: where to write it (mode 0600).
        passphrase: the passphrase; if None it comes from ``SEALSTORE_PASSPHRASE``
            or a prompt, unless *insecure_no_passphrase*.
        insecure_no_passphrase: store the KEKs unprotected (throwaway use; warns).
        overwrite: replace an existing file.
        opslimit, memlimit: Argon2id cost (default libsodium's "interactive").
        tpm_pcrs: seal the keyring's sealing key to the TPM under these PCRs
            (e.g. ``"7,16"``) instead of deriving it from a passphrase.
        tcti: the TPM for *tpm_pcrs* (default ``$SEALSTORE_TPM_TCTI``).

    Raises:
        FileExistsError: *path* exists and *overwrite* is false.
    """
    from nacl import pwhash

    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"keyring {p} already exists")
    if insecure_no_passphrase and tpm_pcrs:
        raise ValueError("a keyring is either TPM-sealed or unprotected, not both")
    if insecure_no_passphrase:
        warnings.warn(f"keyring {p} is not protected by a passphrase", stacklevel=2)
        kdf: dict[str, Any] = {"alg": "none"}
        seal_key = _ZERO_KEY
    elif tpm_pcrs:
        seal_key = os.urandom(32)
        kdf = {"alg": "tpm", **_tpm_sealer().seal_secret(seal_key, tpm_pcrs, tcti)}
    else:
        if passphrase is None:
            passphrase = _prompt(p, confirm=True)
        if not passphrase:
            raise ValueError("an empty passphrase is not allowed (use --insecure-no-passphrase)")
        ops = opslimit or pwhash.argon2id.OPSLIMIT_INTERACTIVE
        mem = memlimit or pwhash.argon2id.MEMLIMIT_INTERACTIVE
        salt = os.urandom(pwhash.argon2id.SALTBYTES)
        kdf = {"alg": "argon2id", "salt": _b64(salt), "opslimit": ops, "memlimit": mem}
        seal_key = _argon2id(passphrase, salt, ops, mem)
    kek_id = "k1"
    public = {
        "format": FORMAT,
        "id": str(uuid.uuid4()),
        "created": _now(),
        "kdf": kdf,
        "keks": [{"id": kek_id, "created": _now()}],
        "current": kek_id,
    }
    keks = {kek_id: os.urandom(32), _SIGNING: os.urandom(32)}
    public["signing"] = _signing_key_id(keks[_SIGNING])
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(p) as fp:
        fp.write(_seal_document(public, keks, seal_key))
    LocalKeyring._cache.pop(str(p.resolve()), None)
    ring = LocalKeyring.open(p)
    ring._signing = keks.pop(_SIGNING)
    ring._keks = keks
    return ring


def _seal_document(public: dict[str, Any], keks: Mapping[str, bytes], seal_key: bytes) -> bytes:
    nonce = os.urandom(12)
    secret = canonical_json({k: _b64(v) for k, v in keks.items()})
    sealed = nonce + AESGCM(seal_key).encrypt(nonce, secret, canonical_json(public))
    doc = dict(public, sealed=_b64(sealed))
    return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


def _check_document(doc: dict[str, Any]) -> str | None:
    """What is wrong with a keyring document's structure, or None."""
    from nacl import pwhash

    kdf = doc.get("kdf")
    if not isinstance(doc.get("id"), str):
        return "'id' must be a string"
    if not isinstance(kdf, dict) or kdf.get("alg") not in ("none", "argon2id", "tpm"):
        return "'kdf' must name argon2id, tpm or none"
    if kdf["alg"] == "tpm" and not all(
        isinstance(kdf.get(f), str) for f in ("pcrs", "policy", "public", "private")
    ):
        return "bad TPM sealing fields"
    if kdf["alg"] == "argon2id":
        salt = _unb64(kdf.get("salt"))
        if salt is None or len(salt) != pwhash.argon2id.SALTBYTES:
            return "bad Argon2id salt"
        ops, mem = kdf.get("opslimit"), kdf.get("memlimit")
        argon = pwhash.argon2id
        if not (isinstance(ops, int) and argon.OPSLIMIT_MIN <= ops <= argon.OPSLIMIT_MAX):
            return "bad Argon2id opslimit"
        if not (isinstance(mem, int) and argon.MEMLIMIT_MIN <= mem <= argon.MEMLIMIT_MAX):
            return "bad Argon2id memlimit"
    keks = doc.get("keks")
    if not isinstance(keks, list) or not all(
        isinstance(k, dict) and isinstance(k.get("id"), str) for k in keks
    ):
        return "'keks' must be a list of {id, created}"
    current = doc.get("current")
    if not isinstance(current, str) or current not in {k["id"] for k in keks}:
        return "'current' names no KEK"
    if any(not isinstance(k.get("retired", ""), str) for k in keks):
        return "a KEK's 'retired' must be a time"
    if any(k["id"] == current and "retired" in k for k in keks):
        return "the current KEK is retired"
    if any(k["id"].startswith("!") for k in keks):
        return "a KEK id may not start with '!'"
    if "signing" in doc and not (
        isinstance(doc["signing"], str) and doc["signing"].startswith("ed25519:")
    ):
        return "bad 'signing' key id"
    sealed = _unb64(doc.get("sealed"))
    if sealed is None or len(sealed) < 12 + 16:
        return "bad 'sealed' field"
    return None


def _plausible_keyring(path: Path) -> bool:
    try:
        st = path.stat()
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size <= _MAX_KEYRING_SIZE


def _unb64(value: Any) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        return None


class LocalKeyring:
    """A keyring file: a wrapper (with its current KEK) and an unwrapper.

    Opening reads only the public part; the passphrase is asked for (or read
    from ``SEALSTORE_PASSPHRASE``) the first time a KEK is needed, once per
    process.
    """

    _cache: dict[str, LocalKeyring] = {}
    _cache_lock = threading.Lock()

    def __init__(self, path: Path, public: dict[str, Any]) -> None:
        self.path = path
        self._public = public
        self._keks: dict[str, bytes] | None = None
        self._signing: bytes | None = None
        self._sealed = ""
        self._lock = threading.Lock()

    # -- construction -------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> LocalKeyring:
        """Open a keyring file (cached per real path for the life of the process).

        Raises:
            NotFound: no such file.
            FormatError: not a sealstore keyring.
        """
        p = Path(path).expanduser()
        key = str(p.resolve())
        with cls._cache_lock:
            if key in cls._cache:
                return cls._cache[key]
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise NotFound(
                f"keyring {p} does not exist (create it with: sealstore keys init)"
            ) from None
        except (OSError, ValueError) as exc:
            raise FormatError(f"keyring {p} is unreadable: {exc.__class__.__name__}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or "sealed" not in doc:
            raise FormatError(f"{p} is not a sealstore keyring")
        problem = _check_document(doc)
        if problem:
            raise FormatError(f"keyring {p} is damaged: {problem}")
        public = {k: v for k, v in doc.items() if k != "sealed"}
        ring = cls(p, public)
        ring._sealed = doc["sealed"]
        with cls._cache_lock:
            return cls._cache.setdefault(key, ring)

    @classmethod
    def from_uri(cls, uri: str) -> LocalKeyring:
        """``local:PATH``; ``local:`` alone is the default keyring."""
        return cls.open(cls.uri_path(uri))

    @staticmethod
    def uri_path(uri: str) -> Path:
        """The keyring file a ``local:`` URI names (``local:`` alone: the default keyring)."""
        from sealstore.kms.registry import default_keyring_path

        path = uri.partition(":")[2]
        return Path(path).expanduser() if path else default_keyring_path()

    @classmethod
    def names_slot(cls, uri: str, slot: KeySlot) -> bool:
        """Whether the key *uri* names is the keyring that made *slot*.

        ``local:``, ``local:~/ring.json`` and ``local:/home/me/ring.json`` can
        all name one keyring; the slot records the path it was made with and
        the keyring's id. Same file (after resolving), or a keyring at *uri*
        whose id is the slot's: it is that keyring.
        """
        if slot.kind != "local":
            return False
        target = cls.uri_path(uri)
        recorded = slot.key_id.partition(":")[2]
        try:
            if recorded and Path(recorded).expanduser().resolve() == target.resolve():
                return True
        except (OSError, RuntimeError):
            pass
        if not _plausible_keyring(target):
            return False
        try:
            return cls.open(target).id == slot.params.get("keyring")
        except SealstoreError:
            return False

    @classmethod
    def unwrapper_for_slot(cls, slot: KeySlot) -> LocalKeyring | Refusal | None:
        """The keyring a slot names, if it exists here; else the default keyring."""
        from sealstore.kms.registry import default_keyring_path

        # The slot section is not authenticated: its key_id may name any path.
        # Only a regular file of keyring size is ever opened (never a FIFO or a
        # device), and a file that is not this slot's keyring is skipped.
        want = slot.params.get("keyring")
        path = slot.key_id.partition(":")[2]
        problem = None
        missing: list[str] = []
        for candidate in (Path(path) if path else None, default_keyring_path()):
            if candidate is None:
                continue
            if not _plausible_keyring(candidate):
                if not candidate.exists() and str(candidate) not in missing:
                    missing.append(str(candidate))
                continue
            try:
                ring = cls.open(candidate)
            except SealstoreError as exc:
                problem = problem or str(exc)
                continue
            if ring.id == want:
                return ring
        if problem:
            return Refusal(problem)
        if missing:
            # Say which file was looked for: "no provider" would hide a typo'd
            # SEALSTORE_KEYRING or a keyring left on another machine.
            return Refusal(f"keyring {' nor '.join(missing)} does not exist")
        return None

    # -- public metadata -----------------------------------------------------------

    @property
    def id(self) -> str:
        return str(self._public["id"])

    @property
    def key_id(self) -> str:
        return f"local:{self.path}"

    @property
    def current(self) -> str:
        return str(self._public["current"])

    @property
    def protected(self) -> bool:
        return self._public["kdf"].get("alg") != "none"

    @property
    def signing_key_id(self) -> str | None:
        """The public Ed25519 key id (``ed25519:...``) manifests are signed with, if any."""
        value = self._public.get("signing")
        return str(value) if value is not None else None

    def sign(self, message: bytes) -> bytes:
        """An Ed25519 signature with the keyring's signing key (unlocks the keyring).

        Raises:
            KeyUnavailable: the keyring has no signing key (made before there
                were any: create a new one), or it cannot be unlocked.
        """
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._unlock()
        if self._signing is None:
            raise KeyUnavailable(
                f"keyring {self.path} has no signing key (create a new keyring with "
                "sealstore keys init)"
            )
        return Ed25519PrivateKey.from_private_bytes(self._signing).sign(message)

    def describe(self) -> dict[str, Any]:
        """Public facts about the keyring (no key material)."""
        return {
            "path": str(self.path),
            "id": self.id,
            "signing_key": self.signing_key_id,
            "created": self._public.get("created"),
            "protected": self.protected,
            "kdf": self._public["kdf"].get("alg"),
            "current": self.current,
            "keks": list(self._public["keks"]),
        }

    def __repr__(self) -> str:
        return f"LocalKeyring(path={str(self.path)!r}, id={self.id!r})"

    def __reduce__(self) -> Any:
        raise TypeError("keyrings cannot be pickled")

    def can_unwrap(self, slot: KeySlot) -> bool:
        return slot.kind == "local" and slot.params.get("keyring") == self.id

    # -- secrets -------------------------------------------------------------------

    def _seal_key(self) -> bytes:
        """The key the KEK table is sealed under (asks for the passphrase if needed)."""
        kdf = self._public["kdf"]
        if kdf.get("alg") == "none":
            log.warning("keyring %s is not protected by a passphrase", self.path)
            return _ZERO_KEY
        if kdf.get("alg") == "argon2id":
            passphrase = _prompt(self.path, confirm=False)
            return _argon2id(
                passphrase,
                base64.b64decode(kdf["salt"]),
                int(kdf["opslimit"]),
                int(kdf["memlimit"]),
            )
        if kdf.get("alg") == "tpm":
            unsealed = _tpm_sealer().unseal_secret(kdf, f"keyring {self.path}")
            seal_key = bytes(unsealed)
            unsealed[:] = bytes(len(unsealed))
            return seal_key
        raise FormatError(f"keyring {self.path}: unknown KDF {kdf.get('alg')!r}")

    def _open_table(self, seal_key: bytes) -> dict[str, bytes]:
        """The sealed table (KEKs and signing seed) opened with *seal_key*."""
        sealed = base64.b64decode(self._sealed)
        try:
            secret = AESGCM(seal_key).decrypt(
                sealed[:12], sealed[12:], canonical_json(self._public)
            )
        except InvalidTag:
            raise KeyUnavailable(
                f"cannot open keyring {self.path}: wrong passphrase or edited file"
            ) from None
        table = {k: base64.b64decode(v) for k, v in json.loads(secret).items()}
        if self.current not in table or any(len(v) != 32 for v in table.values()):
            raise FormatError(f"keyring {self.path} is damaged: bad KEK table")
        return table

    def _unlock(self) -> dict[str, bytes]:
        with self._lock:
            if self._keks is not None:
                return self._keks
            keks = self._open_table(self._seal_key())
            signing = keks.pop(_SIGNING, None)
            if (signing is None) != (self.signing_key_id is None) or (
                signing is not None and _signing_key_id(signing) != self.signing_key_id
            ):
                raise FormatError(f"keyring {self.path} is damaged: signing key mismatch")
            self._signing = signing
            self._keks = keks
            return keks

    # -- management ----------------------------------------------------------------

    def retired(self, kek_id: str) -> str | None:
        """When KEK *kek_id* was retired, or None if it was not (or does not exist)."""
        for kek in self._public["keks"]:
            if kek["id"] == kek_id and kek.get("retired") is not None:
                return str(kek["retired"])
        return None

    def _reload(self) -> None:
        """Re-read the file: another process may have changed it since it was opened."""
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FormatError(
                f"keyring {self.path} is unreadable: {exc.__class__.__name__}"
            ) from None
        problem = (
            "not a sealstore keyring"
            if not isinstance(doc, dict) or doc.get("format") != FORMAT
            else _check_document(doc)
        )
        if problem:
            raise FormatError(f"keyring {self.path} is damaged: {problem}")
        public = {k: v for k, v in doc.items() if k != "sealed"}
        if public.get("id") != self.id:
            raise FormatError(f"keyring {self.path} was replaced by another keyring")
        if public != self._public or doc["sealed"] != self._sealed:
            self._public, self._sealed = public, doc["sealed"]
            self._keks = self._signing = None

    def _rewrite(
        self,
        public: dict[str, Any],
        table: dict[str, bytes],
        seal_key: bytes,
        *,
        backup: bool,
    ) -> Path | None:
        """Seal *table* under *seal_key* with *public* and replace the file atomically.

        The new document is opened again before it is written, so a keyring
        that could not be opened is never written. Returns the backup's path.
        """
        data = _seal_document(public, table, seal_key)
        doc = json.loads(data)
        sealed = base64.b64decode(doc["sealed"])
        check = AESGCM(seal_key).decrypt(sealed[:12], sealed[12:], canonical_json(public))
        if json.loads(check) != {k: _b64(v) for k, v in table.items()} or _check_document(doc):
            raise SealstoreError(f"keyring {self.path}: the rewritten keyring does not verify")
        kept = _keep_backup(self.path) if backup else None
        with atomic_file(self.path, mode=0o600) as fp:
            fp.write(data)
        self._public, self._sealed = public, doc["sealed"]
        keks = dict(table)
        self._signing = keks.pop(_SIGNING, None)
        self._keks = keks
        return kept

    def add_kek(self) -> str:
        """Add a fresh KEK and make it current; the old ones stay to unwrap.

        New slots are wrapped under the new KEK; ``keys rotate FILE --to
        local:RING`` moves a file's slot onto it. Returns the new KEK id
        (``k<n>``, never the id of a KEK retired before).
        """
        with self._lock:
            self._reload()
            seal_key = self._seal_key()
            table = self._open_table(seal_key)
            used = [str(k["id"]) for k in self._public["keks"]]
            numbers = [int(i[1:]) for i in used if i[:1] == "k" and i[1:].isdigit()]
            kek_id = f"k{max(numbers, default=0) + 1}"
            while kek_id in used:  # hand-made ids: never reuse one
                kek_id = f"k{int(kek_id[1:]) + 1}"
            table[kek_id] = os.urandom(32)
            public = dict(self._public)
            public["keks"] = [*self._public["keks"], {"id": kek_id, "created": _now()}]
            public["current"] = kek_id
            self._rewrite(public, table, seal_key, backup=False)
            return kek_id

    def retire_kek(self, kek_id: str) -> None:
        """Destroy KEK *kek_id*: its key leaves the sealed table for good.

        Its entry stays in the public list, marked ``retired``, so its id is
        never reused and a slot under it is refused by name. No backup is
        kept (it would hold the KEK this destroys). The process-wide DEK
        cache, if any, is emptied: it may hold keys unwrapped under the KEK.

        Raises:
            ValueError: no such KEK, already retired, or the current KEK
                (add a new one first: there must always be one to wrap with).
        """
        with self._lock:
            self._reload()
            ids = [str(k["id"]) for k in self._public["keks"]]
            if kek_id not in ids:
                raise ValueError(f"keyring {self.path} has no KEK {kek_id!r}")
            when = self.retired(kek_id)
            if when is not None:
                raise ValueError(f"KEK {kek_id!r} was already retired on {when}")
            if kek_id == self.current:
                raise ValueError(
                    f"KEK {kek_id!r} is the current KEK of keyring {self.path}: add a new one "
                    "first (sealstore keys add-kek)"
                )
            seal_key = self._seal_key()
            table = self._open_table(seal_key)
            table.pop(kek_id, None)
            public = dict(self._public)
            public["keks"] = [
                dict(k, retired=_now()) if k["id"] == kek_id else k for k in self._public["keks"]
            ]
            self._rewrite(public, table, seal_key, backup=False)
        # DEKs unwrapped under the KEK may sit in the process-wide DEK cache:
        # it cannot tell which, so it forgets them all (fail closed).
        from sealstore.kms import envelope

        if envelope._default_cache is not None:
            envelope._default_cache.clear()

    def change_passphrase(
        self,
        new_passphrase: str,
        *,
        opslimit: int | None = None,
        memlimit: int | None = None,
    ) -> Path:
        """Re-seal the keyring under *new_passphrase* (fresh salt); returns the backup's path.

        The old file is kept beside it as ``FILE.TIME.bak`` (mode 0600), as
        ``keys init --force`` does: it still opens with the old passphrase.
        An unprotected keyring gains a passphrase.

        Raises:
            ValueError: an empty passphrase, or a TPM-sealed keyring (it has none).
            KeyUnavailable: the current passphrase is wrong.
        """
        from nacl import pwhash

        if not new_passphrase:
            raise ValueError("an empty passphrase is not allowed")
        with self._lock:
            self._reload()
            kdf = self._public["kdf"]
            if kdf.get("alg") == "tpm":
                raise ValueError(f"keyring {self.path} is sealed to the TPM and has no passphrase")
            seal_key = self._seal_key()
            table = self._open_table(seal_key)
            argon = kdf.get("alg") == "argon2id"
            ops = opslimit or (kdf["opslimit"] if argon else pwhash.argon2id.OPSLIMIT_INTERACTIVE)
            mem = memlimit or (kdf["memlimit"] if argon else pwhash.argon2id.MEMLIMIT_INTERACTIVE)
            salt = os.urandom(pwhash.argon2id.SALTBYTES)
            public = dict(self._public)
            public["kdf"] = {
                "alg": "argon2id",
                "salt": _b64(salt),
                "opslimit": ops,
                "memlimit": mem,
            }
            new_key = _argon2id(new_passphrase, salt, ops, mem)
            kept = self._rewrite(public, table, new_key, backup=True)
            assert kept is not None
            return kept

    def _aad(self, kek_id: str, context: Mapping[str, str]) -> bytes:
        return b"".join(
            (
                _SLOT_AAD,
                self.id.encode(),
                b"\x00",
                kek_id.encode(),
                b"\x00",
                canonical_json(dict(context)),
            )
        )

    def wrap(self, dek: DataKey, context: Mapping[str, str]) -> KeySlot:
        """Wrap *dek* under the current KEK, bound to *context*."""
        kek_id = self.current
        kek = self._unlock()[kek_id]
        nonce = os.urandom(12)
        blob = nonce + AESGCM(kek).encrypt(nonce, dek.material(), self._aad(kek_id, context))
        return KeySlot("local", self.key_id, blob, {"keyring": self.id, "kek": kek_id})

    def unwrap(self, slot: KeySlot, context: Mapping[str, str]) -> DataKey:
        """Recover the DEK from a slot this keyring made.

        Raises:
            KeyUnavailable: another keyring's slot, an unknown KEK or a wrong passphrase.
            AuthenticationError: the slot names this keyring and one of its KEKs
                but does not open under *context*: the slot or the context was
                changed after sealing (an honest slot always opens under the
                context it was made for).
        """
        if not self.can_unwrap(slot):
            raise KeyUnavailable(f"slot was not made by keyring {self.path}")
        kek_id = str(slot.params.get("kek", ""))
        retired = self.retired(kek_id)
        if retired is not None:
            raise KeyUnavailable(
                f"keyring {self.path}: KEK {kek_id!r} was retired on {retired} and no longer "
                "unwraps (a file still sealed to it needs another slot, or a backup of the keyring)"
            )
        keks = self._unlock()
        if kek_id not in keks:
            raise KeyUnavailable(f"keyring {self.path} has no KEK {kek_id!r}")
        blob = slot.blob
        try:
            dek = AESGCM(keks[kek_id]).decrypt(blob[:12], blob[12:], self._aad(kek_id, context))
        except (InvalidTag, ValueError):
            raise AuthenticationError(
                f"slot of keyring {self.path} does not open under this encryption context "
                "(the context or the slot was changed after sealing)"
            ) from None
        if len(dek) != DEK_SIZE:
            raise KeyUnavailable("slot holds a key of the wrong size")
        return DataKey(dek)
