"""The DEK cache: one unwrap for many objects sharing a data key, TTL and use limits."""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping

import pytest

from sealstore import AuthenticationError
from sealstore.dekcache import DekCache
from sealstore.format import parse_preamble
from sealstore.keys import DataKey, KeySlot
from sealstore.kms.envelope import configure_cache, open_reader, open_sealed, unwrap_dek
from sealstore.kms.local import LocalKeyring
from sealstore.stream import SealWriter

CONTEXT = {"tenant": "t1", "artifact": "model"}


class Counting:
    """An unwrapper that counts the unwraps it does (a stand-in for a KMS round trip)."""

    def __init__(self, inner: LocalKeyring) -> None:
        self.inner = inner
        self.calls = 0

    def can_unwrap(self, slot: KeySlot) -> bool:
        return self.inner.can_unwrap(slot)

    def unwrap(self, slot: KeySlot, context: Mapping[str, str]) -> DataKey:
        self.calls += 1
        return self.inner.unwrap(slot, context)


def shards(keyring: LocalKeyring, n: int) -> tuple[list[bytes], list[KeySlot]]:
    """*n* objects sealed under one DEK, its slot held apart (as a store manifest does)."""
    dek = DataKey.generate()
    slots = [keyring.wrap(dek, CONTEXT)]
    out = []
    for i in range(n):
        buf = io.BytesIO()
        with SealWriter(buf, dek, context=CONTEXT, chunk_size=65536) as writer:
            writer.write(f"shard {i}".encode())
        out.append(buf.getvalue())
    return out, slots


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_thirty_shards_cost_one_unwrap(keyring: LocalKeyring) -> None:
    objects, slots = shards(keyring, 30)
    counter = Counting(keyring)
    cache = DekCache(ttl=60, max_uses=100)
    for i, data in enumerate(objects):
        with open_sealed(data, [counter], slots=slots, cache=cache) as f:
            assert f.read_range(0, 100) == f"shard {i}".encode()
    assert counter.calls == 1
    assert (cache.hits, cache.misses) == (29, 1)
    # Without a cache every shard is an unwrap.
    counter.calls = 0
    for data in objects:
        open_sealed(data, [counter], slots=slots, cache=None).close()
    assert counter.calls == 30


def test_ttl_and_uses_bound_an_entry(keyring: LocalKeyring) -> None:
    objects, slots = shards(keyring, 4)
    counter = Counting(keyring)
    clock = Clock()
    cache = DekCache(ttl=10, max_uses=2, clock=clock)
    for data in objects[:3]:  # 1 unwrap + 2 hits, then the entry is used up
        open_sealed(data, [counter], slots=slots, cache=cache).close()
    assert counter.calls == 1
    open_sealed(objects[3], [counter], slots=slots, cache=cache).close()
    assert counter.calls == 2  # uses exhausted: unwrapped again
    clock.now = 11
    open_sealed(objects[0], [counter], slots=slots, cache=cache).close()
    assert counter.calls == 3  # expired


def test_an_expired_key_is_wiped_when_any_other_key_is_asked_for() -> None:
    # A key nobody asks for again must not outlive its ttl in memory.
    clock = Clock()
    cache = DekCache(ttl=10, clock=clock)
    a, b = (KeySlot("local", f"k{i}", bytes([i]) * 32) for i in range(2))
    dek = DataKey.generate()
    cache.put(a, {}, dek)
    held = cache._entries[next(iter(cache._entries))][0]
    clock.now = 11
    assert cache.get(b, {}) is None
    assert len(cache) == 0 and held == bytes(len(held))


def test_a_cached_key_must_pass_the_commitment(keyring: LocalKeyring) -> None:
    # A cache entry keyed by a slot is only a candidate: a header that does not
    # commit to it (a slot copied into another file) gets no plaintext from it.
    objects, slots = shards(keyring, 1)
    cache = DekCache()
    open_sealed(objects[0], [keyring], slots=slots, cache=cache).close()
    other_objects, _ = shards(keyring, 1)  # another DEK
    with pytest.raises(AuthenticationError):
        open_sealed(other_objects[0], [keyring], slots=slots, cache=cache)


def test_context_is_part_of_the_key(keyring: LocalKeyring) -> None:
    cache = DekCache()
    dek = DataKey.generate()
    slot = keyring.wrap(dek, CONTEXT)
    cache.put(slot, CONTEXT, dek)
    assert cache.get(slot, {**CONTEXT, "tenant": "t2"}) is None
    assert cache.get(slot, CONTEXT).material() == dek.material()


def test_clear_wipes_and_no_secrets_leak(keyring: LocalKeyring) -> None:
    cache = DekCache()
    dek = DataKey.generate()
    slot = keyring.wrap(dek, CONTEXT)
    cache.put(slot, CONTEXT, dek)
    entry = next(iter(cache._entries.values()))
    assert repr(cache) == "DekCache(ttl=60.0, max_uses=64, entries=1)"
    with pytest.raises(TypeError):
        pickle.dumps(cache)
    cache.clear()
    assert entry[0] == bytes(32) and len(cache) == 0


def test_the_process_wide_cache_serves_streaming_readers(keyring: LocalKeyring) -> None:
    objects, slots = shards(keyring, 3)
    counter = Counting(keyring)
    configure_cache(DekCache())
    try:
        for data in objects:
            with open_reader(io.BytesIO(data), [counter], slots=slots) as reader:
                assert reader.read().startswith(b"shard")
    finally:
        configure_cache(None)
    assert counter.calls == 1
    # cache=None bypasses even a configured process-wide cache.
    configure_cache(DekCache())
    try:
        unwrap_dek(parse_preamble(objects[0]), [counter], slots=slots).close()
        unwrap_dek(parse_preamble(objects[0]), [counter], slots=slots, cache=None).close()
    finally:
        configure_cache(None)
    assert counter.calls == 3


def test_the_library_default_is_no_cache() -> None:
    # In a fresh interpreter (conftest resets the cache for every test here).
    import subprocess
    import sys

    code = "import sealstore.kms.envelope as e; print(e._default_cache)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
