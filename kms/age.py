"""``age1...`` recipients -- data keys wrapped for age users (https://age-encryption.org).

An age user gives a recipient (``age1...`` from ``age-keygen``, or an SSH
public key as ``age:ssh-ed25519 AAAA...``) and keeps the identity file; the
slot is a genuine age file, made and opened by ``pyrage`` (the Rust ``age``
crate), so ``age -d -i key.txt`` opens it too. age has no associated data, so,
as for ``x25519:`` slots, the age file holds ``DEK || SHA-256(label ||
canonical_json(context))`` and unwrapping checks the hash: a slot opens only
under the context it was made for.

Plugin recipients (``age1yubikey1...``) need their plugin binary and post-
quantum ``age1pq1...`` recipients are not in pyrage 1.4: both are refused
with a clear message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import pyrage
from pyrage import ssh, x25519

from sealstore.errors import AuthenticationError, FormatError, KeyUnavailable
from sealstore.format import canonical_json
from sealstore.keys import DataKey, KeySlot, Refusal
from sealstore.kms.x25519 import dek_from_payload

__all__ = ["AgeIdentity", "AgeRecipient"]

KIND = "age"
_PREFIX = "age:"
_LABEL = b"sealstore/v1/slot/age\x00"
_SECRET = "AGE-SECRET-KEY-1"  # noqa: S105 -- the line prefix of an age identity, not a secret
_SSH_SECRET = "-----BEGIN OPENSSH PRIVATE KEY-----"  # noqa: S105 -- a PEM label
_NO_MATCH = "No matching keys found"  # pyrage's DecryptError when no stanza is ours


def _context_hash(context: Mapping[str, str]) -> bytes:
    return hashlib.sha256(_LABEL + canonical_json(dict(context))).digest()


def _parse_recipient(text: str) -> Any:
    # Bech32: the human-readable part ends at the last "1" ("age" for X25519,
    # "age1pq" for post-quantum, "age1NAME" for plugins).
    hrp = text.rsplit("1", 1)[0] if text.startswith("age1") else ""
    try:
        if text.startswith(("ssh-ed25519 ", "ssh-rsa ")):
            return ssh.Recipient.from_str(text)
        if hrp == "age":
            return x25519.Recipient.from_str(text)
    except pyrage.RecipientError as exc:
        raise ValueError(f"not a valid age recipient ({exc})") from None
    if hrp == "age1pq":
        raise ValueError("post-quantum age1pq recipients are not supported (pyrage 1.4 lacks them)")
    if hrp.startswith("age1"):
        raise ValueError(f"age plugin recipients ({hrp}1...) need their plugin: not supported")
    raise ValueError("not an age X25519 recipient (age1...) or SSH key (ssh-ed25519/ssh-rsa)")


class AgeRecipient:
    """Wraps data keys to one age recipient."""

    def __init__(self, recipient: str) -> None:
        text = " ".join(recipient.split())
        self._recipient = _parse_recipient(text)
        self.key_id = _PREFIX + text

    @classmethod
    def from_uri(cls, uri: str) -> AgeRecipient:
        """Parse ``age1...``, ``age:age1...`` or ``age:ssh-ed25519 AAAA...``.

        Raises:
            ValueError: not a recipient this provider can wrap to.
        """
        text = uri[len(_PREFIX) :] if uri.startswith(_PREFIX) else uri
        if not text.startswith(("age1", "ssh-")):
            raise ValueError(f"not an age recipient: {uri!r}")
        return cls(text)

    @classmethod
    def unwrapper_for_slot(cls, slot: KeySlot) -> Refusal:
        return Refusal("needs the age identity file of this recipient (pass -i FILE)")

    def wrap(self, dek: DataKey, context: Mapping[str, str]) -> KeySlot:
        blob = pyrage.encrypt(dek.material() + _context_hash(context), [self._recipient])
        return KeySlot(KIND, self.key_id, bytes(blob))

    def __repr__(self) -> str:
        return f"AgeRecipient({self.key_id!r})"

    @staticmethod
    def identity_from_text(text: str, *, source: str = "identity") -> AgeIdentity:
        return AgeIdentity.from_text(text, source=source)


class AgeIdentity:
    """The secret half: one or more age identities from one file."""

    __slots__ = ("_identities", "_ssh", "recipients", "source")

    def __init__(self, identities: list[Any], recipients: set[str], ssh_keys: bool, source: str):
        self._identities = identities
        self.recipients = recipients
        self._ssh = ssh_keys
        self.source = source

    @classmethod
    def from_text(cls, text: str, *, source: str = "identity") -> AgeIdentity:
        """Parse an age identity file (``AGE-SECRET-KEY-1...`` lines) or an OpenSSH key.

        Raises:
            FormatError: no identity in it, or a malformed one (never the key itself).
        """
        if _SSH_SECRET in text:
            try:
                ident = ssh.Identity.from_buffer(text.encode())
            except (pyrage.IdentityError, ValueError):
                raise FormatError(
                    f"{source}: not a usable OpenSSH private key (an encrypted one is not "
                    "supported: remove its passphrase or use an age identity)"
                ) from None
            return cls([ident], set(), True, source)
        idents, recipients = [], set()
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line.startswith(_SECRET):
                continue
            try:
                ident = x25519.Identity.from_str(line)
            except pyrage.IdentityError:
                raise FormatError(f"{source}: line {number} is a malformed age identity") from None
            idents.append(ident)
            recipients.add(_PREFIX + str(ident.to_public()))
        if not idents:
            raise FormatError(f"{source} holds no age identity")
        return cls(idents, recipients, False, source)

    def can_unwrap(self, slot: KeySlot) -> bool:
        if slot.kind != KIND:
            return False
        if self._ssh:
            return slot.key_id.startswith(_PREFIX + "ssh-")
        return slot.key_id in self.recipients

    def unwrap(self, slot: KeySlot, context: Mapping[str, str]) -> DataKey:
        """Open an age slot made for one of this file's identities.

        Raises:
            KeyUnavailable: the slot is for another recipient.
            AuthenticationError: the slot names this identity but does not open,
                or was made under another encryption context.
        """
        if not self.can_unwrap(slot):
            raise KeyUnavailable(f"slot is not for an identity in {self.source}")
        try:
            payload = pyrage.decrypt(slot.blob, self._identities)
        except pyrage.DecryptError as exc:
            if self._ssh and _NO_MATCH in str(exc):
                raise KeyUnavailable(f"slot is not for the SSH key in {self.source}") from None
            raise AuthenticationError(
                f"slot names {self.source}'s age recipient but does not open with it (altered)"
            ) from None
        return dek_from_payload(payload, _context_hash(context))

    def __repr__(self) -> str:
        return f"AgeIdentity(source={self.source!r})"

    def __reduce__(self) -> Any:
        raise TypeError("identities cannot be pickled")
