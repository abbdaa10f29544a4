"""Signed documents as DSSE envelopes: known answers, securesystemslib, tampering, old form."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import CryptoSigner, SSlibKey

from sealstore import audit
from sealstore.errors import AuthenticationError, FormatError
from sealstore.signing import (
    claimed_body,
    is_envelope,
    pae,
    payload_type,
    public_key_bytes,
    sign_document,
    verify_document,
)
from sealstore.vault import auditing, backup, freshness, manifest, safemode
from sealstore.vault.backup import creating
from sealstore.vault.manifest import dumps, loads
from sealstore.vault.storage import Storage, open_storage
from sealstore.vault.store import Store
from tests.conftest import make_keyring
from tests.s3util import new_bucket, s3_options
from tests.signed_docs import SeedSigner, edited, fields, old_form, with_fields
from tests.test_store import model_dir

DATA = Path(__file__).parent / "data" / "dsse"
KINDS = ["store", "manifest", "tag", "safe-mode", "sequence", "snapshot", "audit-checkpoint"]
KEY = json.loads((DATA / "key.json").read_text())
SEED = bytes.fromhex(KEY["seed"])


def sslib_key(key_id: str) -> SSlibKey:
    """securesystemslib's public key for a sealstore key id (the keyid is kept as is)."""
    return SSlibKey(key_id, "ed25519", "ed25519", {"public": public_key_bytes(key_id).hex()})


def sslib_verify(doc: dict[str, Any], key_id: str) -> bytes:
    """The payload, once securesystemslib has verified *doc* under *key_id*."""
    env = Envelope.from_dict(copy.deepcopy(doc))  # from_dict rewrites the signatures it reads
    env.verify([sslib_key(key_id)], 1)
    return env.payload


