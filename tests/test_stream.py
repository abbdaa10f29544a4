"""STREAM: round trips, random access, tampering, the writer's failure modes, key handles."""

from __future__ import annotations

import copy
import dataclasses
import gc
import io
import itertools
import pickle
import random
import struct
from array import array
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from sealstore.errors import AuthenticationError, FormatError
from sealstore.format import (
    MAGIC,
    SUITES,
    TAG_SIZE,
    canonical_json,
    derive_keys,
    parse_preamble,
)
from sealstore.keys import DataKey, KeySlot
from sealstore.stream import ChunkLayout, SealedFile, SealReader, SealWriter, chunk_nonce
from tests.conftest import CS, seal_bytes

FULL = CS + TAG_SIZE
SIZES = [0, 1, CS - 1, CS, CS + 1, 2 * CS + 500, 777, 3 * CS + 12345, 4 * CS]


def plaintext(n: int) -> bytes:
    return random.Random(n).randbytes(n)


@cache
def fixed_key() -> DataKey:
    return DataKey(bytes(range(100, 132)))


def expected_chunks(n: int) -> int:
    return max(1, -(-n // CS))


def check_sealed(sealed: bytes, data: bytes, dek: DataKey, tmp_path: Path) -> None:
    """Every reader returns *data* from *sealed*."""
    pre = parse_preamble(sealed)
    count = expected_chunks(len(data))
    assert len(sealed) == pre.payload_offset + len(data) + count * TAG_SIZE
    if len(data) >= 32:
        assert data[:32] not in sealed

    # SealReader: read(), read(n) in pieces, readinto, iter_chunks; 1 and 3 threads.
    for threads in (1, 3):
        assert SealReader(io.BytesIO(sealed), dek, threads=threads).read() == data
        reader = SealReader(io.BytesIO(sealed), dek, threads=threads)
        pieces = []
        step = 0
        while True:
            piece = reader.read((1, 1000, CS - 1, CS + 7)[step % 4])
            step += 1
            if not piece:
                break
            pieces.append(piece)
        assert b"".join(pieces) == data
        assert reader.read() == b""
        reader = SealReader(io.BytesIO(sealed), dek, threads=threads)
        buf = bytearray(len(data) + 10)
        assert reader.readinto(buf) == len(data)
        assert bytes(buf[: len(data)]) == data
        reader = SealReader(io.BytesIO(sealed), dek, threads=threads)
        chunks = [bytes(view) for view in reader.iter_chunks()]
        assert b"".join(chunks) == data
        assert all(len(c) == CS for c in chunks[:-1])
        assert len(chunks) == (count if data else 0)  # an empty final chunk yields nothing

    # SealedFile from bytes, a path and a file object.
    path = tmp_path / "sealed.bin"
    path.write_bytes(sealed)

    # SealReader over a regular file takes the memory-mapped path, also when the
    # sealed bytes start part-way into the file.
    embedded = tmp_path / "embedded.bin"
    embedded.write_bytes(b"x" * 1000 + sealed)
    for threads in (1, 3):
        with path.open("rb") as fp, SealReader(fp, dek, threads=threads) as reader:
            assert reader._file is not None
            assert reader.read() == data
        with embedded.open("rb") as fp:
            fp.seek(1000)
            assert SealReader(fp, dek, threads=threads).read() == data
    with path.open("rb") as fp:
        for src in (sealed, bytearray(sealed), memoryview(sealed), path, str(path), fp):
            with SealedFile(src, dek) as sf:
                assert sf.size == len(data)
                assert sf.chunk_count == count
                assert sf.read_range(0, len(data) + 5) == data
                out = bytearray(len(data))
                assert sf.decrypt_into(out, threads=2) == len(data)
                assert out == data
                sf.verify()


# -- round trips --------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("threads", [1, 3])
def test_round_trip(suite: str, size: int, threads: int, tmp_path: Path) -> None:
    data = plaintext(size)
    dek = DataKey.generate()
    sealed = seal_bytes(data, dek, suite=suite, threads=threads)
    assert parse_preamble(sealed).header.suite == suite
    check_sealed(sealed, data, dek, tmp_path)


@pytest.mark.parametrize("piece", [1, 7, CS + 3])
@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, 2 * CS + 500])
@pytest.mark.parametrize("threads", [1, 3])
def test_odd_write_sizes(piece: int, size: int, threads: int, tmp_path: Path) -> None:
    data = plaintext(size)
    dek = DataKey.generate()
    out = io.BytesIO()
    with SealWriter(out, dek, chunk_size=CS, threads=threads) as writer:
        for pos in range(0, size, piece):
            assert writer.write(data[pos : pos + piece]) == len(data[pos : pos + piece])
        assert writer.plaintext_written == size
    check_sealed(out.getvalue(), data, dek, tmp_path)


