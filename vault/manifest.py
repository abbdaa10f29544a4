"""Signed documents of the store: the store config, version manifests, tags.

Each is written as a DSSE envelope over its canonical JSON, signed with
Ed25519 under a payload type of its own (``sealstore.signing``). A manifest
names where it belongs (store id, tenant, artifact, version) inside the
signed body, so a valid manifest moved to another name, tenant or store is
refused, not just an edited one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sealstore.errors import AuthenticationError, FormatError
from sealstore.keys import KeySlot
from sealstore.signing import Signer, sign_document, verify_document
from sealstore.vault.digest import check_digest_text

__all__ = [
    "FileEntry",
    "Manifest",
    "Ref",
    "check_name",
    "parse_ref",
    "version_context",
]

STORE_FORMAT = "sealstore-store-v1"
MANIFEST_FORMAT = "sealstore-manifest-v1"
TAG_FORMAT = "sealstore-tag-v1"
MAX_DOC = 16 << 20

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_name(value: str, what: str) -> str:
    """A tenant, artifact, version or tag name: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``.

    Raises:
        ValueError: anything else (slashes, ``..``, empty, too long).
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"bad {what} {str(value)[:60]!r}: use letters, digits, '.', '_', '-' "
            "(starting with a letter or digit, at most 128)"
        )
    return value


def check_file_path(value: str) -> str:
    """A file path inside an artifact: relative, '/'-separated, no '..' or empty parts."""
    parts = value.split("/") if isinstance(value, str) else [""]
    if (
        not value
        or len(value) > 1024
        or any(p in ("", ".", "..") for p in parts)
        or "\x00" in value
        or "\\" in value
    ):
        raise FormatError(f"bad file path in artifact: {str(value)[:80]!r}")
    return value


@dataclass(frozen=True)
class Ref:
    """``NAME``, ``NAME:VERSION`` or ``NAME@TAG``."""

    name: str
    version: str | None = None
    tag: str | None = None

    def __str__(self) -> str:
        if self.version:
            return f"{self.name}:{self.version}"
        if self.tag:
            return f"{self.name}@{self.tag}"
        return self.name


def parse_ref(text: str) -> Ref:
    """Parse ``NAME[:VERSION|@TAG]``.

    Raises:
        ValueError: a malformed reference.
    """
    if "@" in text:
        name, _, tag = text.partition("@")
        return Ref(check_name(name, "artifact name"), tag=check_name(tag, "tag"))
    name, sep, version = text.partition(":")
    if sep:
        return Ref(check_name(name, "artifact name"), version=check_name(version, "version"))
    return Ref(check_name(name, "artifact name"))


def version_context(tenant: str, name: str, version: str) -> dict[str, str]:
    """The encryption context every key slot of a version is bound to."""
    return {"tenant": tenant, "artifact": name, "version": version}


