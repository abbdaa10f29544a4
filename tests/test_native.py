"""sealstore.native on the CPU: RFC 8439 and Wycheproof vectors, and cross-checks with OpenSSL."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM as OpenSSLAesGcm
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305 as OpenSSLChaCha
from cryptography.hazmat.primitives.poly1305 import Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from sealstore.errors import AuthenticationError
from sealstore.native import chacha
from sealstore.native.aead import AESGCM, ChaCha20Poly1305
from tests.conftest import shared_data

DATA = shared_data()


def u8(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8)


def words(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<u4").astype(np.uint32)


def xor(key: bytes, nonce: bytes, counter: int, data: bytes) -> bytes:
    out = np.empty(len(data), dtype=np.uint8)
    chacha.chacha20_xor(words(key), words(nonce), counter, u8(data), out)
    return out.tobytes()


def mac(otk: bytes, msg: bytes) -> bytes:
    tag = np.empty(16, dtype=np.uint8)
    chacha.poly1305(u8(otk), u8(msg), tag)
    return tag.tobytes()


def test_rfc8439_chacha20_block() -> None:
    """Section 2.3.2."""
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a00000000")
    out = np.empty(64, dtype=np.uint8)
    chacha.chacha20_block(words(key), words(nonce), 1, out)
    assert out.tobytes() == bytes.fromhex(
        "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
        "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
    )


def test_rfc8439_chacha20_encryption() -> None:
    """Section 2.4.2."""
    key = bytes(range(32))
    nonce = bytes.fromhex("000000000000004a00000000")
    text = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
        b"for the future, sunscreen would be it."
    )
    ct = xor(key, nonce, 1, text)
    assert ct.hex().startswith("6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b")
    assert xor(key, nonce, 1, ct) == text


def test_rfc8439_poly1305() -> None:
    """Section 2.5.2."""
    otk = bytes.fromhex("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b")
    assert mac(otk, b"Cryptographic Forum Research Group").hex() == (
        "a8061dc1305136c6c22b8baf0c0127a9"
    )


@settings(max_examples=300, deadline=None)
@given(
    st.binary(min_size=32, max_size=32),
    st.integers(min_value=0, max_value=2000),
    st.sampled_from([0x00, 0xFF, None]),
)
def test_poly1305_matches_openssl(otk: bytes, n: int, fill: int | None) -> None:
    """Every length around the lane rows, and all-ones input that drives h past p."""
    msg = os.urandom(n) if fill is None else bytes([fill]) * n
    assert mac(otk, msg) == Poly1305.generate_tag(otk, msg)


def test_poly1305_reduction_edges() -> None:
    """Clamped r at its largest, s all ones, messages of 0xFF: the final h >= p branch."""
    r_max = bytes([0xFF, 0xFF, 0xFF, 0x0F, 0xFC, 0xFF, 0xFF, 0x0F] * 2)
    for s in (bytes(16), b"\xff" * 16):
        for n in (16, 32, 16 * 17, 16 * 33 + 5):
            otk = r_max + s
            for msg in (b"\xff" * n, bytes(n), b"\xfb" + b"\xff" * (n - 1)):
                assert mac(otk, msg) == Poly1305.generate_tag(otk, msg)


@settings(max_examples=100, deadline=None)
@given(
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=12, max_size=12),
    st.integers(min_value=0, max_value=2**32 - 80),  # 5000 bytes = 79 blocks, no wrap
    st.integers(min_value=0, max_value=5000),
)
def test_chacha20_matches_openssl(key: bytes, nonce: bytes, counter: int, n: int) -> None:
    data = os.urandom(n)
    ref = Cipher(algorithms.ChaCha20(key, counter.to_bytes(4, "little") + nonce), None)
    assert xor(key, nonce, counter, data) == ref.encryptor().update(data)


@settings(max_examples=100, deadline=None)
@given(
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=12, max_size=12),
    st.binary(max_size=100),
    st.integers(min_value=0, max_value=3000),
)
def test_aead_matches_openssl(key: bytes, nonce: bytes, aad: bytes, n: int) -> None:
    data = os.urandom(n)
    sealed = ChaCha20Poly1305(key).encrypt(nonce, data, aad)
    assert sealed == OpenSSLChaCha(key).encrypt(nonce, data, aad)
    assert ChaCha20Poly1305(key).decrypt(nonce, sealed, aad) == data


def wycheproof(name: str) -> list[tuple[dict, dict]]:
    path = DATA / "wycheproof" / name
    if not path.is_file():  # fail loudly: a missing vector file is not a pass
        raise FileNotFoundError(f"{path} is missing (set SEALSTORE_SHARED_DATA)")
    doc = json.loads(path.read_text())
    return [(g, t) for g in doc["testGroups"] for t in g["tests"]]


WYCHEPROOF = [
    pytest.param(aead, nonce_error, case, id=f"{name}-{case['tcId']}")
    for name, aead, nonce_error in (
        # Nonces other than 96 bits are refused (RFC 8439's and the sealed format's size).
        ("chacha20_poly1305", ChaCha20Poly1305, "Nonce must be 12 bytes"),
        ("aes_gcm", AESGCM, "96-bit"),
    )
    for _, case in wycheproof(f"{name}_test.json")
]


@pytest.mark.parametrize(("aead_class", "nonce_error", "case"), WYCHEPROOF)
def test_wycheproof(aead_class: type, nonce_error: str, case: dict) -> None:
    """Every Wycheproof ChaCha20-Poly1305 and AES-GCM case (AES with 128/192/256-bit keys)."""
    key, iv, aad = (bytes.fromhex(case[k]) for k in ("key", "iv", "aad"))
    msg, ct, tag = (bytes.fromhex(case[k]) for k in ("msg", "ct", "tag"))
    aead = aead_class(key)
    if len(iv) != 12:
        with pytest.raises(ValueError, match=nonce_error):
            aead.decrypt(iv, ct + tag, aad)
        return
    if case["result"] == "valid":
        assert aead.encrypt(iv, msg, aad) == ct + tag
        assert aead.decrypt(iv, ct + tag, aad) == msg
    else:
        out = bytearray(b"\x55" * len(ct))
        with pytest.raises(InvalidTag):
            aead.decrypt_into(iv, ct + tag, aad, out)
        assert out == b"\x55" * len(ct)  # not a byte written: the tag is checked first


def test_decrypt_refuses_tampering_anywhere() -> None:
    key, nonce, aad = os.urandom(32), os.urandom(12), b"header"
    sealed = bytearray(ChaCha20Poly1305(key).encrypt(nonce, os.urandom(5000), aad))
    for pos in (0, 1023, 1024, 4999, 5000, 5015):
        bad = bytearray(sealed)
        bad[pos] ^= 1
        with pytest.raises(InvalidTag):
            ChaCha20Poly1305(key).decrypt(nonce, bytes(bad), aad)
    with pytest.raises(InvalidTag):
        ChaCha20Poly1305(key).decrypt(nonce, bytes(sealed), b"other header")
    with pytest.raises(InvalidTag):
        ChaCha20Poly1305(key).decrypt(nonce, bytes(sealed[:15]), aad)


def test_no_key_in_repr() -> None:
    key = os.urandom(32)
    aead = ChaCha20Poly1305(key)
    assert key.hex() not in repr(aead) and "native" in repr(aead)
    aead.close()
    assert not aead._key.any()


# --------------------------------------------------------------------------- AES-GCM


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([16, 24, 32]),
    st.binary(min_size=12, max_size=12),
    st.binary(max_size=70),
    st.integers(min_value=0, max_value=3000),
)
def test_aes_gcm_matches_openssl(key_len: int, nonce: bytes, aad: bytes, n: int) -> None:
    key, data = os.urandom(key_len), os.urandom(n)
    sealed = AESGCM(key).encrypt(nonce, data, aad)
    assert sealed == OpenSSLAesGcm(key).encrypt(nonce, data, aad)
    assert AESGCM(key).decrypt(nonce, sealed, aad) == data


def test_aes_matches_fips197() -> None:
    """FIPS 197 appendix C.3: AES-256 of 00112233...eeff under 000102...1f."""
    from sealstore.native import aes

    rk = aes.expand_key(np.arange(32, dtype=np.uint8))
    out = np.empty(16, dtype=np.uint8)
    aes._encrypt_block(rk, u8(bytes.fromhex("00112233445566778899aabbccddeeff")), out)
    assert out.tobytes().hex() == "8ea2b7ca516745bfeafc49904b496089"


@pytest.mark.parametrize("suite", ["AES-256-GCM", "CHACHA20-POLY1305"])
@pytest.mark.filterwarnings("ignore:SEALSTORE_AEAD=native")
def test_the_stream_on_the_native_engine(suite: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SEALSTORE_AEAD=native: sealed files made by either engine open with the other.

    (For AES-256-GCM "native" keeps OpenSSL: the numba AES is never used in
    the stream; the other tests here check it against OpenSSL directly.)
    """
    from sealstore.keys import DataKey
    from sealstore.stream import SealedFile
    from tests.conftest import CS, seal_bytes

    dek = DataKey.generate()
    data = os.urandom(3 * CS + 777)
    by_openssl = seal_bytes(data, dek, suite=suite)
    monkeypatch.setenv("SEALSTORE_AEAD", "native")
    by_native = seal_bytes(data, dek, suite=suite)
    for sealed in (by_openssl, by_native):
        assert SealedFile(sealed, dek).read_range(0, len(data), threads=2) == data
    bad = bytearray(by_openssl)
    bad[-40] ^= 1
    with pytest.raises(AuthenticationError):
        SealedFile(bytes(bad), dek).read_range(0, len(data))
    monkeypatch.setenv("SEALSTORE_AEAD", "openssl")
    assert SealedFile(by_native, dek).read_range(0, len(data)) == data
    monkeypatch.setenv("SEALSTORE_AEAD", "fast")
    with pytest.raises(ValueError, match="SEALSTORE_AEAD"):
        SealedFile(by_native, dek)
