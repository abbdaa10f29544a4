"""Local key management: add-kek, retire, passwd and re-keying files, library and CLI."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from sealstore.errors import AuthenticationError, FormatError, KeyUnavailable
from sealstore.format import read_preamble
from sealstore.kms.envelope import seal_file, unseal_file, unwrap_dek
from sealstore.kms.local import LocalKeyring
from sealstore.kms.rekey import rekey_file
from sealstore.kms.rotate import rotate_file
from tests.conftest import CS, PASSPHRASE, make_keyring

# The commands run in this process (tests.test_cli.in_process): what they do, not
# the process boundary, which tests/test_cli.py and test_fail_closed_cli.py test.
from tests.test_cli import fails, ok
from tests.test_cli import in_process as run

CTX = {"tenant": "t1", "artifact": "model"}
DATA = os.urandom(3 * CS + 777)
NEW = "a new and longer passphrase"


def reopen(path: Path) -> LocalKeyring:
    LocalKeyring._cache.clear()
    return LocalKeyring.open(path)


def sealed_file(tmp_path: Path, keys: list[str], name: str = "m.sealed") -> Path:
    src = tmp_path / "plain.bin"
    src.write_bytes(DATA)
    dst = tmp_path / name
    seal_file(src, dst, keys, context=CTX, chunk_size=CS)
    return dst


def plaintext(path: Path, tmp_path: Path, identities: list[str] = []) -> bytes:  # noqa: B006
    out = tmp_path / "out.bin"
    unseal_file(path, out, identities)
    data = out.read_bytes()
    out.unlink()
    return data


def slot_keks(path: Path) -> list[str]:
    with path.open("rb") as fp:
        return [str(s.params.get("kek")) for s in read_preamble(fp).slots if s.kind == "local"]


# -- add-kek ----------------------------------------------------------------------------


def test_add_kek_becomes_current_and_old_slots_still_open(
    keyring: LocalKeyring, keyring_path: Path, tmp_path: Path
) -> None:
    old = sealed_file(tmp_path, ["local:"], "old.sealed")
    assert keyring.add_kek() == "k2"
    ring = reopen(keyring_path)  # from disk, locked again
    assert ring.current == "k2"
    assert [k["id"] for k in ring.describe()["keks"]] == ["k1", "k2"]
    assert ring.signing_key_id == keyring.signing_key_id
    assert plaintext(old, tmp_path) == DATA
    new = sealed_file(tmp_path, ["local:"], "new.sealed")
    assert slot_keks(new) == ["k2"]
    assert plaintext(new, tmp_path) == DATA
    assert stat.S_IMODE(keyring_path.stat().st_mode) == 0o600


def test_add_kek_with_a_wrong_passphrase_leaves_the_keyring(
    keyring: LocalKeyring, keyring_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = keyring_path.read_bytes()
    ring = reopen(keyring_path)
    monkeypatch.setenv("SEALSTORE_PASSPHRASE", "wrong")
    with pytest.raises(KeyUnavailable, match="wrong passphrase"):
        ring.add_kek()
    assert keyring_path.read_bytes() == before


def test_add_kek_sees_a_change_made_by_another_process(
    keyring: LocalKeyring, keyring_path: Path
) -> None:
    stale = keyring  # cached object, opened before the file changed
    LocalKeyring._cache.clear()
    assert LocalKeyring.open(keyring_path).add_kek() == "k2"  # "another process"
    assert stale.add_kek() == "k3"  # re-reads the file: k2 is not lost
    assert [k["id"] for k in reopen(keyring_path).describe()["keks"]] == ["k1", "k2", "k3"]


# -- retire -----------------------------------------------------------------------------


def test_retire_destroys_the_kek_and_fails_closed_by_name(
    keyring: LocalKeyring, keyring_path: Path, tmp_path: Path
) -> None:
    old = sealed_file(tmp_path, ["local:"])
    keyring.add_kek()
    keyring.retire_kek("k1")
    ring = reopen(keyring_path)
    (k1,) = [k for k in ring.describe()["keks"] if k["id"] == "k1"]
    assert k1["retired"]
    assert "k1" not in ring._unlock()  # the key itself is gone from the sealed table
    with pytest.raises(KeyUnavailable, match="'k1' was retired"):
        plaintext(old, tmp_path)
    # A retired id is never handed out again (a slot under the old k1 must not
    # meet a different key of the same name).
    assert ring.add_kek() == "k3"


def test_retire_empties_the_process_wide_dek_cache(keyring: LocalKeyring, tmp_path: Path) -> None:
    from sealstore.dekcache import DekCache
    from sealstore.kms.envelope import configure_cache

    f = sealed_file(tmp_path, ["local:"])
    cache = DekCache()
    configure_cache(cache)
    try:
        assert plaintext(f, tmp_path) == DATA
        assert len(cache) == 1  # the DEK is now cached by its slot
        keyring.add_kek()
        keyring.retire_kek("k1")
        assert len(cache) == 0
        with pytest.raises(KeyUnavailable, match="retired"):
            plaintext(f, tmp_path)
    finally:
        configure_cache(None)


def test_retire_after_rotating_keeps_the_file_reachable(
    keyring: LocalKeyring, keyring_path: Path, tmp_path: Path
) -> None:
    f = sealed_file(tmp_path, ["local:"])
    keyring.add_kek()
    rotate_file(f, ["local:"])  # re-wraps in place under the current KEK
    assert slot_keks(f) == ["k2"]
    keyring.retire_kek("k1")
    reopen(keyring_path)
    assert plaintext(f, tmp_path) == DATA


def test_retire_refusals(keyring: LocalKeyring, keyring_path: Path) -> None:
    with pytest.raises(ValueError, match="current KEK"):
        keyring.retire_kek("k1")
    with pytest.raises(ValueError, match="no KEK 'k9'"):
        keyring.retire_kek("k9")
    keyring.add_kek()
    keyring.retire_kek("k1")
    with pytest.raises(ValueError, match="already retired"):
        keyring.retire_kek("k1")
    assert reopen(keyring_path).current == "k2"


def test_a_keyring_whose_current_kek_is_retired_is_refused(
    keyring: LocalKeyring, keyring_path: Path
) -> None:
    doc = json.loads(keyring_path.read_text())
    doc["keks"][0]["retired"] = "2026-01-01T00:00:00Z"
    keyring_path.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="current KEK is retired"):
        reopen(keyring_path)


# -- passwd -----------------------------------------------------------------------------


def test_change_passphrase(
    keyring: LocalKeyring, keyring_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = sealed_file(tmp_path, ["local:"])
    old_salt = keyring.describe()
    backup = keyring.change_passphrase(NEW)
    assert backup.name.startswith("keyring.json.") and backup.name.endswith(".bak")
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    doc = json.loads(keyring_path.read_text())
    assert doc["id"] == old_salt["id"]
    assert doc["kdf"]["salt"] != json.loads(backup.read_text())["kdf"]["salt"]
    # the old passphrase no longer opens the keyring; the new one does
    with pytest.raises(KeyUnavailable, match="wrong passphrase"):
        reopen(keyring_path)._unlock()
    monkeypatch.setenv("SEALSTORE_PASSPHRASE", NEW)
    LocalKeyring._cache.clear()
    assert plaintext(f, tmp_path) == DATA
    # the backup is the old keyring: the old passphrase opens it
    monkeypatch.setenv("SEALSTORE_PASSPHRASE", PASSPHRASE)
    assert "k1" in reopen(backup)._unlock()


def test_change_passphrase_protects_an_unprotected_keyring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "open.json"
    with pytest.warns(UserWarning):
        ring = make_keyring(path, insecure_no_passphrase=True)
    ring.change_passphrase(NEW)
    ring = reopen(path)
    assert ring.protected and ring.describe()["kdf"] == "argon2id"
    monkeypatch.setenv("SEALSTORE_PASSPHRASE", NEW)
    assert "k1" in ring._unlock()


def test_change_passphrase_refusals(keyring: LocalKeyring, keyring_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        keyring.change_passphrase("")
    # A TPM-sealed keyring has no passphrase: refused before the TPM is asked.
    doc = json.loads(keyring_path.read_text())
    doc["kdf"] = {"alg": "tpm", "pcrs": "7", "policy": "x", "public": "y", "private": "z"}
    tpm = keyring_path.with_name("tpm.json")
    tpm.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="sealed to the TPM"):
        reopen(tpm).change_passphrase(NEW)
    assert not list(keyring_path.parent.glob("*.bak"))


# -- rekey ------------------------------------------------------------------------------


def test_rekey_reencrypts_under_a_new_dek_for_the_same_keys(
    keyring: LocalKeyring, identity_path: Path, tmp_path: Path
) -> None:
    from sealstore.kms.x25519 import X25519Identity

    recipient = X25519Identity.from_text(identity_path.read_text()).recipient
    f = sealed_file(tmp_path, ["local:", recipient])
    os.chmod(f, 0o640)
    before = f.read_bytes()
    with f.open("rb") as fp:
        old = read_preamble(fp)
    old_fd = os.open(f, os.O_RDONLY)  # the old inode, as an attacker holding it would see it
    try:
        with unwrap_dek(old, cache=None) as dek:
            old_key = dek.material()
        slots = rekey_file(f)
        leftover = os.pread(old_fd, len(before), 0)
    finally:
        os.close(old_fd)
    assert leftover == bytes(len(before))  # the old bytes were overwritten
    with f.open("rb") as fp:
        new = read_preamble(fp)
    assert [s.key_id for s in slots] == [s.key_id for s in old.slots]
    assert [s.key_id for s in new.slots] == [s.key_id for s in old.slots]
    assert new.header.context == old.header.context
    assert new.header.chunk_size == old.header.chunk_size
    assert new.header.commitment != old.header.commitment
    assert f.read_bytes()[new.payload_offset :] != before[old.payload_offset :]
    with unwrap_dek(new, cache=None) as dek:
        assert dek.material() != old_key
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    assert plaintext(f, tmp_path) == DATA  # by the keyring slot
    LocalKeyring._cache.clear()
    assert plaintext(f, tmp_path, [str(identity_path)]) == DATA  # by the x25519 slot


def test_rekey_to_other_keys(keyring: LocalKeyring, identity_path: Path, tmp_path: Path) -> None:
    from sealstore.kms.x25519 import X25519Identity

    recipient = X25519Identity.from_text(identity_path.read_text()).recipient
    f = sealed_file(tmp_path, ["local:"])
    slots = rekey_file(f, to=[recipient])
    assert [s.kind for s in slots] == ["x25519"]
    assert plaintext(f, tmp_path, [str(identity_path)]) == DATA


def test_rekey_of_a_tampered_file_leaves_it_as_it_was(
    keyring: LocalKeyring, tmp_path: Path
) -> None:
    f = sealed_file(tmp_path, ["local:"])
    data = bytearray(f.read_bytes())
    data[-100] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(AuthenticationError):
        rekey_file(f)
    assert f.read_bytes() == bytes(data)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["m.sealed", "plain.bin"]


def test_rekey_refusals(keyring: LocalKeyring, keyring_path: Path, tmp_path: Path) -> None:
    f = sealed_file(tmp_path, ["local:"])
    before = f.read_bytes()
    link = tmp_path / "link.sealed"
    os.link(f, link)
    with pytest.raises(ValueError, match="2 hard links"):
        rekey_file(f)
    link.unlink()
    with pytest.raises(ValueError, match="cannot wrap a new data key to nope:x"):
        rekey_file(f, to=["nope:x"])
    keyring.add_kek()
    keyring.retire_kek("k1")
    with pytest.raises(KeyUnavailable, match="retired"):
        rekey_file(f)
    assert f.read_bytes() == before


# -- the CLI ----------------------------------------------------------------------------


def test_cli_add_kek_retire_and_list(keyring: LocalKeyring, tmp_path: Path) -> None:
    f = sealed_file(tmp_path, ["local:"])
    report = json.loads(ok(run("keys", "add-kek", "--json")).stdout)
    assert report["kek"] == "k2" and report["current"] == "k2"
    # f still needs k1: refused, named, nothing retired
    line = fails(run("keys", "retire", "k1", f), 2)
    assert "still wraps the data key of" in line and str(f) in line
    assert "keys rotate" in line
    ok(run("keys", "rotate", f, "--to", "local:"))
    report = json.loads(ok(run("keys", "retire", "k1", f, "--json")).stdout)
    assert report["retired"] == "k1" and report["still_needed_by"] == []
    listing = ok(run("keys", "list")).stdout.decode()
    assert "x k1" in listing and "retired" in listing and "* k2" in listing
    assert "current KEK" in fails(run("keys", "retire", "k2"), 2)
    ok(run("decrypt", "-o", tmp_path / "back.bin", f))
    assert (tmp_path / "back.bin").read_bytes() == DATA


def test_cli_retire_force_warns_and_the_file_then_fails_closed(
    keyring: LocalKeyring, tmp_path: Path
) -> None:
    f = sealed_file(tmp_path, ["local:"])
    ok(run("keys", "add-kek"))
    proc = ok(run("keys", "retire", "k1", f, "--force"))
    assert "no longer opens" in proc.stderr.decode()
    line = fails(run("decrypt", "-o", tmp_path / "back.bin", f), 4)
    assert "retired" in line
    assert not (tmp_path / "back.bin").exists()


def test_cli_passwd(keyring: LocalKeyring, keyring_path: Path, tmp_path: Path) -> None:
    f = sealed_file(tmp_path, ["local:"])
    fails(run("keys", "passwd", drop=("SEALSTORE_NEW_PASSPHRASE",)), 4)  # no new one given
    proc = ok(run("keys", "passwd", "--json", env={"SEALSTORE_NEW_PASSPHRASE": NEW}))
    report = json.loads(proc.stdout)
    assert Path(report["replaced_kept_as"]).exists()
    for text in (proc.stdout.decode(), proc.stderr.decode()):
        assert NEW not in text and PASSPHRASE not in text
    assert "wrong passphrase" in fails(run("decrypt", "-o", tmp_path / "b", f), 4)
    ok(run("decrypt", "-o", tmp_path / "b", f, env={"SEALSTORE_PASSPHRASE": NEW}))
    assert (tmp_path / "b").read_bytes() == DATA


def test_cli_rekey(keyring: LocalKeyring, tmp_path: Path) -> None:
    f = sealed_file(tmp_path, ["local:"])
    g = sealed_file(tmp_path, ["local:"], "g.sealed")
    before = f.read_bytes()
    report = json.loads(ok(run("keys", "rekey", f, g, "--json")).stdout)
    assert [r["file"] for r in report["files"]] == [str(f), str(g)]
    assert report["files"][0]["slots"][0]["kind"] == "local"
    assert f.read_bytes() != before
    for path in (f, g):
        ok(run("decrypt", "-o", tmp_path / "b", path))
        assert (tmp_path / "b").read_bytes() == DATA
    line = fails(run("keys", "rekey", tmp_path / "plain.bin"), 3)
    assert "plain.bin: not a sealed file" in line
    line = fails(run("keys", "retire", "k1", tmp_path / "plain.bin"), 3)
    assert "plain.bin: not a sealed file" in line


def test_a_tpm_sealed_keyring_gains_and_retires_keks_but_has_no_passphrase(
    tcti: str, tmp_path: Path
) -> None:
    """On swtpm: add-kek and retire re-seal under the same TPM-held sealing key."""
    from sealstore.errors import KeyReleaseDenied
    from tests.conftest import extend_pcr16

    ring_path = tmp_path / "ring.json"
    env = {"SEALSTORE_PASSPHRASE": ""}
    ok(run("keys", "init", "--keyring", ring_path, "--tpm-pcrs", "7,16", env=env))
    kdf = json.loads(ring_path.read_text())["kdf"]
    f = sealed_file(tmp_path, [f"local:{ring_path}"])
    ok(run("keys", "add-kek", "--keyring", ring_path, env=env))
    ok(run("keys", "rotate", f, "--to", f"local:{ring_path}", env=env))
    ok(run("keys", "retire", "k1", f, "--keyring", ring_path, env=env))
    doc = json.loads(ring_path.read_text())
    assert doc["kdf"] == kdf and doc["current"] == "k2"
    ok(run("decrypt", "-o", tmp_path / "back.bin", f, env=env))
    assert (tmp_path / "back.bin").read_bytes() == DATA
    line = fails(run("keys", "passwd", "--keyring", ring_path, env=env), 2)
    assert "sealed to the TPM" in line
    assert not list(tmp_path.glob("*.bak"))
    before = ring_path.read_bytes()
    extend_pcr16()
    with pytest.raises(KeyReleaseDenied):
        reopen(ring_path).add_kek()
    assert ring_path.read_bytes() == before
