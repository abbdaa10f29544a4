"""The v1 preamble codec: round trips, every rejection, and fuzzing of the parsers."""

from __future__ import annotations

import base64
import io
import json
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealstore.errors import (
    AuthenticationError,
    FormatError,
    SealstoreError,
    UnsupportedVersion,
)
from sealstore.format import (
    CHUNK_MAX,
    CHUNK_MIN,
    MAGIC,
    MAX_HEADER_SIZE,
    MAX_SLOTS,
    MAX_SLOTS_SIZE,
    SUITES,
    Header,
    build_preamble,
    canonical_json,
    derive_keys,
    encode_slots,
    header_aad,
    open_payload_key,
    parse_preamble,
    read_preamble,
)
from sealstore.keys import DataKey, KeySlot

U32 = struct.Struct("<I")
DEK = DataKey(bytes(range(32)))
SLOTS = (
    KeySlot("local", "local:/k.json", b"\x01" * 60, {"keyring": "ring-id", "kek": "k1"}),
    KeySlot("x25519", "x25519:abc", b"\x02" * 112),
)


def valid_header(**kwargs: Any) -> Header:
    kwargs.setdefault("chunk_size", CHUNK_MIN)
    header, _ = Header.new(DEK, **kwargs)
    return header


def valid_obj(**kwargs: Any) -> dict[str, Any]:
    return valid_header(**kwargs).to_json()


def raw_preamble(header: bytes | dict[str, Any], slots: bytes = b"") -> bytes:
    """A preamble with these exact header and slot bytes (no validation)."""
    hbytes = header if isinstance(header, bytes) else canonical_json(header)
    return MAGIC + U32.pack(len(hbytes)) + hbytes + U32.pack(len(slots)) + slots


def both_parsers(data: bytes) -> list[Any]:
    """Parse with parse_preamble and read_preamble; return both results."""
    return [parse_preamble(data), read_preamble(io.BytesIO(data))]


def assert_rejects(data: bytes, error: type[Exception] = FormatError) -> None:
    with pytest.raises(error):
        parse_preamble(data)
    with pytest.raises(error):
        read_preamble(io.BytesIO(data))


# -- round trips --------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("plaintext_size", [None, 0, 12345, 2**40])
def test_header_encode_decode_round_trip(suite: str, plaintext_size: int | None) -> None:
    header = valid_header(
        suite=suite,
        chunk_size=CHUNK_MAX,
        context={"model": "llama", "ünïcode": "välue ✓"},
        plaintext_size=plaintext_size,
    )
    decoded = Header.decode(header.encode())
    assert decoded == header
    assert decoded.encode() == header.encode()
    assert ("plaintext_size" in header.to_json()) == (plaintext_size is not None)


def test_header_new_fresh_randomness_and_commitment() -> None:
    h1, k1 = Header.new(DEK, chunk_size=CHUNK_MIN)
    h2, k2 = Header.new(DEK, chunk_size=CHUNK_MIN)
    assert h1.salt != h2.salt and h1.nonce_prefix != h2.nonce_prefix and k1 != k2
    assert len(h1.salt) == 32 and len(h1.nonce_prefix) == 7 and len(h1.commitment) == 32
    assert (k1, h1.commitment) == derive_keys(DEK, h1.salt, h1.suite)
    assert open_payload_key(h1, DEK) == k1
    with pytest.raises(AuthenticationError):
        open_payload_key(h1, DataKey(bytes(32)))


def test_derive_keys_separates_suites() -> None:
    salt = bytes(32)
    aes = derive_keys(DEK, salt, "AES-256-GCM")
    chacha = derive_keys(DEK, salt, "CHACHA20-POLY1305")
    assert aes != chacha
    assert aes == derive_keys(DEK, salt, "AES-256-GCM")


@pytest.mark.parametrize("slots", [(), SLOTS[:1], SLOTS])
def test_preamble_round_trip(slots: tuple[KeySlot, ...]) -> None:
    header = valid_header(context={"a": "b"}, plaintext_size=7)
    data = build_preamble(header, slots)
    for pre in both_parsers(data + b"chunk bytes after the preamble"):
        assert pre.header == header
        assert pre.header_bytes == header.encode()
        assert pre.slots == slots
        assert pre.payload_offset == len(data)
        assert pre.slots_size == len(encode_slots(slots))
        assert pre.aad == header_aad(header.encode())