@pytest.mark.parametrize("size", [0, CS, 2 * CS + 500])
def test_declared_plaintext_size(size: int, tmp_path: Path) -> None:
    data = plaintext(size)
    dek = DataKey.generate()
    sealed = seal_bytes(data, dek, plaintext_size=size, context={"name": "m"})
    header = parse_preamble(sealed).header
    assert header.plaintext_size == size
    assert dict(header.context) == {"name": "m"}
    check_sealed(sealed, data, dek, tmp_path)


def test_writer_accepts_buffers_and_copies_them() -> None:
    dek = DataKey.generate()
    data = plaintext(3 * CS + 5)
    for threads in (1, 3):
        out = io.BytesIO()
        with SealWriter(out, dek, chunk_size=CS, threads=threads) as writer:
            buf = bytearray(data)
            writer.write(buf)
            buf[:] = bytes(len(buf))  # the caller reuses its buffer at once
            assert writer.write(memoryview(b"xyz")) == 3
            assert writer.write(array("H", [1, 2])) == 4
        expected = data + b"xyz" + array("H", [1, 2]).tobytes()
        assert SealReader(io.BytesIO(out.getvalue()), dek).read() == expected


def test_writer_needs_only_write() -> None:
    class WriteOnly:
        def __init__(self) -> None:
            self.parts: list[bytes] = []

        def write(self, b: bytes) -> int:
            self.parts.append(bytes(b))
            return len(b)

    dek = DataKey.generate()
    sink = WriteOnly()
    with SealWriter(sink, dek, chunk_size=CS) as writer:  # type: ignore[arg-type]
        writer.write(b"hello")
    assert SealReader(io.BytesIO(b"".join(sink.parts)), dek).read() == b"hello"


def test_reader_needs_only_read() -> None:
    class ReadOnly:
        def __init__(self, data: bytes) -> None:
            self._fp = io.BytesIO(data)

        def read(self, n: int = -1) -> bytes:
            return self._fp.read(min(n, 1000))  # short reads, too

    dek = DataKey.generate()
    data = plaintext(2 * CS + 500)
    reader = SealReader(ReadOnly(seal_bytes(data, dek)), dek, threads=2)  # type: ignore[arg-type]
    assert reader.read() == data


def test_reader_with_preamble_given() -> None:
    dek = DataKey.generate()
    sealed = seal_bytes(b"abc", dek)
    fp = io.BytesIO(sealed)
    from sealstore.format import read_preamble

    pre = read_preamble(fp)
    reader = SealReader(fp, dek, preamble=pre)
    assert reader.header == pre.header and reader.read() == b"abc"


def test_chunk_nonce_layout() -> None:
    prefix = bytes(range(7))
    assert chunk_nonce(prefix, 0, False) == prefix + b"\x00\x00\x00\x00\x00"
    assert chunk_nonce(prefix, 258, True) == prefix + b"\x00\x00\x01\x02\x01"
    for bad in (-1, 2**32):
        with pytest.raises(ValueError):
            chunk_nonce(prefix, bad, False)


def test_bad_parameters() -> None:
    dek = DataKey.generate()
    for kwargs in ({"threads": 0}, {"chunk_size": 1000}, {"suite": "ROT13"}):
        with pytest.raises(ValueError):
            SealWriter(io.BytesIO(), dek, **kwargs)  # type: ignore[arg-type]
    sealed = seal_bytes(b"x", dek)
    with pytest.raises(ValueError):
        SealReader(io.BytesIO(sealed), dek, threads=0)
    with pytest.raises(TypeError):
        SealedFile(12345, dek)


# -- random access ------------------------------------------------------------------

RA_SIZE = 5 * CS + 777


@cache
def ra_file(declared: bool) -> tuple[bytes, SealedFile]:
    data = plaintext(RA_SIZE)
    sealed = seal_bytes(data, fixed_key(), plaintext_size=RA_SIZE if declared else None)
    return data, SealedFile(sealed, fixed_key())


