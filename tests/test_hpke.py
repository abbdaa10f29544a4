"""``hpke:`` recipients: the official vectors, slots, identities, the CLI and the store.

The vectors (``tests/data/hpke/``, see SOURCES.md there) are run two ways:
through ``cryptography``'s HPKE, the implementation the slots use, and
through a small RFC 9180 Base-mode receiver written here from the RFC's
pseudocode (labeled HKDF, the key schedule, nonces, exports). The vectors
check that receiver; the receiver then opens sealstore's own slots, which
checks that a slot is what docs/FORMAT.md says: ``enc || ct`` of RFC 9180
with ``info = "sealstore/v1/slot/hpke\\0" || canonical_json(context)`` and
empty aad.

``cryptography``'s public API has no aad and no exporter, while every RFC
vector encrypts with aad ``Count-i``: the seq-0 ciphertexts go through its
private ``_decrypt_with_aad``, the rest and the exports through the receiver.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.bindings._rust import openssl as rust_openssl
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.hmac import HMAC

from sealstore.errors import AuthenticationError, FormatError, KeyUnavailable
from sealstore.format import canonical_json, parse_preamble
from sealstore.keys import DataKey, KeySlot
from sealstore.kms import hpke as shpke
from sealstore.kms.hpke import KEMS, HpkeIdentity, HpkeRecipient, generate_identity, slot_info
from sealstore.kms.registry import load_identity, wrapper_for
from sealstore.kms.x25519 import generate_identity as generate_x25519_identity

# The commands run in this process (tests.test_cli.in_process): what they do, not
# the process boundary, which tests/test_cli.py and test_fail_closed_cli.py test.
from tests.test_cli import DATA, fails, ok
from tests.test_cli import in_process as run

DATA_DIR = Path(__file__).parent / "data" / "hpke"
CONTEXT = {"tenant": "acme", "artifact": "bert", "path": "model.safetensors"}

# -- the RFC 9180 appendix, as the CFRG repository has it ---------------------------


def _fields(block: list[str]) -> list[dict[str, str]]:
    """``key: value`` records of one ``~~~`` block; hex values may wrap onto the next lines."""
    records: list[dict[str, str]] = [{}]
    last = None
    for line in block:
        if not line.strip():
            records.append({})
            last = None
            continue
        m = re.fullmatch(r"([A-Za-z_ ]+):\s*([0-9a-f]*)", line)
        if m:
            last = m.group(1)
            records[-1][last] = m.group(2)
        else:
            assert last is not None and re.fullmatch(r"[0-9a-f]+", line), line
            records[-1][last] += line
    return [r for r in records if r]


def _rfc_vectors() -> list[dict[str, Any]]:
    text = (DATA_DIR / "rfc9180-base-mode.txt").read_text(encoding="utf-8")
    out = []
    for section in text.split("\n## ")[0:]:
        name, _, body = section.removeprefix("## ").partition("\n")
        blocks = re.findall(r"~~~\n(.*?)\n~~~", body, re.S)
        assert len(blocks) == 3, name
        setup, encryptions, exports = (_fields(b.split("\n")) for b in blocks)
        out.append({"name": name, **setup[0], "encryptions": encryptions, "exports": exports})
    return out


RFC = _rfc_vectors()
XWING = json.loads((DATA_DIR / "hpke-pq-xwing.json").read_text(encoding="utf-8"))


def test_the_appendix_is_all_there() -> None:
    assert [(v["kem_id"], v["kdf_id"], v["aead_id"]) for v in RFC] == [
        ("32", "1", "1"),
        ("32", "1", "3"),
        ("16", "1", "1"),
        ("16", "3", "1"),
        ("16", "1", "3"),
        ("18", "3", "2"),
    ]
    for v in RFC:
        assert v["mode"] == "0"
        assert [e["sequence number"] for e in v["encryptions"]] == [
            "0",
            "1",
            "2",
            "4",
            "255",
            "256",
        ]
        assert len(v["exports"]) == 3
    assert [(v["kem_id"], v["kdf_id"], v["aead_id"]) for v in XWING] == [
        (0x647A, 1, 3),
        (0x647A, 17, 3),
    ]


_KEM = {32: hpke.KEM.X25519, 16: hpke.KEM.P256, 18: hpke.KEM.P521}
_KDF = {1: hpke.KDF.HKDF_SHA256, 3: hpke.KDF.HKDF_SHA512, 17: hpke.KDF.SHAKE256}
_AEAD = {1: hpke.AEAD.AES_128_GCM, 2: hpke.AEAD.AES_256_GCM, 3: hpke.AEAD.CHACHA20_POLY1305}


def _rfc_private(v: dict[str, Any]) -> tuple[Any, bytes]:
    sk = bytes.fromhex(v["skRm"])
    if v["kem_id"] == "32":
        key = x25519.X25519PrivateKey.from_private_bytes(sk)
        return key, key.public_key().public_bytes_raw()
    curve = ec.SECP256R1() if v["kem_id"] == "16" else ec.SECP521R1()
    key = ec.derive_private_key(int.from_bytes(sk, "big"), curve)
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key, key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


@pytest.mark.parametrize("v", RFC, ids=[v["name"] for v in RFC])
def test_rfc9180_vectors_through_cryptography(v: dict[str, Any]) -> None:
    sk, pk = _rfc_private(v)
    assert pk.hex() == v["pkRm"]
    suite = hpke.Suite(_KEM[int(v["kem_id"])], _KDF[int(v["kdf_id"])], _AEAD[int(v["aead_id"])])
    first = v["encryptions"][0]
    enc, info = bytes.fromhex(v["enc"]), bytes.fromhex(v["info"])
    ct, aad = bytes.fromhex(first["ct"]), bytes.fromhex(first["aad"])
    pt = rust_openssl.hpke._decrypt_with_aad(suite, enc + ct, sk, info=info, aad=aad)
    assert pt.hex() == first["pt"]
    # One bit of info, aad, enc or ciphertext, and it does not open.
    for args in (
        (enc + ct, info + b"!", aad),
        (enc + ct, info, aad + b"!"),
        (_flip(enc, len(enc) - 1) + ct, info, aad),
        (enc + _flip(ct, 0), info, aad),
    ):
        with pytest.raises((InvalidTag, ValueError)):  # ValueError: enc is not a point
            rust_openssl.hpke._decrypt_with_aad(suite, args[0], sk, info=args[1], aad=args[2])


@pytest.mark.parametrize("v", XWING, ids=["hkdf-sha256", "shake256"])
def test_xwing_vectors_through_cryptography(v: dict[str, Any]) -> None:
    """draft-ietf-hpke-pq's own vectors: sealstore's seed expansion gives their key pair."""
    sk, public = shpke._xwing_private(bytes.fromhex(v["skRm"]))
    assert public.hex() == v["pkRm"]
    suite = hpke.Suite(hpke.KEM.MLKEM768_X25519, _KDF[v["kdf_id"]], _AEAD[v["aead_id"]])
    enc, info = bytes.fromhex(v["enc"]), bytes.fromhex(v["info"])
    for e in v["encryptions"][:1]:
        ct, aad = bytes.fromhex(e["ct"]), bytes.fromhex(e["aad"])
        pt = rust_openssl.hpke._decrypt_with_aad(suite, enc + ct, sk, info=info, aad=aad)
        assert pt.hex() == e["pt"]
        with pytest.raises(InvalidTag):
            rust_openssl.hpke._decrypt_with_aad(suite, _flip(enc, 5) + ct, sk, info=info, aad=aad)


# -- an RFC 9180 Base-mode receiver, from the RFC's pseudocode ----------------------


def _extract(salt: bytes, ikm: bytes) -> bytes:
    h = HMAC(salt or bytes(32), hashes.SHA256())
    h.update(ikm)
    return h.finalize()


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, i = b"", b"", 1
    while len(out) < length:
        h = HMAC(prk, hashes.SHA256())
        h.update(block + info + bytes([i]))
        block = h.finalize()
        out += block
        i += 1
    return out[:length]


@dataclass
class Receiver:
    """Base-mode context of HKDF-SHA256 with AES-128-GCM (1) or ChaCha20-Poly1305 (3)."""

    suite_id: bytes
    key: bytes
    base_nonce: bytes
    exporter_secret: bytes
    aead_id: int

    @classmethod
    def setup(cls, kem_id: int, aead_id: int, shared_secret: bytes, info: bytes) -> Receiver:
        suite_id = b"HPKE" + kem_id.to_bytes(2, "big") + (1).to_bytes(2, "big")
        suite_id += aead_id.to_bytes(2, "big")

        def lx(salt: bytes, label: bytes, ikm: bytes) -> bytes:
            return _extract(salt, b"HPKE-v1" + suite_id + label + ikm)

        def le(prk: bytes, label: bytes, info: bytes, n: int) -> bytes:
            return _expand(prk, n.to_bytes(2, "big") + b"HPKE-v1" + suite_id + label + info, n)

        context = b"\x00" + lx(b"", b"psk_id_hash", b"") + lx(b"", b"info_hash", info)
        secret = lx(shared_secret, b"secret", b"")
        nk = 16 if aead_id == 1 else 32
        return cls(
            suite_id,
            le(secret, b"key", context, nk),
            le(secret, b"base_nonce", context, 12),
            le(secret, b"exp", context, 32),
            aead_id,
        )

    def open(self, seq: int, aad: bytes, ct: bytes) -> bytes:
        nonce = bytes(a ^ b for a, b in zip(self.base_nonce, seq.to_bytes(12, "big"), strict=True))
        aead = AESGCM(self.key) if self.aead_id == 1 else ChaCha20Poly1305(self.key)
        return aead.decrypt(nonce, ct, aad)

    def export(self, context: bytes, length: int) -> bytes:
        return _expand(
            self.exporter_secret,
            length.to_bytes(2, "big") + b"HPKE-v1" + self.suite_id + b"sec" + context,
            length,
        )


def _dhkem_x25519(sk: bytes, enc: bytes) -> bytes:
    """DHKEM(X25519, HKDF-SHA256) Decap (RFC 9180 section 4.1)."""
    key = x25519.X25519PrivateKey.from_private_bytes(sk)
    dh = key.exchange(x25519.X25519PublicKey.from_public_bytes(enc))
    kem_id = b"KEM\x00\x20"
    prk = _extract(b"", b"HPKE-v1" + kem_id + b"eae_prk" + dh)
    kem_context = enc + key.public_key().public_bytes_raw()
    return _expand(
        prk, (32).to_bytes(2, "big") + b"HPKE-v1" + kem_id + b"shared_secret" + kem_context, 32
    )


def _xwing(seed: bytes, enc: bytes) -> bytes:
    """X-Wing Decap (draft-connolly-cfrg-xwing-kem): ML-KEM-768, X25519, SHA3-256 combiner."""
    expanded = hashlib.shake_256(seed).digest(96)
    sk_m = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
    sk_x = x25519.X25519PrivateKey.from_private_bytes(expanded[64:])
    ct_m, ct_x = enc[:1088], enc[1088:]
    ss_m = sk_m.decapsulate(ct_m)
    ss_x = sk_x.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
    pk_x = sk_x.public_key().public_bytes_raw()
    return hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + b"\\.//^\\").digest()


def _check_all(v: dict[str, Any], ctx: Receiver, seq_key: str, ct_key: str, exp: tuple) -> None:
    for e in v["encryptions"]:
        seq = int(e[seq_key]) if seq_key else v["encryptions"].index(e)
        assert ctx.open(seq, bytes.fromhex(e["aad"]), bytes.fromhex(e[ct_key])).hex() == e["pt"]
    for x in v["exports"]:
        assert ctx.export(bytes.fromhex(x[exp[0]]), int(x[exp[1]])).hex() == x[exp[2]]


@pytest.mark.parametrize("v", [v for v in RFC if v["kem_id"] == "32"], ids=["aes128gcm", "chacha"])
def test_the_receiver_passes_the_rfc_vectors(v: dict[str, Any]) -> None:
    shared = _dhkem_x25519(bytes.fromhex(v["skRm"]), bytes.fromhex(v["enc"]))
    assert shared.hex() == v["shared_secret"]
    ctx = Receiver.setup(0x20, int(v["aead_id"]), shared, bytes.fromhex(v["info"]))
    assert (ctx.key.hex(), ctx.base_nonce.hex()) == (v["key"], v["base_nonce"])
    assert ctx.exporter_secret.hex() == v["exporter_secret"]
    _check_all(v, ctx, "sequence number", "ct", ("exporter_context", "L", "exported_value"))


def test_the_receiver_passes_the_xwing_vector() -> None:
    [v] = [v for v in XWING if v["kdf_id"] == 1]
    shared = _xwing(bytes.fromhex(v["skRm"]), bytes.fromhex(v["enc"]))
    assert shared.hex() == v["shared_secret"]
    ctx = Receiver.setup(0x647A, v["aead_id"], shared, bytes.fromhex(v["info"]))
    assert (ctx.key.hex(), ctx.base_nonce.hex()) == (v["key"], v["base_nonce"])
    _check_all(v, ctx, "", "ct", ("exporter_context", "L", "exported_value"))


@pytest.mark.parametrize("kem", sorted(KEMS))
def test_a_slot_is_rfc9180_as_the_spec_says(kem: str) -> None:
    """The receiver above opens a slot from FORMAT.md's description alone."""
    ident = HpkeIdentity.generate(kem)
    dek = DataKey.generate()
    slot = wrapper_for(ident.recipient).wrap(dek, CONTEXT)
    assert (slot.kind, slot.key_id, slot.params) == ("hpke", ident.recipient, {})
    spec = KEMS[kem]
    enc, ct = slot.blob[: spec.enc_size], slot.blob[spec.enc_size :]
    assert len(ct) == 32 + 16
    secret = ident._secret
    shared = _dhkem_x25519(secret, enc) if kem == "x25519" else _xwing(secret, enc)
    info = b"sealstore/v1/slot/hpke\x00" + canonical_json(CONTEXT)
    assert slot_info(CONTEXT) == info
    assert Receiver.setup(spec.kem_id, 3, shared, info).open(0, b"", ct) == dek.material()


