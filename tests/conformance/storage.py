"""The conformance suite every store backend runs (fsspec's pattern).

A subclass provides a ``storage`` fixture; every test here then runs on it.
The promises checked are the ones the store's atomicity rests on: create-if-
absent that exactly one of several racing writers wins, replace, and large
writes that become visible only when they complete -- never after an error.
"""

from __future__ import annotations

import os
import threading

import pytest

from sealstore.errors import NotFound
from sealstore.vault.storage import Storage


class StorageConformance:
    big = 40 << 20  # several S3 parts (16 MiB each)

    def test_put_new_then_read(self, storage: Storage) -> None:
        storage.put_new("a/b/c.json", b"one")
        assert storage.read("a/b/c.json") == b"one"
        assert storage.exists("a/b/c.json") and storage.size("a/b/c.json") == 3
        assert storage.list("a/b") == ["c.json"]
        assert storage.walk("a") == {"a/b/c.json": 3}

    def test_put_new_refuses_an_existing_file(self, storage: Storage) -> None:
        storage.put_new("x", b"first")
        with pytest.raises(FileExistsError):
            storage.put_new("x", b"second")
        assert storage.read("x") == b"first"

    def test_put_new_race_has_one_winner(self, storage: Storage) -> None:
        wins: list[int] = []
        losses: list[int] = []
        barrier = threading.Barrier(6)

        def attempt(i: int) -> None:
            barrier.wait()
            try:
                storage.put_new("race/manifest.json", f"writer {i}".encode())
                wins.append(i)
            except FileExistsError:
                losses.append(i)

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and len(losses) == 5
        assert storage.read("race/manifest.json") == f"writer {wins[0]}".encode()

    def test_put_replaces(self, storage: Storage) -> None:
        storage.put("t", b"1")
        storage.put("t", b"22")
        assert storage.read("t") == b"22"

    def test_missing_file_is_not_found(self, storage: Storage) -> None:
        for call in (storage.read, storage.size, storage.open_read):
            with pytest.raises(NotFound):
                call("nope/missing")
        assert not storage.exists("nope/missing")
        assert storage.list("nope") == [] and storage.walk("nope") == {}
        storage.delete("nope/missing")  # not an error

    def test_large_write_streams_and_reads_back(self, storage: Storage) -> None:
        block = os.urandom(1 << 20)
        with storage.open_write("objects/big") as fp:
            for _ in range(self.big >> 20):
                fp.write(block)
        assert storage.size("objects/big") == self.big
        with storage.open_read("objects/big") as fp:
            fp.seek(self.big - (1 << 20))
            assert fp.read() == block
            fp.seek(0)
            assert fp.read(1 << 20) == block

    def test_failed_write_leaves_nothing(self, storage: Storage) -> None:
        block = os.urandom(1 << 20)

        def produce() -> None:
            with storage.open_write("objects/torn") as fp:
                for _ in range(self.big >> 20):
                    fp.write(block)
                raise RuntimeError("producer failed")

        with pytest.raises(RuntimeError, match="producer failed"):
            produce()
        assert not storage.exists("objects/torn")
        assert storage.walk("objects") == {}

    def test_delete_and_modified(self, storage: Storage) -> None:
        storage.put("d/f", b"x")
        assert storage.modified("d/f") > 0
        storage.delete("d/f")
        assert not storage.exists("d/f")

    def test_paths_cannot_escape_the_root(self, storage: Storage) -> None:
        for bad in ("../x", "/abs", "a//b", "a/./b", ""):
            with pytest.raises(ValueError, match="bad store path"):
                storage.put(bad, b"x")