@settings(max_examples=150, deadline=None)
@given(
    st.integers(min_value=0, max_value=RA_SIZE + 100),
    st.integers(min_value=0, max_value=3 * CS),
    st.sampled_from([1, 2]),
    st.booleans(),
)
def test_read_range(offset: int, n: int, threads: int, declared: bool) -> None:
    data, sf = ra_file(declared)
    assert sf.read_range(offset, n, threads=threads) == data[offset : offset + n]
    buf = bytearray(b"\xee" * n)
    got = sf.read_into(offset, buf, threads=threads)
    assert got == len(data[offset : offset + n])
    assert buf[:got] == data[offset : offset + n]
    assert buf[got:] == b"\xee" * (n - got)  # past the end: untouched


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(  # chunk edges and their neighbours, and anywhere
            st.sampled_from([x for k in range(6) for x in (k * CS - 1, k * CS, k * CS + 1)][1:]),
            st.integers(min_value=0, max_value=RA_SIZE),
        ),
        min_size=2,
        max_size=12,
        unique=True,
    ),
    st.lists(st.booleans(), min_size=12, max_size=12),
    st.sampled_from([1, 2, 3]),
)
def test_read_scatter(cuts: list[int], keep: list[bool], threads: int) -> None:
    """Ranges with gaps, several in one chunk, empty ones: each gets exactly its bytes."""
    data, sf = ra_file(True)
    cuts.sort()
    pieces = [
        (a, bytearray(b"\xee" * (b - a)))
        for (a, b), k in zip(itertools.pairwise(cuts), keep, strict=False)
        if k
    ]
    sf.read_scatter(pieces[::-1], threads=threads)  # any order
    for a, buf in pieces:
        assert buf == data[a : a + len(buf)]


def test_read_scatter_refuses_bad_ranges() -> None:
    _, sf = ra_file(True)
    with pytest.raises(ValueError, match="overlap"):
        sf.read_scatter([(0, bytearray(10)), (5, bytearray(10))])
    with pytest.raises(ValueError, match="outside"):
        sf.read_scatter([(RA_SIZE - 1, bytearray(2))])
    with pytest.raises(ValueError, match="outside"):
        sf.read_scatter([(-1, bytearray(1))])


def test_read_range_edges() -> None:
    data, sf = ra_file(False)
    for offset in (0, CS - 1, CS, RA_SIZE - 1):
        for n in (0, 1, 2, CS, CS + 1):
            assert sf.read_range(offset, n) == data[offset : offset + n]
    assert sf.read_range(RA_SIZE, 10) == b""
    assert sf.read_range(RA_SIZE + 10**9, 10) == b""
    with pytest.raises(ValueError):
        sf.read_range(-1, 10)
    with pytest.raises(ValueError):
        sf.read_range(0, -1)
    with pytest.raises(ValueError):
        sf.read_into(-1, bytearray(4))


def test_decrypt_chunk_into() -> None:
    data, sf = ra_file(False)
    assert sf.chunk_count == 6
    buf = bytearray(CS + 3)
    for i in range(sf.chunk_count):
        n = sf.decrypt_chunk_into(i, buf)
        assert bytes(buf[:n]) == data[i * CS : (i + 1) * CS]
    assert sf.decrypt_chunk_into(5, memoryview(bytearray(777))) == 777
    for bad in (-1, 6, 100):
        with pytest.raises(IndexError):
            sf.decrypt_chunk_into(bad, buf)
    with pytest.raises(ValueError):
        sf.decrypt_chunk_into(0, bytearray(CS - 1))
    assert sf.decrypt_chunk_into(5, bytearray(777)) == 777  # exactly big enough


def test_decrypt_into_and_progress() -> None:
    data, sf = ra_file(True)
    seen: list[int] = []
    buf = bytearray(RA_SIZE + 3)
    buf[-3:] = b"END"
    assert sf.decrypt_into(buf, threads=2, progress=seen.append) == RA_SIZE
    assert buf[:RA_SIZE] == data and buf[-3:] == b"END"
    assert sum(seen) == RA_SIZE
    with pytest.raises(ValueError):
        sf.decrypt_into(bytearray(RA_SIZE - 1))
    verified: list[int] = []
    sf.verify(threads=2, progress=verified.append)
    assert sum(verified) == RA_SIZE and len(verified) == 6


@pytest.fixture
def decrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    # Every chunk decryption, whichever public method asked for it.
    calls: list[int] = []
    original = SealedFile._decrypt_chunk

    def counting(self: SealedFile, i: int, buf: Any) -> int:
        calls.append(i)
        return original(self, i, buf)

    monkeypatch.setattr(SealedFile, "_decrypt_chunk", counting)
    return calls


def test_only_needed_chunks_are_decrypted(decrypt_calls: list[int]) -> None:
    dek = DataKey.generate()
    data = plaintext(10 * CS)
    sf = SealedFile(seal_bytes(data, dek), dek)
    assert sf.chunk_count == 10
    assert decrypt_calls == []  # opening decrypts nothing
    mid = 5 * CS + 100
    # No plaintext_size in the header: the final chunk is authenticated on the
    # first read, so a truncated file cannot pass as a shorter one.
    assert sf.read_range(mid, 10) == data[mid : mid + 10]
    assert decrypt_calls == [9, 5]
    decrypt_calls.clear()
    assert sf.read_range(3 * CS - 5, 10) == data[3 * CS - 5 : 3 * CS + 5]
    assert sorted(decrypt_calls) == [2, 3]
    decrypt_calls.clear()
    assert sf.read_range(mid, 0) == b""
    assert decrypt_calls == []