# -- slots and identities -------------------------------------------------------------


def _flip(raw: bytes, pos: int) -> bytes:
    b = bytearray(raw)
    b[pos] ^= 0x01
    return bytes(b)


@pytest.mark.parametrize("kem", sorted(KEMS))
def test_round_trip_and_context_binding(kem: str) -> None:
    ident = HpkeIdentity.generate(kem)
    rec = HpkeRecipient.from_uri(ident.recipient)
    dek = DataKey.generate()
    slot = rec.wrap(dek, CONTEXT)
    assert len(slot.blob) == KEMS[kem].blob_size
    assert ident.unwrap(slot, CONTEXT).material() == dek.material()
    assert rec.wrap(dek, CONTEXT).blob != slot.blob  # a fresh encapsulation each time
    # The slot survives its JSON form.
    again = KeySlot.from_json(json.loads(json.dumps(slot.to_json())))
    assert ident.unwrap(again, dict(reversed(CONTEXT.items()))).material() == dek.material()
    for other in ({**CONTEXT, "artifact": "gpt"}, {}, {**CONTEXT, "extra": ""}):
        with pytest.raises(AuthenticationError, match="changed after sealing"):
            ident.unwrap(slot, other)


@pytest.mark.parametrize("kem", sorted(KEMS))
def test_tampered_enc_ciphertext_and_length(kem: str) -> None:
    ident = HpkeIdentity.generate(kem)
    slot = HpkeRecipient.from_uri(ident.recipient).wrap(DataKey.generate(), CONTEXT)
    n = KEMS[kem].enc_size
    for pos in (0, n - 1, n, len(slot.blob) - 1):  # enc, ciphertext, tag
        bad = KeySlot("hpke", slot.key_id, _flip(slot.blob, pos))
        with pytest.raises(AuthenticationError):
            ident.unwrap(bad, CONTEXT)
    for blob in (slot.blob[:-1], slot.blob + b"\x00", b"", slot.blob[:n]):
        with pytest.raises(AuthenticationError):
            ident.unwrap(KeySlot("hpke", slot.key_id, blob), CONTEXT)