def test_read_preamble_leaves_file_at_first_chunk() -> None:
    data = build_preamble(valid_header(), SLOTS)
    fp = io.BytesIO(data + b"PAYLOAD")
    read_preamble(fp)
    assert fp.tell() == len(data)
    assert fp.read() == b"PAYLOAD"


def test_read_preamble_survives_short_reads() -> None:
    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._fp = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            return self._fp.read(min(n, 3) if n >= 0 else 3)

    data = build_preamble(valid_header(), SLOTS)
    assert read_preamble(Trickle(data)).slots == SLOTS  # type: ignore[arg-type]


def test_aad_binds_magic_length_and_header() -> None:
    hbytes = valid_header().encode()
    assert header_aad(hbytes) != header_aad(hbytes + b" ")
    assert len(header_aad(hbytes)) == 32


def test_slot_params_round_trip() -> None:
    slot = KeySlot("kms", "kms:arn", b"\x00\xff", {"region": "eu", "version": 3})
    assert KeySlot.from_json(json.loads(canonical_json(slot.to_json()))) == slot


# -- canonical JSON -----------------------------------------------------------------


def test_canonical_json() -> None:
    obj = {"b": 1, "a": [1, {"z": None, "y": True}], "é": "ü ✓"}
    assert canonical_json(obj) == '{"a":[1,{"y":true,"z":null}],"b":1,"é":"ü ✓"}'.encode()


def test_header_encoding_is_canonical() -> None:
    header = valid_header(context={"z": "1", "a": "2", "ß": "x"}, plaintext_size=3)
    data = header.encode()
    assert data == canonical_json(json.loads(data))
    assert b" " not in data and b"\n" not in data
    assert list(json.loads(data)) == sorted(json.loads(data))
    assert "ß".encode() in data  # UTF-8, not \u escapes


def test_decode_accepts_non_canonical_spacing() -> None:
    # Readers authenticate the bytes as stored, so non-canonical spacing is not
    # a security problem; they accept it.
    obj = valid_obj()
    header = Header.decode(json.dumps(obj, indent=2).encode())
    assert header.to_json() == obj


# -- rejections: framing ------------------------------------------------------------


def test_bad_magic() -> None:
    good = build_preamble(valid_header())
    for i in range(len(MAGIC)):
        bad = bytearray(good)
        bad[i] ^= 0x01
        assert_rejects(bytes(bad))
    assert_rejects(b"PK\x03\x04" + good[4:])
    assert_rejects(b"")


@pytest.mark.parametrize("hlen", [0, MAX_HEADER_SIZE + 1, 2**32 - 1])
def test_header_length_out_of_bounds(hlen: int) -> None:
    data = MAGIC + U32.pack(hlen) + canonical_json(valid_obj()) + U32.pack(0)
    with pytest.raises(FormatError, match="out of bounds"):
        parse_preamble(data)
    with pytest.raises(FormatError, match="out of bounds"):
        read_preamble(io.BytesIO(data))


@pytest.mark.parametrize("slen", [MAX_SLOTS_SIZE + 1, 2**32 - 1])
def test_slot_length_out_of_bounds(slen: int) -> None:
    hbytes = canonical_json(valid_obj())
    data = MAGIC + U32.pack(len(hbytes)) + hbytes + U32.pack(slen)
    with pytest.raises(FormatError, match="out of bounds"):
        parse_preamble(data)
    with pytest.raises(FormatError, match="out of bounds"):
        read_preamble(io.BytesIO(data))


@pytest.mark.parametrize("slots", [(), SLOTS])
def test_truncated_preamble_at_every_byte(slots: tuple[KeySlot, ...]) -> None:
    data = build_preamble(valid_header(context={"k": "v"}), slots)
    for i in range(len(data)):
        with pytest.raises(FormatError):
            parse_preamble(data[:i])
        with pytest.raises(FormatError):
            read_preamble(io.BytesIO(data[:i]))
    both_parsers(data)