def test_declared_size_still_checks_the_end_once(decrypt_calls: list[int]) -> None:
    # Even with plaintext_size declared, the final chunk is authenticated before
    # the first byte is returned (it proves the header and the length), then never again.
    dek = DataKey.generate()
    data = plaintext(10 * CS)
    sf = SealedFile(seal_bytes(data, dek, plaintext_size=len(data)), dek)
    mid = 5 * CS + 100
    assert sf.read_range(mid, 10) == data[mid : mid + 10]
    assert decrypt_calls == [9, 5]
    decrypt_calls.clear()
    assert sf.read_range(mid, 10) == data[mid : mid + 10]
    assert decrypt_calls == [5]


def test_verify_then_read_skips_end_check(decrypt_calls: list[int]) -> None:
    dek = DataKey.generate()
    data = plaintext(4 * CS)
    sf = SealedFile(seal_bytes(data, dek), dek)
    sf.verify()
    assert decrypt_calls == [0, 1, 2, 3]
    decrypt_calls.clear()
    sf.read_range(CS, 1)
    assert decrypt_calls == [1]


# -- tampering ----------------------------------------------------------------------

TAMPER_SIZE = 3 * CS + 500  # three full chunks and a short last one


@cache
def victim(declared: bool) -> tuple[bytes, bytes, int]:
    """(plaintext, sealed bytes, payload offset) under fixed_key()."""
    data = plaintext(TAMPER_SIZE)
    sealed = seal_bytes(
        data, fixed_key(), plaintext_size=TAMPER_SIZE if declared else None, context={"a": "b"}
    )
    return data, sealed, parse_preamble(sealed).payload_offset


def split_chunks(sealed: bytes, po: int) -> list[bytes]:
    body = sealed[po:]
    return [body[i : i + FULL] for i in range(0, len(body), FULL)]


def assert_rejected(sealed: bytes, dek: DataKey | None = None) -> None:
    """Every reader raises AuthenticationError and hands back no plaintext."""
    dek = dek or fixed_key()
    for threads in (1, 3):
        with pytest.raises(AuthenticationError):
            SealReader(io.BytesIO(sealed), dek, threads=threads).read()
    for call in (
        lambda sf: sf.verify(),
        lambda sf: sf.verify(threads=2),
        lambda sf: sf.read_range(0, TAMPER_SIZE),
    ):
        with pytest.raises(AuthenticationError):
            call(SealedFile(sealed, dek))
    try:
        sf = SealedFile(sealed, dek)
    except AuthenticationError:
        return  # wrong key or impossible length: refused before any chunk is read
    for threads in (1, 2):
        buf = bytearray(b"\x55" * sf.size)
        with pytest.raises(AuthenticationError):
            sf.decrypt_into(buf, threads=threads)
        assert buf == bytes(sf.size)