def test_a_low_order_enc_is_an_authentication_error() -> None:
    ident = HpkeIdentity.generate("x25519")
    slot = HpkeRecipient.from_uri(ident.recipient).wrap(DataKey.generate(), CONTEXT)
    with pytest.raises(AuthenticationError):
        ident.unwrap(KeySlot("hpke", slot.key_id, bytes(32) + slot.blob[32:]), CONTEXT)


def test_wrong_identity() -> None:
    mine, other = HpkeIdentity.generate("x25519"), HpkeIdentity.generate("x25519")
    pq = HpkeIdentity.generate("mlkem768x25519")
    slot = wrapper_for(mine.recipient).wrap(DataKey.generate(), CONTEXT)
    assert not other.can_unwrap(slot) and not pq.can_unwrap(slot)
    with pytest.raises(KeyUnavailable):
        other.unwrap(slot, CONTEXT)
    # A slot relabelled to name another identity: that identity tries it, and it does not open.
    with pytest.raises(AuthenticationError):
        other.unwrap(KeySlot("hpke", other.recipient, slot.blob), CONTEXT)
    # An x25519 sealed-box slot is not an HPKE one, nor the reverse.
    legacy = generate_x25519_identity()
    assert not mine.can_unwrap(wrapper_for(legacy.recipient).wrap(DataKey.generate(), CONTEXT))
    assert not legacy.can_unwrap(slot)