def test_header_length_past_end_of_data() -> None:
    hbytes = canonical_json(valid_obj())
    assert_rejects(MAGIC + U32.pack(len(hbytes) + 10) + hbytes + U32.pack(0))


# -- rejections: header JSON --------------------------------------------------------


def test_duplicate_keys() -> None:
    obj = valid_obj()
    text = canonical_json(obj)
    assert_rejects(raw_preamble(text[:-1] + b',"v":1}'))
    assert_rejects(raw_preamble(text.replace(b'"context":{}', b'"context":{"a":"1","a":"2"}')))
    slots = b'[{"kind":"local","kind":"x","key_id":"","blob":""}]'
    assert_rejects(raw_preamble(obj, slots))


def test_unknown_field() -> None:
    assert_rejects(raw_preamble(dict(valid_obj(), extra=1)))
    assert_rejects(raw_preamble(dict(valid_obj(), V=1)))


@pytest.mark.parametrize(
    "name", ["suite", "chunk_size", "salt", "nonce_prefix", "commitment", "context"]
)
def test_missing_field(name: str) -> None:
    obj = valid_obj()
    del obj[name]
    assert_rejects(raw_preamble(obj))


def test_missing_version_is_a_format_error() -> None:
    obj = valid_obj()
    del obj["v"]
    with pytest.raises(FormatError) as info:
        parse_preamble(raw_preamble(obj))
    assert not isinstance(info.value, UnsupportedVersion)


@pytest.mark.parametrize("version", [0, 2, 3, 2**64])
def test_other_versions_unsupported(version: int) -> None:
    obj = dict(valid_obj(), v=version)
    assert_rejects(raw_preamble(obj), UnsupportedVersion)
    # A future version may have other fields: the version is checked first.
    obj["newfield"] = {"x": 1}
    del obj["suite"]
    assert_rejects(raw_preamble(obj), UnsupportedVersion)


@pytest.mark.parametrize("suite", ["AES-128-GCM", "aes-256-gcm", "XCHACHA20-POLY1305", ""])
def test_unknown_suite_unsupported(suite: str) -> None:
    assert_rejects(raw_preamble(dict(valid_obj(), suite=suite)), UnsupportedVersion)


@pytest.mark.parametrize("suite", [1, None, ["AES-256-GCM"], True])
def test_non_string_suite(suite: Any) -> None:
    with pytest.raises(FormatError) as info:
        parse_preamble(raw_preamble(dict(valid_obj(), suite=suite)))
    assert not isinstance(info.value, UnsupportedVersion)


@pytest.mark.parametrize("name", ["salt", "nonce_prefix", "commitment"])
@pytest.mark.parametrize(
    "value",
    ["!!!!", "AAAA AAA=", "AAA", "AAAA=", "ÄÄÄÄ", "-_-_", 1234, None, ["AAAA"]],
)
def test_bad_base64(name: str, value: Any) -> None:
    assert_rejects(raw_preamble(dict(valid_obj(), **{name: value})))


@pytest.mark.parametrize(("name", "size"), [("salt", 32), ("nonce_prefix", 7), ("commitment", 32)])
def test_wrong_byte_lengths(name: str, size: int) -> None:
    for n in (0, size - 1, size + 1, 2 * size):
        value = base64.b64encode(b"\x00" * n).decode()
        assert_rejects(raw_preamble(dict(valid_obj(), **{name: value})))
    good = base64.b64encode(b"\x00" * size).decode()
    parse_preamble(raw_preamble(dict(valid_obj(), **{name: good})))


@pytest.mark.parametrize(
    "chunk_size",
    [
        0,
        1,
        CHUNK_MIN // 2,
        CHUNK_MIN - 1,
        CHUNK_MIN + 1,
        3 * CHUNK_MIN,
        CHUNK_MAX - 1,
        2 * CHUNK_MAX,
        -CHUNK_MIN,
        float(CHUNK_MIN),
        str(CHUNK_MIN),
        True,
        None,
    ],
)
def test_bad_chunk_size(chunk_size: Any) -> None:
    assert_rejects(raw_preamble(dict(valid_obj(), chunk_size=chunk_size)))