def sslib_sign(payload: bytes, kind: str, *seeds: bytes) -> dict[str, Any]:
    """An envelope signed by securesystemslib (one signature per seed)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    env = Envelope(payload, kind, {})
    for seed in seeds:
        private = Ed25519PrivateKey.from_private_bytes(seed)
        key_id = SeedSigner(seed).signing_key_id
        env.sign(CryptoSigner(private, sslib_key(key_id)))
    return env.to_dict()


# -- known answers ------------------------------------------------------------------------


def test_pae_is_dsse_s() -> None:
    # The example of the DSSE protocol (secure-systems-lab/dsse, protocol.md).
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert payload_type("audit-checkpoint") == "application/vnd.sealstore.audit-checkpoint+json"
    for bad in ("", "Manifest", "a/b", "x+json", "tag\x00"):
        with pytest.raises(ValueError, match="document kind"):
            payload_type(bad)


@pytest.mark.parametrize("kind", KINDS)
def test_known_answer_vectors(kind: str) -> None:
    signer = SeedSigner(SEED)
    assert signer.signing_key_id == KEY["keyid"]
    payload = (DATA / f"{kind}.payload.json").read_bytes()
    expected = (DATA / f"{kind}.envelope.json").read_bytes()
    body = json.loads(payload)
    # sealstore writes the envelope byte for byte (Ed25519 is deterministic) ...
    env = sign_document(kind, body, signer)
    assert dumps(env) == expected
    assert base64.b64decode(env["payload"]) == payload
    assert env["payloadType"] == f"application/vnd.sealstore.{kind}+json"
    # ... securesystemslib verifies it, over the same payload bytes ...
    assert sslib_verify(env, KEY["keyid"]) == payload
    # ... and sealstore reads it back, and the old form of the same document.
    doc = loads(expected, kind)
    assert verify_document(kind, doc, [KEY["keyid"]], what=kind) == dict(body, signer=KEY["keyid"])
    old = json.loads((DATA / f"{kind}.legacy.json").read_text())
    assert old == old_form(kind, body, signer)
    assert verify_document(kind, old, [KEY["keyid"]], what=kind) == dict(body, signer=KEY["keyid"])


def test_the_payload_is_parsed_as_signed_never_re_serialised() -> None:
    # Another writer's bytes (spaces, unsorted keys, escapes) verify as they are.
    payload = b'{ "z": 1,\n  "a": "\\u00e9", "n": [1, 2.5] }'
    env = sslib_sign(payload, payload_type("tag"), SEED)
    body = verify_document("tag", env, [KEY["keyid"]], what="tag")
    assert body == {"z": 1, "a": "é", "n": [1, 2.5], "signer": KEY["keyid"]}
    # Payloads that are not one plain JSON object are refused after the signature holds.
    for bad in (b"[1]", b'{"a": 1, "a": 2}', b'{"a": NaN}', b"\xff", b'{"signer": "x"}'):
        env = sslib_sign(bad, payload_type("tag"), SEED)
        with pytest.raises(FormatError, match="payload"):
            verify_document("tag", env, [KEY["keyid"]], what="tag")


# -- tampering and confusion ------------------------------------------------------------


@pytest.fixture
def signed() -> dict[str, Any]:
    return json.loads((DATA / "manifest.envelope.json").read_text())


def test_another_kind_never_verifies(signed: dict[str, Any]) -> None:
    trusted = [KEY["keyid"]]
    for kind in KINDS[:1] + KINDS[2:]:
        with pytest.raises(AuthenticationError, match="payload type"):
            verify_document(kind, signed, trusted, what="doc")
        # The payload type relabelled: the signature covers the old one.
        relabelled = dict(signed, payloadType=payload_type(kind))
        with pytest.raises(AuthenticationError, match="does not verify"):
            verify_document(kind, relabelled, trusted, what="doc")
        with pytest.raises(VerificationError):
            sslib_verify(relabelled, KEY["keyid"])
        # The old form binds the kind too.
        old = json.loads((DATA / "manifest.legacy.json").read_text())
        with pytest.raises(AuthenticationError, match="does not verify"):
            verify_document(kind, old, trusted, what="doc")


def test_an_edited_payload_is_refused(signed: dict[str, Any]) -> None:
    bad = edited(signed, version="2")
    with pytest.raises(AuthenticationError, match="does not verify"):
        verify_document("manifest", bad, [KEY["keyid"]], what="manifest")
    with pytest.raises(VerificationError):
        sslib_verify(bad, KEY["keyid"])
    # Even before a trust decision: a store config names its own root, but is checked first.
    with pytest.raises(AuthenticationError, match="does not verify"):
        claimed_body("manifest", bad, what="manifest")
    # Bytes appended to the payload, one bit of the signature, bad base64.
    longer = edited(signed)
    longer["payload"] = base64.b64encode(base64.b64decode(signed["payload"]) + b" ").decode()
    flipped = copy.deepcopy(signed)
    sig = bytearray(base64.b64decode(flipped["signatures"][0]["sig"]))
    sig[5] ^= 1
    flipped["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    for bad in (longer, flipped):
        with pytest.raises(AuthenticationError, match="does not verify"):
            verify_document("manifest", bad, [KEY["keyid"]], what="manifest")
    with pytest.raises(AuthenticationError, match="malformed"):
        verify_document("manifest", dict(signed, payload="*"), [KEY["keyid"]], what="m")


def test_an_untrusted_signer_is_refused(signed: dict[str, Any], tmp_path: Path) -> None:
    other = make_keyring(tmp_path / "other.json")
    with pytest.raises(AuthenticationError, match="untrusted key ed25519:"):
        verify_document("manifest", signed, [other.signing_key_id], what="manifest")
    with pytest.raises(AuthenticationError, match="untrusted key"):
        verify_document("manifest", signed, [], what="manifest")
    # A key id the document chose is shown on one line, and short.
    for keyid in ("x" * 5000, "a\nforged: line"):
        odd = copy.deepcopy(signed)
        odd["signatures"][0]["keyid"] = keyid
        with pytest.raises(AuthenticationError) as info:
            verify_document("manifest", odd, [KEY["keyid"]], what="manifest")
        assert "\n" not in str(info.value) and len(str(info.value)) < 160
    # The keyid relabelled to a trusted key: the signature is not that key's.
    relabelled = copy.deepcopy(signed)
    relabelled["signatures"][0]["keyid"] = other.signing_key_id
    with pytest.raises(AuthenticationError, match="does not verify"):
        verify_document("manifest", relabelled, [other.signing_key_id], what="manifest")


def test_old_form_and_envelope_fields_do_not_mix(signed: dict[str, Any]) -> None:
    trusted = [KEY["keyid"]]
    old = json.loads((DATA / "manifest.legacy.json").read_text())
    # An old-form document carrying an envelope's fields is old form, and edited.
    mixed = dict(old, **signed)
    assert not is_envelope(mixed)
    with pytest.raises(AuthenticationError, match="does not verify"):
        verify_document("manifest", mixed, trusted, what="manifest")
    # An envelope with an old-form signature beside it is not an envelope either.
    for extra in ({"signature": old["signature"]}, {"signer": old["signer"]}):
        with pytest.raises(AuthenticationError):
            verify_document("manifest", dict(signed, **extra), trusted, what="manifest")
    # An old-form document whose body has a field named payload (signed so) verifies.
    body = fields(old)
    body["payload"] = "not an envelope"
    doc = old_form("manifest", body, SeedSigner(SEED))
    assert verify_document("manifest", doc, trusted, what="m") == dict(body, signer=KEY["keyid"])
    # An envelope's fields without a signature: not signed.
    with pytest.raises(AuthenticationError, match="not signed"):
        verify_document("manifest", dict(signed, signatures=[]), trusted, what="manifest")
    with pytest.raises(AuthenticationError, match="not signed"):
        verify_document("manifest", fields(signed), trusted, what="manifest")
    # sign_document refuses what is already signed, in either form.
    for doc in (signed, old):
        with pytest.raises(ValueError, match="already signed"):
            sign_document("manifest", doc, SeedSigner(SEED))


def test_two_signatures(tmp_path: Path) -> None:
    """Any one trusted signature suffices; one by a trusted key that fails refuses it."""
    seed2 = bytes(range(32))
    a, b = SeedSigner(SEED).signing_key_id, SeedSigner(seed2).signing_key_id
    payload = (DATA / "tag.payload.json").read_bytes()
    env = sslib_sign(payload, payload_type("tag"), SEED, seed2)
    assert [s["keyid"] for s in env["signatures"]] == [a, b]
    assert verify_document("tag", env, [a], what="tag")["signer"] == a
    assert verify_document("tag", env, [b], what="tag")["signer"] == b
    assert verify_document("tag", env, [b, a], what="tag")["signer"] == a  # envelope order
    with pytest.raises(AuthenticationError, match="untrusted"):
        verify_document("tag", env, ["ed25519:" + base64.b64encode(bytes(32)).decode()], what="t")
    # The second one damaged: ignored when its key is not trusted, refused when it is.
    damaged = copy.deepcopy(env)
    damaged["signatures"][1]["sig"] = env["signatures"][0]["sig"]
    assert verify_document("tag", damaged, [a], what="tag")["signer"] == a
    with pytest.raises(AuthenticationError, match="does not verify"):
        verify_document("tag", damaged, [a, b], what="tag")
    # One key twice, a signature without a keyid, a flood of signatures.
    twice = dict(env, signatures=[env["signatures"][0]] * 2)
    with pytest.raises(AuthenticationError, match="two signatures by one key"):
        verify_document("tag", twice, [a], what="tag")
    with pytest.raises(AuthenticationError, match="without a keyid"):
        verify_document("tag", dict(env, signatures=[{"sig": "AA=="}]), [a], what="tag")
    flood = dict(env, signatures=[{"keyid": f"k{i}", "sig": ""} for i in range(17)])
    with pytest.raises(AuthenticationError, match="at most 16"):
        verify_document("tag", flood, [a], what="tag")


# -- what a real store writes, read by securesystemslib ------------------------------------


def _kind(path: str) -> str | None:
    """The document kind a store or backup file holds, by its path (None: not a signed one)."""
    parts = path.split("/")
    if path == "sealstore.json":
        return "store"
    if path == "safe-mode.json":
        return "safe-mode"
    if parts[0] == "tenants" and parts[-1] == "manifest.json":
        return "manifest"
    if parts[0] == "tenants" and len(parts) == 5 and parts[2] == "refs":
        return "tag"
    if parts[0] == "tenants" and (parts[2] in ("sequence", "sequence.json")):
        return "sequence"
    if parts[0] == "snapshots":
        return "snapshot"
    if parts[0] == "audit" and path.endswith(".jsonl"):
        return "audit-checkpoint"
    return None


def _documents(storage: Storage) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(path, kind, signed document) of every signed document under *storage*."""
    for path in sorted(storage.walk("")):
        kind = _kind(path)
        if kind is None:
            continue
        data = storage.read(path)
        if kind == "audit-checkpoint":
            yield path, kind, json.loads(data.splitlines()[-1])["checkpoint"]
        else:
            yield path, kind, json.loads(data)


