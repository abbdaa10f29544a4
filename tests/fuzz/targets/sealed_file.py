"""The sealed-file format v1: preamble (magic, lengths, header JSON, key slots) and chunks.

A parsed preamble is opened with the test vectors' data key and every byte is
read, so a mutated chunk layout, length or tag reaches the STREAM reader too.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

from sealstore.errors import AuthenticationError, FormatError
from sealstore.format import parse_preamble, read_preamble
from sealstore.keys import DataKey
from sealstore.stream import SealedFile
from tests.fuzz.harness import vectors

NAME = "sealed_file"
EXPECTED = (FormatError, AuthenticationError)  # UnsupportedVersion is a FormatError
_DEK = bytes.fromhex(json.loads((vectors() / "aes_cs.json").read_text())["dek"])
_SEED_MAX = 4096  # whole small vectors; the preamble of the large ones


def seeds() -> Iterator[bytes]:
    for path in sorted(vectors().glob("*.seal")):
        yield path.read_bytes()[:_SEED_MAX]


def one_input(data: bytes) -> None:
    parsed = parse_preamble(data)
    if read_preamble(io.BytesIO(data)) != parsed:
        raise AssertionError("parse_preamble and read_preamble disagree")
    with SealedFile(data, DataKey(_DEK), preamble=parsed) as sf:
        sf.read_range(0, sf.size)
