"""Envelope encryption of files: a fresh DEK per file, wrapped into one slot per key URI.

This is the high-level file API the CLI and the facade use. It joins the
stream (which takes a DEK) with the providers (which make and open slots).
Writes to a regular (or new) file are atomic: output goes to an anonymous
temporary file in the destination's folder and is renamed into place only
after the last chunk is written or authenticated, so a failure -- Ctrl-C,
SIGTERM and SIGHUP included -- leaves no output file. A device, FIFO or
``/dev/fd/N`` destination is written through as chunks authenticate, like
``-`` (standard output); it is never replaced by a regular file.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any, BinaryIO

from sealstore.dekcache import DekCache
from sealstore.errors import AuthenticationError
from sealstore.format import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SUITE,
    Header,
    Preamble,
    open_payload_key,
    read_preamble,
)
from sealstore.fsutil import atomic_file
from sealstore.keys import DataKey, KeySlot, Refusal, Unwrapper, Wrapper, unwrap_first
from sealstore.kms.registry import load_identity, unwrappers_for, wrapper_for
from sealstore.stream import SealedFile, SealReader, SealWriter, peek_preamble

__all__ = [
    "atomic_output",
    "check_context",
    "make_slots",
    "new_data_key",
    "open_reader",
    "open_sealed",
    "seal_file",
    "seal_stream",
    "seal_writer",
    "unseal_file",
    "unwrap_dek",
    "verify_file",
]

KeySpec = str | Wrapper
IdentitySpec = str | os.PathLike[str] | Unwrapper
Progress = Callable[[int], None]
_COPY = 4 * 1024 * 1024


def make_slots(dek: DataKey, keys: Sequence[KeySpec], context: Mapping[str, str]) -> list[KeySlot]:
    """Wrap *dek* once per key URI (or wrapper object), in order.

    Raises:
        ValueError: no keys, or a malformed URI.
    """
    if not keys:
        raise ValueError("at least one key (-k URI) is needed to seal")
    wrappers = [wrapper_for(k) if isinstance(k, str) else k for k in keys]
    return [w.wrap(dek, context) for w in wrappers]


def new_data_key(
    keys: Sequence[KeySpec],
    context: Mapping[str, str],
    *,
    dek_from: KeySpec | None = None,
) -> tuple[DataKey, list[KeySlot]]:
    """A fresh DEK and its slots: one per key in *keys*, bound to *context*.

    Args:
        dek_from: a key whose service makes the DEK (Vault ``datakey/wrapped``,
            KMS ``GenerateDataKey``) and gives the first slot; that key is not
            wrapped to again if it is also in *keys*. Default: the OS CSPRNG.

    Raises:
        ValueError: no key at all, or *dek_from* cannot generate keys.
        ``SealstoreError`` from a provider (the DEK is closed first).
    """
    first: list[KeySlot] = []
    if dek_from is None:
        dek = DataKey.generate()
    else:
        maker = wrapper_for(dek_from) if isinstance(dek_from, str) else dek_from
        if not hasattr(maker, "generate"):
            raise ValueError(f"{maker.key_id} cannot generate data keys (use -k instead)")
        dek, slot = maker.generate(context)
        first = [slot]
        keys = [k for k in keys if (k if isinstance(k, str) else k.key_id) != maker.key_id]
    try:
        # make_slots refuses an empty key list: without dek_from, no key at all.
        return dek, first + (make_slots(dek, keys, context) if keys or not first else [])
    except BaseException:
        dek.close()
        raise


def _identities(identities: Sequence[IdentitySpec]) -> list[Unwrapper]:
    return [i if hasattr(i, "unwrap") else load_identity(i) for i in identities]  # type: ignore[misc]


def _ident_name(ident: Unwrapper) -> str:
    for attr in ("source", "path", "key_id"):
        value = getattr(ident, attr, None)
        if value is not None:
            return str(value)
    return type(ident).__name__


def _unwrappers(idents: Sequence[Unwrapper]) -> Callable[[KeySlot], list[Unwrapper]]:
    """Per slot: the unwrappers to try, with a cause that knows which identities were given."""

    def for_slot(slot: KeySlot) -> list[Unwrapper]:
        found = list(unwrappers_for(slot, idents))
        if (
            idents
            and not any(u in idents for u in found)
            and all(isinstance(u, Refusal) for u in found)
        ):
            # The provider's own cause ("needs an identity file: -i FILE") would
            # tell the caller to do what they did; say which ones were tried.
            names = ", ".join(_ident_name(i) for i in idents)
            return [Refusal(f"none of the identities given ({names}) is for this slot")]
        return found

    return for_slot


def check_context(context: Mapping[str, str], expect: Mapping[str, str] | None) -> None:
    """Refuse a file whose encryption context lacks any pair of *expect*.

    The header's context is authenticated (it is in every chunk's associated
    data, and the slots are bound to it), so a file that passes this check and
    then decrypts really was sealed for *expect*. A copy or a rename of
    another artifact's file fails here, before any key service is asked.

    Args:
        context: the file's (or the version's) encryption context.
        expect: the pairs it must contain; None or empty: no requirement.

    Raises:
        AuthenticationError: a pair is missing or has another value.
    """
    for key, want in (expect or {}).items():
        if key not in context:
            raise AuthenticationError(
                f"encryption context mismatch: expected {key}={want}, the file has no {key}"
            )
        if context[key] != want:  # the context is public: no constant-time compare needed
            raise AuthenticationError(
                f"encryption context mismatch: expected {key}={want}, the file has "
                f"{key}={context[key]}"
            )


_default_cache: DekCache | None = None


def configure_cache(cache: DekCache | None) -> None:
    """Set the process-wide DEK cache that unwrapping uses by default (None: off).

    Off unless set. A hit skips the unwrap -- and so the key service's check
    of *this* caller's credentials -- so share one cache only among callers
    that may all open the same artifacts (one tenant's loader, not a server
    for several tenants); or pass ``cache=`` per call.
    """
    global _default_cache
    if _default_cache is not None and _default_cache is not cache:
        _default_cache.clear()
    _default_cache = cache


_DEFAULT: Any = object()


def unwrap_dek(
    preamble: Preamble,
    identities: Sequence[IdentitySpec] = (),
    *,
    slots: Sequence[KeySlot] | None = None,
    cache: DekCache | None = _DEFAULT,
    context: Mapping[str, str] | None = None,
    expect_context: Mapping[str, str] | None = None,
) -> DataKey:
    """Recover a file's DEK from its slots (or *slots* held elsewhere, e.g. a manifest).

    The slots are opened under *context* (default: the header's); a store
    manifest's slots are bound to the version's context, shared by its files.
    A DEK is taken from *cache* (default: the process-wide one) only if it
    passes this header's key commitment; a fresh unwrap is stored there.

    Args:
        expect_context: pairs the context must hold (see :func:`check_context`);
            checked before any slot is tried.

    Raises:
        KeyUnavailable: no slot could be unwrapped (each slot's cause listed).
        AuthenticationError: a slot unwrapped to a key the header does not commit
            to, a slot the caller holds the key of does not open under this
            context (the context or the slot changed after sealing), or the
            context lacks a pair of *expect_context*.
    """
    header = preamble.header
    ctx = header.context if context is None else dict(context)
    check_context(ctx, expect_context)
    idents = _identities(identities)

    def accept(dek: DataKey) -> None:
        open_payload_key(header, dek)  # raises AuthenticationError on a commitment mismatch

    candidates = preamble.slots if slots is None else slots
    store = _default_cache if cache is _DEFAULT else cache
    if store is not None:
        cached = store.first(candidates, ctx, accept)
        if cached is not None:
            return cached
    return unwrap_first(
        candidates,
        _unwrappers(idents),
        ctx,
        accept,
        None if store is None else lambda slot, dek: store.put(slot, ctx, dek),
    )


def seal_writer(
    dst: IO[bytes],
    keys: Sequence[KeySpec],
    *,
    context: Mapping[str, str] | None = None,
    suite: str = DEFAULT_SUITE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    plaintext_size: int | None = None,
    threads: int = 1,
    dek_from: KeySpec | None = None,
) -> SealWriter:
    """A ``SealWriter`` into *dst* under a fresh DEK wrapped for *keys*; use it as a context.

    For producers that write their plaintext piece by piece (``save_file``
    streams tensors). Arguments as for :func:`seal_stream`.
    """
    context = dict(context or {})
    dek, slots = new_data_key(keys, context, dek_from=dek_from)
    with dek:
        return SealWriter(
            dst,
            dek,
            slots=slots,
            suite=suite,
            chunk_size=chunk_size,
            context=context,
            plaintext_size=plaintext_size,
            threads=threads,
        )


def seal_stream(
    src: BinaryIO,
    dst: IO[bytes],
    keys: Sequence[KeySpec],
    *,
    context: Mapping[str, str] | None = None,
    suite: str = DEFAULT_SUITE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    plaintext_size: int | None = None,
    threads: int = 1,
    progress: Progress | None = None,
    dek_from: KeySpec | None = None,
) -> Header:
    """Seal everything read from *src* into *dst* under a fresh DEK.

    Args:
        dek_from: a key whose service makes the DEK (Vault ``datakey/wrapped``,
            KMS ``GenerateDataKey``) and gives the first slot; *keys* add more.
            Default: the DEK comes from the OS CSPRNG.

    Returns:
        The header written.

    Raises:
        ValueError: bad parameters, or *dek_from* cannot generate keys.
        SealstoreError: from a provider.
    """
    writer = seal_writer(
        dst,
        keys,
        context=context,
        suite=suite,
        chunk_size=chunk_size,
        plaintext_size=plaintext_size,
        threads=threads,
        dek_from=dek_from,
    )
    with writer:
        while True:
            block = src.read(_COPY)
            if not block:
                break
            writer.write(block)
            if progress is not None:
                progress(len(block))
    return writer.header


@contextmanager
def atomic_output(dst: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary file that appears at *dst* only if the block completes.

    ``-`` means standard output, and a device, FIFO or ``/dev/fd/N`` path is
    written through likewise (as it goes; nothing to roll back): see
    :func:`sealstore.fsutil.atomic_file`.
    """
    if str(dst) == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with atomic_file(dst) as fp:
        yield fp


@contextmanager
def _input(src: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    if str(src) == "-":
        yield sys.stdin.buffer
    else:
        with open(src, "rb") as fp:
            yield fp


def seal_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    keys: Sequence[KeySpec],
    *,
    context: Mapping[str, str] | None = None,
    suite: str = DEFAULT_SUITE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    plaintext_size: int | None = None,
    threads: int = 1,
    progress: Progress | None = None,
    dek_from: KeySpec | None = None,
) -> Header:
    """Seal the file *src* (``-`` = stdin) to *dst* (``-`` = stdout), atomically.

    Args:
        src, dst: the plaintext file and the sealed file to write.
        keys: key URIs or wrappers; the DEK is wrapped to each (one slot each).
        context: the encryption context, bound into the header and every wrap.
        suite: ``"AES-256-GCM"`` (default) or ``"CHACHA20-POLY1305"``.
        chunk_size: a power of two, 64 KiB..64 MiB.
        plaintext_size: recorded in the header; by default the size of *src*
            when it is a regular file.
        threads: chunks sealed in parallel.
        progress: called with each chunk's byte count.
        dek_from: as :func:`seal_stream`.

    Returns:
        The header written.

    Raises:
        ValueError: bad parameters, or *dek_from* cannot generate keys.
        SealstoreError: from a provider.
    """
    if str(src) != "-" and plaintext_size is None:
        st = os.stat(src)
        if stat.S_ISREG(st.st_mode):
            plaintext_size = st.st_size
    with _input(src) as fin, atomic_output(dst) as fout:
        return seal_stream(
            fin,
            fout,
            keys,
            context=context,
            suite=suite,
            chunk_size=chunk_size,
            plaintext_size=plaintext_size,
            threads=threads,
            progress=progress,
            dek_from=dek_from,
        )


def open_sealed(
    src: Any,
    identities: Sequence[IdentitySpec] = (),
    *,
    slots: Sequence[KeySlot] | None = None,
    dek: DataKey | None = None,
    cache: DekCache | None = _DEFAULT,
    expect_context: Mapping[str, str] | None = None,
) -> SealedFile:
    """Open a sealed file for random access, unwrapping its DEK from the slots.

    Args:
        src: a path, bytes-like object or seekable binary file.
        identities: identity files or unwrapper objects to try first.
        slots: slots held outside the file (a store manifest).
        dek: the data key, if the caller already has it.
        expect_context: pairs the file's encryption context must hold.

    Raises:
        AuthenticationError: as :func:`unwrap_dek`, or the context lacks a pair
            of *expect_context*.
    """
    if dek is not None:
        sealed = SealedFile(src, dek)
        try:
            check_context(sealed.header.context, expect_context)
        except BaseException:
            sealed.close()
            raise
        return sealed
    preamble = peek_preamble(src)
    with unwrap_dek(
        preamble, identities, slots=slots, cache=cache, expect_context=expect_context
    ) as key:
        return SealedFile(src, key, preamble=preamble)


def open_reader(
    fp: BinaryIO,
    identities: Sequence[IdentitySpec] = (),
    *,
    slots: Sequence[KeySlot] | None = None,
    threads: int = 1,
    cache: DekCache | None = _DEFAULT,
    expect_context: Mapping[str, str] | None = None,
) -> SealReader:
    """A streaming reader over *fp*, its DEK unwrapped from the slots (or *cache*).

    Raises:
        AuthenticationError: as :func:`unwrap_dek` (*expect_context* included).
    """
    preamble = read_preamble(fp)
    with unwrap_dek(
        preamble, identities, slots=slots, cache=cache, expect_context=expect_context
    ) as key:
        return SealReader(fp, key, preamble=preamble, threads=threads)


def unseal_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    identities: Sequence[IdentitySpec] = (),
    *,
    threads: int = 1,
    progress: Progress | None = None,
    expect_context: Mapping[str, str] | None = None,
) -> int:
    """Decrypt *src* (``-`` = stdin) to *dst* (``-`` = stdout).

    A file destination appears only after every chunk authenticated.

    Args:
        expect_context: pairs the file's encryption context must hold (e.g.
            ``{"artifact": "bert"}``); a file sealed for anything else is
            refused before any key is unwrapped and nothing is written.

    Returns:
        The plaintext size.

    Raises:
        AuthenticationError: tampering, the wrong key, or a context mismatch.
        KeyUnavailable: no slot could be unwrapped.
    """
    with (
        _input(src) as fin,
        open_reader(fin, identities, threads=threads, expect_context=expect_context) as reader,
        atomic_output(dst) as fout,
    ):
        return reader.copy_to(fout, progress)


def verify_file(
    src: str | os.PathLike[str],
    identities: Sequence[IdentitySpec] = (),
    *,
    threads: int = 1,
    progress: Progress | None = None,
    expect_context: Mapping[str, str] | None = None,
) -> Header:
    """Authenticate every chunk of *src*, keeping no plaintext.

    Args:
        expect_context: pairs the file's encryption context must hold.

    Raises:
        AuthenticationError: the first failure, or a context mismatch;
            ``KeyUnavailable`` if no slot opens.
    """
    if str(src) == "-":
        reader = open_reader(
            sys.stdin.buffer, identities, threads=threads, expect_context=expect_context
        )
        with reader:
            for view in reader.iter_chunks():
                if progress is not None:
                    progress(len(view))
            return reader.header
    with open_sealed(src, identities, expect_context=expect_context) as sealed:
        sealed.verify(threads=threads, progress=progress)
        return sealed.header
