"""The storage conformance suite on every backend: file, memory, and two real S3 servers."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from sealstore.vault.storage import Storage, open_storage
from tests.conformance.storage import StorageConformance
from tests.s3util import incomplete_uploads, new_bucket, s3_options


class TestLocal(StorageConformance):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> Storage:
        return open_storage(f"file://{tmp_path}/store")

    def test_failed_write_leaves_no_temporary(self, storage: Storage, tmp_path: Path) -> None:
        with pytest.raises(RuntimeError), storage.open_write("objects/o") as fp:
            fp.write(b"x" * 100)
            raise RuntimeError
        assert list((tmp_path / "store" / "objects").iterdir()) == []


class TestMemory(StorageConformance):
    big = 8 << 20

    @pytest.fixture
    def storage(self) -> Storage:
        return open_storage(f"memory://conformance-{uuid.uuid4().hex}")


class _S3(StorageConformance):
    options: dict[str, Any]

    @pytest.fixture
    def storage(self, s3_endpoint: dict[str, Any]) -> Storage:
        self.options = s3_endpoint
        self.location = new_bucket(s3_endpoint)
        return open_storage(f"s3://{self.location}", **s3_endpoint)

    def test_failed_upload_is_aborted(self, storage: Storage) -> None:
        with pytest.raises(RuntimeError), storage.open_write("objects/o") as fp:
            for _ in range(3):
                fp.write(b"x" * (17 << 20))
            raise RuntimeError
        assert not storage.exists("objects/o")
        assert incomplete_uploads(self.options, self.location) == []


class TestSeaweedFS(_S3):
    @pytest.fixture
    def s3_endpoint(self, s3: Any) -> dict[str, Any]:
        return s3_options(s3.url, s3.key, s3.secret)


class TestMotoS3(_S3):
    @pytest.fixture
    def s3_endpoint(self, moto_url: str) -> dict[str, Any]:
        return s3_options(moto_url, "testing", "testing")
