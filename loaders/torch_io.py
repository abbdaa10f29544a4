"""``torch_save`` / ``torch_load``: sealed ``.pt`` payloads, streamed, never arbitrary unpickling.

``torch_save`` hands ``torch.save`` the sealing writer itself: torch's zip
writer only calls ``write`` (with views of each tensor's own storage) and
``flush``, so every byte is sealed as it is produced -- no plaintext copy of
the payload in memory, none on disk.

``torch_load`` hands ``torch.load(..., weights_only=True)`` a seekable,
read-only file over the sealed file's plaintext (:class:`_PlainReader`, by
hand because no library gives a file object over random-access authenticated
decryption): torch reads each tensor record with one ``readinto`` straight
into the tensor's memory, so the plaintext is never held twice either. Only
tensors, primitive containers and numbers are unpickled, plus the types a
caller lists in ``safe_globals``; a pickle that would run code is refused by
torch's restricted unpickler, even from a correctly sealed file: a sealed file
proves who sealed it, not that its pickle is harmless.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sealstore.chunks import zero
from sealstore.kms.envelope import IdentitySpec, KeySpec, atomic_output, seal_writer
from sealstore.loaders.sources import PREFIX, open_source, signature_of
from sealstore.stream import SealedFile

__all__ = ["torch_load", "torch_save"]


def torch_save(
    obj: Any,
    dst: str | os.PathLike[str],
    *,
    keys: Sequence[KeySpec],
    context: Mapping[str, str] | None = None,
    dek_from: KeySpec | None = None,
    threads: int = 2,
) -> None:
    """``torch.save(obj)`` sealed into *dst* (atomically), streamed as torch writes it.

    Args:
        obj: what to save (tensors, containers, numbers...).
        dst: the sealed file to write.
        keys: key URIs to wrap the data key to.
        context: the encryption context, authenticated in the header.
        dek_from: a key whose service generates the data key.
        threads: chunks sealed in parallel.

    Raises:
        ValueError: no keys, or bad parameters.
        SealstoreError: from a key provider.
    """
    import torch

    with (
        atomic_output(dst) as out,
        seal_writer(out, keys, context=context, threads=threads, dek_from=dek_from) as writer,
    ):
        torch.save(obj, writer)


def torch_load(
    src: Any,
    *,
    map_location: Any = "cpu",
    store: Any = None,
    tenant: str | None = None,
    identities: Sequence[IdentitySpec] = (),
    threads: int = 2,
    safe_globals: Sequence[Any] = (),
    verify_signature: bool = False,
    public_key: Any = None,
) -> Any:
    """``torch.load(..., weights_only=True)`` of a sealed ``.pt`` (file, URL or store reference).

    Args:
        src: a sealed file, URL or store reference (see ``open_source``).
        map_location: as for ``torch.load``.
        store, tenant, identities: where a store reference is resolved, and the keys.
        threads: chunks decrypted in parallel for large reads.
        safe_globals: extra types and functions the unpickler may use, as for
            ``torch.serialization.safe_globals`` (checkpoints pass their
            RNG-state allowlist); empty by default: weights only.
        verify_signature: a store version: check its OMS model signature with
            *public_key* (an EC public key, PEM path or bytes, or root
            certificates; default ``$SEALSTORE_OMS_PUBLIC_KEY``), and the
            file's plaintext SHA-256 against it as torch reads it: every byte
            decrypted for torch is hashed (in file order; a range read out of
            order is kept as a copy until its turn), the few bytes torch skips
            (zip padding) are decrypted at the end, and nothing is returned
            before the digest matched. torch's restricted unpickler
            (``weights_only``: tensors, containers, numbers, the allowlist)
            has then already parsed the bytes -- authenticated as the store's
            by the AEAD, not yet as the signer's. To compare before any parse,
            at the cost of a second decryption, open the file through a store
            file system with ``verify_signature`` (it checks at open) and pass
            that to ``torch.load``.

    Returns:
        The unpickled object.

    Raises:
        AuthenticationError: a chunk fails, or with *verify_signature* the
            signature is missing or another signer's, or the file differs
            from it (nothing is returned).
        ValueError: *verify_signature* for a source that is not a store
            version, or without a public key.
        pickle.UnpicklingError: the payload holds a type outside the allowlist (named).
    """
    import torch

    key = None
    if verify_signature:
        from sealstore.vault.oms import public_key_from

        text = os.fspath(src) if isinstance(src, (str, os.PathLike)) else None
        if text is None or not (text.startswith(PREFIX) or store is not None):
            raise ValueError(
                "verify_signature checks a store version's model signature: "
                "name one (sealstore+URL#NAME... or store=)"
            )
        key = public_key_from(public_key)  # before any key is asked for
    sf = open_source(src, store=store, tenant=tenant, identities=identities, suffix=".pt")
    digest = None
    if key is not None:
        from sealstore.vault.oms import PlaintextDigest

        try:
            sig, path, where = signature_of(sf, key)
        except BaseException:
            if sf is not src:
                sf.close()
            raise
        digest = PlaintextDigest(sf.size, sig.digests[path], where)
    reader = _PlainReader(sf, threads=threads, digest=digest)
    try:
        with _allowed(safe_globals):
            # mmap=False: torch cannot map a decrypting file (and a global config may ask it to).
            obj = torch.load(reader, map_location=map_location, weights_only=True, mmap=False)
        if digest is not None:
            reader.finish_digest()
        return obj
    except pickle.UnpicklingError as exc:
        if reader.error is not None:
            raise reader.error from None
        raise pickle.UnpicklingError(f"{_where(src)}: {_refusal(str(exc))}") from None
    except BaseException:
        # torch's C++ reader turns an exception raised in readinto into a
        # RuntimeError: the reader's own failure (AuthenticationError) is the
        # one that says what happened.
        if reader.error is not None:
            raise reader.error from None
        raise
    finally:
        reader.close()
        if digest is not None:
            digest.discard()
        if sf is not src:
            sf.close()


def _where(src: Any) -> str:
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else "sealed .pt"


def _refusal(message: str) -> str:
    """One line naming what torch's restricted unpickler refused, from its long message."""
    found = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"got <class '([\w.]+)'>", message)
    if found:
        return (
            f"refusing to unpickle {found.group(1)}: it is not a tensor, a plain container "
            "or number, or an allowlisted type"
        )
    detail = message.partition("WeightsUnpickler error:")[2].strip() or message
    return "refusing to unpickle: " + " ".join(detail.split())[:300]