@pytest.mark.parametrize(
    "uri, message",
    [
        ("hpke:x25519", "expected hpke:<kem>"),
        ("hpke:rsa:AAAA", "unknown HPKE KEM 'rsa'"),
        ("hpke:x25519:" + "A" * 42, "43 base64url"),
        ("hpke:x25519:" + "A" * 42 + "=", "43 base64url"),
        ("hpke:x25519:" + "A" * 42 + "B", "must encode 32 bytes"),  # non-canonical last char
        ("hpke:x25519:" + "A" * 43, "not a valid public key"),  # the all-zero, low-order point
        ("hpke:mlkem768x25519:" + "A" * 43, "1622 base64url"),
        ("hpke:mlkem768x25519:" + "_" * 1621 + "A", "not a valid public key"),
    ],
)
def test_bad_recipients(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        wrapper_for(uri)


def test_identity_files(tmp_path: Path) -> None:
    for kem in KEMS:
        path = tmp_path / f"{kem}.key"
        ident = generate_identity(path, kem=kem)
        assert path.stat().st_mode & 0o777 == 0o600
        text = path.read_text()
        assert f"# recipient: {ident.recipient}\n" in text
        loaded = load_identity(path)
        assert isinstance(loaded, HpkeIdentity) and loaded.recipient == ident.recipient
        secret = text.strip().rsplit(":", 1)[1]
        assert secret not in repr(loaded) and secret not in str(loaded.__repr__())
        with pytest.raises(TypeError):
            pickle.dumps(loaded)
        with pytest.raises(FileExistsError):
            generate_identity(path, kem=kem)
    with pytest.raises(ValueError, match="unknown HPKE KEM"):
        generate_identity(tmp_path / "x.key", kem="kyber")
    for text in (
        "SEALSTORE-HPKE-IDENTITY:x25519\n",
        "SEALSTORE-HPKE-IDENTITY:x25519:short\n",
        "SEALSTORE-HPKE-IDENTITY:kyber:" + "A" * 43 + "\n",
    ):
        (tmp_path / "bad.key").write_text(text)
        with pytest.raises(FormatError, match="malformed hpke identity") as err:
            load_identity(tmp_path / "bad.key")
        assert "short" not in str(err.value) and "AAAA" not in str(err.value)


# -- the command line and the store ----------------------------------------------------


@pytest.mark.parametrize("kem", sorted(KEMS))
def test_cli_keys_init_encrypt_decrypt(kem: str, tmp_path: Path, work: Path) -> None:
    ident = tmp_path / "id.key"
    recipient = ok(run("keys", "init", "--identity", ident, "--kem", kem)).stdout.decode().strip()
    assert recipient.startswith(f"hpke:{kem}:")
    assert ok(run("keys", "recipient", ident)).stdout.decode().strip() == recipient
    no_pass = ("SEALSTORE_PASSPHRASE",)
    ok(run("encrypt", "-k", recipient, "-o", work / "s", work / "plain.bin", drop=no_pass))
    [slot] = parse_preamble((work / "s").read_bytes()).slots
    assert (slot.kind, slot.key_id) == ("hpke", recipient)
    line = fails(run("decrypt", "-o", work / "out", work / "s"), 4)
    assert "HPKE identity" in line and "pass -i" in line
    ok(run("decrypt", "-i", ident, "-o", work / "out", work / "s", drop=no_pass))
    assert (work / "out").read_bytes() == DATA
    other = tmp_path / "other.key"
    ok(run("keys", "init", "--identity", other, "--kem", kem))
    fails(run("decrypt", "-i", other, "-o", work / "out2", work / "s"), 4)
    assert not (work / "out2").exists()


def test_cli_defaults_and_compatibility(tmp_path: Path, work: Path) -> None:
    # New identities are HPKE with DHKEM(X25519) unless told otherwise.
    recipient = ok(run("keys", "init", "--identity", tmp_path / "a.key")).stdout.decode().strip()
    assert recipient.startswith("hpke:x25519:") and len(recipient) == len("hpke:x25519:") + 43
    assert fails(run("keys", "init", "--kem", "mlkem768x25519"), 2).count("--kem") == 1
    fails(run("keys", "init", "--identity", tmp_path / "b.key", "--kem", "rsa"), 2)
    # An x25519: recipient still makes a sealed-box slot that its old identity file opens.
    legacy_path = tmp_path / "legacy.key"
    legacy = generate_x25519_identity(legacy_path)
    assert ok(run("keys", "recipient", legacy_path)).stdout.decode().strip() == legacy.recipient
    ok(
        run(
            "encrypt", "-k", legacy.recipient, "-k", recipient, "-o", work / "s", work / "plain.bin"
        )
    )
    kinds = [s.kind for s in parse_preamble((work / "s").read_bytes()).slots]
    assert kinds == ["x25519", "hpke"]
    ok(run("decrypt", "-i", legacy_path, "-o", work / "o1", work / "s"))
    ok(run("decrypt", "-i", tmp_path / "a.key", "-o", work / "o2", work / "s"))
    assert (work / "o1").read_bytes() == (work / "o2").read_bytes() == DATA


def test_push_and_pull_with_an_hpke_recipient(store_env: dict[str, str], tmp_path: Path) -> None:
    from tests.test_store import model_dir, same_tree

    ident = tmp_path / "escrow.key"
    cmd = ("keys", "init", "--identity", ident, "--kem", "mlkem768x25519")
    recipient = ok(run(*cmd)).stdout.decode().strip()
    src = model_dir(tmp_path, {"w.bin": 5000})
    ok(run("push", src, "m", "-k", recipient, env=store_env))
    shown = json.loads(ok(run("show", "m:1", "--json", env=store_env)).stdout)
    assert "hpke" in json.dumps(shown) and "blob" not in json.dumps(shown)
    line = fails(run("pull", "m", "-o", tmp_path / "none", env=store_env), 4)
    assert "pass -i" in line
    ok(run("pull", "m", "-o", tmp_path / "out", "-i", ident, env=store_env))
    assert same_tree(src, tmp_path / "out")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    (d / "plain.bin").write_bytes(DATA)
    return d


@pytest.fixture
def store_env(keyring: Any, tmp_path: Path) -> dict[str, str]:
    url = f"file://{tmp_path}/store"
    ok(run("store", "init", url))
    return {"SEALSTORE_STORE": url}


def test_recipient_strings_are_base64url_of_the_raw_key() -> None:
    ident = HpkeIdentity.generate("mlkem768x25519")
    raw = base64.urlsafe_b64decode(ident.recipient.split(":")[2] + "==")
    assert len(raw) == 1216
    expanded = hashlib.shake_256(ident._secret).digest(96)
    assert raw[-32:] == (
        x25519.X25519PrivateKey.from_private_bytes(expanded[64:]).public_key().public_bytes_raw()
    )


# -- the broker's answer -----------------------------------------------------------------


def test_a_release_answer_opens_only_for_its_challenge() -> None:
    from sealstore.enclave.broker import release

    secret = x25519.X25519PrivateKey.generate()
    raw_sk = secret.private_bytes_raw()
    public = secret.public_key().public_bytes_raw()
    nonce, dek = bytes(range(32)), bytes(range(100, 132))
    scope = {"tenant": "acme", "artifact": "bert"}
    answer = release.seal_answer(dek, public, nonce=nonce, **scope)
    assert answer["suite"] == release.ANSWER_SUITE == "hpke-x25519-hkdf-sha256-chacha20poly1305"
    assert release.open_answer(answer, raw_sk, nonce=nonce, **scope) == dek
    # It is RFC 9180 with the documented info, opened here by the receiver above.
    sealed = base64.b64decode(answer["sealed"])
    info = b"sealstore-release-v1/answer\x00" + canonical_json(
        {
            "artifact": "bert",
            "nonce": base64.b64encode(nonce).decode(),
            "public_key": base64.b64encode(public).decode(),
            "suite": release.ANSWER_SUITE,
            "tenant": "acme",
        }
    )
    shared = _dhkem_x25519(raw_sk, sealed[:32])
    assert Receiver.setup(0x20, 3, shared, info).open(0, b"", sealed[32:]) == dek
    # Replayed to another challenge, scope or key, or altered: it does not open.
    for kw in (
        {"nonce": bytes(32), **scope},
        {"nonce": nonce, "tenant": "globex", "artifact": "bert"},
        {"nonce": nonce, "tenant": "acme", "artifact": "gpt"},
    ):
        with pytest.raises(AuthenticationError):
            release.open_answer(answer, raw_sk, **kw)
    other = x25519.X25519PrivateKey.generate().private_bytes_raw()
    with pytest.raises(AuthenticationError):
        release.open_answer(answer, other, nonce=nonce, **scope)
    for pos in (0, 40, len(sealed) - 1):
        bad = {**answer, "sealed": base64.b64encode(_flip(sealed, pos)).decode()}
        with pytest.raises(AuthenticationError):
            release.open_answer(bad, raw_sk, nonce=nonce, **scope)
    with pytest.raises(AuthenticationError):
        release.open_answer({**answer, "sealed": "AAAA"}, raw_sk, nonce=nonce, **scope)
    # Another suite, or an older broker's bare sealed box, is named, not guessed at.
    with pytest.raises(FormatError, match="older broker"):
        release.open_answer({"sealed": answer["sealed"]}, raw_sk, nonce=nonce, **scope)
    with pytest.raises(FormatError, match="'hpke-p256'"):
        release.open_answer({**answer, "suite": "hpke-p256"}, raw_sk, nonce=nonce, **scope)
    with pytest.raises(FormatError, match="not valid base64"):
        release.open_answer({**answer, "sealed": "!!"}, raw_sk, nonce=nonce, **scope)


def test_post_quantum_escrow_of_a_backup(store: Any, ring: Any, tmp_path: Path) -> None:
    """The recovery key of a backup can be an ML-KEM-768 + X25519 identity."""
    import shutil

    from sealstore.vault import backup
    from sealstore.vault.store import Store
    from tests.test_store import model_dir, same_tree

    escrow = tmp_path / "escrow.key"
    ident = generate_identity(escrow, kem="mlkem768x25519")
    src = model_dir(tmp_path, {"w.bin": 3000})
    store.push(src, "m", keys=["local:"])
    url = f"file://{tmp_path}/bk"
    snap, _ = backup.create(store, url, recovery_recipients=[ident.recipient])
    assert [s.kind for s in snap.versions[0].escrow] == ["hpke"]
    assert not backup.verify(url).problems
    shutil.rmtree(tmp_path / "store")
    backup.restore(url, to=store.url, identities=[escrow])
    restored = Store.open(store.url)
    assert [s.kind for s in restored.manifest("m:1").slots] == ["local", "hpke"]
    ring.path.unlink()  # the online key is gone: only the escrow identity opens it
    with pytest.raises(KeyUnavailable):
        restored.pull("m", tmp_path / "none")
    restored.pull("m", tmp_path / "out", identities=[escrow])
    assert same_tree(src, tmp_path / "out")
