"""Loads from S3 with many ranged GETs at once, decrypted straight into the tensors.

On both real S3 servers of the test services (SeaweedFS, moto): store
references and plain sealed ``s3://`` URLs load equal to a load of the file;
GETs really overlap and the ciphertext held stays within the window; a
tampered object fails; and a server that stops mid-load (frozen, or killed)
ends the load with one BackendError naming the object, nothing returned and
the caller's buffer zeroed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sealstore import ranged
from sealstore.errors import AuthenticationError, BackendError
from sealstore.kms.envelope import seal_file
from sealstore.loaders.safetensors import load_file
from sealstore.loaders.sources import open_source
from sealstore.vault.store import Store
from tests.s3util import new_bucket, s3_options
from tests.test_fail_closed_s3 import KEY, SECRET, _free_port, weed  # noqa: F401

RANGE_MB, CONCURRENCY = 2, 4


@pytest.fixture(params=["seaweedfs", "moto"])
def endpoint(request: pytest.FixtureRequest, services: dict[str, str]) -> dict[str, Any]:
    if request.param == "seaweedfs":
        return s3_options(services["s3_url"], services["s3_key"], services["s3_secret"])
    return s3_options(services["moto_url"], "testing", "testing")


@pytest.fixture(autouse=True)
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranges of 2 MiB, 4 at once: many ranges even for a small model."""
    monkeypatch.setenv("SEALSTORE_S3_RANGE_MB", str(RANGE_MB))
    monkeypatch.setenv("SEALSTORE_S3_CONCURRENCY", str(CONCURRENCY))