# torch keeps its allowlist in one process-wide set, and its safe_globals
# context removes on exit whatever it was given -- a type the application had
# allowed itself, or one that a concurrent load still needs. So: only what is
# missing is added, once for all concurrent loads, and removed by the last.
_ALLOW_LOCK = threading.Lock()
_allow_users: dict[Any, int] = {}


@contextlib.contextmanager
def _allowed(extra: Sequence[Any]) -> Iterator[None]:
    if not extra:
        yield
        return
    from torch.serialization import add_safe_globals, get_safe_globals, safe_globals

    with _ALLOW_LOCK:
        have = set(get_safe_globals())
        for g in extra:
            if g in _allow_users:
                _allow_users[g] += 1
            elif g not in have:
                _allow_users[g] = 1
                add_safe_globals([g])
    try:
        yield
    finally:
        with _ALLOW_LOCK:
            done = []
            for g in extra:
                if g in _allow_users:
                    _allow_users[g] -= 1
                    if not _allow_users[g]:
                        done.append(g)
                        del _allow_users[g]
            if done:
                with safe_globals(done):  # its exit removes exactly these
                    pass


class _PlainReader(io.RawIOBase):
    """A seekable, read-only file over a :class:`SealedFile`'s authenticated plaintext.

    Reads of a chunk or more decrypt straight into the caller's buffer (for
    ``torch.load``, the new tensor's storage); small reads (zip headers, the
    pickle) come from one cached chunk, so reading a few bytes at a time does
    not decrypt a chunk per read. The cache is wiped on close.

    Args:
        sf: the sealed file.
        threads: chunks decrypted in parallel for large reads.
    """

    def __init__(self, sf: SealedFile, *, threads: int = 1, digest: Any = None) -> None:
        super().__init__()
        self._sf = sf
        self._digest = digest  # a PlaintextDigest fed every range decrypted, or None
        self._threads = threads
        self._pos = 0
        self._cs = sf.layout.chunk_size
        self._cache = bytearray()
        self._cached = -1  # index of the chunk in the cache
        self.error: BaseException | None = None  # the first failure, kept for the caller

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._sf.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, b: Any) -> int:
        if self.closed:
            raise ValueError("read from a closed file")
        out = memoryview(b).cast("B")
        n = max(0, min(len(out), self._sf.size - self._pos))
        try:
            if n >= self._cs:
                self._sf.read_into(self._pos, out[:n], threads=self._threads)
                if self._digest is not None:
                    self._digest.feed_transient(self._pos, out[:n])
            else:
                done = 0
                while done < n:
                    pos = self._pos + done
                    chunk = self._chunk(pos // self._cs)
                    lo = pos % self._cs
                    take = min(n - done, len(chunk) - lo)
                    out[done : done + take] = chunk[lo : lo + take]
                    done += take
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            raise
        self._pos += n
        return n

    def _chunk(self, i: int) -> memoryview:
        if not self._cache:
            self._cache = bytearray(self._cs)
        if self._cached != i:
            self._cached = -1
            self._sf.decrypt_chunk_into(i, self._cache)
            self._cached = i
            if self._digest is not None:
                # The whole chunk, not just the bytes asked for: the zip headers
                # and padding around a record are hashed with it.
                view = memoryview(self._cache)[: self._sf.layout.plain_len(i)]
                self._digest.feed_transient(i * self._cs, view)
        return memoryview(self._cache)[: self._sf.layout.plain_len(i)]

    def finish_digest(self) -> None:
        """Hash what torch never read (decrypted now, a block at a time), then check.

        Raises:
            AuthenticationError: the plaintext is not the signed one.
        """
        digest = self._digest
        block = bytearray(min(4 << 20, max(self._sf.size, 1)))
        try:
            for offset, length in digest.gaps():
                done = 0
                while done < length:
                    view = memoryview(block)[: min(len(block), length - done)]
                    self._sf.read_into(offset + done, view, threads=self._threads)
                    digest.feed_transient(offset + done, view)
                    done += len(view)
        finally:
            zero(memoryview(block))
        digest.check()

    def close(self) -> None:
        if self._cache:
            zero(memoryview(self._cache))
        self._cached = -1
        super().close()
