"""``push`` never drops a file silently; ``pull`` keeps exec bits, never opens plaintext to others.

Symlinks, special files and modes, through the CLI and the API on a
``file://`` store.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sealstore.errors import FormatError
from sealstore.kms.local import LocalKeyring
from sealstore.signing import sign_document
from sealstore.vault.manifest import FileEntry, dumps
from tests.signed_docs import fields

# The commands run in this process (tests.test_cli.in_process): what they do, not
# the process boundary, which tests/test_cli.py and test_fail_closed_cli.py test.
from tests.test_cli import fails, ok
from tests.test_cli import in_process as run

MANIFEST = "tenants/default/artifacts/{}/manifest.json"
OLD_ENTRY_KEYS = {
    "path",
    "size",
    "sha256",
    "object",
    "object_size",
    "object_digest",
    "header_sha256",
}


@pytest.fixture
def store_env(keyring: LocalKeyring, tmp_path: Path) -> dict[str, str]:
    ok(run("store", "init", f"file://{tmp_path}/store"))
    return {"SEALSTORE_STORE": f"file://{tmp_path}/store"}


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0 while the test runs: whatever pull sets must not rely on the umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def tree(base: Path, files: dict[str, bytes]) -> Path:
    root = base / "model"
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def files_of(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


def nothing_stored(store_dir: Path) -> bool:
    """No object and no version under a file:// store's root."""
    return not any(p.is_file() for d in ("objects", "tenants") for p in (store_dir / d).rglob("*"))


# -- symlinks and special files ------------------------------------------------------------