class Watch:
    """Counts the GETs of every window and the most in flight at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.now = self.most = self.gets = 0
        self.windows: list[Any] = []
        fetch, init = ranged.RangedSource.fetch, ranged._Window.__init__
        watch = self

        def counted(src: Any, start: int, end: int) -> memoryview:
            with watch.lock:
                watch.now += 1
                watch.gets += 1
                watch.most = max(watch.most, watch.now)
            try:
                # Widens each GET a little so that overlap, if the code allows
                # it, is seen even on a fast loopback.
                time.sleep(delay)
                return fetch(src, start, end)
            finally:
                with watch.lock:
                    watch.now -= 1

        def window_init(win: Any, *args: Any, **kwargs: Any) -> None:
            init(win, *args, **kwargs)
            watch.windows.append(win)

        monkeypatch.setattr(ranged.RangedSource, "fetch", counted)
        monkeypatch.setattr(ranged._Window, "__init__", window_init)


def _state_dict(mib: int = 24) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(7)
    n = mib * (1 << 20) // 4 // 3
    return {
        "a": torch.randn(n, generator=g),
        "b": torch.randn(n // 1024, 1024, generator=g),
        "c": torch.arange(n, dtype=torch.int32),
        "small": torch.ones(3, dtype=torch.float16),
    }


def _same(got: dict[str, Any], want: dict[str, Any]) -> bool:
    import torch

    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _client(options: dict[str, Any]) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=options["endpoint_url"],
        aws_access_key_id=options["key"],
        aws_secret_access_key=options["secret"],
        region_name="us-east-1",
    )


def _sealed_on_s3(
    tmp_path: Path, options: dict[str, Any], sd: dict[str, Any], chunk_size: int = 1 << 20
) -> tuple[str, Path]:
    """Seal *sd* as safetensors, upload it; returns (its s3:// URL, the local sealed file)."""
    from safetensors.torch import save_file

    plain, sealed = tmp_path / "model.safetensors", tmp_path / "model.safetensors.sealed"
    save_file(sd, plain)
    seal_file(plain, sealed, ["local:"], chunk_size=chunk_size)
    bucket, _, prefix = new_bucket(options).partition("/")
    key = f"{prefix}/model.safetensors.sealed"
    _client(options).put_object(Bucket=bucket, Key=key, Body=sealed.read_bytes())
    return f"s3://{bucket}/{key}", sealed


def _use_endpoint(monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", options["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", options["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_store_reference_on_s3_loads_equal_to_the_file_load_with_overlapping_gets(
    endpoint: dict[str, Any], ring: Any, minilm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file as plain_load

    store = Store.init(f"s3://{new_bucket(endpoint)}/models", **endpoint)
    store.push(minilm, "minilm", keys=["local:"])
    watch = Watch(monkeypatch, delay=0.02)
    got = load_file("minilm:1/model.safetensors", store=store, threads=2)
    assert _same(got, plain_load(minilm / "model.safetensors"))
    # The whole object went through one window, GETs overlapping, never more
    # than CONCURRENCY at once nor more than CONCURRENCY ranges held.
    (win,) = [w for w in watch.windows if w.fetched > 1]
    size = os.path.getsize(minilm / "model.safetensors")
    assert win.fetched >= size // (RANGE_MB << 20)
    assert 1 < watch.most <= CONCURRENCY
    assert 0 < win.max_held <= CONCURRENCY * (RANGE_MB << 20)
    # The object digest was hashed from those same ranges: a second download
    # would have taken as many GETs again.
    assert watch.gets < 2 * win.fetched


def test_plain_sealed_s3_url_loads_equal_to_the_file_load(
    endpoint: dict[str, Any], ring: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = _state_dict()
    url, sealed = _sealed_on_s3(tmp_path, endpoint, sd, chunk_size=256 << 10)
    _use_endpoint(monkeypatch, endpoint)
    watch = Watch(monkeypatch, delay=0.02)
    got = load_file(url, threads=2)
    assert _same(got, sd)
    assert _same(got, load_file(sealed, threads=2))
    assert 1 < watch.most <= CONCURRENCY
    assert max(w.max_held for w in watch.windows) <= CONCURRENCY * (RANGE_MB << 20)


def test_a_lazy_read_of_one_tensor_fetches_only_its_ranges(
    endpoint: dict[str, Any], ring: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealstore.loaders.safetensors import safe_open

    sd = _state_dict()
    url, _ = _sealed_on_s3(tmp_path, endpoint, sd)
    _use_endpoint(monkeypatch, endpoint)
    watch = Watch(monkeypatch)
    with safe_open(url, framework="pt") as f:
        small = f.get_tensor("small")
    assert small.tolist() == [1.0, 1.0, 1.0]
    assert watch.gets <= 6  # head, header, final chunk, the tensor's chunk: not 12+ ranges


def test_a_tampered_range_fails_and_returns_nothing(
    endpoint: dict[str, Any], ring: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = _state_dict()
    url, sealed = _sealed_on_s3(tmp_path, endpoint, sd)
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 1  # one bit, in a range in the middle
    bucket, _, key = url[len("s3://") :].partition("/")
    _client(endpoint).put_object(Bucket=bucket, Key=key, Body=bytes(data))
    _use_endpoint(monkeypatch, endpoint)
    with pytest.raises(AuthenticationError):
        load_file(url, threads=2)
    with open_source(url) as sf:
        buf = bytearray(b"\xaa" * sf.size)
        with pytest.raises(AuthenticationError):
            sf.read_into(0, buf, threads=2)
    assert not any(buf)


def test_a_tampered_store_object_fails_and_returns_nothing(
    endpoint: dict[str, Any], ring: Any, tmp_path: Path
) -> None:
    store = Store.init(f"s3://{new_bucket(endpoint)}/models", **endpoint)
    m = store.push({"model.safetensors": os.urandom(3 << 20)}, "m", keys=["local:"])
    obj = store.object_path(m.tenant, m.files[0].object)
    data = bytearray(store.storage.read(obj))
    data[len(data) // 2] ^= 1
    store.storage.put(obj, bytes(data))
    with open_source("m:1/model.safetensors", store=store) as sf:
        buf = bytearray(b"\xaa" * sf.size)
        with pytest.raises(AuthenticationError):
            sf.read_into(0, buf, threads=2)
    assert not any(buf)


# -- a server that stops mid-load ------------------------------------------------------


@pytest.fixture
def frozen_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short timeouts, two attempts a GET: a dead server is declared dead in seconds."""
    monkeypatch.setenv("SEALSTORE_S3_CONNECT_TIMEOUT", "2")
    monkeypatch.setenv("SEALSTORE_S3_READ_TIMEOUT", "3")
    monkeypatch.setenv("SEALSTORE_S3_DEADLINE", "12")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")


def _stop_after(monkeypatch: pytest.MonkeyPatch, gets: int, stop: Any) -> threading.Event:
    """Run *stop* (freeze or kill the server) once *gets* ranged GETs have answered."""
    fetch = ranged.RangedSource.fetch
    done, count, lock = threading.Event(), [0], threading.Lock()

    def counted(src: Any, start: int, end: int) -> memoryview:
        data = fetch(src, start, end)
        with lock:
            count[0] += 1
            if count[0] == gets and not done.is_set():
                stop()
                done.set()
        return data

    monkeypatch.setattr(ranged.RangedSource, "fetch", counted)
    return done


def _load_fails_cleanly(url: str, stopped: threading.Event) -> None:
    with open_source(url) as sf:
        buf = bytearray(b"\xaa" * sf.size)
        with pytest.raises(BackendError) as err:
            sf.read_into(0, buf, threads=2)
    assert stopped.is_set()
    line = str(err.value)
    assert "model.safetensors.sealed" in line and "\n" not in line
    assert not any(buf)  # nothing decrypted is left behind


def test_a_frozen_seaweedfs_mid_load_is_one_backend_error_and_nothing_returned(
    weed: Any,  # noqa: F811
    ring: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    frozen_limits: None,
) -> None:
    options = s3_options(weed.url, KEY, SECRET)
    url, _ = _sealed_on_s3(tmp_path, options, _state_dict(32))
    _use_endpoint(monkeypatch, options)
    try:
        _load_fails_cleanly(url, _stop_after(monkeypatch, 3, weed.freeze))
    finally:
        weed.thaw()


@pytest.fixture
def own_moto(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A moto server of this test's own (the session's must keep running)."""
    port = _free_port()
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "moto_server exited"
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(url + "/moto-api/", timeout=2),  # noqa: S310
            ):
                break
            assert time.monotonic() < end, "moto did not start"
            time.sleep(0.2)
        yield proc, url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_killed_moto_mid_load_is_one_backend_error_and_nothing_returned(
    own_moto: tuple[subprocess.Popen[bytes], str],
    ring: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    frozen_limits: None,
) -> None:
    proc, url_base = own_moto
    options = s3_options(url_base, "testing", "testing")
    url, _ = _sealed_on_s3(tmp_path, options, _state_dict(32))
    _use_endpoint(monkeypatch, options)
    _load_fails_cleanly(url, _stop_after(monkeypatch, 3, proc.kill))


def test_ranged_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from sealstore.vault.s3limits import ranged_reads

    assert ranged_reads({}) == (ranged.DEFAULT_CONCURRENCY, ranged.DEFAULT_RANGE_SIZE)
    assert ranged_reads({"SEALSTORE_S3_CONCURRENCY": "16", "SEALSTORE_S3_RANGE_MB": "4"}) == (
        16,
        4 << 20,
    )
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(ValueError, match="SEALSTORE_S3_CONCURRENCY"):
            ranged_reads({"SEALSTORE_S3_CONCURRENCY": bad})


# -- the ranged source itself, over bytes in memory (edge cases the servers need not repeat) --


@pytest.mark.parametrize(
    ("size", "chunk", "range_size", "n"),
    [
        (0, 1 << 16, 1 << 20, 4),
        (1, 1 << 16, 1 << 20, 4),
        ((1 << 16) - 1, 1 << 16, 1 << 16, 2),  # ranges smaller than a sealed chunk
        ((1 << 16) + 1, 1 << 16, 1 << 16, 2),
        (5 * (1 << 16) + 500, 1 << 16, 3 << 16, 3),
        (3 << 20, 1 << 16, 1 << 20, 1),  # one GET at a time still completes
    ],
)
def test_ranged_reads_match_the_file_at_chunk_and_range_boundaries(
    ring: Any, tmp_path: Path, size: int, chunk: int, range_size: int, n: int
) -> None:
    import hashlib
    import random

    from sealstore.kms.envelope import open_sealed

    plain, sealed = tmp_path / "p", tmp_path / "s"
    plain.write_bytes(os.urandom(size))
    seal_file(plain, sealed, ["local:"], chunk_size=chunk)
    blob = sealed.read_bytes()
    rng = random.Random(size)

    def fetch(start: int, end: int) -> bytes:
        time.sleep(rng.random() / 500)  # ranges complete out of order
        return blob[start:end]

    src = ranged.RangedSource(fetch, len(blob), name="o", concurrency=n, range_size=range_size)
    digest = hashlib.sha256()
    with open_sealed(src, ()) as sf:
        finish = src.tap(digest.update)
        assert sf.read_range(0, sf.size, threads=2) == plain.read_bytes()
        for _ in range(5):
            lo = rng.randrange(0, size + 1)
            hi = rng.randrange(lo, size + 1)
            assert sf.read_range(lo, hi - lo, threads=2) == plain.read_bytes()[lo:hi]
        finish()
    assert digest.hexdigest() == hashlib.sha256(blob).hexdigest()


def test_an_object_replaced_mid_load_is_one_clear_error(
    endpoint: dict[str, Any], ring: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, sealed = _sealed_on_s3(tmp_path, endpoint, _state_dict(8))
    _use_endpoint(monkeypatch, endpoint)
    with open_source(url) as sf:
        # Replaced after it was opened (same bytes even): its ETag changes.
        bucket, _, key = url[len("s3://") :].partition("/")
        data = bytearray(sealed.read_bytes())
        data[-1] ^= 1
        _client(endpoint).put_object(Bucket=bucket, Key=key, Body=bytes(data))
        buf = bytearray(b"\xaa" * sf.size)
        with pytest.raises(BackendError, match="changed while being read") as err:
            sf.read_into(0, buf, threads=2)
    assert "\n" not in str(err.value)
    assert not any(buf)


def test_a_fetch_past_the_deadline_fails_the_read_and_never_holds_the_process() -> None:
    # A GET that never answers: the read fails at the deadline with one line,
    # and the process exits at once after it (the fetch threads are daemons).
    code = """
import threading, time
from sealstore.errors import BackendError
from sealstore.ranged import RangedSource

def frozen(start, end):
    time.sleep(600)

def window():
    with src.window([(0, 10), (10, 20)]) as ranges:
        return list(ranges)

src = RangedSource(frozen, 1 << 20, name="o in s3://b", concurrency=2, deadline=0.5)
for read in (lambda: src.view(0, 10), window):
    try:
        print("returned:", read())
    except BackendError as exc:
        print("refused:", exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    lines = done.stdout.splitlines()
    assert lines == ["refused: cannot read o in s3://b: no answer within the 0.5 s deadline"] * 2


def test_the_digest_check_carries_on_after_an_interrupt(
    endpoint: dict[str, Any], ring: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.init(f"s3://{new_bucket(endpoint)}/models", **endpoint)
    blob = os.urandom(5 << 20)
    store.push({"model.safetensors": blob}, "m", keys=["local:"])
    fetch, calls = ranged.RangedSource.fetch, [0]

    def interrupted_once(src: Any, start: int, end: int) -> memoryview:
        calls[0] += 1
        if calls[0] == 4:  # a range the digest check fetches after the lazy read
            raise KeyboardInterrupt
        return fetch(src, start, end)

    monkeypatch.setattr(ranged.RangedSource, "fetch", interrupted_once)
    with open_source("m:1/model.safetensors", store=store) as sf:
        with pytest.raises(KeyboardInterrupt):
            sf.read_range(0, 100)
        # The next read finishes the hash from where it stopped, and passes.
        assert sf.read_range(0, 100) == blob[:100]


def test_an_object_a_key_holder_substituted_fails_the_digest_though_every_chunk_authenticates(
    endpoint: dict[str, Any], ring: Any
) -> None:
    """The threat the object digest is for: someone holding the version's key
    seals other bytes under the same header. Every chunk then authenticates;
    only the digest, hashed from the ranges the load fetched, can refuse it."""
    from sealstore.chunks import ChunkLayout, chunk_nonce, new_aead
    from sealstore.format import open_payload_key
    from sealstore.vault.pull import open_file

    store = Store.init(f"s3://{new_bucket(endpoint)}/models", **endpoint)
    size = (3 << 20) + 123
    m = store.push({"model.safetensors": os.urandom(size)}, "m", keys=["local:"])
    _m, _entry, fp, pre, dek = open_file(store, "m:1", "model.safetensors", check_digest=False)
    fp.close()
    obj = store.object_path(m.tenant, m.files[0].object)
    original = store.storage.read(obj)
    layout = ChunkLayout(pre.header, pre.payload_offset, len(original) - pre.payload_offset)
    with dek:
        aead = new_aead(pre.header.suite, open_payload_key(pre.header, dek))
    forged, other = bytearray(original[: pre.payload_offset]), os.urandom(size)
    for i in range(layout.count):
        nonce = chunk_nonce(pre.header.nonce_prefix, i, i == layout.count - 1)
        lo = i * layout.chunk_size
        forged += aead.encrypt(nonce, other[lo : lo + layout.plain_len(i)], pre.aad)
    store.storage.put(obj, bytes(forged))
    with open_source("m:1/model.safetensors", store=store) as sf:
        buf = bytearray(b"\xaa" * sf.size)
        with pytest.raises(AuthenticationError, match="object hash does not match"):
            sf.read_into(0, buf, threads=2)
    assert not any(buf)