@pytest.fixture(params=["file", "seaweedfs"])
def store_place(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    if request.param == "file":
        return f"file://{tmp_path}/store", {}
    services = request.getfixturevalue("services")
    opts = s3_options(services["s3_url"], services["s3_key"], services["s3_secret"])
    return f"s3://{new_bucket(opts)}/store", opts


def _populate(store: Store, tmp_path: Path, backup_url: str) -> None:
    src = model_dir(tmp_path / "src", {"w.bin": 5000, "config.json": 20})
    store.push(src, "bert", keys=["local:"])
    store.push(src, "bert", keys=["local:"])
    store.tag("bert:1", "known-good")
    safemode.enter(store, "drill")
    safemode.exit_safe_mode(store, "drill over")
    backup.create(store, backup_url)


def test_a_real_store_verifies_with_securesystemslib(
    store_place: tuple[str, dict[str, Any]], tmp_path: Path, keyring_path: Path
) -> None:
    url, opts = store_place
    ring = make_keyring(keyring_path)
    store = Store.init(url, **opts)
    _populate(store, tmp_path, f"file://{tmp_path}/bk")
    audit_key = auditing.machine_key().signing_key_id
    seen: dict[str, int] = {}
    places = [(store.storage, "store"), (open_storage(f"file://{tmp_path}/bk"), "backup")]
    for storage, where in places:
        for path, kind, doc in _documents(storage):
            assert is_envelope(doc), f"{where} {path} is not a DSSE envelope"
            assert doc["payloadType"] == f"application/vnd.sealstore.{kind}+json", path
            key = audit_key if kind == "audit-checkpoint" else ring.signing_key_id
            payload = sslib_verify(doc, key)
            assert payload == base64.b64decode(doc["payload"])
            seen[kind] = seen.get(kind, 0) + 1
            # One byte of the payload changed: securesystemslib refuses it.
            tampered = dict(doc, payload=base64.b64encode(payload.replace(b'"', b"'", 1)).decode())
            with pytest.raises(VerificationError):
                sslib_verify(tampered, key)
            # And under another key, however the keyid is labelled.
            other = copy.deepcopy(doc)
            other["signatures"][0]["keyid"] = KEY["keyid"]
            with pytest.raises(VerificationError):
                sslib_verify(other, KEY["keyid"])
    assert set(seen) == set(KINDS), seen
    # The store reads back what it wrote.
    assert backup.verify(f"file://{tmp_path}/bk").ok
    assert Store.open(url, **opts).versions("bert") == ["1", "2"]
    assert not any(p.problems for p in audit.verify_log(store.storage))


# -- old stores, backups and audit logs stay readable -------------------------------------

WRITERS = [manifest, creating, freshness, safemode, audit]


def test_an_old_form_store_stays_readable_and_new_writes_are_envelopes(
    tmp_path: Path, keyring_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store, backup and audit log written the old way (as before DSSE), then used."""
    import sealstore.vault.store as store_module

    make_keyring(keyring_path)
    url, bk = f"file://{tmp_path}/store", f"file://{tmp_path}/bk"
    with monkeypatch.context() as old:
        for module in [*WRITERS, store_module]:
            old.setattr(module, "sign_document", old_form)
        store = Store.init(url)
        _populate(store, tmp_path, bk)
    docs = list(_documents(store.storage)) + list(_documents(open_storage(bk)))
    assert {k for _, k, _ in docs} == set(KINDS)
    assert not any(is_envelope(d) for _, _, d in docs)
    # Read by this version: everything verifies, and pulls.
    store = Store.open(url)
    assert backup.verify(bk).ok
    assert not any(p.problems for p in audit.verify_log(store.storage))
    store.pull("bert@known-good", tmp_path / "out")
    assert safemode.status(store).enabled is False
    # New writes are envelopes beside the old documents; the mix verifies.
    src = model_dir(tmp_path / "src2", {"w.bin": 300})
    store.push(src, "bert", keys=["local:"])
    snap, _ = backup.create(store, bk)
    new = store.storage.read("tenants/default/artifacts/bert/3/manifest.json")
    assert is_envelope(json.loads(new))
    assert not is_envelope(
        json.loads(store.storage.read("tenants/default/artifacts/bert/1/manifest.json"))
    )
    assert backup.verify(bk, snap.id).ok
    assert not any(p.problems for p in audit.verify_log(store.storage))
    # An old-form document edited is refused, as before.
    path = "tenants/default/artifacts/bert/1/manifest.json"
    old = json.loads(store.storage.read(path))
    store.storage.put(path, json.dumps(dict(old, created="2000-01-01T00:00:00Z")).encode())
    with pytest.raises(AuthenticationError, match="does not verify"):
        store.manifest("bert:1")
    # The backup restores the mix (the edited manifest put back from it).
    restored = f"file://{tmp_path}/restored"
    backup.restore(bk, snap.id, to=restored)
    assert Store.open(restored).versions("bert") == ["1", "2", "3"]


def test_with_fields_keeps_the_signature(signed: dict[str, Any]) -> None:
    # The helper the other tests edit documents with really produces a broken signature.
    same = with_fields(signed, fields(signed))
    assert verify_document("manifest", same, [KEY["keyid"]], what="m")["signer"] == KEY["keyid"]
    with pytest.raises(AuthenticationError):
        verify_document("manifest", edited(signed, name="x"), [KEY["keyid"]], what="m")