def test_item08_symlinked_folder_inside_the_tree_is_pushed(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    src = tree(tmp_path, {"real/w.bin": os.urandom(5000), "config.json": b"{}"})
    (src / "alias").symlink_to("real")  # a folder link: os.walk used to skip it
    (src / "cfg.json").symlink_to("config.json")
    (src / "real" / "deep").symlink_to("../real/w.bin")  # reached again through alias/
    ok(run("push", src, "m", "-k", "local:", "--no-progress", env=store_env))
    shown = json.loads(ok(run("show", "m:1", "--json", env=store_env)).stdout)
    paths = sorted(f["path"] for f in shown["files"])
    assert paths == [
        "alias/deep",
        "alias/w.bin",
        "cfg.json",
        "config.json",
        "real/deep",
        "real/w.bin",
    ]
    ok(run("pull", "m:1", "-o", tmp_path / "out", env=store_env))
    got = files_of(tmp_path / "out")
    assert got["alias/w.bin"] == got["real/w.bin"] == got["alias/deep"] == got["real/deep"]
    assert got["alias/w.bin"] == (src / "real" / "w.bin").read_bytes()
    assert got["cfg.json"] == b"{}"
    # Pulled as plain files: a pull never creates a symlink.
    assert not any(p.is_symlink() for p in (tmp_path / "out").rglob("*"))


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_item08_symlink_outside_the_tree_is_refused_before_any_upload(
    store_env: dict[str, str], tmp_path: Path, kind: str
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "id_ed25519").write_bytes(b"a private key")
    src = tree(tmp_path, {"w.bin": b"w" * 100})
    link = src / "leak"
    link.symlink_to(outside / "id_ed25519" if kind == "file" else outside)
    line = fails(run("push", src, "m", "-k", "local:", "--no-progress", env=store_env), 2)
    assert str(link) in line and "outside" in line and "--follow-outside-links" in line
    assert nothing_stored(tmp_path / "store")
    # Allowed on request: what the link leads to is stored under the link's name.
    ok(run("push", src, "m", "-k", "local:", "--follow-outside-links", env=store_env))
    ok(run("pull", "m:1", "-o", tmp_path / "out", env=store_env))
    key = "leak" if kind == "file" else "leak/id_ed25519"
    assert files_of(tmp_path / "out") == {"w.bin": b"w" * 100, key: b"a private key"}


def test_item08_hugging_face_snapshot_needs_the_opt_in(store: Any, tmp_path: Path) -> None:
    # The cache layout: snapshots/REV/FILE -> ../../blobs/HASH.
    blobs = tmp_path / "hub" / "blobs"
    snap = tmp_path / "hub" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / "1f2e").write_bytes(b"weights")
    (snap / "model.safetensors").symlink_to("../../blobs/1f2e")
    with pytest.raises(
        ValueError, match=re.escape("model.safetensors is a symlink to ../../blobs/1f2e")
    ):
        store.push(snap, "hf", keys=["local:"])
    assert store.storage.walk("objects") == {}
    m = store.push(snap, "hf", keys=["local:"], follow_outside_links=True)
    assert [f.path for f in m.files] == ["model.safetensors"]
    store.pull("hf:1", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"weights"


def test_item08_dangling_links_loops_and_special_files_are_refused(
    store: Any, tmp_path: Path
) -> None:
    src = tree(tmp_path, {"w.bin": b"w", "sub/x.bin": b"x"})

    def refused(entry: Path, match: str) -> None:
        with pytest.raises(ValueError, match=match) as err:
            store.push(src, "m", keys=["local:"])
        assert str(entry) in str(err.value)
        assert store.storage.walk("objects") == {}
        assert store.storage.walk("tenants") == {}
        os.unlink(entry)

    (src / "sub" / "gone").symlink_to("nothing-here")
    refused(src / "sub" / "gone", "dangling symlink")
    (src / "sub" / "self").symlink_to("self")
    refused(src / "sub" / "self", "symlink loop")
    (src / "sub" / "up").symlink_to("..")  # inside the tree, but an ancestor
    refused(src / "sub" / "up", "symlink loop")
    (src / "root").symlink_to(".")
    refused(src / "root", "symlink loop")
    os.mkfifo(src / "pipe")
    refused(src / "pipe", "FIFO")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sub" / "sock"))
    try:
        refused(src / "sub" / "sock", "socket")
    finally:
        sock.close()
    (src / "bad\\name").write_bytes(b"b")  # a manifest could never name it
    refused(src / "bad\\name", "cannot hold")
    # With every problem gone, the same tree pushes.
    assert sorted(f.path for f in store.push(src, "m", keys=["local:"]).files) == [
        "sub/x.bin",
        "w.bin",
    ]


def test_item08_single_file_symlink_is_followed_under_its_own_name(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    blob = tmp_path / "blob-1f2e"
    blob.write_bytes(b"weights")
    link = tmp_path / "model.safetensors"
    link.symlink_to(blob)  # named on the command line: followed
    ok(run("push", link, "m", "-k", "local:", "--no-progress", env=store_env))
    ok(run("pull", "m:1", "-o", tmp_path / "out", env=store_env))
    assert files_of(tmp_path / "out") == {"model.safetensors": b"weights"}
    dangling = tmp_path / "gone.bin"
    dangling.symlink_to(tmp_path / "nothing")
    line = fails(run("push", dangling, "g", "-k", "local:", env=store_env), 2)
    assert "gone.bin is a dangling symlink" in line


# -- modes -----------------------------------------------------------------------------------


def test_item07_modes_exec_bit_kept_plaintext_never_open_to_others(
    store: Any, tmp_path: Path, open_umask: None
) -> None:
    modes = {
        "run.sh": 0o755,
        "tool": 0o700,
        "odd": 0o610,  # group execute only: still "executable"
        "w.bin": 0o644,
        "private.bin": 0o600,
        "open.bin": 0o666,
        "all.sh": 0o777,
        "ro.txt": 0o444,
        "suid": 0o4755,
    }
    src = tree(tmp_path, {name: name.encode() for name in modes})
    for name, mode in modes.items():
        os.chmod(src / name, mode)
    (src / "link.sh").symlink_to("run.sh")  # the target's mode, not the link's
    m = store.push(src, "m", keys=["local:"])
    recorded = {f.path: f.mode for f in m.files}
    assert recorded == {**{n: mode & 0o777 for n, mode in modes.items()}, "link.sh": 0o755}
    store.pull("m:1", tmp_path / "out")
    got = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    executable = {"run.sh", "tool", "odd", "all.sh", "suid", "link.sh"}
    assert got == {n: 0o700 if n in executable else 0o600 for n in recorded}
    # The same through pull --file (one file of the version).
    store.pull("m:1", tmp_path / "one", files=["all.sh"])
    assert stat.S_IMODE((tmp_path / "one" / "all.sh").stat().st_mode) == 0o700


def test_item07_modes_cli_round_trip_and_show(store_env: dict[str, str], tmp_path: Path) -> None:
    src = tree(tmp_path, {"bin/convert.py": b"#!/usr/bin/env python\n", "w.bin": b"w"})
    os.chmod(src / "bin" / "convert.py", 0o755)  # noqa: S103 -- the mode under test
    os.chmod(src / "w.bin", 0o644)
    ok(run("push", src, "m", "-k", "local:", "--no-progress", env=store_env))
    shown = json.loads(ok(run("show", "m:1", "--json", env=store_env)).stdout)
    assert {f["path"]: f["mode"] for f in shown["files"]} == {
        "bin/convert.py": 0o755,
        "w.bin": 0o644,
    }
    ok(run("pull", "m:1", "-o", tmp_path / "out", env=store_env))
    out = tmp_path / "out"
    assert stat.S_IMODE((out / "bin" / "convert.py").stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "w.bin").stat().st_mode) == 0o600


def test_item07_modes_manifest_without_modes_still_verifies(
    store: Any, ring: LocalKeyring, tmp_path: Path, open_umask: None
) -> None:
    # Bytes pushed from memory carry no mode: their entries are written exactly
    # as before modes were recorded.
    store.push({"a.sh": b"#!/bin/sh\n", "w.bin": b"w"}, "m", keys=["local:"])
    raw = fields(json.loads(store.storage.read(MANIFEST.format("m/1"))))
    assert all(set(f) == OLD_ENTRY_KEYS for f in raw["files"])
    m = store.manifest("m:1")
    assert [f.mode for f in m.files] == [None, None]
    # The parsed body is the signed body, key for key: a re-signature (rotate,
    # shred, restore) of a manifest written before modes keeps it unchanged.
    assert m.body() == raw
    store.pull("m:1", tmp_path / "out")
    for name in ("a.sh", "w.bin"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o600
    # A manifest signed by a writer without modes -- built here by hand, byte
    # for byte what such a writer signed -- verifies and pulls.
    m2 = store.push(tree(tmp_path, {"x.sh": b"x"}), "n", keys=["local:"])
    body = m2.body()
    for f in body["files"]:
        del f["mode"]
    store.storage.put(MANIFEST.format("n/1"), dumps(sign_document("manifest", body, ring)))
    # Written behind the store's back: an admin lists what the storage holds.
    from sealstore.vault.freshness import refresh

    refresh(store, "default", rebuild=True)
    assert [f.mode for f in store.manifest("n:1").files] == [None]
    store.pull("n:1", tmp_path / "out2")
    assert stat.S_IMODE((tmp_path / "out2" / "x.sh").stat().st_mode) == 0o600


@pytest.mark.parametrize("bad", ["0755", True, -1, 0o1000, 0o4755, None, 1.5])
def test_item07_modes_bad_mode_is_refused(
    store: Any, ring: LocalKeyring, tmp_path: Path, bad: object
) -> None:
    m = store.push(tree(tmp_path, {"x.sh": b"x"}), "m", keys=["local:"])
    entry = dict(m.files[0].to_json(), mode=bad)
    with pytest.raises(FormatError, match="bad mode"):
        FileEntry.from_json(entry)
    # And in a correctly signed manifest: refused as malformed, never pulled.
    body = m.body()
    body["files"][0]["mode"] = bad
    store.storage.put(MANIFEST.format("m/1"), dumps(sign_document("manifest", body, ring)))
    with pytest.raises(FormatError, match="bad mode"):
        store.pull("m:1", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_item08_a_file_swapped_for_a_fifo_after_the_listing_is_refused(
    store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tree is listed first, then read: a name that became a FIFO in between
    is refused at once (opening a FIFO to read would block the push forever)."""
    from sealstore.vault import push as push_module

    src = tree(tmp_path, {"a.bin": b"a", "w.bin": b"w"})
    listed = push_module.collect_files(src)
    (src / "w.bin").unlink()
    os.mkfifo(src / "w.bin")
    monkeypatch.setattr(push_module, "collect_files", lambda *a, **kw: listed)
    with pytest.raises(ValueError, match="no longer a regular file"):
        store.push(src, "m", keys=["local:"])
    assert store.storage.walk("tenants") == {}
