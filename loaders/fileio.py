"""``sealstore.open``: a sealed file or store object as a binary file object.

The file object itself lives on the ground floor (``sealstore.fileobj``);
this module, on the loaders floor, resolves what to open -- a path, an
fsspec URL of a sealed file, a store reference -- through
``loaders.sources.open_source``, the one resolver every loader uses, and
gives the file object a picklable :class:`SourceRef` so another process
can open it again by itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sealstore.errors import SealstoreError
from sealstore.fileobj import (
    DEFAULT_CACHE_CHUNKS,
    SealedBufferedReader,
    SealedIO,
    named,
)
from sealstore.kms.envelope import IdentitySpec
from sealstore.loaders.sources import PREFIX, open_source
from sealstore.stream import SealedFile

__all__ = ["SourceRef", "identity_specs", "open"]


def identity_specs(identities: Sequence[IdentitySpec]) -> tuple[str, ...] | None:
    """*identities* as picklable specs (paths); None if any is an object (it may hold keys)."""
    if all(isinstance(i, (str, os.PathLike)) for i in identities):
        return tuple(os.fspath(i) for i in identities)  # type: ignore[arg-type]
    return None


@dataclass(frozen=True)
class SourceRef:
    """How to open one sealed file again: its source and options, never a key.

    Attributes:
        src: a path, fsspec URL or store reference; a store reference names the
            resolved version (``#NAME:VERSION/FILE``), so every process reads
            the same bytes even after a tag moves.
        storage_options: travel in the pickle as fsspec's own file systems'
            do (S3 credentials included, if given here rather than in the
            worker's environment).
    """

    src: str
    tenant: str | None = None
    identities: tuple[str, ...] = ()
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)  # credentials
    check_digest: bool = True

    @property
    def name(self) -> str:
        return self.src

    def open(self) -> SealedFile:
        """Open the sealed file (unwrapping its key through ``identities``).

        Raises:
            NotFound, AuthenticationError, KeyUnavailable, FormatError, BackendError: with
                the source named.
        """
        try:
            return open_source(
                self.src,
                tenant=self.tenant,
                identities=self.identities,
                suffix="",
                check_digest=self.check_digest,
                storage_options=dict(self.storage_options),
            )
        except SealstoreError as exc:
            raise named(exc, self.src) from None


def open(  # sealstore.open mirrors the builtin on purpose
    src: Any,
    mode: str = "rb",
    *,
    store: Any = None,
    tenant: str | None = None,
    identities: Sequence[IdentitySpec] = (),
    storage_options: Mapping[str, Any] | None = None,
    check_digest: bool = True,
    cache_chunks: int = DEFAULT_CACHE_CHUNKS,
    threads: int = 1,
    buffering: int = -1,
) -> SealedIO | SealedBufferedReader:
    """Open a sealed file or store object for reading, as a seekable binary file.

    Every byte read has been authenticated; only the chunks a read covers
    are fetched and decrypted. The file pickles as a reference (the source
    and these options, never key bytes): a process that unpickles it opens
    the file again with its own identities.

    Args:
        src: a sealed file's path, ``file://`` or fsspec URL (``s3://...``), a
            store reference ``sealstore+URL#NAME[:VERSION|@TAG]/FILE`` (or
            ``NAME[:VERSION|@TAG]/FILE`` with *store*), or an open ``SealedFile``
            (not closed with the file object, and not picklable).
        mode: ``"rb"`` only.
        store: the store a bare reference is in (a ``Store`` or its URL).
        tenant: the store tenant (default: ``$SEALSTORE_TENANT`` or ``default``).
        identities: identity files (or unwrapper objects, which make the file
            object unpicklable) to try before each slot's own provider.
        storage_options: fsspec / store options (``endpoint_url``, ``key``, ...).
        check_digest: store objects: hash the whole object against the signed
            manifest before the first read (see ``sealstore.vault.pull.open_file``);
            False makes store reads lazy, like plain sealed files.
        cache_chunks: whole decrypted chunks kept for small reads.
        threads: threads decrypting a read of several chunks.
        buffering: 0 gives the raw :class:`SealedIO`; else a buffered reader
            (``buffering`` > 1 sets its buffer size).

    Returns:
        A :class:`~sealstore.fileobj.SealedBufferedReader` (or a
        :class:`~sealstore.fileobj.SealedIO` with ``buffering=0``).

    Raises:
        ValueError: a mode other than ``"rb"``.
        NotFound, AuthenticationError, KeyUnavailable, FormatError, BackendError: the
            message names the source.
    """
    if mode != "rb":
        raise ValueError(f"sealstore.open reads only (mode 'rb'), not {mode!r}")
    if isinstance(src, SealedFile):
        raw = SealedIO(src, cache_chunks=cache_chunks, threads=threads, close_sealed=False)
        return _buffer(raw, buffering)
    text = os.fspath(src)
    if store is not None:
        url = store if isinstance(store, (str, os.PathLike)) else store.url
        text = f"{PREFIX}{os.fspath(url)}#{text}"
    store_options = dict(storage_options or {})
    specs = identity_specs(identities)
    if specs is None:  # identity objects: opened here, never pickled
        try:
            sealed = open_source(
                text,
                tenant=tenant,
                identities=identities,
                suffix="",
                check_digest=check_digest,
                storage_options=store_options,
            )
        except SealstoreError as exc:
            raise named(exc, text) from None
        raw = SealedIO(sealed, name=text, cache_chunks=cache_chunks, threads=threads)
        return _buffer(raw, buffering)
    ref = SourceRef(text, tenant, specs, store_options, check_digest)
    sealed = ref.open()
    ref = _pinned(ref, sealed)
    raw = SealedIO(sealed, reopener=ref, cache_chunks=cache_chunks, threads=threads)
    return _buffer(raw, buffering)


def _pinned(ref: SourceRef, sealed: SealedFile) -> SourceRef:
    """A store reference resolved to the version and file just opened."""
    manifest = getattr(sealed, "source_manifest", None)
    store = getattr(sealed, "source_store", None)
    if manifest is None or store is None:
        return ref
    path = sealed.header.context.get("path", "")
    src = f"{PREFIX}{store.url}#{manifest.name}:{manifest.version}/{path}"
    return SourceRef(src, ref.tenant, ref.identities, ref.storage_options, ref.check_digest)


def _buffer(raw: SealedIO, buffering: int) -> SealedIO | SealedBufferedReader:
    if buffering == 0:
        return raw
    return SealedBufferedReader(raw, buffering if buffering > 1 else 1 << 16)
