"""Key rotation rewrites only the slot section: the payload stays byte for byte."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sealstore import KeyUnavailable
from sealstore.format import parse_preamble
from sealstore.kms.envelope import open_sealed, seal_file
from sealstore.kms.local import LocalKeyring
from sealstore.kms.rotate import rotate_file
from sealstore.kms.x25519 import X25519Identity
from tests.conftest import CS
from tests.test_cli import in_process as run

# The commands run in this process (tests.test_cli.in_process): what they do, not
# the process boundary, which tests/test_cli.py and test_fail_closed_cli.py test.
from tests.test_cli import ok

VECTORS = Path(__file__).resolve().parent.parent / "docs" / "vectors"


def payload(path: Path) -> bytes:
    data = path.read_bytes()
    return data[parse_preamble(data).payload_offset :]


@pytest.fixture
def sealed(tmp_path: Path, keyring: LocalKeyring) -> tuple[Path, bytes]:
    plain = os.urandom(3 * CS + 7)
    src = tmp_path / "plain.bin"
    src.write_bytes(plain)
    dst = tmp_path / "plain.seal"
    seal_file(src, dst, [keyring.key_id], context={"tenant": "t1"}, chunk_size=CS)
    return dst, plain


def test_add_then_remove(
    sealed: tuple[Path, bytes], keyring: LocalKeyring, identity: X25519Identity, identity_path: Path
) -> None:
    path, plain = sealed
    before = payload(path)
    slots = rotate_file(path, [identity.recipient])
    assert [s.kind for s in slots] == ["local", "x25519"]
    assert payload(path) == before
    slots = rotate_file(path, [], remove=[keyring.key_id])
    assert [s.kind for s in slots] == ["x25519"]
    assert payload(path) == before
    LocalKeyring._cache.clear()
    with open_sealed(path, [identity_path]) as f:
        assert f.read_range(0, len(plain)) == plain
    # The local keyring's slot is gone: without the identity nothing opens.
    with pytest.raises(KeyUnavailable):
        open_sealed(path)


def test_rotating_to_the_same_local_key_rewraps(
    sealed: tuple[Path, bytes], keyring: LocalKeyring
) -> None:
    path, plain = sealed
    old = parse_preamble(path.read_bytes()).slots[0]
    (new,) = rotate_file(path, [keyring.key_id])
    assert new.key_id == old.key_id and new.blob != old.blob
    with open_sealed(path) as f:
        assert f.read_range(0, len(plain)) == plain


def test_refuses_to_remove_every_slot(sealed: tuple[Path, bytes], keyring: LocalKeyring) -> None:
    path, _ = sealed
    before = path.read_bytes()
    with pytest.raises(ValueError, match="every key slot"):
        rotate_file(path, [], remove=[keyring.key_id])
    assert path.read_bytes() == before


def test_without_the_key_nothing_changes(
    sealed: tuple[Path, bytes], identity: X25519Identity, monkeypatch
) -> None:
    path, _ = sealed
    before = path.read_bytes()
    LocalKeyring._cache.clear()
    monkeypatch.setenv("SEALSTORE_PASSPHRASE", "wrong")
    with pytest.raises(KeyUnavailable):
        rotate_file(path, [identity.recipient])
    assert path.read_bytes() == before


def test_a_non_canonical_header_is_kept_byte_for_byte(
    tmp_path: Path, identity: X25519Identity
) -> None:
    # Readers accept non-canonical header JSON and authenticate the bytes as
    # stored, so rotation must never re-encode the header.
    vec = json.loads((VECTORS / "header_noncanonical.json").read_text())
    path = tmp_path / "v.seal"
    shutil.copy(VECTORS / "header_noncanonical.seal", path)
    ident = tmp_path / "id.txt"
    ident.write_text(vec["identity"])
    header_before = parse_preamble(path.read_bytes()).header_bytes
    rotate_file(path, [identity.recipient], identities=[ident])
    assert parse_preamble(path.read_bytes()).header_bytes == header_before
    with open_sealed(path, [ident]) as f:
        assert len(f.read_range(0, vec["plaintext_size"])) == vec["plaintext_size"]


@pytest.mark.usefixtures("keyring")
def test_cli_rotate(
    sealed: tuple[Path, bytes], identity: X25519Identity, identity_path: Path
) -> None:
    path, plain = sealed
    before = payload(path)
    ring_uri = f"local:{os.environ['SEALSTORE_HOME']}/keyring.json"
    ok(run("keys", "rotate", path, "--to", identity.recipient, "--remove", ring_uri))
    assert [slot.kind for slot in parse_preamble(path.read_bytes()).slots] == ["x25519"]
    assert payload(path) == before
    out = path.with_suffix(".out")
    ok(run("decrypt", "-i", identity_path, "-o", out, path, drop=("SEALSTORE_PASSPHRASE",)))
    assert out.read_bytes() == plain


def test_rotating_through_a_symlink_rotates_its_target(
    sealed: tuple[Path, bytes], keyring: LocalKeyring, identity: X25519Identity, tmp_path: Path
) -> None:
    path, _ = sealed
    link = tmp_path / "link.seal"
    link.symlink_to(path)
    path.chmod(0o640)
    rotate_file(link, [identity.recipient], remove=[keyring.key_id])
    assert link.is_symlink()
    assert [s.kind for s in parse_preamble(path.read_bytes()).slots] == ["x25519"]
    assert path.stat().st_mode & 0o777 == 0o640


def test_removing_a_key_with_no_slot_is_an_error(sealed: tuple[Path, bytes]) -> None:
    path, _ = sealed
    before = path.read_bytes()
    with pytest.raises(ValueError, match="no key slot to remove"):
        rotate_file(path, [], remove=["local:/no/such/keyring.json"])
    assert path.read_bytes() == before