@pytest.mark.parametrize("chunk_size", [CHUNK_MIN, 2 * CHUNK_MIN, 2**20, CHUNK_MAX])
def test_good_chunk_sizes(chunk_size: int) -> None:
    assert parse_preamble(raw_preamble(dict(valid_obj(), chunk_size=chunk_size)))


@pytest.mark.parametrize(
    "context",
    [{"a": 1}, {"a": None}, {"a": ["x"]}, {"a": {"b": "c"}}, {"a": True}, [], "a=b", None, 1],
)
def test_bad_context(context: Any) -> None:
    assert_rejects(raw_preamble(dict(valid_obj(), context=context)))


@pytest.mark.parametrize("field", ["v", "chunk_size", "plaintext_size"])
@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_an_int(field: str, value: bool) -> None:
    assert_rejects(raw_preamble(dict(valid_obj(), **{field: value})))


@pytest.mark.parametrize("value", [-1, 1.0, 1.5, "10", [1], {"n": 1}])
def test_bad_plaintext_size(value: Any) -> None:
    assert_rejects(raw_preamble(dict(valid_obj(), plaintext_size=value)))


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"])
@pytest.mark.parametrize("field", ["v", "chunk_size", "plaintext_size"])
def test_nan_and_infinity(literal: bytes, field: str) -> None:
    obj = dict(valid_obj(), **{field: 424242})
    text = canonical_json(obj).replace(b"424242", literal)
    assert_rejects(raw_preamble(text))


def test_plaintext_size_null_means_absent() -> None:
    header = parse_preamble(raw_preamble(dict(valid_obj(), plaintext_size=None))).header
    assert header.plaintext_size is None


@pytest.mark.parametrize(
    "text",
    [
        b"[]",
        b'"header"',
        b"1",
        b"null",
        b"{",
        b"{}",
        b"\xff\xfe{}",
        b'{"v":1',
        b"\x00" * 8,
        b"[" * 50_000,
        b'{"v":1}garbage',
        b"9" * 5000,  # past Python's int-string conversion limit
    ],
)
def test_malformed_header_bytes(text: bytes) -> None:
    assert_rejects(raw_preamble(text))


@pytest.mark.parametrize(
    "slots",
    [
        b"{}",
        b"[]",
        b"null",
        b'"x"',
        b"[1]",
        b"[[]]",
        b'[{"key_id":"a","blob":""}]',
        b'[{"kind":"","key_id":"a","blob":""}]',
        b'[{"kind":1,"key_id":"a","blob":""}]',
        b'[{"kind":"local","key_id":null,"blob":""}]',
        b'[{"kind":"local","key_id":"a"}]',
        b'[{"kind":"local","key_id":"a","blob":"!!"}]',
        b'[{"kind":"local","key_id":"a","blob":"\xc3\xa9"}]',
        b'[{"kind":"local","key_id":"a","blob":7}]',
        b"\xff",
        b"[" * 200_000,
        b"[NaN]",
    ],
)
def test_malformed_slots(slots: bytes) -> None:
    assert_rejects(raw_preamble(valid_obj(), slots))


def test_too_many_slots() -> None:
    one = {"kind": "x", "key_id": "", "blob": ""}
    parse_preamble(raw_preamble(valid_obj(), canonical_json([one] * MAX_SLOTS)))
    assert_rejects(raw_preamble(valid_obj(), canonical_json([one] * (MAX_SLOTS + 1))))


# -- writer-side validation (misuse is ValueError) ----------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"suite": "AES-128-GCM"},
        {"chunk_size": 1000},
        {"chunk_size": CHUNK_MIN // 2},
        {"chunk_size": 2 * CHUNK_MAX},
        {"chunk_size": 3 * CHUNK_MIN},
        {"context": {"a": 1}},
        {"context": {1: "a"}},
        {"plaintext_size": -1},
        {"plaintext_size": True},
        {"plaintext_size": 1.0},
    ],
)
def test_header_new_rejects_bad_parameters(kwargs: dict[str, Any]) -> None:
    kwargs.setdefault("chunk_size", CHUNK_MIN)
    with pytest.raises(ValueError):
        Header.new(DEK, **kwargs)


def test_header_new_with_closed_key() -> None:
    dek = DataKey.generate()
    dek.close()
    with pytest.raises(ValueError):
        Header.new(dek, chunk_size=CHUNK_MIN)


