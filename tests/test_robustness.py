"""Failure paths found in review: interrupts, abandoned readers, hostile slots, pipes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sealstore.errors import AuthenticationError, KeyUnavailable
from sealstore.format import TAG_SIZE, build_preamble, parse_preamble
from sealstore.keys import DataKey, KeySlot
from sealstore.kms.envelope import open_sealed, seal_stream
from sealstore.kms.local import LocalKeyring
from sealstore.parallel import ring_slots
from sealstore.stream import SealedFile, SealReader, SealWriter
from tests.conftest import CS, listing, seal_bytes
from tests.test_cli import SEALSTORE, fails, run


def test_interrupt_during_threaded_read_leaves_the_buffer_zeroed() -> None:
    dek = DataKey.generate()
    data = os.urandom(64 * CS)
    sf = SealedFile(seal_bytes(data, dek), dek)
    buf = bytearray(len(data))
    calls = []

    def progress(n: int) -> None:
        # The first chunk a lane finishes interrupts the main thread, which is
        # then waiting for the lanes: the interrupt must stop them before the
        # buffer is wiped, or they would keep writing plaintext into it.
        if not calls:
            # A real SIGINT: it wakes the main thread out of its join at once
            # (interrupt_main() only sets a flag the main thread sees when it
            # next runs Python code, which a blocked join does not).
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        calls.append(n)
        time.sleep(0.005)  # slow lanes, so "stopped early" is not a race

    with pytest.raises(KeyboardInterrupt):
        sf.read_into(0, buf, threads=4, progress=progress)
    assert buf == bytes(len(buf))
    time.sleep(0.2)
    assert buf == bytes(len(buf))
    assert len(calls) < 64  # the lanes stopped early


def test_abandoned_threaded_readers_do_not_block_exit(tmp_path: Path) -> None:
    dek = DataKey.generate()
    path = tmp_path / "big.seal"
    path.write_bytes(seal_bytes(os.urandom(40 * CS), dek))
    script = textwrap.dedent(
        f"""
        from sealstore.keys import DataKey
        from sealstore.stream import SealReader, SealedFile
        dek = DataKey(bytes.fromhex({dek.material().hex()!r}))
        reader = SealReader(open({str(path)!r}, "rb"), dek, threads=4)
        reader.read(10)
        chunks = SealedFile({str(path)!r}, dek).iter_chunks(threads=3)
        next(chunks)
        print("done")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.strip() == b"done"


def test_decrypt_chunk_into_refuses_a_truncated_file() -> None:
    dek = DataKey.generate()
    sealed = seal_bytes(os.urandom(3 * CS + 5), dek)
    cut = sealed[: parse_preamble(sealed).payload_offset + 2 * (CS + TAG_SIZE)]
    sf = SealedFile(cut, dek)  # looks like a complete 2-chunk file
    buf = bytearray(b"\x55" * CS)
    with pytest.raises(AuthenticationError):
        sf.decrypt_chunk_into(0, buf)
    assert buf == bytes(CS)


def _with_extra_slot(sealed: bytes, extra: KeySlot) -> bytes:
    pre = parse_preamble(sealed)
    return build_preamble(pre.header, [extra, *pre.slots]) + sealed[pre.payload_offset :]


@pytest.mark.parametrize("target", ["fifo", "device", "text file", "folder"])
def test_hostile_slot_paths_are_skipped(keyring: LocalKeyring, tmp_path: Path, target: str) -> None:
    # The slot section is not authenticated: a slot whose key_id names a FIFO,
    # a device or any other file must neither hang nor abort the search.
    paths = {
        "fifo": tmp_path / "fifo",
        "device": Path("/dev/zero"),
        "text file": tmp_path / "notes.txt",
        "folder": tmp_path,
    }
    if target == "fifo":
        os.mkfifo(paths["fifo"])
    paths["text file"].write_text("not a keyring")
    out = io.BytesIO()
    seal_stream(io.BytesIO(b"payload"), out, [keyring], context={"t": "1"})
    bogus = KeySlot("local", f"local:{paths[target]}", b"x" * 60, {"keyring": "x", "kek": "k1"})
    sealed = _with_extra_slot(out.getvalue(), bogus)
    with open_sealed(sealed) as f:
        assert f.read_range(0, 100) == b"payload"


