"""age recipients and identities: slots that are real age files, checked with the real age CLI.

``age`` and ``age-keygen`` (Debian's, 1.1) are installed by scripts/services.sh;
the slots are made and opened by pyrage (the Rust age crate).
"""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from sealstore.errors import AuthenticationError, FormatError, KeyUnavailable
from sealstore.keys import DataKey, KeySlot
from sealstore.kms.age import AgeIdentity, AgeRecipient
from sealstore.kms.registry import load_identity, wrapper_for

# The commands run in this process (tests.test_cli.in_process): what they do, not
# the process boundary, which tests/test_cli.py and test_fail_closed_cli.py test.
from tests.test_cli import SEALSTORE, fails, ok
from tests.test_cli import in_process as run

CONTEXT = {"purpose": "age test", "file": "model.safetensors"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/services.sh install puts it there)")
    return path


@pytest.fixture
def age_key(tmp_path: Path) -> tuple[Path, str]:
    """An identity made by the real age-keygen, and its recipient."""
    key = tmp_path / "key.txt"
    subprocess.run([_tool("age-keygen"), "-o", str(key)], check=True, capture_output=True)
    recipient = subprocess.run(
        [_tool("age-keygen"), "-y", str(key)], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert recipient.startswith("age1")
    return key, recipient


def test_a_slot_is_an_age_file_that_the_age_cli_opens(
    age_key: tuple[Path, str], tmp_path: Path
) -> None:
    key, recipient = age_key
    dek = DataKey.generate()
    slot = wrapper_for(recipient).wrap(dek, CONTEXT)
    assert slot.kind == "age" and slot.key_id == f"age:{recipient}"
    assert slot.blob.startswith(b"age-encryption.org/v1\n-> X25519 ")
    blob = tmp_path / "slot.age"
    blob.write_bytes(slot.blob)
    opened = subprocess.run(
        [_tool("age"), "-d", "-i", str(key), str(blob)], check=True, capture_output=True
    ).stdout
    assert opened[:32] == dek.material() and len(opened) == 64  # DEK || context hash
    ident = load_identity(key)
    assert isinstance(ident, AgeIdentity) and ident.can_unwrap(slot)
    with ident.unwrap(slot, CONTEXT) as back:
        assert back.material() == dek.material()


def test_a_slot_opens_only_under_its_context_and_unaltered(age_key: tuple[Path, str]) -> None:
    key, recipient = age_key
    slot = AgeRecipient.from_uri(recipient).wrap(DataKey.generate(), CONTEXT)
    ident = load_identity(key)
    with pytest.raises(AuthenticationError, match="another encryption context"):
        ident.unwrap(slot, {**CONTEXT, "file": "other"})
    blob = bytearray(slot.blob)
    blob[-5] ^= 1
    with pytest.raises(AuthenticationError, match="does not open"):
        ident.unwrap(KeySlot(slot.kind, slot.key_id, bytes(blob)), CONTEXT)
    other = AgeRecipient.from_uri(str(AgeIdentity.from_text(_new_identity()).recipients.pop()))
    foreign = other.wrap(DataKey.generate(), CONTEXT)
    assert not ident.can_unwrap(foreign)
    with pytest.raises(KeyUnavailable):
        ident.unwrap(foreign, CONTEXT)


def _new_identity() -> str:
    from pyrage import x25519

    return str(x25519.Identity.generate())


def test_an_ssh_ed25519_key_is_a_recipient_and_its_private_key_an_identity(
    tmp_path: Path,
) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    key = tmp_path / "id_ed25519"
    key.write_bytes(pem)
    dek = DataKey.generate()
    slot = wrapper_for(f"age:{public.decode()} me@host").wrap(dek, CONTEXT)
    assert slot.key_id.startswith("age:ssh-ed25519 ")
    with load_identity(key).unwrap(slot, CONTEXT) as back:
        assert back.material() == dek.material()
    stranger = tmp_path / "id_other"
    stranger.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyUnavailable, match="not for the SSH key"):
        load_identity(stranger).unwrap(slot, CONTEXT)


@pytest.mark.parametrize(
    ("recipient", "says"),
    [
        ("age1pq1" + "q" * 60, "post-quantum"),
        ("age1yubikey1" + "q" * 50, "plugin"),
        ("age1notbech32", "not a valid age recipient"),
        ("age:ssh-dss AAAA", "not an age X25519 recipient"),
    ],
)
def test_recipients_it_cannot_wrap_to_say_why(recipient: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        wrapper_for(recipient)


def test_a_malformed_identity_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    bad = tmp_path / "key.txt"
    secret = "AGE-SECRET-KEY-1" + "Q" * 40
    bad.write_text(f"# created: now\n{secret}\n")
    with pytest.raises(FormatError, match="line 2 is a malformed age identity") as err:
        load_identity(bad)
    assert secret not in str(err.value)


def test_cli_encrypts_to_an_age_recipient_and_decrypts_with_its_identity(
    sealstore_env: Path, age_key: tuple[Path, str], tmp_path: Path
) -> None:
    key, recipient = age_key
    plain = tmp_path / "plain.bin"
    plain.write_bytes(os.urandom(300_000))
    sealed = tmp_path / "plain.seal"
    ok(run("encrypt", "-k", recipient, "-o", sealed, plain))
    out = tmp_path / "out.bin"
    ok(run("decrypt", "-i", key, "-o", out, sealed))
    assert out.read_bytes() == plain.read_bytes()
    # No -o: standard output, as age does (a pipe here)...
    piped = ok(run("decrypt", "-i", key, sealed))
    assert piped.stdout == plain.read_bytes()
    # ...but never a terminal.
    primary, secondary = pty.openpty()
    try:
        to_tty = subprocess.run(
            [str(SEALSTORE), "decrypt", "-i", str(key), str(sealed)],
            stdout=secondary,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
    finally:
        os.close(primary)
        os.close(secondary)
    assert to_tty.returncode == 2 and b"terminal" in to_tty.stderr
    other = tmp_path / "other.txt"
    subprocess.run([_tool("age-keygen"), "-o", str(other)], check=True, capture_output=True)
    line = fails(run("decrypt", "-i", other, "-o", tmp_path / "no.bin", sealed), 4)
    assert "age" in line
    assert not (tmp_path / "no.bin").exists()
    line = fails(run("encrypt", "-k", "age1yubikey1qqqq", "-o", tmp_path / "x", plain), 2)
    assert "plugin" in line
