"""The known-answer vectors of docs/vectors/ through every reader, and their generator.

Each vector is opened every way that applies -- with its DEK by the random-access
reader (``SealedFile``, plain and after ``verify()``) and the streaming reader
(``SealReader``), and through its key slots with its identity or keyring by
``open_sealed`` and ``open_reader`` -- and each way must give exactly the
vector's ``expect``: the plaintext (hash, size, bytes when small) or that
exception class, not a subclass or a parent.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sealstore.errors import (
    AuthenticationError,
    FormatError,
    KeyUnavailable,
    SealstoreError,
    UnsupportedVersion,
)
from sealstore.keys import DataKey, KeySlot
from sealstore.kms.envelope import open_reader, open_sealed
from sealstore.stream import SealedFile, SealReader, peek_preamble

ROOT = Path(__file__).resolve().parent.parent
VECTOR_DIR = ROOT / "docs" / "vectors"
SCRIPT = ROOT / "scripts" / "make_vectors.py"
FORMAT_MD = ROOT / "docs" / "FORMAT.md"

EXPECT: dict[str, type[SealstoreError] | None] = {
    "ok": None,
    "AuthenticationError": AuthenticationError,
    "FormatError": FormatError,
    "UnsupportedVersion": UnsupportedVersion,
    "KeyUnavailable": KeyUnavailable,
}

# The cases the format's test plan names; the generator may add more.
REQUIRED = {
    "aes_empty",
    "chacha_empty",
    "aes_cs_minus_1",
    "aes_cs",
    "aes_cs_plus_1",
    "aes_2cs_plus_500",
    "context_and_size",
    "example_detached",
    "multiple_slots",
    "header_byte_flipped",
    "slot_swapped",
    "chunks_swapped",
    "chunk_duplicated",
    "truncated_at_chunk_boundary",
    "truncated_mid_chunk",
    "trailing_bytes",
    "wrong_dek",
    "bad_magic",
    "version_2",
    "unknown_suite",
    "chunk_size_not_power_of_two",
    "empty_final_chunk_after_full",
    "plaintext_size_mismatch",
    "slot_does_not_open",
}


# Where the reference implementation disagrees with docs/FORMAT.md. The marks
# are strict: once the code is fixed the test XPASSes, fails, and the entry
# must go.
def _load_vectors() -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(VECTOR_DIR.glob("*.json"))]


VECTORS = _load_vectors()


def _sealed(vec: dict[str, Any]) -> bytes:
    return (VECTOR_DIR / f"{vec['name']}.seal").read_bytes()


def _identity_files(vec: dict[str, Any], tmp_path: Path) -> list[Path]:
    paths = []
    if vec["identity"] is not None:
        paths.append(tmp_path / "identity.txt")
        paths[-1].write_text(vec["identity"], encoding="utf-8")
    if vec["keyring"] is not None:
        paths.append(tmp_path / "vectors-keyring.json")
        paths[-1].write_text(vec["keyring"], encoding="utf-8")
    return paths


def _detached(vec: dict[str, Any]) -> list[KeySlot] | None:
    slots = vec["detached_slots"]
    return None if slots is None else [KeySlot.from_json(s) for s in slots]


def _random_access(f: SealedFile, *, verify: bool) -> bytes:
    with f:
        if verify:
            f.verify()
        buf = bytearray(f.size)
        n = f.decrypt_into(buf)
        assert n == f.size
        return bytes(buf)


def _stream(r: SealReader) -> bytes:
    with r:
        return r.read()


Reader = Callable[[dict[str, Any], bytes, Path], bytes]


def _dek(vec: dict[str, Any]) -> DataKey:
    return DataKey(bytes.fromhex(vec["dek"]))


READERS: dict[str, Reader] = {
    "dek-random": lambda v, d, _: _random_access(SealedFile(d, _dek(v)), verify=False),
    "dek-random-verify": lambda v, d, _: _random_access(SealedFile(d, _dek(v)), verify=True),
    "dek-stream": lambda v, d, _: _stream(SealReader(io.BytesIO(d), _dek(v))),
    "slots-random": lambda v, d, tmp: _random_access(
        open_sealed(d, _identity_files(v, tmp), slots=_detached(v)), verify=False
    ),
    "slots-stream": lambda v, d, tmp: _stream(
        open_reader(io.BytesIO(d), _identity_files(v, tmp), slots=_detached(v))
    ),
}


def _applies(vec: dict[str, Any], way: str) -> bool:
    if way.startswith("dek-"):
        return vec["dek"] is not None
    return vec["identity"] is not None or vec["keyring"] is not None


def _cases() -> list[Any]:
    cases = []
    for vec in VECTORS:
        for way in READERS:
            if not _applies(vec, way):
                continue
            cases.append(pytest.param(vec, way, id=f"{vec['name']}-{way}"))
    return cases


@pytest.mark.parametrize(("vec", "way"), _cases())
def test_vector(vec: dict[str, Any], way: str, tmp_path: Path) -> None:
    data = _sealed(vec)
    try:
        result: bytes | SealstoreError = READERS[way](vec, data, tmp_path)
    except SealstoreError as exc:
        result = exc
    expected = EXPECT[vec["expect"]]
    if expected is None:
        assert isinstance(result, bytes), f"expected the plaintext, got {result!r}"
        assert len(result) == vec["plaintext_size"]
        assert hashlib.sha256(result).hexdigest() == vec["plaintext_sha256"]
        if "plaintext_hex" in vec:
            assert result.hex() == vec["plaintext_hex"]
        return
    assert type(result) is expected, f"expected {expected.__name__}, got {result!r}"
    if isinstance(result, KeyUnavailable):
        # One cause per slot tried, in slot order (none when no slot exists).
        slots = _detached(vec)
        if slots is None:
            slots = list(peek_preamble(data).slots)
        assert len(result.causes) == len(slots)


def test_vector_set_is_complete() -> None:
    names = [v["name"] for v in VECTORS]
    assert len(names) >= 20
    assert len(set(names)) == len(names)
    missing = REQUIRED - set(names)
    assert not missing, sorted(missing)
    assert {v["expect"] for v in VECTORS} == set(EXPECT)
    seals = {p.stem for p in VECTOR_DIR.glob("*.seal")}
    assert seals == set(names), "every NAME.seal has a NAME.json and the reverse"
    total = 0
    for vec in VECTORS:
        data = _sealed(vec)
        total += len(data)
        assert len(data) == vec["file_size"]
        assert hashlib.sha256(data).hexdigest() == vec["file_sha256"]
        assert vec["description"]
        assert vec["dek"] is not None or _applies(vec, "slots"), vec["name"]
        assert ("plaintext_sha256" in vec) == (vec["expect"] == "ok")
    assert total < 2 * 1024 * 1024


def test_every_expectation_is_exercised_both_ways() -> None:
    """Each outcome is checked with a DEK and through slots somewhere in the set."""
    for expect in EXPECT:
        group = [v for v in VECTORS if v["expect"] == expect]
        if expect != "KeyUnavailable":  # only slots can be unavailable
            assert any(_applies(v, "dek-") for v in group), expect
        assert any(_applies(v, "slots-") for v in group), expect


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_vectors", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_regenerating_gives_identical_vectors(tmp_path: Path) -> None:
    out = tmp_path / "vectors"
    out.mkdir()
    (out / "stale.seal").write_bytes(b"old")
    _generator().main(["--out", str(out)])
    fresh = {p.name for p in out.iterdir()}
    committed = {p.name for p in VECTOR_DIR.iterdir() if p.suffix in (".seal", ".json")}
    assert fresh == committed
    for name in sorted(committed):
        if name.endswith(".json"):
            old = json.loads((VECTOR_DIR / name).read_text(encoding="utf-8"))
            new = json.loads((out / name).read_text(encoding="utf-8"))
            assert new["expect"] == old["expect"], name
        assert (out / name).read_bytes() == (VECTOR_DIR / name).read_bytes(), name


def test_worked_example_matches_the_spec() -> None:
    """docs/FORMAT.md's worked example is the example_detached vector, byte for byte."""
    spec = FORMAT_MD.read_text(encoding="utf-8")
    data = (VECTOR_DIR / "example_detached.seal").read_bytes()
    preamble = peek_preamble(data)
    assert preamble.header_bytes.decode() in spec
    assert data[preamble.payload_offset :].hex() in spec
    assert preamble.aad.hex() in spec
    vec = json.loads((VECTOR_DIR / "example_detached.json").read_text(encoding="utf-8"))
    assert vec["dek"] in spec
