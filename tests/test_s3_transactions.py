"""S3 writes through s3fs's own transaction, conditional writes told by their code,
and the streaming read's failure behaviour -- on the real SeaweedFS and moto servers."""

from __future__ import annotations

import gc as gcollect
import uuid
from typing import Any

import pytest

from sealstore.errors import BackendError
from sealstore.vault.storage import S3Storage, _precondition_failed, open_storage
from tests.s3util import incomplete_uploads, new_bucket, s3_options

PART = S3Storage.PART


@pytest.fixture(params=["seaweedfs", "moto"])
def endpoint(request: pytest.FixtureRequest, services: dict[str, str]) -> dict[str, Any]:
    if request.param == "seaweedfs":
        return s3_options(services["s3_url"], services["s3_key"], services["s3_secret"])
    return s3_options(services["moto_url"], "testing", "testing")


@pytest.fixture
def seaweed(services: dict[str, str]) -> dict[str, Any]:
    """SeaweedFS only: for reads of large objects (moto copies the whole object per ranged GET)."""
    return s3_options(services["s3_url"], services["s3_key"], services["s3_secret"])


def _storage(options: dict[str, Any]) -> tuple[S3Storage, str]:
    location = new_bucket(options)
    storage = open_storage(f"s3://{location}", **options)
    assert isinstance(storage, S3Storage)
    return storage, location