def loads(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_DOC:
        raise FormatError(f"{what} is too large")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{what} is not a JSON object")
    return doc


def dumps(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


@dataclass(frozen=True)
class FileEntry:
    """One file of an artifact version.

    Attributes:
        path: the file's path inside the artifact ('/'-separated).
        size: plaintext bytes.
        sha256: hex SHA-256 of the plaintext (also in the Model BoM).
        object: the object's name under ``objects/TENANT/``.
        object_size: ciphertext bytes.
        object_digest: ``blake3:HEX`` of the whole sealed object (checked without a
            key; see ``sealstore.vault.digest``).
        header_sha256: hex SHA-256 of the object's header bytes.
        mode: the file's permission bits (``0o777`` at most) when it was
            pushed from disk; None for files pushed from memory and in
            manifests written before modes were recorded. ``pull`` does not
            apply it as is: see :attr:`plaintext_mode`.
    """

    path: str
    size: int
    sha256: str
    object: str
    object_size: int
    object_digest: str
    header_sha256: str
    mode: int | None = None

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        # Absent, not null, when unknown: a manifest signed before modes were
        # recorded keeps exactly its body when it is re-signed (rotate, shred,
        # restore).
        if d["mode"] is None:
            del d["mode"]
        return d

    @property
    def plaintext_mode(self) -> int:
        """The permission bits ``pull`` gives this file's plaintext.

        Owner read and write always; owner execute if the file had any execute
        bit when it was pushed; nothing for group or others, whatever was
        recorded: decrypted model weights stay private to the user who pulled
        them (``chmod`` them afterwards to share). Set with ``fchmod``, so the
        umask neither widens nor narrows it.
        """
        return 0o700 if self.mode is not None and self.mode & 0o111 else 0o600

    @classmethod
    def from_json(cls, d: Any) -> FileEntry:
        optional = ("mode",)
        if not isinstance(d, dict):
            raise FormatError("manifest file entry is malformed")
        try:
            entry = cls(
                **{k: d[k] for k in cls.__dataclass_fields__ if k not in optional},
                **{k: d[k] for k in optional if k in d},
            )
        except (KeyError, TypeError):
            raise FormatError("manifest file entry is malformed") from None
        if "mode" in d and (
            not isinstance(entry.mode, int)
            or isinstance(entry.mode, bool)
            or not 0 <= entry.mode <= 0o777
        ):
            raise FormatError("manifest file entry has a bad mode")
        check_file_path(entry.path)
        if not check_digest_text(entry.object_digest):
            raise FormatError("manifest file entry has a bad object_digest")
        for f in ("sha256", "header_sha256"):
            if not re.fullmatch(r"[0-9a-f]{64}", str(getattr(entry, f))):
                raise FormatError(f"manifest file entry has a bad {f}")
        if not re.fullmatch(r"[0-9a-f]{16,128}", str(entry.object)):
            raise FormatError("manifest file entry has a bad object name")
        for f in ("size", "object_size"):
            v = getattr(entry, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise FormatError(f"manifest file entry has a bad {f}")
        return entry


@dataclass(frozen=True)
class Manifest:
    """A version's signed manifest (the body; ``signer`` is the key whose signature verified)."""

    store: str
    tenant: str
    name: str
    version: str
    created: str
    files: tuple[FileEntry, ...]
    slots: tuple[KeySlot, ...]
    parent: str | None = None
    bom_sha256: str | None = None
    shredded: str | None = None  # the time the version was crypto-shredded
    signer: str | None = None
    # The version's OMS model signature (a Sigstore bundle, JSON text, exactly
    # as verified or made at push; ``sealstore.vault.oms``), if it has one.
    oms: str | None = None

    @property
    def context(self) -> dict[str, str]:
        return version_context(self.tenant, self.name, self.version)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def body(self) -> dict[str, Any]:
        body = {
            "format": MANIFEST_FORMAT,
            "store": self.store,
            "tenant": self.tenant,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "parent": self.parent,
            "context": self.context,
            "files": [f.to_json() for f in self.files],
            "slots": [s.to_json() for s in self.slots],
            "bom_sha256": self.bom_sha256,
            "shredded": self.shredded,
        }
        # Absent, not null, without one: manifests signed before OMS signatures
        # keep exactly their body when re-signed (rotate, shred, restore).
        if self.oms is not None:
            body["oms"] = self.oms
        return body

    def sign(self, signer: Signer) -> bytes:
        return dumps(sign_document("manifest", self.body(), signer))

    @classmethod
    def verify(
        cls,
        data: bytes,
        trusted: Iterable[str],
        *,
        store: str,
        tenant: str,
        name: str,
        version: str,
    ) -> Manifest:
        """Parse and verify a manifest found at tenant/name/version of *store*.

        Raises:
            AuthenticationError: unsigned, untrusted signer, edited, or moved
                (its signed location differs from where it was found).
            FormatError: malformed.
        """
        where = f"manifest of {tenant}/{name}:{version}"
        body = verify_document("manifest", loads(data, where), trusted, what=where)
        if body.get("format") != MANIFEST_FORMAT:
            raise FormatError(f"{where}: unknown format {body.get('format')!r}")
        located = (body.get("store"), body.get("tenant"), body.get("name"), body.get("version"))
        if located != (store, tenant, name, version):
            raise AuthenticationError(
                f"{where} is signed for another location "
                f"({located[1]}/{located[2]}:{located[3]} in store {located[0]})"
            )
        if body.get("context") != version_context(tenant, name, version):
            raise AuthenticationError(f"{where} has a wrong encryption context")
        try:
            files = tuple(FileEntry.from_json(f) for f in body["files"])
            slots = tuple(KeySlot.from_json(s) for s in body["slots"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{where} is malformed: {exc}") from None
        if len({f.path for f in files}) != len(files):
            raise FormatError(f"{where} lists a file twice")
        bom = body.get("bom_sha256")
        if bom is not None and not (isinstance(bom, str) and re.fullmatch(r"[0-9a-f]{64}", bom)):
            raise FormatError(f"{where} has a bad bom_sha256")
        for key in ("parent", "shredded", "created", "oms"):
            if body.get(key) is not None and not isinstance(body.get(key), str):
                raise FormatError(f"{where} has a bad {key}")
        return cls(
            store=store,
            tenant=tenant,
            name=name,
            version=version,
            created=str(body.get("created")),
            files=files,
            slots=slots,
            parent=body.get("parent"),
            bom_sha256=body.get("bom_sha256"),
            shredded=body.get("shredded"),
            signer=body.get("signer"),
            oms=body.get("oms"),
        )


def sign_tag(
    signer: Signer, *, store: str, tenant: str, name: str, tag: str, version: str, digest: str
) -> bytes:
    body = {
        "format": TAG_FORMAT,
        "store": store,
        "tenant": tenant,
        "name": name,
        "tag": tag,
        "version": version,
        "manifest_sha256": digest,
        "created": now(),
    }
    return dumps(sign_document("tag", body, signer))


def verify_tag(
    data: bytes, trusted: Iterable[str], *, store: str, tenant: str, name: str, tag: str
) -> tuple[str, str]:
    """(version, manifest sha256) of a signed tag found at tenant/name@tag.

    Raises:
        AuthenticationError: bad signature, or a tag moved from elsewhere.
    """
    where = f"tag {tenant}/{name}@{tag}"
    body = verify_document("tag", loads(data, where), trusted, what=where)
    if (body.get("store"), body.get("tenant"), body.get("name"), body.get("tag")) != (
        store,
        tenant,
        name,
        tag,
    ):
        raise AuthenticationError(f"{where} is signed for another location")
    version, digest = body.get("version"), body.get("manifest_sha256")
    if not isinstance(version, str) or not isinstance(digest, str):
        raise FormatError(f"{where} is malformed")
    return check_name(version, "version"), digest
