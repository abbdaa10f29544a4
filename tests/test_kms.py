"""Key providers, the registry, slots and unwrapping, and the envelope file API."""

from __future__ import annotations

import base64
import getpass
import io
import json
import logging
import os
import pickle
import stat
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from sealstore.errors import (
    AuthenticationError,
    FormatError,
    KeyUnavailable,
    NotFound,
)
from sealstore.format import MAGIC, TAG_SIZE, encode_slots, parse_preamble
from sealstore.keys import DataKey, KeySlot, Unwrapper, Wrapper, unwrap_first
from sealstore.kms import registry
from sealstore.kms.envelope import (
    make_slots,
    open_reader,
    open_sealed,
    seal_file,
    seal_stream,
    unseal_file,
    unwrap_dek,
    verify_file,
)
from sealstore.kms.local import LocalKeyring
from sealstore.kms.registry import (
    default_keyring_path,
    get_provider_class,
    known_schemes,
    load_identity,
    register_provider,
    unwrappers_for,
    wrapper_for,
)
from sealstore.kms.x25519 import X25519Identity, X25519Recipient, generate_identity
from sealstore.stream import SealedFile
from tests.conftest import CS, MEMLIMIT, OPSLIMIT, PASSPHRASE, listing, make_keyring

CTX = {"tenant": "t1", "artifact": "model"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def reopen(path: Path) -> LocalKeyring:
    """The keyring opened afresh from disk (locked again)."""
    LocalKeyring._cache.clear()
    return LocalKeyring.open(path)


def seal(data: bytes, keys: list[Any], context: Mapping[str, str] = CTX, **kw: Any) -> bytes:
    out = io.BytesIO()
    seal_stream(io.BytesIO(data), out, keys, context=context, chunk_size=CS, **kw)
    return out.getvalue()


def with_slots(sealed: bytes, slots: tuple[KeySlot, ...]) -> bytes:
    """*sealed* with its slot section replaced (slots are outside the AAD)."""
    pre = parse_preamble(sealed)
    sbytes = encode_slots(slots)
    head = MAGIC + len(pre.header_bytes).to_bytes(4, "little") + pre.header_bytes
    return head + len(sbytes).to_bytes(4, "little") + sbytes + sealed[pre.payload_offset :]


@pytest.fixture
def no_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SEALSTORE_PASSPHRASE and a standard input that is not a terminal."""
    monkeypatch.delenv("SEALSTORE_PASSPHRASE", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO())


# -- local keyrings -----------------------------------------------------------------


def test_create_keyring(keyring_path: Path, tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        ring = make_keyring(keyring_path)
    finally:
        os.umask(old)
    assert mode(keyring_path) == 0o600
    assert ring.path == keyring_path and ring.key_id == f"local:{keyring_path}"
    assert ring.protected and ring.current == "k1"
    doc = json.loads(keyring_path.read_text())
    assert doc["format"] == "sealstore-keyring-v1"
    assert doc["kdf"]["alg"] == "argon2id"
    assert (doc["kdf"]["opslimit"], doc["kdf"]["memlimit"]) == (OPSLIMIT, MEMLIMIT)
    kek = ring._unlock()["k1"]
    text = keyring_path.read_text()
    for form in (kek.hex(), base64.b64encode(kek).decode(), PASSPHRASE):
        assert form not in text
    assert [p.name for p in keyring_path.parent.iterdir()] == ["keyring.json"]


def test_describe_needs_no_passphrase(keyring: LocalKeyring, no_tty: None) -> None:
    ring = reopen(keyring.path)
    info = ring.describe()
    assert info == {
        "path": str(keyring.path),
        "id": keyring.id,
        "created": info["created"],
        "protected": True,
        "kdf": "argon2id",
        "current": "k1",
        "keks": [{"id": "k1", "created": info["keks"][0]["created"]}],
        "signing_key": ring.signing_key_id,
    }
    assert info["created"].endswith("Z")
    assert repr(ring) == f"LocalKeyring(path={str(keyring.path)!r}, id={keyring.id!r})"


def test_open_is_cached_per_real_path(keyring: LocalKeyring, tmp_path: Path) -> None:
    link = tmp_path / "link.json"
    link.symlink_to(keyring.path)
    assert LocalKeyring.open(keyring.path) is LocalKeyring.open(link)
    assert LocalKeyring.from_uri(f"local:{keyring.path}") is LocalKeyring.open(keyring.path)
    assert LocalKeyring.from_uri("local:") is LocalKeyring.open(default_keyring_path())
    assert wrapper_for(f"local:{keyring.path}") is keyring


def test_create_refuses_to_overwrite(keyring: LocalKeyring) -> None:
    with pytest.raises(FileExistsError):
        make_keyring(keyring.path)
    again = make_keyring(keyring.path, overwrite=True)
    assert again.id != keyring.id
    assert LocalKeyring.open(keyring.path) is again


def test_empty_passphrase_refused(keyring_path: Path) -> None:
    with pytest.raises(ValueError):
        make_keyring(keyring_path, passphrase="")
    assert not keyring_path.exists()


def test_passphrase_from_env(
    keyring: LocalKeyring, no_tty: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    dek = DataKey.generate()
    slot = keyring.wrap(dek, CTX)
    monkeypatch.setenv("SEALSTORE_PASSPHRASE", PASSPHRASE)  # no terminal, but the variable
    assert reopen(keyring.path).unwrap(slot, CTX).material() == dek.material()


def test_explicit_passphrase(keyring_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ring = make_keyring(keyring_path, passphrase="other passphrase")
    slot = ring.wrap(DataKey.generate(), CTX)
    with pytest.raises(KeyUnavailable, match="wrong passphrase"):
        reopen(keyring_path).unwrap(slot, CTX)
    monkeypatch.setenv("SEALSTORE_PASSPHRASE", "other passphrase")
    reopen(keyring_path).unwrap(slot, CTX)


def test_wrong_passphrase(keyring: LocalKeyring, monkeypatch: pytest.MonkeyPatch) -> None:
    slot = keyring.wrap(DataKey.generate(), CTX)
    monkeypatch.setenv("SEALSTORE_PASSPHRASE", "not the passphrase")
    ring = reopen(keyring.path)
    with pytest.raises(KeyUnavailable) as info:
        ring.unwrap(slot, CTX)
    assert str(keyring.path) in str(info.value)
    assert "not the passphrase" not in str(info.value)
    with pytest.raises(KeyUnavailable):
        ring.wrap(DataKey.generate(), CTX)


def test_no_passphrase_without_terminal(keyring: LocalKeyring, no_tty: None) -> None:
    slot = keyring.wrap(DataKey.generate(), CTX)
    with pytest.raises(KeyUnavailable, match="SEALSTORE_PASSPHRASE"):
        reopen(keyring.path).unwrap(slot, CTX)
    with pytest.raises(KeyUnavailable, match="SEALSTORE_PASSPHRASE"):
        make_keyring(keyring.path.with_name("new.json"))
    assert not keyring.path.with_name("new.json").exists()


def test_passphrase_prompt_on_a_terminal(
    keyring_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SEALSTORE_PASSPHRASE")
    monkeypatch.setattr(sys, "stdin", type("Tty", (io.StringIO,), {"isatty": lambda s: True})())
    answers = iter(["typed", "typed", "typed"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    ring = make_keyring(keyring_path)  # asks twice
    slot = ring.wrap(DataKey.generate(), {})
    reopen(keyring_path).unwrap(slot, {})  # asks once
    answers = iter(["one", "two"])
    with pytest.raises(ValueError, match="do not match"):
        make_keyring(keyring_path.with_name("other.json"))


def test_insecure_keyring(keyring_path: Path, no_tty: None, caplog: Any) -> None:
    with pytest.warns(UserWarning, match="not protected"):
        ring = make_keyring(keyring_path, insecure_no_passphrase=True)
    assert not ring.protected and mode(keyring_path) == 0o600
    assert json.loads(keyring_path.read_text())["kdf"] == {"alg": "none"}
    dek = DataKey.generate()
    slot = ring.wrap(dek, CTX)
    caplog.set_level(logging.WARNING, logger="sealstore")
    assert reopen(keyring_path).unwrap(slot, CTX).material() == dek.material()
    assert any("not protected" in r.getMessage() for r in caplog.records)


def _edit_public(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


PUBLIC_EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "id": lambda d: d.__setitem__("id", "00000000-0000-0000-0000-000000000000"),
    "created": lambda d: d.__setitem__("created", "2000-01-01T00:00:00Z"),
    "kek created": lambda d: d["keks"][0].__setitem__("created", "2000-01-01T00:00:00Z"),
    "kek added": lambda d: d["keks"].append({"id": "k2", "created": "2000-01-01T00:00:00Z"}),
    "kdf salt": lambda d: d["kdf"].__setitem__("salt", base64.b64encode(b"s" * 16).decode()),
    "kdf opslimit": lambda d: d["kdf"].__setitem__("opslimit", OPSLIMIT + 1),
    "kdf none": lambda d: d.__setitem__("kdf", {"alg": "none"}),
    "extra field": lambda d: d.__setitem__("note", "hello"),
}


@pytest.mark.parametrize("edit", sorted(PUBLIC_EDITS))
def test_edited_public_part(keyring: LocalKeyring, edit: str) -> None:
    slot = keyring.wrap(DataKey.generate(), CTX)
    _edit_public(keyring.path, PUBLIC_EDITS[edit])
    ring = reopen(keyring.path)
    with pytest.raises(KeyUnavailable):
        # Relabel the slot so that it names the (edited) keyring id and reaches the seal.
        ring.unwrap(
            KeySlot("local", slot.key_id, slot.blob, {"keyring": ring.id, "kek": "k1"}), CTX
        )
    with pytest.raises(KeyUnavailable):
        ring.wrap(DataKey.generate(), CTX)


MALFORMED_EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "unknown kdf": lambda d: d["kdf"].__setitem__("alg", "scrypt"),
    "salt not base64": lambda d: d["kdf"].__setitem__("salt", "!!!!"),
    "salt too short": lambda d: d["kdf"].__setitem__("salt", "AAAA"),
    "opslimit not a number": lambda d: d["kdf"].__setitem__("opslimit", "many"),
    "memlimit too small": lambda d: d["kdf"].__setitem__("memlimit", 1),
    "kdf not an object": lambda d: d.__setitem__("kdf", "argon2id"),
    "sealed too short": lambda d: d.__setitem__("sealed", "AAAA"),
    "sealed not a string": lambda d: d.__setitem__("sealed", 5),
    "current names no kek": lambda d: d.__setitem__("current", "k2"),
}


@pytest.mark.parametrize("edit", sorted(MALFORMED_EDITS))
def test_malformed_keyring_is_a_sealstore_error(keyring: LocalKeyring, edit: str) -> None:
    # A damaged keyring must fail as FormatError / KeyUnavailable (CLI exit 3 or 4),
    # not as a raw library exception (a traceback, or exit 2 "usage error").
    _edit_public(keyring.path, MALFORMED_EDITS[edit])
    with pytest.raises((FormatError, KeyUnavailable)):
        reopen(keyring.path).wrap(DataKey.generate(), CTX)


@pytest.mark.parametrize(
    "content", ["", "not json", "[]", '{"format": "other"}', '{"format": "sealstore-keyring-v1"}']
)
def test_not_a_keyring(tmp_path: Path, content: str) -> None:
    path = tmp_path / "ring.json"
    path.write_text(content)
    with pytest.raises(FormatError):
        LocalKeyring.open(path)


def test_missing_keyring(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="keys init"):
        LocalKeyring.open(tmp_path / "nope.json")
    with pytest.raises(NotFound):
        wrapper_for(f"local:{tmp_path / 'nope.json'}")


def test_local_wrap_unwrap(keyring: LocalKeyring, tmp_path: Path) -> None:
    dek = DataKey.generate()
    slot = keyring.wrap(dek, CTX)
    assert (slot.kind, slot.key_id) == ("local", keyring.key_id)
    assert dict(slot.params) == {"keyring": keyring.id, "kek": "k1"}
    assert len(slot.blob) == 12 + 32 + 16
    assert dek.material() not in slot.blob
    assert keyring.can_unwrap(slot)
    with keyring.unwrap(slot, dict(reversed(CTX.items()))) as back:  # order does not matter
        assert back.material() == dek.material()
    other = make_keyring(tmp_path / "other.json")
    assert not other.can_unwrap(slot)
    with pytest.raises(KeyUnavailable, match="not made by"):
        other.unwrap(slot, CTX)
    with pytest.raises(KeyUnavailable, match="no KEK"):
        keyring.unwrap(KeySlot("local", slot.key_id, slot.blob, {**slot.params, "kek": "k9"}), CTX)
    with pytest.raises(TypeError):
        pickle.dumps(keyring)


@pytest.mark.parametrize(
    "context", [{}, {"tenant": "t2", "artifact": "model"}, {**CTX, "extra": ""}, {"tenant": "t1"}]
)
def test_local_context_binding(keyring: LocalKeyring, context: dict[str, str]) -> None:
    slot = keyring.wrap(DataKey.generate(), CTX)
    with pytest.raises(AuthenticationError, match="context"):
        keyring.unwrap(slot, context)


# -- x25519 -------------------------------------------------------------------------


def test_identity_file(identity_path: Path, identity: X25519Identity) -> None:
    assert mode(identity_path) == 0o600
    text = identity_path.read_text()
    assert text.startswith("#") and f"# recipient: {identity.recipient}" in text
    assert identity.recipient.startswith("x25519:")
    assert len(identity.recipient) == len("x25519:") + 43  # base64url, no padding
    secret = bytes(identity._sk)
    assert base64.urlsafe_b64encode(secret).rstrip(b"=").decode() in text
    for shown in (repr(identity), str(identity)):
        assert identity.recipient in shown
        assert secret.hex() not in shown
        assert base64.urlsafe_b64encode(secret).rstrip(b"=").decode() not in shown
    with pytest.raises(TypeError):
        pickle.dumps(identity)
    assert isinstance(load_identity(identity_path), X25519Identity)
    assert load_identity(str(identity_path)).recipient == identity.recipient


def test_identity_file_is_not_overwritten(identity_path: Path) -> None:
    before = identity_path.read_text()
    with pytest.raises(FileExistsError):
        generate_identity(identity_path)
    assert identity_path.read_text() == before
    after = generate_identity(identity_path, overwrite=True)
    assert after.recipient in identity_path.read_text()
    assert mode(identity_path) == 0o600


def test_identity_overwrite_tightens_mode(tmp_path: Path) -> None:
    # Overwriting a world-readable file must not leave the new secret world-readable.
    path = tmp_path / "id.key"
    path.write_text("old")
    path.chmod(0o644)
    generate_identity(path, overwrite=True)
    assert mode(path) == 0o600


def test_generate_identity_in_memory() -> None:
    a, b = generate_identity(), generate_identity()
    assert a.recipient != b.recipient


def test_x25519_round_trip(identity: X25519Identity) -> None:
    recipient = wrapper_for(identity.recipient)
    assert isinstance(recipient, X25519Recipient)
    assert recipient.key_id == identity.recipient
    assert repr(recipient) == f"X25519Recipient({identity.recipient!r})"
    dek = DataKey.generate()
    slot = recipient.wrap(dek, CTX)
    assert (slot.kind, slot.key_id, dict(slot.params)) == ("x25519", identity.recipient, {})
    assert identity.can_unwrap(slot)
    assert identity.unwrap(slot, CTX).material() == dek.material()


@pytest.mark.parametrize("context", [{}, {"tenant": "t2", "artifact": "model"}, {**CTX, "x": "y"}])
def test_x25519_context_binding(identity: X25519Identity, context: dict[str, str]) -> None:
    slot = X25519Recipient.from_uri(identity.recipient).wrap(DataKey.generate(), CTX)
    with pytest.raises(AuthenticationError, match="context"):
        identity.unwrap(slot, context)


def test_x25519_other_identity(identity: X25519Identity) -> None:
    other = generate_identity()
    slot = X25519Recipient.from_uri(identity.recipient).wrap(DataKey.generate(), CTX)
    assert not other.can_unwrap(slot)
    with pytest.raises(KeyUnavailable):
        other.unwrap(slot, CTX)
    # Relabelled for the other identity, the sealed box still does not open:
    # a slot that names this identity yet does not open with it was altered.
    relabelled = KeySlot("x25519", other.recipient, slot.blob)
    with pytest.raises(AuthenticationError):
        other.unwrap(relabelled, CTX)


@pytest.mark.parametrize(
    "uri",
    [
        "x25519:",
        "x25519:abc",
        "x25519:!!!!" + "A" * 39,
        "x25519:" + "A" * 42,
        "x25519:" + "A" * 44,
        "x25519:" + "é" * 43,
        "X25519:" + "A" * 43,
    ],
)
def test_bad_recipient(uri: str) -> None:
    with pytest.raises(ValueError):
        wrapper_for(uri)


def test_low_order_recipient_is_refused() -> None:
    # The all-zero point makes libsodium's sealed box fail with a bare
    # nacl RuntimeError at wrap time; it should be refused as a bad recipient.
    with pytest.raises(ValueError):
        wrapper_for("x25519:" + "A" * 43).wrap(DataKey.generate(), {})


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only a comment\n",
        "SEALSTORE-X25519-IDENTITY:\n",
        "SEALSTORE-X25519-IDENTITY:abc\n",
        "SEALSTORE-X25519-IDENTITY:" + "A" * 44 + "\n",
        "SEALSTORE-X25519-IDENTITY:" + "ü" * 43 + "\n",
        "AGE-SECRET-KEY-1QQQQ\n",
    ],
)
def test_identity_parse_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.key"
    path.write_text(text)
    with pytest.raises(FormatError) as info:
        load_identity(path)
    assert str(path) in str(info.value)


def test_identity_parse_tolerates_comments_and_spaces(identity_path: Path) -> None:
    secret_line = identity_path.read_text().splitlines()[-1]
    text = f"# a comment\n\n   {secret_line}   \n# trailing\n"
    ident = X25519Identity.from_text(text, source="x")
    assert ident.recipient == load_identity(identity_path).recipient  # type: ignore[attr-defined]


def test_load_identity_errors(tmp_path: Path, keyring: LocalKeyring) -> None:
    with pytest.raises(NotFound):
        load_identity(tmp_path / "missing.key")
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(FormatError):
        load_identity(binary)
    with pytest.raises(FormatError):
        load_identity(tmp_path)  # a directory
    assert load_identity(keyring.path) is keyring


# -- the registry -------------------------------------------------------------------


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_loaded", dict(registry._loaded))


def test_known_schemes() -> None:
    assert {"local", "x25519"} <= set(known_schemes())
    assert get_provider_class("local") is LocalKeyring
    assert get_provider_class("x25519") is X25519Recipient


@pytest.mark.parametrize("uri", ["nope:thing", "s3://bucket/key", "vault-typo:k"])
def test_unknown_scheme(uri: str) -> None:
    with pytest.raises(ValueError) as info:
        wrapper_for(uri)
    message = str(info.value)
    assert repr(uri.partition(":")[0]) in message
    assert "local" in message and "x25519" in message


@pytest.mark.parametrize("uri", ["", "no-scheme", ":x", "/path/to/keyring.json"])
def test_uri_without_scheme(uri: str) -> None:
    with pytest.raises(ValueError, match="scheme"):
        wrapper_for(uri)


def test_missing_provider_module_gives_install_hint(clean_registry: None) -> None:
    register_provider("fakekms", "sealstore_no_such_module:Provider", "pip install 'fake[kms]'")
    assert "fakekms" in known_schemes()
    with pytest.raises(ImportError) as info:
        wrapper_for("fakekms:key-1")
    assert "pip install 'fake[kms]'" in str(info.value)
    assert "fakekms" in str(info.value)
    # A slot of that kind names the hint as its cause.
    slot = KeySlot("fakekms", "fakekms:key-1", b"blob")
    (stand_in,) = unwrappers_for(slot)
    with pytest.raises(KeyUnavailable, match="pip install"):
        stand_in.unwrap(slot, {})


def test_register_provider_conflicts(clean_registry: None) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_provider("local", "somewhere:Else")
    register_provider("local", "sealstore.kms.local:LocalKeyring")  # same target: fine
    register_provider("local", "sealstore.kms.x25519:X25519Recipient", clobber=True)
    assert get_provider_class("local") is X25519Recipient


class ToyProvider:
    """A provider registered from outside sealstore: XOR with a fixed pad (tests only)."""

    PAD = bytes(range(7, 39))

    def __init__(self, name: str) -> None:
        self.key_id = f"toy:{name}"
        self.calls: list[str] = []

    @classmethod
    def from_uri(cls, uri: str) -> ToyProvider:
        return cls(uri.partition(":")[2])

    @classmethod
    def unwrapper_for_slot(cls, slot: KeySlot) -> ToyProvider:
        return cls(slot.key_id.partition(":")[2])

    def wrap(self, dek: DataKey, context: Mapping[str, str]) -> KeySlot:
        blob = bytes(a ^ b for a, b in zip(dek.material(), self.PAD, strict=True))
        return KeySlot("toy", self.key_id, blob, {"ctx": json.dumps(dict(context), sort_keys=True)})

    def unwrap(self, slot: KeySlot, context: Mapping[str, str]) -> DataKey:
        if slot.params.get("ctx") != json.dumps(dict(context), sort_keys=True):
            raise KeyUnavailable("toy: other context")
        return DataKey(bytes(a ^ b for a, b in zip(slot.blob, self.PAD, strict=True)))


def test_registered_provider_end_to_end(clean_registry: None) -> None:
    register_provider("toy", f"{__name__}:ToyProvider")
    wrapper = wrapper_for("toy:alpha")
    assert isinstance(wrapper, Wrapper) and isinstance(wrapper, Unwrapper)
    sealed = seal(b"hello toy", ["toy:alpha"])
    assert parse_preamble(sealed).slots[0].kind == "toy"
    with open_sealed(sealed) as sf:
        assert sf.read_range(0, 100) == b"hello toy"


# -- several slots ------------------------------------------------------------------


class Recording:
    """An unwrapper that records each attempt, then delegates (or fails)."""

    def __init__(self, name: str, log: list[str], inner: Unwrapper | None = None) -> None:
        self.name, self.log, self.inner = name, log, inner

    def unwrap(self, slot: KeySlot, context: Mapping[str, str]) -> DataKey:
        self.log.append(f"{self.name}:{slot.key_id}")
        if self.inner is None:
            raise KeyUnavailable(f"{self.name} cannot")
        return self.inner.unwrap(slot, context)


def test_unwrap_first_tries_in_order(keyring: LocalKeyring) -> None:
    dek = DataKey.generate()
    slots = [KeySlot("local", f"local:s{i}", b"", {}) for i in range(3)]
    good = keyring.wrap(dek, CTX)
    slots.insert(2, good)
    log: list[str] = []
    by_slot = {
        "local:s0": [Recording("a", log), Recording("b", log)],
        "local:s1": [Recording("c", log)],
        good.key_id: [Recording("d", log), Recording("e", log, keyring), Recording("f", log)],
    }
    got = unwrap_first(slots, lambda s: by_slot.get(s.key_id, []), CTX, lambda d: None)
    assert got.material() == dek.material()
    assert log == ["a:local:s0", "b:local:s0", "c:local:s1", f"d:{good.key_id}", f"e:{good.key_id}"]


def test_unwrap_first_causes(keyring: LocalKeyring) -> None:
    slots = [KeySlot("local", f"local:s{i}", b"", {}) for i in range(3)]
    by_slot = {"local:s0": [Recording("a", []), Recording("b", [])], "local:s1": []}
    with pytest.raises(KeyUnavailable) as info:
        unwrap_first(slots, lambda s: by_slot.get(s.key_id, []), CTX, lambda d: None)
    causes = info.value.causes
    assert [kid for kid, _ in causes] == ["local:s0", "local:s1", "local:s2"]
    assert causes[0][1] == "b cannot"  # the last unwrapper's reason
    assert "no identity or key provider" in causes[1][1]
    message = str(info.value)
    assert "slot 0 (local:s0): b cannot" in message and "slot 2 (local:s2)" in message
    with pytest.raises(KeyUnavailable, match="manifest"):
        unwrap_first([], lambda s: [], CTX, lambda d: None)


def test_unwrap_first_skips_a_mismatched_key(keyring: LocalKeyring) -> None:
    right, wrong = DataKey.generate(), DataKey.generate()
    slots = [keyring.wrap(wrong, CTX), keyring.wrap(right, CTX)]

    def accept(dek: DataKey) -> None:
        if dek.material() != right.material():
            raise AuthenticationError("commitment")

    assert unwrap_first(slots, lambda s: [keyring], CTX, accept).material() == right.material()
    with pytest.raises(AuthenticationError):
        unwrap_first(slots[:1], lambda s: [keyring], CTX, accept)


def test_several_slots_in_a_file(
    keyring: LocalKeyring, identity: X25519Identity, identity_path: Path, tmp_path: Path
) -> None:
    other = make_keyring(tmp_path / "other.json")
    sealed = seal(b"three slots", [keyring.key_id, identity.recipient, other])
    pre = parse_preamble(sealed)
    assert [s.key_id for s in pre.slots] == [keyring.key_id, identity.recipient, other.key_id]
    # Each key alone opens the file.
    for idents in ([], [identity_path], [identity], [str(identity_path)]):
        with open_sealed(sealed, idents) as sf:
            assert sf.read_range(0, 99) == b"three slots"

    # Without the first keyring, the identity (second slot) is used.
    keyring.path.unlink()
    LocalKeyring._cache.clear()
    with open_sealed(sealed, [identity]) as sf:
        assert sf.read_range(0, 99) == b"three slots"
    # ...and without an identity, the third slot's keyring.
    with open_sealed(sealed) as sf:
        assert sf.read_range(0, 99) == b"three slots"

    other.path.unlink()
    LocalKeyring._cache.clear()
    with pytest.raises(KeyUnavailable) as info:
        open_sealed(sealed)
    assert [kid for kid, _ in info.value.causes] == [s.key_id for s in pre.slots]
    assert "identity" in info.value.causes[1][1]


def test_identities_are_tried_before_providers(keyring: LocalKeyring) -> None:
    sealed = seal(b"x", [keyring])
    log: list[str] = []
    first = Recording("first", log)  # fails: the next unwrapper is tried
    with open_sealed(sealed, [first]) as sf:
        assert sf.read_range(0, 1) == b"x"
    assert log == [f"first:{keyring.key_id}"]


def test_wrong_passphrase_is_listed_as_the_cause(
    keyring: LocalKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    sealed = seal(b"x", [keyring])
    monkeypatch.setenv("SEALSTORE_PASSPHRASE", "wrong")
    LocalKeyring._cache.clear()
    with pytest.raises(KeyUnavailable) as info:
        open_sealed(sealed)
    ((kid, why),) = info.value.causes
    assert kid == keyring.key_id and "wrong passphrase" in why


def test_slot_swapped_from_another_file(keyring: LocalKeyring) -> None:
    a = seal(b"file a", [keyring])
    b = seal(b"file b", [keyring])
    swapped = with_slots(b, parse_preamble(a).slots)
    with pytest.raises(AuthenticationError):
        open_sealed(swapped)
    with pytest.raises(AuthenticationError):
        open_reader(io.BytesIO(swapped))
    # A good slot after the swapped one still opens the file.
    both = with_slots(b, parse_preamble(a).slots + parse_preamble(b).slots)
    with open_sealed(both) as sf:
        assert sf.read_range(0, 10) == b"file b"


def test_slot_moved_to_a_file_with_another_context(keyring: LocalKeyring) -> None:
    a = seal(b"file a", [keyring], context={"tenant": "a"})
    b = seal(b"file b", [keyring], context={"tenant": "b"})
    # The keyring holds the slot's key, so it can tell the slot was moved here.
    with pytest.raises(AuthenticationError, match="context"):
        open_sealed(with_slots(b, parse_preamble(a).slots))


def test_detached_slots(keyring: LocalKeyring) -> None:
    with DataKey.generate() as dek:
        slots = make_slots(dek, [keyring], CTX)
        out = io.BytesIO()
        from sealstore.stream import SealWriter

        with SealWriter(out, dek, chunk_size=CS, context=CTX) as writer:
            writer.write(b"detached")
    sealed = out.getvalue()
    pre = parse_preamble(sealed)
    assert pre.slots == () and pre.slots_size == 0
    with pytest.raises(KeyUnavailable, match="manifest"):
        open_sealed(sealed)
    with open_sealed(sealed, slots=slots) as sf:
        assert sf.read_range(0, 100) == b"detached"
    with unwrap_dek(pre, slots=slots) as got:
        assert SealedFile(sealed, got).read_range(0, 100) == b"detached"


def test_make_slots_needs_a_key() -> None:
    with pytest.raises(ValueError):
        make_slots(DataKey.generate(), [], {})


# -- the envelope file API ----------------------------------------------------------


@pytest.fixture
def work(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    (d / "plain.bin").write_bytes(os.urandom(3 * CS + 100))
    return d


def test_seal_and_unseal_file(keyring: LocalKeyring, work: Path) -> None:
    data = (work / "plain.bin").read_bytes()
    header = seal_file(work / "plain.bin", work / "sealed", [keyring.key_id], chunk_size=CS)
    assert header.plaintext_size == len(data)
    assert parse_preamble((work / "sealed").read_bytes()).header == header
    assert unseal_file(work / "sealed", work / "out", threads=2) == len(data)
    assert (work / "out").read_bytes() == data
    assert verify_file(work / "sealed") == header
    assert listing(work) == ["out", "plain.bin", "sealed"]
    with (work / "sealed").open("rb") as fp, open_reader(fp, threads=2) as reader:
        assert reader.read() == data


def _tamper(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "where", ["first chunk", "last chunk", "last tag", "truncated", "trailing"]
)
@pytest.mark.parametrize("threads", [1, 3])
def test_failed_unseal_leaves_no_output(
    keyring: LocalKeyring, work: Path, where: str, threads: int
) -> None:
    sealed = work / "sealed"
    seal_file(work / "plain.bin", sealed, [keyring], chunk_size=CS)
    po = parse_preamble(sealed.read_bytes()).payload_offset
    if where == "first chunk":
        _tamper(sealed, po + 5)
    elif where == "last chunk":
        _tamper(sealed, po + 3 * (CS + TAG_SIZE) + 5)
    elif where == "last tag":
        _tamper(sealed, sealed.stat().st_size - 1)
    elif where == "truncated":
        sealed.write_bytes(sealed.read_bytes()[: po + 3 * (CS + TAG_SIZE)])
    else:
        sealed.write_bytes(sealed.read_bytes() + b"\x00")
    before = listing(work)
    with pytest.raises(AuthenticationError):
        unseal_file(sealed, work / "out", threads=threads)
    assert listing(work) == before  # no output, no temporary file
    with pytest.raises(AuthenticationError):
        verify_file(sealed, threads=threads)
    # An existing destination is left as it was.
    (work / "out").write_bytes(b"previous")
    with pytest.raises(AuthenticationError):
        unseal_file(sealed, work / "out", threads=threads)
    assert (work / "out").read_bytes() == b"previous"
    assert listing(work) == sorted([*before, "out"])


def test_failed_key_leaves_no_output(
    keyring: LocalKeyring, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seal_file(work / "plain.bin", work / "sealed", [keyring], chunk_size=CS)
    monkeypatch.setenv("SEALSTORE_PASSPHRASE", "wrong")
    LocalKeyring._cache.clear()
    before = listing(work)
    with pytest.raises(KeyUnavailable):
        unseal_file(work / "sealed", work / "out")
    with pytest.raises(KeyUnavailable):
        seal_file(work / "plain.bin", work / "sealed2", [keyring.key_id])
    assert listing(work) == before


def test_failed_seal_leaves_no_output(keyring: LocalKeyring, work: Path) -> None:
    before = listing(work)
    with pytest.raises(ValueError):
        seal_file(work / "plain.bin", work / "sealed", [keyring], chunk_size=1000)
    with pytest.raises(ValueError):
        seal_file(work / "plain.bin", work / "sealed", [])
    with pytest.raises(ValueError):
        seal_file(work / "plain.bin", work / "sealed", ["nope:x"])
    with pytest.raises(FileNotFoundError):
        seal_file(work / "missing.bin", work / "sealed", [keyring])
    with pytest.raises(FormatError):
        unseal_file(work / "plain.bin", work / "out")
    assert listing(work) == before


def test_unseal_not_found(work: Path) -> None:
    with pytest.raises(FileNotFoundError):
        unseal_file(work / "missing", work / "out")
    assert "out" not in listing(work)


# -- no key material in messages ----------------------------------------------------


def forms(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.b64encode(secret).decode().rstrip("="),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret)[2:-1][:40],
    ]


def test_no_key_material_in_messages(
    keyring: LocalKeyring,
    identity: X25519Identity,
    identity_path: Path,
    work: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: Any,
) -> None:
    caplog.set_level(logging.DEBUG)
    sealed_path = work / "sealed"
    seal_file(work / "plain.bin", sealed_path, [keyring, identity.recipient], context=CTX)
    sealed = sealed_path.read_bytes()
    pre = parse_preamble(sealed)
    dek = unwrap_dek(pre)
    secrets = [dek.material(), keyring._unlock()["k1"], bytes(identity._sk)]
    texts: list[str] = [PASSPHRASE]  # must not appear either; checked separately below

    def record(exc: BaseException) -> None:
        texts.append("".join(traceback.format_exception(exc)))
        texts.extend((str(exc), repr(exc)))

    def expect(error: type[BaseException], call: Callable[[], Any]) -> None:
        with pytest.raises(error) as info:
            call()
        record(info.value)

    slot0 = pre.slots[0]
    ctx_b = {"tenant": "other"}
    expect(AuthenticationError, lambda: keyring.unwrap(slot0, ctx_b))
    expect(AuthenticationError, lambda: identity.unwrap(pre.slots[1], ctx_b))
    expect(KeyUnavailable, lambda: unwrap_first(pre.slots, lambda s: [], CTX, lambda d: None))
    bad = bytearray(sealed)
    bad[-1] ^= 1
    expect(AuthenticationError, lambda: open_sealed(bytes(bad)).verify())
    expect(AuthenticationError, lambda: SealedFile(sealed, DataKey.generate()))
    other = seal(b"x", [keyring], context=CTX)
    expect(
        AuthenticationError, lambda: open_sealed(with_slots(sealed, parse_preamble(other).slots))
    )
    closed = DataKey(dek.material())
    closed.close()
    expect(ValueError, closed.material)
    expect(TypeError, lambda: pickle.dumps(dek))
    bad_path = work / "bad-sealed"
    bad_path.write_bytes(bytes(bad))
    expect(AuthenticationError, lambda: unseal_file(bad_path, work / "out"))
    damaged = identity_path.read_text()[:-6] + "\n"
    (work / "damaged.key").write_text(damaged)
    expect(FormatError, lambda: load_identity(work / "damaged.key"))
    monkeypatch.setenv("SEALSTORE_PASSPHRASE", "wrong")
    LocalKeyring._cache.clear()
    expect(KeyUnavailable, lambda: open_sealed(sealed))
    texts.extend(repr(x) for x in (dek, keyring, identity, pre.slots, pre, pre.header))
    texts.extend(str(x) for x in (dek, keyring, identity, pre.slots[0]))
    texts.extend(r.getMessage() for r in caplog.records)

    assert PASSPHRASE not in "".join(texts[1:])
    haystack = "\n".join(texts)
    for secret in secrets:
        for form in forms(secret):
            assert form not in haystack, "key material in a message"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dek.close()


def test_keyring_signs_with_its_public_signing_key(keyring: LocalKeyring) -> None:
    from sealstore.signing import sign_document, verify_document
    from tests.signed_docs import edited

    ring = reopen(keyring.path)
    assert ring.signing_key_id is not None and ring.signing_key_id.startswith("ed25519:")
    doc = sign_document("test", {"a": 1}, ring)
    assert verify_document("test", doc, [ring.signing_key_id], what="doc") == {
        "a": 1,
        "signer": ring.signing_key_id,
    }
    with pytest.raises(AuthenticationError, match="edited"):
        verify_document("test", edited(doc, a=2), [ring.signing_key_id], what="doc")
    with pytest.raises(AuthenticationError, match="payload type"):
        verify_document("other", doc, [ring.signing_key_id], what="doc")
    with pytest.raises(AuthenticationError, match="untrusted"):
        verify_document("test", doc, [], what="doc")
    # A slot can never select the signing seed as a KEK.
    assert "!sign" not in ring._unlock()