def _pattern(n: int) -> bytes:
    block = uuid.uuid4().bytes * 4096  # 64 KiB, different every call
    return (block * (n // len(block) + 1))[:n]


@pytest.mark.parametrize("size", [0, 1, PART - 1, PART, PART + 1])
def test_an_upload_appears_whole_and_only_at_the_end(endpoint: dict[str, Any], size: int) -> None:
    storage, location = _storage(endpoint)
    data = _pattern(size)
    with storage.open_write("obj") as out:
        out.write(data[: size // 2])
        out.write(data[size // 2 :])
        out.flush()
        assert not storage.exists("obj")  # parts may be uploaded; nothing is visible
    assert storage.read("obj") == data
    assert storage.size("obj") == size
    assert incomplete_uploads(endpoint, location) == []


@pytest.mark.parametrize("size", [1000, PART + 1, 2 * PART + 500])
def test_an_exception_mid_write_discards_the_upload(endpoint: dict[str, Any], size: int) -> None:
    storage, location = _storage(endpoint)
    with pytest.raises(RuntimeError, match="sealer died"), storage.open_write("obj") as out:
        out.write(_pattern(size))
        raise RuntimeError("sealer died")
    assert not storage.exists("obj")
    assert storage.walk("") == {}
    assert incomplete_uploads(endpoint, location) == []  # aborted, not left to gc


def test_a_failed_replacement_keeps_the_previous_object(seaweed: dict[str, Any]) -> None:
    storage, location = _storage(seaweed)
    storage.put("obj", b"the good one")
    with pytest.raises(RuntimeError), storage.open_write("obj") as out:
        out.write(_pattern(PART + 7))
        raise RuntimeError("stop")
    assert storage.read("obj") == b"the good one"
    assert incomplete_uploads(seaweed, location) == []


def test_a_writer_dropped_unfinished_never_publishes(endpoint: dict[str, Any]) -> None:
    """A writer nobody finishes (a crashed caller's frame, collected): no object, no upload."""
    storage, location = _storage(endpoint)
    cm = storage.open_write("obj")
    out = cm.__enter__()
    out.write(_pattern(PART + 3))
    del cm, out
    gcollect.collect()
    assert not storage.exists("obj")
    assert incomplete_uploads(endpoint, location) == []


def test_sealstore_fsspec_write_failure_leaves_no_object_and_no_upload(
    endpoint: dict[str, Any], ring: Any
) -> None:
    """``sealstore::s3://`` writes go through the same transaction; a failed one,
    and the s3fs file it leaves to the garbage collector, start no upload."""
    import fsspec

    location = new_bucket(endpoint)
    target = {
        "key": endpoint["key"],
        "secret": endpoint["secret"],
        "client_kwargs": {"endpoint_url": endpoint["endpoint_url"]},
    }

    def fail_to_write(url: str, size: int) -> None:
        try:
            with fsspec.open(url, "wb", s3=target, keys=["local:"]) as fp:
                fp.write(_pattern(size))
                raise RuntimeError("writer died")
        except RuntimeError:
            pass

    ls = fsspec.filesystem("s3", **target, use_listings_cache=False)
    for size in (1000, 6 << 20):  # under and over s3fs's 5 MiB minimum part
        url = f"sealstore::s3://{location}/f-{size}.bin"
        fail_to_write(url, size)
        gcollect.collect()  # the failed write's files are collected (and closed) now
        assert not ls.exists(f"{location}/f-{size}.bin")
        assert incomplete_uploads(endpoint, location) == []
    # And a write that succeeds appears.
    url = f"sealstore::s3://{location}/ok.bin"
    with fsspec.open(url, "wb", s3=target, keys=["local:"]) as fp:
        fp.write(b"sealed")
    with fsspec.open(url, "rb", s3=target) as fp:
        assert fp.read() == b"sealed"
    assert incomplete_uploads(endpoint, location) == []


def test_put_new_refuses_an_existing_object_on_both_servers(endpoint: dict[str, Any]) -> None:
    storage, _ = _storage(endpoint)
    storage.put_new("tags/latest", b"1")
    with pytest.raises(FileExistsError):
        storage.put_new("tags/latest", b"2")
    assert storage.read("tags/latest") == b"1"


def test_put_new_refused_for_another_reason_is_a_backend_error_not_a_race(
    seaweed: dict[str, Any],
) -> None:
    storage, _ = _storage(seaweed)
    wrong = open_storage(storage.url, **dict(seaweed, secret="not-the-secret"))
    with pytest.raises(BackendError, match="cannot write x in s3://"):
        wrong.put_new("x", b"1")


def test_put_new_into_a_missing_bucket_is_a_backend_error_not_a_race(moto_url: str) -> None:
    options = s3_options(moto_url, "testing", "testing")
    storage = open_storage(f"s3://no-such-bucket-{uuid.uuid4().hex[:12]}/p", **options)
    with pytest.raises(BackendError, match="cannot write x in s3://"):
        storage.put_new("x", b"1")


def _client_error(code: str, status: int, message: str) -> Exception:
    from botocore.exceptions import ClientError

    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "PutObject")


def test_a_precondition_failure_is_told_by_its_code_not_its_message() -> None:
    def raised_from(cause: Exception) -> OSError:
        exc = OSError(22, "whatever the server said")
        exc.__cause__ = cause
        return exc

    refused = _client_error("PreconditionFailed", 412, "no words anyone checks")
    assert _precondition_failed(refused)
    assert _precondition_failed(raised_from(refused))
    # A 412 whose code is missing or a server's own.
    assert _precondition_failed(_client_error("", 412, ""))
    # Words about preconditions in another error are not a precondition failure.
    other = _client_error("InternalError", 500, "precondition 412 pre-condition failed")
    assert not _precondition_failed(other)
    assert not _precondition_failed(raised_from(other))
    assert not _precondition_failed(OSError(22, "At least one of the pre-conditions (412)"))


def test_a_stream_whose_object_is_replaced_fails_and_keeps_failing(
    seaweed: dict[str, Any],
) -> None:
    """The streaming read (pull, backup) names the object when it fails, and a
    read after the failure raises again instead of resuming past the gap."""
    storage, _ = _storage(seaweed)
    size = 96 << 20  # more than the read-ahead holds
    data = _pattern(size)
    with storage.open_write("obj") as out:
        out.write(data)
    fp = storage.open_stream("obj")
    try:
        assert fp.read(1 << 20) == data[: 1 << 20]
        storage.put("obj", b"another object under the same name")
        with pytest.raises(BackendError, match="cannot read obj in s3://") as first:
            while fp.read(1 << 20):
                pass
        with pytest.raises(BackendError) as again:
            fp.read(1 << 20)
        assert str(again.value) == str(first.value)
    finally:
        fp.close()


def test_a_stream_reads_the_object_across_block_boundaries(seaweed: dict[str, Any]) -> None:
    storage, _ = _storage(seaweed)
    size = 3 * (8 << 20) + 12345
    data = _pattern(size)
    with storage.open_write("obj") as out:
        out.write(data)
    got = bytearray()
    with storage.open_stream("obj") as fp:
        while block := fp.read((1 << 20) + 80):  # a sealed chunk and its tag
            got += block
    assert bytes(got) == data
