"""fsspec file systems over sealed data, registered through the ``fsspec.specs`` entry point.

Two kinds of URL, so pandas, pyarrow (through ``filesystem=``), Hugging Face
``datasets`` and anything else that speaks fsspec read sealed data in place:

* ``sealstore::PROTOCOL://PATH`` -- sealed files on any fsspec file system
  (``sealstore::s3://bucket/data/part-0.parquet.seal``,
  ``sealstore::file:///data/part-0.parquet.seal``); the target's own options
  go under its protocol (``s3={...}``), ours at the top level.
* ``sealstore+file://PATH#NAME[:VERSION|@TAG]/FILE``, ``sealstore+s3://BUCKET/PREFIX#...``
  (and ``sealstore+memory://``) -- files of a store version; ``ls``, ``glob``
  and ``info`` list the version's files with their plaintext sizes from the
  signed manifest. Names keep the reference as written (pyarrow wants a
  folder's entries under the folder); a tag's resolution is kept
  ``tag_ttl`` seconds (30) so a listing and the opens after it see one
  version, and each file opened is pinned to its version
  (``#NAME:VERSION/...``), so a worker that reopens it reads the same bytes.

Options: ``identities`` (identity file paths), ``tenant`` (store URLs),
``check_digest`` (store URLs; default True: each object is hashed against
the manifest before its first read -- False makes reads lazy),
``cache_chunks`` and ``threads`` (as ``sealstore.open``); a store URL's other
options (``endpoint_url``, ``key``, ``secret``) open the store.

Store URLs are read-only (a store is written by ``push``); a chained URL
opened ``"wb"`` seals what is written (``keys=[URI, ...]`` required), and the
file appears only when it is closed without an error. ``open`` gives the
``sealstore.fileobj`` file object, which pickles as (file system, path): a
worker process reopens the file with the identities named here.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.implementations.chained import ChainedFileSystem

from sealstore.chunks import ChunkLayout, zero
from sealstore.dekcache import DekCache
from sealstore.errors import NotFound, SealstoreError
from sealstore.fileobj import DEFAULT_CACHE_CHUNKS, SealedBufferedReader, named, wrap
from sealstore.format import DEFAULT_CHUNK_SIZE, read_preamble_from
from sealstore.fsutil import atomic_file
from sealstore.kms.envelope import open_sealed, seal_writer
from sealstore.loaders.fileio import identity_specs
from sealstore.loaders.sources import PREFIX, open_source, split_store_ref, verify_at_open
from sealstore.stream import SealedFile

__all__ = [
    "SealedFileSystem",
    "StoreFileSystem",
    "StoreMemoryFileSystem",
    "StoreS3FileSystem",
]


class _FsRef:
    """A file's reference for pickling: its file system (which pickles as its options) and path."""

    def __init__(self, fs: _SealedBase, path: str) -> None:
        self.fs, self.path = fs, path

    @property
    def name(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    def open(self) -> SealedFile:
        return self.fs.open_sealed(self.path)

    def __reduce__(self) -> tuple[Any, ...]:
        if not self.fs.picklable:
            raise TypeError(
                f"{self.name}: identity objects do not pickle; give identities as file paths "
                "to pass the file to another process"
            )
        return _FsRef, (self.fs, self.path)


class _SealedBase(AbstractFileSystem):
    """What both file systems share: options, ``_open`` and the read-only refusals."""

    def __init__(
        self,
        *args: Any,
        identities: Sequence[Any] = (),
        cache_chunks: int = DEFAULT_CACHE_CHUNKS,
        threads: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        specs = identity_specs(identities)
        self.picklable = specs is not None
        self.identities = list(specs) if specs is not None else list(identities)
        self.cache_chunks = cache_chunks
        self.threads = threads

    def open_sealed(self, path: str) -> SealedFile:
        raise NotImplementedError

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: Any = None,
        autocommit: bool = True,
        cache_options: Any = None,
        **kwargs: Any,
    ) -> Any:
        if mode != "rb":
            raise ValueError(
                f"{self.unstrip_protocol(path)}: mode {mode!r} is not supported (read 'rb'; "
                "write 'wb' through a sealstore:: URL)"
            )
        path = self._strip_protocol(path)
        ref = _FsRef(self, path)
        return wrap(ref.open(), reopener=ref, cache_chunks=self.cache_chunks, threads=self.threads)

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise PermissionError("this file system is read-only (push to a store to write one)")

    rm_file = mkdir = makedirs = rmdir = mv = cp_file = put_file = pipe_file = _refuse


class _SealingFile(io.BufferedIOBase):
    """fsspec ``"wb"``: what is written is sealed into the target, which appears only
    when this closes without an error (*commit*); otherwise *discard* drops it.

    A close while an exception is being handled discards too (fsspec closes its
    files on the way out of a failed ``with`` block), so close a file you mean
    to keep outside ``except`` blocks.
    """

    def __init__(
        self, writer: Any, commit: Callable[[], Any], discard: Callable[[], Any], name: str
    ) -> None:
        super().__init__()
        self._writer, self._commit, self._discard, self.name = writer, commit, discard, name
        # An exception already being handled where the file was opened (a
        # fallback write in an ``except`` block) is not a failure of this write.
        self._handling = sys.exc_info()[1]

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return int(self._writer.write(data))

    def close(self) -> None:
        if self.closed:
            return
        active = sys.exc_info()[1]
        if active is not None and active is not self._handling:
            # Closed while an exception propagates: fsspec's OpenFile closes its
            # files on the way out of a failed ``with`` block. Sealing the final
            # chunk now would publish a file that authenticates as a shorter
            # plaintext; drop it instead.
            self.discard()
            return
        try:
            self._writer.close()  # the final chunk
            self._commit()
        except BaseException:
            self.discard()
            raise
        super().close()

    def discard(self) -> None:
        """Drop what was written: no file appears."""
        if self.closed:
            return
        self._writer.abort()
        with contextlib.suppress(Exception):
            self._discard()
        super().close()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def __del__(self) -> None:
        if not self.closed:  # dropped unclosed: never a file that looks complete
            self.discard()


def _target_writer(fs: Any, path: str) -> tuple[Any, Callable[[], Any], Callable[[], Any]]:
    """``(file, commit, discard)`` for a new file at *path* that appears only on commit."""
    from fsspec.implementations.local import LocalFileSystem
    from fsspec.spec import AbstractBufferedFile

    if isinstance(fs, LocalFileSystem):
        # Local disk: sealstore's atomic file (an anonymous temporary in the
        # destination's folder, renamed into place; fsspec's goes through /tmp).
        fs.makedirs(fs._parent(path), exist_ok=True)
        cm = atomic_file(path)
        fp = cm.__enter__()
        gone = RuntimeError("discarded")
        return (
            fp,
            lambda: cm.__exit__(None, None, None),
            lambda: cm.__exit__(RuntimeError, gone, None),
        )
    # Elsewhere the file system's own transaction (S3: the upload completes on
    # commit). Through _open, the backend's method: fs.open would also queue
    # the file on the file system's transaction, which this write is not part
    # of, and keep it there for the life of the (cached, shared) file system.
    fp = fs._open(path, "wb", autocommit=False)

    def commit() -> None:
        fp.close()
        fp.commit()

    def discard() -> None:
        try:
            fp.discard()
        finally:
            # A discarded file is never closed: s3fs's close() (its __del__
            # calls it) would start a new multipart upload nothing completes.
            if isinstance(fp, AbstractBufferedFile):
                fp.closed = True

    return fp, commit, discard


class SealedFileSystem(_SealedBase, ChainedFileSystem):
    """Sealed files on another fsspec file system: ``sealstore::PROTOCOL://PATH``.

    Reads as ``sealstore.open``; ``open(path, "wb")`` seals what is written.

    Sizes listed are plaintext sizes (from each file's header). A file that is
    not sealed is listed with ``size`` None and fails to open (``FormatError``).

    Args:
        target_protocol, target_options: the file system holding the sealed files.
        fs: that file system, already made (instead of the two above).
        identities, cache_chunks, threads: as ``sealstore.open``.
        keys, context, chunk_size: for ``open(path, "wb")``: the key URIs the new
            file's data key is wrapped to (required), its encryption context,
            its chunk size. The file appears when it is closed without error.
    """

    protocol = "sealstore"

    def __init__(
        self,
        target_protocol: str | None = None,
        target_options: dict[str, Any] | None = None,
        fs: Any = None,
        fo: str | None = None,
        keys: Sequence[str] = (),
        context: dict[str, str] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.keys = list(keys)
        self.context = dict(context or {})
        self.chunk_size = chunk_size
        if fs is None:
            import fsspec

            fs = fsspec.filesystem(target_protocol or "file", **(target_options or {}))
        self.fs = fs
        self._sizes: dict[tuple[str, int], int | None] = {}

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
        for lead in ("sealstore::", "sealstore://"):
            if text.startswith(lead):
                text = text[len(lead) :]
        # Empty stays empty: fsspec then gives a chained file system the target's path.
        return text.rstrip("/") if text.strip("/") else text

    def unstrip_protocol(self, name: str) -> str:
        return "sealstore::" + self.fs.unstrip_protocol(name)

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: Any = None,
        autocommit: bool = True,
        cache_options: Any = None,
        **kwargs: Any,
    ) -> Any:
        if mode != "wb":
            return super()._open(path, mode, block_size, autocommit, cache_options, **kwargs)
        if not self.keys:
            raise ValueError(f"{self.unstrip_protocol(path)}: writing seals; give keys=[URI, ...]")
        path = self._strip_protocol(path)
        target, commit, discard = _target_writer(self.fs, path)
        try:
            writer = seal_writer(
                target,
                self.keys,
                context=self.context,
                chunk_size=self.chunk_size,
                threads=self.threads,
            )
        except BaseException:
            discard()
            raise
        return _SealingFile(writer, commit, discard, self.unstrip_protocol(path))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.fs.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.fs.mkdir(self._strip_protocol(path), create_parents=create_parents, **kwargs)

    def open_sealed(self, path: str) -> SealedFile:
        fp = self.fs.open(path, "rb")
        try:
            sealed = open_sealed(fp, self.identities)
        except SealstoreError as exc:
            fp.close()
            raise named(exc, self.unstrip_protocol(path)) from None
        except BaseException:
            fp.close()
            raise
        sealed._owned = fp  # closed with it
        return sealed

    def _plaintext(self, info: dict[str, Any]) -> dict[str, Any]:
        if info.get("type") != "file":
            return info
        name, size = info["name"], int(info.get("size") or 0)
        key = (name, size)
        if key not in self._sizes:
            got = b""

            def head(n: int) -> bytes:
                # Ranged reads of the preamble only (opening the file could
                # fetch a whole read-ahead block per file listed).
                nonlocal got
                if n > len(got):
                    got = bytes(self.fs.cat_file(name, start=0, end=max(n, 4096)))
                return got[:n]

            try:
                pre = read_preamble_from(head)
                self._sizes[key] = ChunkLayout(
                    pre.header, pre.payload_offset, size - pre.payload_offset
                ).plaintext_size
            except SealstoreError:
                self._sizes[key] = None  # not a sealed file (or a broken one)
        return {**info, "size": self._sizes[key], "sealed_size": size}

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        entries = self.fs.ls(self._strip_protocol(path), detail=True, **kwargs)
        out = [self._plaintext(e) for e in entries]
        return out if detail else [e["name"] for e in out]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._plaintext(self.fs.info(self._strip_protocol(path), **kwargs))


class StoreFileSystem(_SealedBase):
    """Files of store versions: ``sealstore+file://PATH#NAME[:VERSION|@TAG]/FILE``.

    Paths inside are the store URL without its scheme plus the fragment
    (``srv/store#data:3/train/part-0.parquet``), so a library that puts the
    protocol back in front of a listed path gets the full URL again. The path
    of a ``sealstore+file://`` URL is absolute, with or without its leading "/".

    Args:
        tenant: the store tenant (default: ``$SEALSTORE_TENANT`` or ``default``).
        check_digest: hash each object against the manifest before its first read.
        tag_ttl: seconds a tag's resolution is kept (a listing and the opens
            that follow it see one version).
        verify_signature: check each version's OMS model signature with
            *public_key* (a PEM path or bytes; default
            ``$SEALSTORE_OMS_PUBLIC_KEY``) and each file's plaintext against
            it: ``cat_file`` hashes beside its one decryption; ``open`` (random
            access: a reader may seek anywhere first) checks the whole file
            in one streaming pass before it returns the file object.
        identities, cache_chunks, threads: as ``sealstore.open``.
        storage_options: the store's (``endpoint_url``, ``key``, ``secret``).
    """

    protocol = "sealstore+file"
    scheme = "file"  # the store's own URL scheme
    root_marker = ""

    def __init__(
        self,
        tenant: str | None = None,
        check_digest: bool = True,
        tag_ttl: float = 30.0,
        identities: Sequence[Any] = (),
        cache_chunks: int = DEFAULT_CACHE_CHUNKS,
        threads: int = 1,
        *,
        verify_signature: bool = False,
        public_key: Any = None,
        **storage_options: Any,
    ) -> None:
        super().__init__(identities=identities, cache_chunks=cache_chunks, threads=threads)
        self.signature_key = None
        if verify_signature:
            from sealstore.vault.oms import public_key_from

            # Loaded now: a missing or bad key fails before any store is read.
            self.signature_key = public_key_from(public_key)
        self.tenant = tenant
        self.check_digest = check_digest
        self.tag_ttl = tag_ttl
        self.store_options = storage_options
        self._stores: dict[str, Any] = {}
        self._manifests: dict[tuple[str, str], tuple[Any, float]] = {}
        # A dataset's shards share their version's key: one unwrap per version
        # (per 256 files, per minute), not one per file. Only this instance,
        # with its own identities and tenant, takes keys from it.
        self.keys = DekCache(ttl=60.0, max_uses=256)
        self._lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
        for lead in (f"{PREFIX}{cls.scheme}://", f"{cls.scheme}://"):
            if text.startswith(lead):
                text = text[len(lead) :]
                break
        # No leading "/": libraries that rebuild a URL from a listed path strip
        # it (datasets' streaming does), so a file store's path is always
        # absolute, "/" put back in _parse.
        return text.strip("/")

    def unstrip_protocol(self, name: str) -> str:
        return f"{self.protocol}://{self._strip_protocol(name)}"

    def _parse(self, path: str) -> tuple[str, str, str]:
        """``(store URL, NAME[:VERSION|@TAG], path inside the artifact)``."""
        where, sep, fragment = self._strip_protocol(path).partition("#")
        if not sep or not fragment:
            raise ValueError(f"{self.unstrip_protocol(path)}: name the artifact after '#'")
        ref, sub = split_store_ref(fragment)
        root = "/" if self.scheme == "file" else ""
        return f"{self.scheme}://{root}{where}", ref, (sub or "").strip("/")

    def _store(self, url: str) -> Any:
        with self._lock:
            store = self._stores.get(url)
        if store is None:
            from sealstore.vault.store import Store

            store = Store.open(url, **self.store_options)
            with self._lock:
                self._stores[url] = store
        return store

    def _manifest(self, url: str, ref: str) -> Any:
        """The version's signed manifest; a tag's kept ``tag_ttl`` seconds, a version's for good."""
        key = (url, ref)
        now = time.monotonic()
        with self._lock:
            m, expires = self._manifests.get(key, (None, 0.0))
        if m is None or now >= expires:
            from sealstore.vault.store import default_tenant

            store = self._store(url)
            m = store.serving_manifest(ref, tenant=self.tenant or default_tenant())
            # A version never changes (a shred or rotation shows when a file
            # is opened, which reads the manifest afresh); a tag moves.
            expires = float("inf") if ":" in ref else now + self.tag_ttl
            with self._lock:
                self._manifests[key] = (m, expires)
        return m

    def _entries(self, path: str) -> tuple[str, list[Any], str]:
        """``(listed base, the version's files, path inside)``; names keep the ref as written."""
        url, ref, sub = self._parse(path)
        try:
            m = self._manifest(url, ref)
        except NotFound as exc:
            raise FileNotFoundError(str(exc)) from None
        return f"{self._strip_protocol(url)}#{ref}", list(m.files), sub

    def canonical(self, path: str) -> str:
        """*path* with its tag resolved to a version (``#NAME:VERSION/...``)."""
        url, ref, sub = self._parse(path)
        m = self._manifest(url, ref)
        base = f"{self._strip_protocol(url)}#{m.name}:{m.version}"
        return f"{base}/{sub}" if sub else base

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        base, files, sub = self._entries(path)
        prefix = f"{sub}/" if sub else ""
        out: dict[str, dict[str, Any]] = {}
        for e in files:
            if e.path == sub:
                out = {e.path: self._file(base, e)}
                break
            if not e.path.startswith(prefix):
                continue
            head, slash, _rest = e.path[len(prefix) :].partition("/")
            if slash:
                name = f"{base}/{prefix}{head}"
                out.setdefault(name, {"name": name, "size": 0, "type": "directory"})
            else:
                out[e.path] = self._file(base, e)
        if not out:
            raise FileNotFoundError(self.unstrip_protocol(path))
        entries = sorted(out.values(), key=lambda d: d["name"])
        return entries if detail else [d["name"] for d in entries]

    @staticmethod
    def _file(base: str, e: Any) -> dict[str, Any]:
        return {
            "name": f"{base}/{e.path}",
            "size": e.size,
            "type": "file",
            "sha256": e.sha256,  # of the plaintext, signed in the manifest
            "sealed_size": e.object_size,
        }

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        base, files, sub = self._entries(path)
        for e in files:
            if e.path == sub:
                return self._file(base, e)
        if not sub or any(e.path.startswith(sub + "/") for e in files):
            name = f"{base}/{sub}" if sub else base
            return {"name": name, "size": 0, "type": "directory"}
        raise FileNotFoundError(self.unstrip_protocol(path))

    def glob(self, path: str, **kwargs: Any) -> Any:
        # The pattern's tag becomes the version it names now, so the names
        # matched (which carry the version) match the pattern.
        url, _ref, _sub = self._parse(path)
        where, _, fragment = self._strip_protocol(path).partition("#")
        ref, sub = split_store_ref(fragment)
        m = self._manifest(url, ref)
        pinned = f"{where}#{m.name}:{m.version}" + (f"/{sub}" if sub is not None else "")
        return super().glob(pinned, **kwargs)

    def open_sealed(self, path: str, *, whole: bool = False) -> SealedFile:
        """The file *path* names; with ``verify_signature``, checked against the model
        signature: now, in a streaming pass, or (*whole*: the caller reads the whole
        file at once) beside that read's decryption, before it returns."""
        url, ref, sub = self._parse(path)
        where = self.unstrip_protocol(path)
        if not sub:
            raise IsADirectoryError(f"{where}: name a file of the artifact after its version")
        try:
            sealed = open_source(
                f"{ref}/{sub}",
                store=self._store(url),
                tenant=self.tenant,
                identities=self.identities,
                check_digest=self.check_digest,
                cache=self.keys,
                verify_signature=whole and self.signature_key is not None,
                public_key=self.signature_key,
            )
            if self.signature_key is not None and not whole:
                try:
                    verify_at_open(sealed, self.signature_key, threads=self.threads)
                except BaseException:
                    sealed.close()
                    raise
            return sealed
        except SealstoreError as exc:
            raise named(exc, where) from None

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        """The file's plaintext (or ``[start, end)`` of it).

        With ``verify_signature``: one decryption of the whole file, hashed
        beside it against the signature before any byte is returned.
        """
        if self.signature_key is None:
            return super().cat_file(path, start=start, end=end, **kwargs)
        with self.open_sealed(self._strip_protocol(self.canonical(path)), whole=True) as sealed:
            buf = bytearray(sealed.size)
            try:
                sealed.read_into(0, buf, threads=self.threads)
                return bytes(memoryview(buf)[slice(start, end)])
            finally:
                zero(memoryview(buf))

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: Any = None,
        autocommit: bool = True,
        cache_options: Any = None,
        **kwargs: Any,
    ) -> SealedBufferedReader:
        if mode == "rb":
            path = self.canonical(path)  # workers reopen this very version
        opened: SealedBufferedReader = super()._open(
            path, mode, block_size, autocommit, cache_options, **kwargs
        )
        return opened


class StoreS3FileSystem(StoreFileSystem):
    """Files of store versions on S3: ``sealstore+s3://BUCKET/PREFIX#NAME:VERSION/FILE``."""

    protocol = "sealstore+s3"
    scheme = "s3"


class StoreMemoryFileSystem(StoreFileSystem):
    """Files of store versions in this process's ``memory://`` stores (for tests)."""

    protocol = "sealstore+memory"
    scheme = "memory"
