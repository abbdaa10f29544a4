"""``tpm:PATH`` -- a key-encryption key sealed to this machine's TPM under a PCR policy.

``PATH`` is a small JSON file (``sealstore tpm seal`` writes it): the sealed
KEK's public and private blobs, the PCR selection and the policy digest. The
file is not secret -- its private blob is encrypted by the TPM's storage key
and opens only on this TPM, and only while the chosen PCRs hold the values
the policy was made for (the measured boot state: firmware, boot loader,
kernel, whatever was extended into them).

Each wrap or unwrap unseals the KEK (~10 ms on swtpm), uses it for one
AES-256-GCM operation and wipes it. The slot's AAD binds the KEK file's id
and the encryption context, as the local keyring's does. When the PCRs have
changed, the TPM refuses and ``KeyReleaseDenied`` names the policy.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealstore.enclave.attestation import tpm
from sealstore.errors import AuthenticationError, FormatError, KeyUnavailable, NotFound
from sealstore.format import canonical_json
from sealstore.fsutil import atomic_file
from sealstore.keys import DEK_SIZE, DataKey, KeySlot, Refusal

__all__ = ["TpmKek", "seal_kek", "seal_secret", "unseal_secret"]

_TYPE = "sealstore-tpm-kek"
_AAD = b"sealstore/v1/slot/tpm\x00"
_MAX_FILE = 64 * 1024


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def seal_kek(
    path: str | os.PathLike[str],
    policy: tpm.PcrPolicy,
    *,
    expect: Mapping[int, bytes] | None = None,
    tcti: str | None = None,
    overwrite: bool = False,
) -> TpmKek:
    """Make a fresh KEK, seal it to the TPM under *policy*, write the KEK file at *path*.

    Args:
        expect: PCR values to seal to instead of the current ones (a policy for
            the state after an update, computed offline); every PCR of the
            policy needs a value.
        tcti: the TPM (default ``$SEALSTORE_TPM_TCTI``, else ``device:/dev/tpmrm0``).

    Raises:
        FileExistsError: *path* exists and *overwrite* is false.
        BackendError: no TPM, or it refused.
        ValueError: a PCR value of the wrong size or missing.
    """
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"TPM KEK file {p} already exists")
    kek = bytearray(os.urandom(32))
    try:
        with tpm.connect(tcti) as ectx:
            values = dict(expect) if expect is not None else tpm.read_pcrs(ectx, policy)
            digest = policy.digest(values)
            public, private = tpm.seal(ectx, bytes(kek), digest)
    finally:
        kek[:] = bytes(len(kek))
    doc = {
        "type": _TYPE,
        "v": 1,
        "id": os.urandom(16).hex(),
        "pcrs": policy.spec,
        "policy": digest.hex(),
        "public": _b64(public),
        "private": _b64(private),
        "expected_pcrs": {str(k): v.hex() for k, v in sorted(values.items())},
    }
    if tcti:
        doc["tcti"] = tcti
    with atomic_file(p, mode=0o644) as fp:
        fp.write(json.dumps(doc, indent=2).encode() + b"\n")
    return TpmKek.open(p)


def seal_secret(secret: bytes, pcrs: str, tcti: str | None = None) -> dict[str, str]:
    """Seal *secret* to the TPM under the current values of *pcrs*; the fields to store.

    What a local keyring keeps as its ``kdf`` when its sealing key lives in the
    TPM instead of coming from a passphrase (``sealstore keys init --tpm-pcrs``).

    Raises:
        BackendError: no TPM, or it refused.
        ValueError: a malformed PCR list.
    """
    policy = tpm.PcrPolicy.parse(pcrs)
    with tpm.connect(tcti) as ectx:
        digest = policy.digest(tpm.read_pcrs(ectx, policy))
        public, private = tpm.seal(ectx, secret, digest)
    doc = {
        "pcrs": policy.spec,
        "policy": digest.hex(),
        "public": _b64(public),
        "private": _b64(private),
    }
    if tcti:
        doc["tcti"] = tcti
    return doc


def unseal_secret(doc: Mapping[str, Any], what: str) -> bytearray:
    """Unseal what :func:`seal_secret` sealed; the caller wipes the result.

    Raises:
        KeyReleaseDenied: the PCRs no longer match (the message names *what* and the policy).
        BackendError: no TPM, or the blobs belong to another TPM.
        FormatError: the fields are damaged.
    """
    try:
        policy = tpm.PcrPolicy.parse(str(doc["pcrs"]))
        public = base64.b64decode(str(doc["public"]), validate=True)
        private = base64.b64decode(str(doc["private"]), validate=True)
    except (KeyError, ValueError) as exc:
        raise FormatError(f"{what}: damaged TPM sealing fields ({exc})") from None
    with tpm.connect(doc.get("tcti")) as ectx:
        return tpm.unseal(ectx, public, private, policy, what=what)


class TpmKek:
    """Wraps and unwraps data keys with a TPM-sealed KEK (see the module doc)."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path = path
        self.key_id = f"tpm:{path}"
        self.id = doc["id"]
        self.policy = tpm.PcrPolicy.parse(doc["pcrs"])
        self.policy_digest = doc["policy"]
        self._public = base64.b64decode(doc["public"])
        self._private = base64.b64decode(doc["private"])
        self._tcti = doc.get("tcti")

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> TpmKek:
        """Read a KEK file.

        Raises:
            NotFound: no such file.
            FormatError: not a sealstore TPM KEK file.
        """
        p = Path(path).absolute()
        # A slot's key_id is not authenticated and may name any path: only a
        # small regular file is ever read (never a FIFO or a device).
        if p.exists() and (not p.is_file() or p.stat().st_size > _MAX_FILE):
            raise FormatError(f"{p} is not a sealstore TPM KEK file")
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise NotFound(f"TPM KEK file {p} does not exist") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise FormatError(f"cannot read TPM KEK file {p}: {exc.__class__.__name__}") from None
        need = ("id", "pcrs", "policy", "public", "private")
        if not isinstance(doc, dict) or doc.get("type") != _TYPE or any(k not in doc for k in need):
            raise FormatError(f"{p} is not a sealstore TPM KEK file")
        try:
            return cls(p, doc)
        except (ValueError, TypeError) as exc:
            raise FormatError(f"TPM KEK file {p} is damaged: {exc}") from None

    @classmethod
    def from_uri(cls, uri: str, **_: Any) -> TpmKek:
        """``tpm:PATH``."""
        path = uri.partition(":")[2]
        if not path:
            raise ValueError("a tpm: key URI names its KEK file: tpm:PATH")
        return cls.open(path)

    @classmethod
    def unwrapper_for_slot(cls, slot: KeySlot) -> TpmKek | Refusal:
        try:
            kek = cls.from_uri(slot.key_id)
        except (NotFound, FormatError, ValueError) as exc:
            return Refusal(str(exc))
        if slot.params.get("kek") != kek.id:
            return Refusal(f"{kek.path} is another TPM KEK than the one this slot names")
        return kek

    def _aad(self, context: Mapping[str, str]) -> bytes:
        return _AAD + self.id.encode() + b"\x00" + canonical_json(dict(context))

    def _unseal(self) -> bytearray:
        with tpm.connect(self._tcti) as ectx:
            return tpm.unseal(
                ectx, self._public, self._private, self.policy, what=f"KEK {self.path}"
            )

    def wrap(self, dek: DataKey, context: Mapping[str, str]) -> KeySlot:
        """Wrap *dek* under the sealed KEK, bound to *context*.

        Raises:
            KeyReleaseDenied: the PCRs do not match the policy.
            BackendError: no TPM, or this file was sealed on another one.
        """
        kek = self._unseal()
        try:
            nonce = os.urandom(12)
            blob = nonce + AESGCM(bytes(kek)).encrypt(nonce, dek.material(), self._aad(context))
        finally:
            kek[:] = bytes(len(kek))
        return KeySlot("tpm", self.key_id, blob, {"kek": self.id, "pcrs": self.policy.spec})

    def can_unwrap(self, slot: KeySlot) -> bool:
        return slot.kind == "tpm" and slot.params.get("kek") == self.id

    def unwrap(self, slot: KeySlot, context: Mapping[str, str]) -> DataKey:
        """Recover a DEK this KEK wrapped.

        Raises:
            KeyUnavailable: another KEK's slot.
            AuthenticationError: the slot names this KEK but does not open
                under *context*: the slot or the context was changed after
                sealing (an honest slot always opens under its own context;
                the PCR policy was met, so this is no question of the key).
            KeyReleaseDenied: the PCRs do not match the policy.
            BackendError: no TPM, or this file was sealed on another one.
        """
        if not self.can_unwrap(slot):
            raise KeyUnavailable(f"slot was not wrapped by TPM KEK {self.path}")
        kek = self._unseal()
        try:
            dek = AESGCM(bytes(kek)).decrypt(slot.blob[:12], slot.blob[12:], self._aad(context))
        except (InvalidTag, ValueError):
            raise AuthenticationError(
                f"slot of TPM KEK {self.path} does not open under this encryption context "
                "(the context or the slot was changed after sealing)"
            ) from None
        finally:
            kek[:] = bytes(len(kek))
        if len(dek) != DEK_SIZE:
            raise KeyUnavailable("slot holds a key of the wrong size")
        return DataKey(dek)

    def __repr__(self) -> str:
        return f"TpmKek({str(self.path)!r}, pcrs={self.policy.spec!r})"

    def __reduce__(self) -> Any:
        raise TypeError("TPM KEK handles cannot be pickled")