def test_a_slot_naming_a_damaged_keyring_says_so(keyring: LocalKeyring, tmp_path: Path) -> None:
    out = io.BytesIO()
    seal_stream(io.BytesIO(b"payload"), out, [keyring])
    damaged = tmp_path / "damaged.json"
    damaged.write_text('{"format": "sealstore-keyring-v1", "sealed": "AAAA"}')
    bogus = KeySlot("local", f"local:{damaged}", b"x" * 60, {"keyring": "x", "kek": "k1"})
    pre = parse_preamble(out.getvalue())
    only_bogus = build_preamble(pre.header, [bogus]) + out.getvalue()[pre.payload_offset :]
    with pytest.raises(KeyUnavailable, match="damaged"):
        open_sealed(only_bogus)


@pytest.mark.usefixtures("keyring")
def test_closed_output_pipe_is_not_success(tmp_path: Path) -> None:
    plain = tmp_path / "plain.bin"
    # Several MiB: the pipe (and what the kernel takes in one write) must fill up.
    plain.write_bytes(os.urandom(128 * CS))
    sealed = tmp_path / "plain.seal"
    assert run("encrypt", "-k", "local:", "-o", sealed, plain).returncode == 0
    for args in (["decrypt", "-o", "-", sealed], ["encrypt", "-k", "local:", "-o", "-", plain]):
        proc = subprocess.Popen(
            [str(SEALSTORE), *map(str, args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        assert len(proc.stdout.read(10)) == 10
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 141, err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("sealstore: error: output pipe closed")


@pytest.mark.usefixtures("keyring")
def test_output_into_a_missing_folder_creates_nothing(tmp_path: Path) -> None:
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"hello")
    before = listing(tmp_path)
    line = fails(run("encrypt", "-k", "local:", "-o", tmp_path / "new" / "sub" / "x", plain), 5)
    assert "No such file or directory" in line
    assert listing(tmp_path) == before


def test_damaged_keyring_fields_are_one_line(keyring: LocalKeyring) -> None:
    doc = json.loads(keyring.path.read_text())
    doc["current"] = ["k1"]
    keyring.path.write_text(json.dumps(doc))
    line = fails(run("keys", "list"), 3)
    assert "damaged" in line


def test_inspect_json_reports_an_impossible_length(tmp_path: Path) -> None:
    dek = DataKey.generate()
    sealed = seal_bytes(b"x" * 100, dek)
    bad = tmp_path / "bad.seal"
    bad.write_bytes(sealed[: parse_preamble(sealed).payload_offset + 10])  # cut inside the tag
    proc = run("inspect", "--json", bad)
    assert proc.returncode == 1
    assert b"layout_error" in proc.stdout


@pytest.mark.usefixtures("keyring")
def test_failure_mid_stream_leaves_no_temporary_file(tmp_path: Path) -> None:
    # From a pipe the damage shows only after earlier chunks were written to the
    # temporary file: it must be removed, and no output must appear.
    plain = tmp_path / "plain.bin"
    plain.write_bytes(os.urandom(8 * CS))
    sealed = tmp_path / "plain.seal"
    assert (
        run("encrypt", "-k", "local:", "--chunk-size", "64KiB", "-o", sealed, plain).returncode == 0
    )
    data = bytearray(sealed.read_bytes())
    data[parse_preamble(bytes(data)).payload_offset + 5 * (CS + TAG_SIZE) + 3] ^= 1
    out = tmp_path / "out"
    out.mkdir()
    fails(run("decrypt", "-o", out / "plain.bin", "-", stdin=bytes(data)), 1)
    assert listing(out) == []


def test_large_chunks_use_one_ring_slot_per_lane() -> None:
    # 16 MiB chunks with 3 threads: the lanes get one buffer each (memory stays
    # bounded at the largest chunk sizes); order and contents must not suffer.
    cs = 16 << 20
    dek = DataKey.generate()
    data = os.urandom(3 * cs + 5)
    out = io.BytesIO()
    assert ring_slots(3, cs) == 3
    with SealWriter(out, dek, chunk_size=cs, threads=3) as writer:
        for i in range(0, len(data), 5_000_000):
            writer.write(data[i : i + 5_000_000])
    sealed = out.getvalue()
    assert SealReader(io.BytesIO(sealed), dek, threads=3).read() == data
    chunks = SealedFile(sealed, dek).iter_chunks(threads=3)
    assert b"".join(bytes(view) for view in chunks) == data
