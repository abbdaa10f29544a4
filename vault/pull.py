"""``pull`` and ``verify``: read versions back, checking everything before release.

Order of checks, for every read: the store config's signature (on open), the
manifest's signature and location, then per file the object's size, the
SHA-256 of its header bytes (signed in the manifest), the header's context
(tenant, artifact, version, path), the key commitment, every chunk's tag, and
the SHA-256 of the whole object. ``pull`` writes into a temporary directory
beside the destination and moves files into place only when every file of
the version has passed, so a failure leaves no output at all.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import mmap
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from sealstore.dekcache import DekCache
from sealstore.errors import (
    AuthenticationError,
    BackendError,
    KeyUnavailable,
    NotFound,
    Refused,
    SealstoreError,
)
from sealstore.format import Preamble, open_payload_key, read_preamble, read_preamble_from
from sealstore.fsutil import is_stream_target, lock_folder, remove_if_unlocked
from sealstore.keys import DataKey, unwrap_first
from sealstore.kms.envelope import IdentitySpec, _identities, atomic_output
from sealstore.kms.registry import unwrappers_for
from sealstore.ranged import RangedSource
from sealstore.stream import SealReader
from sealstore.vault.digest import ObjectHasher, digests_equal
from sealstore.vault.manifest import FileEntry, Manifest, check_name
from sealstore.vault.storage import LocalStorage

__all__ = [
    "VerifyResult",
    "check_destination",
    "hash_beside",
    "open_file",
    "pull",
    "select_files",
    "sweep_pull_folders",
    "unwrap_version_key",
    "verify",
    "verify_refs",
]

Progress = Callable[[int], None]
_HASH_BLOCK = 8 << 20


def served(
    store: Any,
    ref: str,
    tenant: str,
    action: str,
    *,
    path: str | None = None,
    granted: bool = True,
) -> Manifest:
    """``store.serving_manifest``, with the decision audited (before any key is asked for).

    A refusal is always recorded; a grant only if *granted* (a caller that
    only looks before it pulls leaves the grant to the pull).

    Raises:
        Refused, AuthenticationError, NotFound: as ``serving_manifest`` (audited as denied).
    """
    from sealstore.vault.auditing import record

    what = {"ref": str(ref), **({"path": path} if path else {})}
    try:
        m = store.serving_manifest(ref, tenant=tenant)
    except (Refused, AuthenticationError) as exc:
        code = "safe-mode" if isinstance(exc, Refused) else "integrity"
        record(
            store, action, tenant=tenant, decision="denied", code=code, reason=str(exc), detail=what
        )
        raise
    if granted:
        record(
            store,
            action,
            tenant=tenant,
            artifact=m.name,
            version=m.version,
            decision="granted",
            detail=what,
        )
    return m


def _where(m: Manifest, entry: FileEntry) -> str:
    return f"{m.name}:{m.version}/{entry.path}"


def _check_preamble(m: Manifest, entry: FileEntry, pre: Preamble, size: int) -> None:
    where = _where(m, entry)
    if size != entry.object_size:
        raise AuthenticationError(
            f"{where}: object is {size} bytes, the manifest says {entry.object_size}"
        )
    header_bytes = pre.header.encode()
    if not hmac.compare_digest(hashlib.sha256(header_bytes).hexdigest(), entry.header_sha256):
        raise AuthenticationError(f"{where}: object header does not match the manifest")
    if pre.header.context != dict(m.context, path=entry.path):
        raise AuthenticationError(f"{where}: object belongs to another artifact or path")
    if pre.header.plaintext_size not in (None, entry.size):
        raise AuthenticationError(f"{where}: object size does not match the manifest")


def unwrap_version_key(
    m: Manifest,
    first: Preamble | None,
    identities: Sequence[IdentitySpec] = (),
    *,
    cache: DekCache | None = None,
) -> DataKey:
    """Open the version's DEK from the manifest's slots (bound to the version context).

    Args:
        cache: take the DEK from here if it passes *first*'s key commitment,
            and store a fresh unwrap there (a sharded model's loader passes
            one so its files cost one unwrap, not one each).

    Raises:
        KeyUnavailable: no slot opens (each slot's cause listed), or the
            version was crypto-shredded.
        AuthenticationError: a slot opens to a key the objects do not commit to.
    """
    if m.shredded:
        raise KeyUnavailable(
            f"{m.name}:{m.version} was crypto-shredded at {m.shredded}: its key slots are destroyed"
        )
    idents = _identities(identities)

    def accept(dek: DataKey) -> None:
        if first is not None:
            open_payload_key(first.header, dek)

    if cache is not None:
        cached = cache.first(m.slots, m.context, accept)
        if cached is not None:
            return cached
    return unwrap_first(
        m.slots,
        lambda slot: unwrappers_for(slot, idents),
        m.context,
        accept,
        None if cache is None else lambda slot, dek: cache.put(slot, m.context, dek),
    )


class _Hashing:
    """A read-only file wrapper that hashes what passes through (not seekable: streamed)."""

    def __init__(self, fp: BinaryIO, alg: str) -> None:
        self._fp = fp
        self.digest = ObjectHasher(alg)

    def read(self, n: int = -1) -> bytes:
        data = self._fp.read(n)
        self.digest.update(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self._fp.read(len(b))
        n = len(data)
        memoryview(b).cast("B")[:n] = data
        self.digest.update(data)
        return n


def _hash_fd(fd: int, alg: str, out: list[str], errors: list[BaseException]) -> None:
    """Hash the object through the reader's own descriptor.

    Never by name: a file renamed into place after the reader opened its
    own would otherwise be hashed instead of the one decrypted.
    """
    try:
        h = ObjectHasher(alg)
        size = os.fstat(fd).st_size
        mapped = None
        if size:
            with contextlib.suppress(OSError, ValueError):
                mapped = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        if mapped is None:
            buf = bytearray(_HASH_BLOCK)
            pos = 0
            while pos < size:
                n = os.preadv(fd, [buf], pos)
                if not n:
                    break
                h.update(memoryview(buf)[:n])
                pos += n
        else:
            # Straight out of the page cache (the reader maps the same file):
            # no read() copy, which was a sixth of a pull's CPU time. Each block
            # is unmapped once hashed: a loader hashing beside its decryption
            # would otherwise carry the whole object in its resident set.
            with mapped:
                whole = memoryview(mapped)
                for pos in range(0, len(whole), _HASH_BLOCK):
                    h.update(whole[pos : pos + _HASH_BLOCK])
                    mapped.madvise(mmap.MADV_DONTNEED, pos, min(_HASH_BLOCK, size - pos))
                whole.release()
        out.append(h.text())
    except BaseException as exc:
        errors.append(exc)


@contextmanager
def _object(
    store: Any, m: Manifest, entry: FileEntry
) -> Iterator[tuple[BinaryIO, Callable[[], str]]]:
    """The object opened for streaming, and a function giving its SHA-256 once read."""
    path = store.object_path(m.tenant, entry.object)
    alg = entry.object_digest.partition(":")[0]
    local = isinstance(store.storage, LocalStorage)
    try:
        fp = store.storage.open_read(path) if local else store.storage.open_stream(path)
    except NotFound:
        raise NotFound(f"{_where(m, entry)}: object {entry.object} is missing") from None
    try:
        if local:
            # A local object: the reader maps it and decrypts in parallel; the
            # hash runs beside it on its own thread over the page cache.
            digests: list[str] = []
            errors: list[BaseException] = []
            t = threading.Thread(
                target=_hash_fd, args=(fp.fileno(), alg, digests, errors), daemon=True
            )
            t.start()

            def local_digest() -> str:
                t.join()
                if errors:
                    exc = errors[0]
                    raise BackendError(f"{_where(m, entry)}: cannot read the object: {exc}")
                return digests[0]

            try:
                yield fp, local_digest
            finally:
                t.join()  # never leave the thread reading after we return
        else:
            wrapped = _Hashing(fp, alg)
            yield wrapped, wrapped.digest.text  # type: ignore[misc]
    finally:
        fp.close()


def _object_size(store: Any, m: Manifest, entry: FileEntry) -> int:
    try:
        return int(store.storage.size(store.object_path(m.tenant, entry.object)))
    except NotFound:
        raise NotFound(f"{_where(m, entry)}: object {entry.object} is missing") from None


def _opened_size(store: Any, m: Manifest, entry: FileEntry, fp: Any) -> int:
    """The size of the object as opened (fstat locally: the file being read, not a name)."""
    fileno = getattr(fp, "fileno", None)
    if isinstance(store.storage, LocalStorage) and fileno is not None:
        return os.fstat(fileno()).st_size
    return _object_size(store, m, entry)


def _decrypt_entry(
    store: Any,
    m: Manifest,
    entry: FileEntry,
    dek: DataKey | None,
    out: Any,
    *,
    identities: Sequence[IdentitySpec],
    threads: int,
    progress: Progress | None,
    check_plaintext: bool = False,
) -> DataKey:
    """Stream one file's plaintext into *out* (None: discard), checking everything.

    The plaintext hash is redundant once the object hash (signed) and every
    chunk tag have passed, so only ``verify`` asks for it (it also proves the
    BoM's hashes).
    """
    with _object(store, m, entry) as (fp, digest):
        size = _opened_size(store, m, entry, fp)
        pre = read_preamble(fp)
        _check_preamble(m, entry, pre, size)
        if dek is None:
            dek = unwrap_version_key(m, pre, identities)
        plain = hashlib.sha256()
        total = 0
        try:
            reader = SealReader(fp, dek, preamble=pre, threads=threads)  # type: ignore[arg-type]
            with reader:
                for chunk in reader.iter_chunks():
                    if check_plaintext:
                        plain.update(chunk)
                    if out is not None:
                        out.write(chunk)
                    total += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
        except AuthenticationError as exc:
            raise AuthenticationError(f"{_where(m, entry)}: {exc}") from None
        if isinstance(fp, _Hashing):
            # Streamed: anything after the final chunk was never read; read it to hash it.
            while fp.read(1 << 20):
                pass
        where = _where(m, entry)
        if not digests_equal(digest(), entry.object_digest):
            raise AuthenticationError(f"{where}: object hash does not match the manifest")
        if total != entry.size or (
            check_plaintext and not hmac.compare_digest(plain.hexdigest(), entry.sha256)
        ):
            raise AuthenticationError(f"{where}: plaintext does not match the manifest")
    return dek


def pull(
    store: Any,
    ref: str,
    dest: str | os.PathLike[str],
    *,
    tenant: str | None = None,
    identities: Sequence[IdentitySpec] = (),
    threads: int = 2,
    progress: Progress | None = None,
    files: Sequence[str] | None = None,
    force: bool = False,
    signature: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Decrypt a version into the directory *dest*, every byte verified first.

    Files appear in *dest* only after every file of the version has been
    authenticated (a temporary directory beside *dest*, or inside it if it
    exists, holds them meanwhile; it is removed on any failure, Ctrl-C and
    SIGTERM included, and a later pull to the same place removes one left by
    a killed process). *dest* must be new or empty unless *force*.

    A single file (*files* naming one path) may instead go to ``-`` (standard
    output) or to a device, FIFO or ``/dev/fd/N`` path: written as each chunk
    authenticates, like ``decrypt -o -``.

    Args:
        files: only these files of the artifact (default: all): paths,
            folders or globs, see :func:`select_files`.
        force: pull into a non-empty *dest*, replacing files of the same name.
        signature: where to write the version's OMS model signature (default
            ``DEST/model.sig``, the name ``model_signing verify`` reads). It is
            written when the whole version is pulled (or *signature* is given)
            and the version has one; then ``model_signing verify key
            --signature DEST/model.sig --public_key KEY DEST`` accepts *dest*.

    Returns:
        The verified manifest.

    Raises:
        ValueError: ``-`` or a stream *dest* for more than one file; *signature*
            for a version without one, or a file of the version in its way.
        FileExistsError: *dest* is not empty and not *force*.
        NotFound: no such version, tag or object.
        AuthenticationError: any signature, hash or tag fails.
        KeyUnavailable: no key slot opens (or the version was shredded).
    """
    from sealstore.vault.store import default_tenant

    check_destination(dest, files=files, force=force)
    tenant = check_name(tenant or default_tenant(), "tenant")
    m = served(store, ref, tenant, "pull")
    if m.shredded:
        unwrap_version_key(m, None)  # raises the shredded error
    entries = list(m.files)
    if files is not None:
        entries = select_files(entries, files, f"{m.name}:{m.version}")
    sig_out = _signature_target(m, dest, files, signature)
    if _is_stream(dest):
        if len(entries) != 1:
            raise ValueError(
                f"-o {dest} takes one file; {files[0]!r} names {len(entries)}"  # type: ignore[index]
            )
        _pull_one(
            store, m, entries[0], dest, identities=identities, threads=threads, progress=progress
        )
        return m
    target = Path(dest)
    if target.exists():
        for entry in entries:  # conflicts are found before anything is decrypted
            dst = target / entry.path
            if dst.is_dir() or any(
                p.exists() and not p.is_dir() for p in dst.parents if target in p.parents
            ):
                raise IsADirectoryError(f"{dst} is in the way of {entry.path}")
        # Inside the destination: the final renames stay on its filesystem
        # (a mount point such as a container volume), never across one.
        tmp = Path(tempfile.mkdtemp(prefix=_INSIDE, dir=target))
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_BESIDE}", dir=target.parent))
    lock: int | None = None
    try:
        # Held until we are done: a later pull's sweep sees a live folder and leaves it.
        lock = lock_folder(tmp)
        os.chmod(tmp, 0o700)
        dek: DataKey | None = None
        try:
            for entry in entries:
                out_path = tmp / entry.path
                out_path.parent.mkdir(parents=True, exist_ok=True)
                with open(out_path, "wb") as out:
                    os.fchmod(out.fileno(), entry.plaintext_mode)
                    dek = _decrypt_entry(
                        store,
                        m,
                        entry,
                        dek,
                        out,
                        identities=identities,
                        threads=threads,
                        progress=progress,
                    )
                    # Durable before it is named: a power loss just after the
                    # pull must not leave an empty or short file at the path.
                    os.fsync(out.fileno())
        finally:
            if dek is not None:
                dek.close()
        paths = [e.path for e in entries]
        if sig_out is not None:
            paths += _write_signature(m, sig_out, target, tmp)
        _publish(tmp, target, paths)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:
            os.close(lock)
    return m


def _signature_target(
    m: Manifest, dest: str | os.PathLike[str], files: Sequence[str] | None, signature: Any
) -> Path | None:
    """Where the version's model signature goes (None: not written); checked up front."""
    from sealstore.vault.oms import DEFAULT_SIGNATURE

    if signature is None and (m.oms is None or files is not None or _is_stream(dest)):
        return None
    if m.oms is None:
        raise ValueError(f"{m.name}:{m.version} has no model signature to write")
    if _is_stream(dest):
        raise ValueError("the model signature is written beside pulled files, not to a stream")
    out = Path(signature) if signature is not None else Path(dest) / DEFAULT_SIGNATURE
    inside = _relative_to(out, Path(dest))
    if inside is not None and any(e.path == inside for e in m.files):
        raise ValueError(
            f"{m.name}:{m.version} has a file {inside}: write its model signature "
            "elsewhere (--signature PATH)"
        )
    return out


def _relative_to(path: Path, folder: Path) -> str | None:
    """*path* as a '/'-separated path inside *folder*, or None if it lies outside."""
    try:
        rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(folder))
    except ValueError:
        return None
    return rel.as_posix() if rel.parts else None


