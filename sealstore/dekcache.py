"""A short-lived cache of unwrapped data keys.

Loading a 30-shard model whose shards share one data key (one DEK per
artifact version, its slots held once in the store manifest) should cost one
unwrap -- one Vault or KMS round trip -- not thirty. Entries are keyed by a
hash of the slot (kind, key id, wrapped blob) and the encryption context, so
a hit needs the very slot that was unwrapped before, and live for a TTL and
a number of uses, whichever ends first.

The cache holds key material: it has no useful ``repr``, refuses pickling,
and :meth:`DekCache.clear` overwrites every entry.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sealstore.errors import AuthenticationError
from sealstore.format import canonical_json
from sealstore.keys import DataKey, KeySlot

__all__ = ["DekCache"]


class DekCache:
    """Unwrapped DEKs by slot and context, for *ttl* seconds and *max_uses* hits.

    Args:
        ttl: seconds an entry lives after it was stored.
        max_uses: hits an entry serves before it is dropped.
        max_entries: entries kept at most (the oldest go first).
        clock: a monotonic clock (tests pass their own).
    """

    def __init__(
        self,
        ttl: float = 60.0,
        max_uses: int = 64,
        *,
        max_entries: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or max_uses < 1 or max_entries < 1:
            raise ValueError("ttl, max_uses and max_entries must be positive")
        self.ttl = ttl
        self.max_uses = max_uses
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [material, expiry, uses left]
        self._entries: dict[bytes, list[Any]] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(slot: KeySlot, context: Mapping[str, str]) -> bytes:
        digest = hashlib.sha256()
        for part in (slot.kind.encode(), slot.key_id.encode(), slot.blob):
            digest.update(len(part).to_bytes(8, "big") + part)
        digest.update(canonical_json(dict(context)))
        return digest.digest()

    def get(self, slot: KeySlot, context: Mapping[str, str]) -> DataKey | None:
        """A new handle on the cached DEK of *slot* under *context*, or None."""
        key = self._key(slot, context)
        with self._lock:
            self._expire()
            entry = self._entries.get(key)
            if entry is None or entry[1] <= self._clock():
                self._drop(key)
                self.misses += 1
                return None
            entry[2] -= 1
            material = bytes(entry[0])
            if entry[2] <= 0:
                self._drop(key)
            self.hits += 1
        return DataKey(material)

    def first(
        self,
        slots: Iterable[KeySlot],
        context: Mapping[str, str],
        accept: Callable[[DataKey], None],
    ) -> DataKey | None:
        """The first cached DEK of *slots* that *accept* takes, or None.

        A cached key that *accept* refuses (``AuthenticationError``: the
        slot now unwraps to another key, e.g. after a rotation) is closed
        and the next slot is tried.
        """
        for slot in slots:
            cached = self.get(slot, context)
            if cached is None:
                continue
            try:
                accept(cached)
            except AuthenticationError:
                cached.close()
                continue
            return cached
        return None

    def put(self, slot: KeySlot, context: Mapping[str, str], dek: DataKey) -> None:
        """Remember *dek* as what *slot* unwraps to under *context*."""
        key = self._key(slot, context)
        with self._lock:
            self._expire()
            self._drop(key)
            while len(self._entries) >= self.max_entries:
                self._drop(next(iter(self._entries)))
            self._entries[key] = [
                bytearray(dek.material()),
                self._clock() + self.ttl,
                self.max_uses,
            ]

    def _expire(self) -> None:
        """Overwrite every entry past its time, whichever slot is asked for now:
        a key must not outlive its ttl because nobody asks for it again."""
        now = self._clock()
        for key in [k for k, entry in self._entries.items() if entry[1] <= now]:
            self._drop(key)

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            entry[0][:] = bytes(len(entry[0]))

    def clear(self) -> None:
        """Forget and overwrite every entry."""
        with self._lock:
            for key in list(self._entries):
                self._drop(key)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"DekCache(ttl={self.ttl}, max_uses={self.max_uses}, entries={len(self)})"

    def __reduce__(self) -> Any:
        raise TypeError("DEK caches cannot be pickled")