# -- fuzzing ------------------------------------------------------------------------

FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check_parsers_agree(data: bytes) -> None:
    """Both parsers accept (the same preamble) or both raise a SealstoreError."""
    results = []
    for parse in (parse_preamble, lambda d: read_preamble(io.BytesIO(d))):
        try:
            results.append(parse(data))
        except SealstoreError as exc:
            assert isinstance(exc, FormatError), exc
            results.append(None)
    assert (results[0] is None) == (results[1] is None)
    if results[0] is not None:
        assert results[0] == results[1]


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

valid_headers = st.builds(
    lambda suite, cs, ctx, size: valid_header(
        suite=suite, chunk_size=cs, context=ctx, plaintext_size=size
    ),
    st.sampled_from(SUITES),
    st.sampled_from([CHUNK_MIN, 2**20, CHUNK_MAX]),
    st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4),
    st.none() | st.integers(min_value=0, max_value=2**63),
)
slot_lists = st.lists(
    st.builds(
        KeySlot,
        st.text(min_size=1, max_size=8),
        st.text(max_size=20),
        st.binary(max_size=80),
        st.dictionaries(
            st.text(max_size=6).filter(lambda k: k not in ("kind", "key_id", "blob")),
            st.text(max_size=6) | st.integers(),
            max_size=2,
        ),
    ),
    max_size=3,
)


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data: bytes) -> None:
    check_parsers_agree(data)
    check_parsers_agree(MAGIC + data)


@FUZZ
@given(valid_headers, slot_lists)
def test_fuzz_valid_preambles_parse(header: Header, slots: list[KeySlot]) -> None:
    data = build_preamble(header, slots)
    for pre in both_parsers(data):
        assert pre.header == header
        assert pre.slots == tuple(slots)
        assert pre.payload_offset == len(data)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(min_value=0), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(min_value=0), st.integers(1, 8)),
    st.tuples(st.just("truncate"), st.integers(min_value=0), st.just(0)),
)


@FUZZ
@given(valid_headers, slot_lists, st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_mutated_preambles(
    header: Header, slots: list[KeySlot], mutations: list[tuple[str, int, Any]]
) -> None:
    data = bytearray(build_preamble(header, slots))
    for op, pos, arg in mutations:
        pos %= len(data) + 1
        if op == "flip" and pos < len(data):
            data[pos] ^= arg
        elif op == "insert":
            data[pos:pos] = arg
        elif op == "delete":
            del data[pos : pos + arg]
        elif op == "truncate":
            del data[pos:]
        if not data:
            break
    check_parsers_agree(bytes(data))


@FUZZ
@given(
    st.dictionaries(st.sampled_from(sorted(valid_obj())), json_values, max_size=4),
    st.sampled_from([None, *sorted(valid_obj())]),
    json_values,
)
def test_fuzz_json_headers(
    replace: dict[str, Any], extra_key: str | None, extra_value: Any
) -> None:
    obj = dict(valid_obj(), **replace)
    if extra_key is not None:
        obj[extra_key] = extra_value
    check_parsers_agree(raw_preamble(json.dumps(obj).encode()))
    check_parsers_agree(raw_preamble(json.dumps(extra_value).encode()))


@FUZZ
@given(json_values)
def test_fuzz_json_slot_sections(slots: Any) -> None:
    check_parsers_agree(raw_preamble(valid_obj(), json.dumps(slots).encode()))
    check_parsers_agree(raw_preamble(valid_obj(), json.dumps([slots]).encode()))


@pytest.mark.parametrize("version", [-1, 0, 2, 1000])
def test_any_other_version_is_unsupported(version: int) -> None:
    with pytest.raises(UnsupportedVersion):
        parse_preamble(raw_preamble(dict(valid_obj(), v=version)))


def test_lone_surrogate_in_a_slot_is_refused() -> None:
    slots = b'[{"blob":"YmxvYg==","key_id":"x25519:abc","kind":"x25519","note":"\\ud800"}]'
    assert_rejects(raw_preamble(valid_obj(), slots))
    with pytest.raises(FormatError, match="surrogate"):
        parse_preamble(raw_preamble(valid_obj(), slots))