def _write_signature(m: Manifest, out: Path, target: Path, tmp: Path) -> list[str]:
    """Write the signature: into the pull's temporary folder when it belongs in *target*
    (it appears with the files), else beside its own name, replaced atomically."""
    data = (m.oms or "").encode()
    inside = _relative_to(out, target)
    if inside is not None:
        dst = tmp / inside
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        return [inside]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, part = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(part, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise
    return []


# The temporary folders of a pull: inside an existing destination, or beside a new one.
_INSIDE = ".sealstore-pull-"
_BESIDE = ".pull-"


def _is_stream(dest: str | os.PathLike[str]) -> bool:
    return str(dest) == "-" or is_stream_target(dest)


_GLOB = re.compile(r"[*?\[]")


def select_files(
    entries: Sequence[FileEntry], patterns: Sequence[str], where: str
) -> list[FileEntry]:
    """The files of a version that *patterns* name, in manifest order.

    Each pattern is a file's path, a folder (``train`` or ``train/``: every
    file under it), or a glob: ``*``, ``?`` and ``[...]`` within one path
    segment, ``**`` across any number (``train/*.parquet``,
    ``**/*.json``), as fsspec globs.

    Raises:
        NotFound: a pattern names no file of *where* (a typo is never a
            silently smaller pull).
    """
    from fsspec.utils import glob_translate

    chosen: set[str] = set()
    for pattern in patterns:
        if _GLOB.search(pattern):
            match = re.compile(glob_translate(pattern)).match
            # A file whose name holds a glob character is still named by its path.
            hits = {e.path for e in entries if e.path == pattern or match(e.path)}
        else:
            folder = pattern.rstrip("/") + "/"
            hits = {e.path for e in entries if e.path == pattern or e.path.startswith(folder)}
        if not hits:
            raise NotFound(f"{where} has no file {pattern}")
        chosen |= hits
    return [e for e in entries if e.path in chosen]


def check_destination(
    dest: str | os.PathLike[str], *, files: Sequence[str] | None = None, force: bool = False
) -> None:
    """Refuse a pull destination before anything is fetched or decrypted.

    Also removes the temporary folders that pulls killed outright (SIGKILL,
    power loss) left in or beside *dest*.

    Raises:
        ValueError: ``-`` (or a device, FIFO, ``/dev/fd/N``) for anything but one file.
        NotADirectoryError: *dest* is a regular file.
        FileNotFoundError: *dest* is a symlink to nothing (never replaced).
        FileExistsError: *dest* is a non-empty folder and not *force*.
    """
    if _is_stream(dest):
        if files is None or len(set(files)) != 1:
            raise ValueError(
                f"-o {dest} takes one file (--file PATH); a whole version needs a folder"
            )
        return
    target = Path(dest)
    if os.path.islink(target) and not target.exists():
        raise FileNotFoundError(
            errno.ENOENT, "a symlink to nothing (neither followed nor replaced)", str(target)
        )
    if not target.exists():
        sweep_pull_folders(target)
        return
    if not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    sweep_pull_folders(target)
    with os.scandir(target) as entries:
        mine = not any(not e.name.startswith(_INSIDE) for e in entries)
    if not force and not mine:
        raise FileExistsError(
            f"{target} is not empty: pull into a new or empty folder, or pass --force "
            "to replace files of the same name"
        )


def sweep_pull_folders(dest: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary pull folders in or beside *dest* whose pull is gone.

    A pull holds an exclusive ``flock`` on its folder until it ends; a folder
    whose lock can be taken was left by a process killed outright.

    Returns:
        The folders removed.
    """
    target = Path(dest)
    found: list[Path] = []
    with contextlib.suppress(OSError):
        if target.is_dir():
            found += [Path(e.path) for e in os.scandir(target) if e.name.startswith(_INSIDE)]
    with contextlib.suppress(OSError):
        prefix = f".{target.name}{_BESIDE}"
        found += [
            Path(e.path) for e in os.scandir(target.parent or ".") if e.name.startswith(prefix)
        ]
    return [folder for folder in found if remove_if_unlocked(folder)]


def _pull_one(
    store: Any,
    m: Manifest,
    entry: FileEntry,
    dest: str | os.PathLike[str],
    *,
    identities: Sequence[IdentitySpec],
    threads: int,
    progress: Progress | None,
) -> None:
    """One file to standard output or a device, FIFO or ``/dev/fd/N``: chunk by chunk."""
    dek: DataKey | None = None
    try:
        with atomic_output(dest) as out:
            dek = _decrypt_entry(
                store,
                m,
                entry,
                None,
                out,
                identities=identities,
                threads=threads,
                progress=progress,
            )
    finally:
        if dek is not None:
            dek.close()


def _publish(tmp: Path, target: Path, paths: list[str]) -> None:
    if not target.exists():
        os.replace(tmp, target)  # the whole directory appears at once
        return
    if not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    for rel in paths:
        dst = target / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, dst)


@dataclass
class VerifyResult:
    """The outcome for one version: ``problems`` is empty when everything passed."""

    ref: str
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    no_key: bool = False  # a problem was that no key slot opened here

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_refs(store: Any, ref: str | None, tenant: str) -> list[str]:
    """The versions ``verify`` checks: *ref*, or every version of the tenant."""
    if ref is not None:
        return [ref]
    return [
        f"{n}:{v}" for n in store.artifacts(tenant=tenant) for v in store.versions(n, tenant=tenant)
    ]


def verify(
    store: Any,
    ref: str | None = None,
    *,
    tenant: str | None = None,
    identities: Sequence[IdentitySpec] = (),
    threads: int = 2,
    decrypt: bool = True,
    progress: Progress | None = None,
) -> list[VerifyResult]:
    """Check a version (or every version of the tenant) without writing anything.

    Signatures, tags, the BoM hash, every object's hash, and (with *decrypt*,
    the default) every chunk and every plaintext hash. Problems are collected
    per version rather than raised, so one report names all the damage.
    """
    from sealstore.vault.store import default_tenant

    tenant = check_name(tenant or default_tenant(), "tenant")
    results = []
    for r in verify_refs(store, ref, tenant):
        res = VerifyResult(r)
        results.append(res)
        try:
            m = store.manifest(r, tenant=tenant)
        except SealstoreError as exc:
            res.problems.append(str(exc))
            continue
        res.ref = f"{m.name}:{m.version}"
        if m.shredded:
            res.ref += f" (shredded {m.shredded})"
            continue  # nothing left to check but the signed tombstone
        try:
            store.bom(res.ref, tenant=tenant)
        except SealstoreError as exc:
            res.problems.append(f"BoM: {exc}")
        dek: DataKey | None = None
        try:
            for entry in m.files:
                res.files += 1
                try:
                    if decrypt:
                        dek = _decrypt_entry(
                            store,
                            m,
                            entry,
                            dek,
                            None,
                            identities=identities,
                            threads=threads,
                            progress=progress,
                            check_plaintext=True,
                        )
                    else:
                        _check_keyless(store, m, entry)
                        if progress is not None:  # per file: the hash runs beside the read
                            progress(entry.size)
                    res.bytes += entry.size
                except KeyUnavailable:
                    raise
                except SealstoreError as exc:
                    res.problems.append(str(exc))
        except KeyUnavailable as exc:
            res.problems.append(str(exc))
            res.no_key = True
        finally:
            if dek is not None:
                dek.close()
    return results


def _check_keyless(store: Any, m: Manifest, entry: FileEntry) -> None:
    with _object(store, m, entry) as (fp, digest):
        size = _opened_size(store, m, entry, fp)
        pre = read_preamble(fp)
        _check_preamble(m, entry, pre, size)
        if isinstance(fp, _Hashing):
            while fp.read(_HASH_BLOCK):
                pass
        if not digests_equal(digest(), entry.object_digest):
            raise AuthenticationError(
                f"{_where(m, entry)}: object hash does not match the manifest"
            )


def open_file(
    store: Any,
    ref: str,
    path: str,
    *,
    tenant: str | None = None,
    identities: Sequence[IdentitySpec] = (),
    check_digest: bool = True,
    cache: DekCache | None = None,
) -> tuple[Manifest, FileEntry, BinaryIO, Preamble, DataKey]:
    """Open one file of a version for random access (the loaders' entry point).

    The manifest's signature, the object's size, header hash and context are
    checked and the DEK unwrapped; chunks are authenticated as they are read
    (``sealstore.stream.SealedFile``). The caller closes the file and the key.

    Args:
        check_digest: also hash the whole object (through the file returned)
            against the manifest before returning. Chunk tags alone prove the
            bytes were sealed with this version's key; the digest also proves
            the signer published them -- a holder of the key could otherwise
            seal other content under the same header. Turning it off makes
            access lazy (only the chunks read are fetched) at that cost.
        cache: a ``DekCache`` the version's DEK is taken from or stored in
            (see :func:`unwrap_version_key`).
    """
    from sealstore.vault.store import default_tenant

    tenant = check_name(tenant or default_tenant(), "tenant")
    m = served(store, ref, tenant, "load", path=path)
    entry = next((e for e in m.files if e.path == path), None)
    if entry is None:
        raise NotFound(f"{m.name}:{m.version} has no file {path}")
    where = store.object_path(m.tenant, entry.object)
    try:
        # An object store's object is read with many ranged GETs at once
        # (sealstore.ranged); SealedFile takes either.
        ranged = getattr(store.storage, "open_ranged", None)
        fp = ranged(where) if ranged is not None else store.storage.open_read(where)
    except NotFound:
        raise NotFound(f"{_where(m, entry)}: object {entry.object} is missing") from None
    try:
        if isinstance(fp, RangedSource):
            pre = read_preamble_from(fp.head)
            size = fp.size  # of the object opened (its ETag is pinned)
        else:
            pre = read_preamble(fp)
            size = _opened_size(store, m, entry, fp)
        _check_preamble(m, entry, pre, size)
        if check_digest:
            hash_beside(store, m, entry, fp)()
        dek = unwrap_version_key(m, pre, identities, cache=cache)
    except BaseException:
        fp.close()
        raise
    return m, entry, fp, pre, dek


def hash_beside(store: Any, m: Manifest, entry: FileEntry, fp: Any) -> Callable[[], None]:
    """Start checking an opened object against its signed digest; returns the check.

    A local object is hashed on a thread of its own, through a duplicate of
    *fp*'s descriptor (the bytes hashed are those of the file opened, and
    closing *fp* meanwhile is safe), so a loader decrypts while it runs and
    calls the check before it releases any plaintext
    (``SealedFile.check_beside``). Any other object is hashed here, through
    *fp* (its position is kept): s3fs pins the ETag it opened, so every range
    comes from the same object, but one file object cannot serve two readers.
    An object read by ranges (a :class:`~sealstore.ranged.RangedSource`, S3)
    is hashed from the ranges the load itself fetches, in order, as they
    arrive; the check fetches only what the load skipped.

    Returns:
        The check: waits for the hash, then raises on a mismatch -- on every
        call, so a failed check keeps failing.

    Raises:
        (from the check) AuthenticationError: the object is not the one the
        manifest signs. BackendError: it could not be read.
    """
    alg = entry.object_digest.partition(":")[0]
    digests: list[str] = []
    errors: list[BaseException] = []
    thread = None

    def verdict() -> None:
        if errors:
            raise BackendError(f"{_where(m, entry)}: cannot read the object: {errors[0]}")
        if not digests_equal(digests[0], entry.object_digest):
            raise AuthenticationError(f"{_where(m, entry)}: object hash does not match")

    if isinstance(store.storage, LocalStorage):
        fd = os.dup(fp.fileno())

        def run() -> None:
            try:
                _hash_fd(fd, alg, digests, errors)
            finally:
                os.close(fd)

        thread = threading.Thread(target=run, name="sealstore-digest", daemon=True)
        try:
            thread.start()
        except BaseException:
            os.close(fd)  # never started: run() will not close it
            raise
    elif isinstance(fp, RangedSource):
        # Hashed as the load's own ranged reads fetch it, in order: no second
        # download. What a load skips is fetched when the check is called.
        h = ObjectHasher(alg)
        finish = fp.tap(h.update)
        once = threading.Lock()

        def settle() -> None:
            with once:  # concurrent lazy reads: one of them finishes the hash
                if digests or errors:
                    return
                try:
                    finish()
                except Exception as exc:  # kept for check; an interrupt propagates
                    errors.append(exc)  # and the next call carries on from where it stopped
                else:
                    digests.append(h.text())

        def ranged_check() -> None:
            settle()
            verdict()

        return ranged_check
    else:
        pos = fp.tell()
        fp.seek(0)
        h = ObjectHasher(alg)
        while block := fp.read(_HASH_BLOCK):
            h.update(block)
        fp.seek(pos)
        digests.append(h.text())

    def check() -> None:
        if thread is not None:
            thread.join()
        verdict()

    return check