def flip(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[pos] ^= mask
    return bytes(out)


def tampered(declared: bool) -> Iterator[tuple[str, bytes]]:
    _, sealed, po = victim(declared)
    pre, chunks = sealed[:po], split_chunks(sealed, po)
    assert len(chunks) == 4 and len(chunks[-1]) == 500 + TAG_SIZE
    for i, chunk in enumerate(chunks):
        for pos in (0, len(chunk) // 2, len(chunk) - TAG_SIZE - 1, len(chunk) - 1):
            yield (
                f"flip chunk {i} byte {pos}",
                pre + b"".join(chunks[:i]) + flip(chunk, pos, 0x80) + b"".join(chunks[i + 1 :]),
            )
    c = chunks
    yield "swap 0 1", pre + c[1] + c[0] + c[2] + c[3]
    yield "swap 1 2", pre + c[0] + c[2] + c[1] + c[3]
    yield "duplicate 0", pre + c[0] + c[0] + c[1] + c[2] + c[3]
    yield "duplicate 1", pre + c[0] + c[1] + c[1] + c[2] + c[3]
    yield "duplicate last", pre + c[0] + c[1] + c[2] + c[3] + c[3]
    yield "drop 0", pre + c[1] + c[2] + c[3]
    yield "drop 1", pre + c[0] + c[2] + c[3]
    yield "truncate at boundary", pre + c[0] + c[1] + c[2]
    yield "truncate at first boundary", pre + c[0]
    yield "truncate to preamble", pre
    yield "truncate mid chunk", pre + c[0] + c[1][:100]
    yield "truncate mid full chunk tag", pre + c[0] + c[1][:-5]
    for cut in (1, 8, 15, 16, 17):
        yield f"cut {cut} bytes", sealed[:-cut]
    for extra in (b"\x00", b"\x00" * 16, b"\x00" * 17, c[3], c[0], bytes(FULL)):
        yield f"trailing {len(extra)} bytes", sealed + extra
    # The final chunk re-sealed, with the right key, under a non-final nonce: what a
    # writer that never finished would leave. It must not pass as a whole file.
    data = victim(declared)[0]
    header = parse_preamble(sealed).header
    key, _ = derive_keys(fixed_key(), header.salt, header.suite)
    aead = AESGCM(key) if header.suite == "AES-256-GCM" else ChaCha20Poly1305(key)
    nonce = chunk_nonce(header.nonce_prefix, 3, False)
    resealed = aead.encrypt(nonce, data[3 * CS :], parse_preamble(sealed).aad)
    assert len(resealed) == len(c[3]) and resealed != c[3]
    yield "last chunk marked non-final", pre + c[0] + c[1] + c[2] + resealed


@pytest.mark.parametrize("declared", [False, True])
def test_tampered_payloads_are_rejected(declared: bool) -> None:
    for name, sealed in tampered(declared):
        try:
            assert_rejected(sealed)
        except BaseException as exc:
            raise AssertionError(f"case {name!r}: {exc!r}") from exc


def rebuild_header(sealed: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    pre = parse_preamble(sealed)
    obj = pre.header.to_json()
    edit(obj)
    hbytes = canonical_json(obj)
    rest = sealed[len(MAGIC) + 4 + len(pre.header_bytes) :]
    return MAGIC + struct.pack("<I", len(hbytes)) + hbytes + rest


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda obj: obj.__setitem__(key, value)


HEADER_EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "context value": _set("context", {"a": "c"}),
    "context added": _set("context", {"a": "b", "b": "a"}),
    "context dropped": _set("context", {}),
    "nonce prefix": _set("nonce_prefix", "AAAAAAAAAA=="),
    "salt": _set("salt", "A" * 43 + "="),
    "commitment": _set("commitment", "A" * 43 + "="),
    "suite": lambda obj: obj.__setitem__(
        "suite", "CHACHA20-POLY1305" if obj["suite"] == "AES-256-GCM" else "AES-256-GCM"
    ),
    "plaintext_size added or dropped": lambda obj: (
        obj.pop("plaintext_size")
        if "plaintext_size" in obj
        else _set("plaintext_size", TAMPER_SIZE)(obj)
    ),
    "plaintext_size wrong": _set("plaintext_size", TAMPER_SIZE - 1),
    "chunk size": _set("chunk_size", 2 * CS),
}


@pytest.mark.parametrize("declared", [False, True])
@pytest.mark.parametrize("edit", sorted(HEADER_EDITS))
def test_header_edits_are_rejected(declared: bool, edit: str) -> None:
    _, sealed, _ = victim(declared)
    changed = rebuild_header(sealed, HEADER_EDITS[edit])
    assert changed != sealed
    assert_rejected(changed)


@pytest.mark.parametrize("declared", [False, True])
def test_every_header_bit_flip_is_caught(declared: bool) -> None:
    _, sealed, _ = victim(declared)
    hlen = len(parse_preamble(sealed).header_bytes)
    start = len(MAGIC) + 4
    dek = fixed_key()
    for pos in range(start, start + hlen):
        for mask in (0x01, 0x20):
            bad = flip(sealed, pos, mask)
            try:
                parse_preamble(bad)
            except FormatError:
                continue  # malformed, rejected before any key is used
            # Still parses: the change must fail authentication somewhere.
            with pytest.raises(AuthenticationError), SealedFile(bad, dek) as sf:
                sf.read_range(0, 1)
            with pytest.raises(AuthenticationError):
                SealReader(io.BytesIO(bad), dek).read()


def test_wrong_key() -> None:
    _, sealed, _ = victim(False)
    for other in (DataKey.generate(), DataKey(bytes(32))):
        with pytest.raises(AuthenticationError):
            SealedFile(sealed, other)
        with pytest.raises(AuthenticationError):
            SealReader(io.BytesIO(sealed), other)


def test_spliced_chunk_from_another_file_with_the_same_key() -> None:
    data, sealed, po = victim(False)
    other = seal_bytes(data, fixed_key(), context={"a": "b"})
    mine = split_chunks(sealed, po)
    theirs = split_chunks(other, parse_preamble(other).payload_offset)
    for i in range(4):
        spliced = list(mine)
        spliced[i] = theirs[i]
        assert_rejected(sealed[:po] + b"".join(spliced))
    # The other file's whole payload under this header fails as well.
    assert_rejected(sealed[:po] + b"".join(theirs))


def test_slot_section_is_not_authenticated_but_cannot_change_plaintext() -> None:
    # Slots are rewritten by key rotation, so they sit outside the AAD: a file
    # with its slot section replaced still decrypts to the same plaintext.
    dek = DataKey.generate()
    slot = KeySlot("local", "local:x", b"\x00" * 60, {"keyring": "r", "kek": "k1"})
    sealed = seal_bytes(b"payload", dek, slots=[slot])
    pre = parse_preamble(sealed)
    assert pre.slots == (slot,)
    assert SealedFile(sealed, dek).read_range(0, 100) == b"payload"


def test_reader_stays_failed() -> None:
    data, sealed, po = victim(False)
    bad = flip(sealed, po + FULL + 3)  # chunk 1
    reader = SealReader(io.BytesIO(bad), fixed_key())
    assert reader.read(CS) == data[:CS]  # chunk 0 is authentic and may be streamed
    with pytest.raises(AuthenticationError):
        reader.read(CS)
    with pytest.raises(AuthenticationError):
        reader.read()
    with pytest.raises(AuthenticationError):
        list(reader.iter_chunks())


def test_failed_read_into_zeroes_the_whole_buffer() -> None:
    data, sealed, po = victim(True)
    bad = flip(sealed, po + 2 * FULL + 3)  # chunk 2
    sf = SealedFile(bad, fixed_key())
    # Chunks 0 and 1 (and the partial edge of 2) would decrypt; none may remain.
    buf = bytearray(b"\x77" * (3 * CS))
    with pytest.raises(AuthenticationError):
        sf.read_into(CS // 2, buf, threads=2)
    assert buf == bytes(len(buf))
    assert sf.read_range(0, CS) == data[:CS]  # good chunks still read


def test_decrypt_chunk_into_zeroes_on_failure() -> None:
    _, sealed, po = victim(True)
    sf = SealedFile(flip(sealed, po + 10), fixed_key())
    buf = bytearray(b"\x99" * (CS + 10))
    with pytest.raises(AuthenticationError):
        sf.decrypt_chunk_into(0, buf)
    assert buf[:CS] == bytes(CS)


@pytest.mark.parametrize("declared", [False, True])
def test_empty_file_tampered(declared: bool) -> None:
    dek = DataKey.generate()
    sealed = seal_bytes(b"", dek, plaintext_size=0 if declared else None)
    assert SealReader(io.BytesIO(sealed), dek).read() == b""
    bad = flip(sealed, len(sealed) - 1)
    with pytest.raises(AuthenticationError):
        SealReader(io.BytesIO(bad), dek).read()
    with pytest.raises(AuthenticationError):
        SealedFile(bad, dek).verify()
    # decrypt_into promises the whole plaintext, authenticated: even when it is
    # empty, and even when only the (authenticated) header was changed.
    with pytest.raises(AuthenticationError):
        SealedFile(bad, dek).decrypt_into(bytearray())
    edited = rebuild_header(sealed, _set("context", {"owner": "mallory"}))
    with pytest.raises(AuthenticationError):
        SealedFile(edited, dek).decrypt_into(bytearray())


def test_truncation_to_an_empty_final_chunk_is_caught() -> None:
    # Cutting a file (no plaintext_size) right after its first 16 payload bytes
    # leaves a length that looks like an empty one-chunk file.
    _, sealed, po = victim(False)
    cut = sealed[: po + TAG_SIZE]
    with pytest.raises(AuthenticationError):
        SealReader(io.BytesIO(cut), fixed_key()).read()
    with pytest.raises(AuthenticationError):
        SealedFile(cut, fixed_key()).verify()
    with pytest.raises(AuthenticationError):
        SealedFile(cut, fixed_key()).decrypt_into(bytearray(16))


def test_readers_agree_on_a_wrong_declared_size() -> None:
    # A writer holding the key (buggy or malicious) declares 5 bytes but seals 10.
    # The header is authentic, so every reader must refuse the length mismatch.
    dek = DataKey.generate()
    out = io.BytesIO()
    writer = SealWriter(out, dek, chunk_size=CS, plaintext_size=5)
    writer.header = dataclasses.replace(writer.header, plaintext_size=None)  # skip the check
    writer.write(b"0123456789")
    writer.close()
    sealed = out.getvalue()
    assert parse_preamble(sealed).header.plaintext_size == 5
    with pytest.raises(AuthenticationError):
        SealedFile(sealed, dek)
    with pytest.raises(AuthenticationError):
        SealReader(io.BytesIO(sealed), dek).read()


def test_layout() -> None:
    _, sealed, po = victim(False)
    header = parse_preamble(sealed).header
    layout = ChunkLayout(header, po, len(sealed) - po)
    assert (layout.count, layout.last_len, layout.plaintext_size) == (4, 500, TAMPER_SIZE)
    assert layout.offset(2) == po + 2 * FULL
    assert [layout.plain_len(i) for i in range(4)] == [CS, CS, CS, 500]
    for bad_len in (0, 5, 15, FULL + 16, FULL + 3):
        with pytest.raises(AuthenticationError):
            ChunkLayout(header, po, bad_len)
    assert ChunkLayout(header, po, 16).plaintext_size == 0
    assert ChunkLayout(header, po, 2 * FULL).count == 2


# -- the writer's failure modes -----------------------------------------------------


@pytest.mark.parametrize("written", [0, 5, CS, 2 * CS + 1, 20])
def test_declared_size_mismatch(written: int) -> None:
    dek = DataKey.generate()
    out = io.BytesIO()
    with (
        pytest.raises(ValueError, match="plaintext_size"),
        SealWriter(out, dek, chunk_size=CS, plaintext_size=10) as writer,
    ):
        writer.write(plaintext(written))
    assert writer.closed
    with pytest.raises(AuthenticationError):
        SealReader(io.BytesIO(out.getvalue()), dek).read()
    with pytest.raises(AuthenticationError):
        SealedFile(out.getvalue(), dek).verify()


def test_declared_size_mismatch_on_explicit_close() -> None:
    dek = DataKey.generate()
    out = io.BytesIO()
    writer = SealWriter(out, dek, chunk_size=CS, plaintext_size=CS + 1, threads=3)
    writer.write(plaintext(CS))
    with pytest.raises(ValueError):
        writer.close()
    writer.close()  # now a no-op
    with pytest.raises(AuthenticationError):
        SealReader(io.BytesIO(out.getvalue()), dek).read()


def test_writing_past_the_declared_size_fails_at_once() -> None:
    dek = DataKey.generate()
    out = io.BytesIO()
    writer = SealWriter(out, dek, chunk_size=CS, plaintext_size=CS + 1, threads=3)
    with pytest.raises(ValueError, match="more bytes were written"):
        writer.write(plaintext(2 * CS))
    writer.close()  # the writer was aborted: a no-op
    with pytest.raises(AuthenticationError):
        SealReader(io.BytesIO(out.getvalue()), dek).read()


@pytest.mark.parametrize("written", [0, 100, CS, 2 * CS, 2 * CS + CS // 2])
@pytest.mark.parametrize("threads", [1, 3])
def test_exception_inside_with_leaves_no_final_chunk(written: int, threads: int) -> None:
    dek = DataKey.generate()
    out = io.BytesIO()
    with (
        pytest.raises(RuntimeError),
        SealWriter(out, dek, chunk_size=CS, threads=threads) as writer,
    ):
        writer.write(plaintext(written))
        raise RuntimeError("producer failed")
    with pytest.raises(AuthenticationError):
        SealReader(io.BytesIO(out.getvalue()), dek).read()
    with pytest.raises(AuthenticationError):
        SealedFile(out.getvalue(), dek).verify()
    with pytest.raises(ValueError):
        writer.write(b"more")


def test_abort_leaves_no_final_chunk() -> None:
    dek = DataKey.generate()
    out = io.BytesIO()
    writer = SealWriter(out, dek, chunk_size=CS)
    writer.write(plaintext(CS + 10))
    writer.abort()
    writer.close()  # after abort: nothing more is written
    with pytest.raises(AuthenticationError):
        SealReader(io.BytesIO(out.getvalue()), dek).read()


def test_unclosed_writer_does_not_finalize_when_collected() -> None:
    # A producer that fails without a ``with`` block drops its writer; the
    # garbage collector must not seal the final chunk on its behalf, or the
    # prefix written so far would authenticate as a complete, shorter file.
    dek = DataKey.generate()
    out = io.BytesIO()

    def producer() -> None:
        writer = SealWriter(out, dek, chunk_size=CS)
        writer.write(plaintext(CS + 100))
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError):
        producer()
    gc.collect()
    with pytest.raises(AuthenticationError):
        SealReader(io.BytesIO(out.getvalue()), dek).read()


def test_write_after_close() -> None:
    dek = DataKey.generate()
    writer = SealWriter(io.BytesIO(), dek, chunk_size=CS)
    writer.close()
    with pytest.raises(ValueError):
        writer.write(b"x")
    assert writer.writable()


# -- key handles --------------------------------------------------------------------


def test_data_key_is_opaque() -> None:
    raw = bytes(range(32))
    dek = DataKey(raw)
    for text in (repr(dek), str(dek), f"{dek}"):
        assert "redacted" in text
        assert raw.hex() not in text and repr(raw) not in text
    with pytest.raises(TypeError):
        pickle.dumps(dek)
    with pytest.raises(TypeError):
        copy.copy(dek)
    with pytest.raises(TypeError):
        copy.deepcopy(dek)
    with pytest.raises(TypeError):
        copy.deepcopy({"k": dek})
    assert dek == dek and dek != DataKey(raw)
    assert {dek: 1}[dek] == 1
    assert not hasattr(dek, "__dict__")


def test_data_key_close_wipes() -> None:
    raw = bytes(range(1, 33))
    dek = DataKey(raw)
    buf = dek._buf
    assert buf == raw and dek.material() == raw
    dek.close()
    assert buf == bytes(32)
    assert dek.closed and repr(dek) == "<DataKey closed>"
    with pytest.raises(ValueError):
        dek.material()
    dek.close()  # idempotent
    with DataKey.generate() as other:
        assert not other.closed
    assert other.closed


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_data_key_size(size: int) -> None:
    with pytest.raises(ValueError):
        DataKey(bytes(size))


def test_data_key_generate_is_random() -> None:
    assert DataKey.generate().material() != DataKey.generate().material()


def test_key_slot_repr_hides_blob() -> None:
    blob = bytes(range(200, 256)) + b"SECRETBLOB"
    slot = KeySlot("local", "local:/ring.json", blob, {"keyring": "r"})
    text = repr(slot)
    import base64

    assert "local:/ring.json" in text and f"<{len(blob)} bytes>" in text
    for leak in (blob.hex(), base64.b64encode(blob).decode(), "SECRETBLOB", repr(blob)[2:20]):
        assert leak not in text
    assert str(slot) == text


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(
    "damage",
    ["flip-middle", "flip-last", "truncate-boundary", "truncate-mid", "trailing"],
)
def test_file_backed_reader_rejects_damage(damage: str, threads: int, tmp_path: Path) -> None:
    dek = DataKey.generate()
    data = plaintext(4 * CS + 10)
    sealed = bytearray(seal_bytes(data, dek))
    off = parse_preamble(bytes(sealed)).payload_offset
    full = CS + TAG_SIZE
    if damage == "flip-middle":
        sealed[off + 2 * full + 5] ^= 1
    elif damage == "flip-last":
        sealed[-1] ^= 1
    elif damage == "truncate-boundary":
        del sealed[off + 4 * full :]
    elif damage == "truncate-mid":
        del sealed[-7:]
    else:
        sealed += b"\0"
    path = tmp_path / "damaged.bin"
    path.write_bytes(sealed)
    got = bytearray()
    with pytest.raises(AuthenticationError), path.open("rb") as fp:
        reader = SealReader(fp, dek, threads=threads)
        for view in reader.iter_chunks():
            got += view
    if damage == "flip-middle":
        # Only whole chunks that authenticated, all before the bad one (a reader
        # working in batches may release fewer).
        assert len(got) % CS == 0 and len(got) <= 2 * CS and data.startswith(got)
    else:
        assert got == b""  # the mapped path proves the end before releasing anything


def test_compressed_file_objects_are_read_not_mapped(tmp_path: Path) -> None:
    """gzip passes fileno() through to the compressed file: it must not be memory-mapped."""
    import gzip

    from sealstore.stream import SealedFile

    dek = DataKey.generate()
    buf = io.BytesIO()
    with SealWriter(buf, dek, chunk_size=CS) as w:
        w.write(b"hello" * 1000)
    with gzip.open(tmp_path / "x.gz", "wb") as g:
        g.write(buf.getvalue())
    with gzip.open(tmp_path / "x.gz", "rb") as g, SealedFile(g, dek) as sf:
        assert sf.read_range(0, 5000) == b"hello" * 1000


@pytest.mark.parametrize("threads", [1, 4])
def test_a_small_declared_file_gets_small_buffers(threads: int) -> None:
    # Pushing thousands of small dataset shards must not zero a chunk-sized
    # ring and batch buffer per file.
    import tracemalloc

    dek = DataKey.generate()
    out = io.BytesIO()
    tracemalloc.start()
    try:
        with SealWriter(
            out, dek, chunk_size=1 << 20, plaintext_size=100, threads=threads
        ) as writer:
            writer.write(plaintext(60))
            writer.write(plaintext(40))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10, peak
    assert SealReader(io.BytesIO(out.getvalue()), dek).read() == plaintext(60) + plaintext(40)
