"""``push``: seal a file or a model directory into the store as a new version.

Streaming and constant-memory: each file is read in blocks, hashed (its
plaintext SHA-256 goes into the BoM and the manifest), sealed and uploaded
as it is read -- no plaintext temporary file, the same memory for 1 MiB or
100 GiB. One DEK per version; each file's payload key is derived from it
with the file's own random salt (FORMAT.md), and its header context names
tenant, artifact, version and path. The objects go up first, the BoM next,
the signed manifest last and only if absent: that write is the commit.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import logging
import os
import stat
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from sealstore.errors import AuthenticationError, BackendError, FormatError, SealstoreError
from sealstore.format import DEFAULT_CHUNK_SIZE, DEFAULT_SUITE
from sealstore.keys import DataKey
from sealstore.kms.envelope import KeySpec, new_data_key
from sealstore.parallel import run_jobs
from sealstore.stream import SealWriter
from sealstore.vault.bom import BomSpec, DatasetRef, build_bom, load_bom_spec
from sealstore.vault.digest import ObjectHasher
from sealstore.vault.manifest import (
    FileEntry,
    Manifest,
    check_file_path,
    check_name,
    now,
    parse_ref,
    version_context,
)
from sealstore.vault.s3limits import timed_out
from sealstore.vault.storage import new_object_name

__all__ = ["collect_files", "commit_version", "push", "seal_object"]

log = logging.getLogger(__name__)

_BLOCK = 8 << 20
_HASH_APART = 1 << 20  # files this large and larger are hashed on a thread of their own
_AUTO_VERSION_TRIES = 20
Progress = Callable[[int], None]


def collect_files(
    src: str | os.PathLike[str], *, follow_outside_links: bool = False
) -> list[tuple[str, Path, int]]:
    """(artifact path, file, size) for a file or every regular file under a directory.

    Nothing under a directory is skipped: every entry is stored or the whole
    push is refused before anything is read. Symlinks whose target lies
    inside the directory are followed, to files and to folders alike, and
    what they lead to is stored under the link's path too (a file reached by
    two paths is stored at both). A *src* that is itself a symlink is
    followed: it was named on purpose.

    Args:
        src: a file or a directory.
        follow_outside_links: also follow symlinks whose target lies outside
            *src* (a Hugging Face cache snapshot, whose files link to
            ``../../blobs``). Off by default: a downloaded tree holding a
            link to ``~/.ssh`` must not push that.

    Raises:
        FileNotFoundError: *src* does not exist.
        PermissionError, OSError: a folder or file under *src* cannot be read.
        ValueError: a symlink that points outside *src* (unless allowed), a
            dangling symlink, a symlink loop, a socket, FIFO or device, or a
            directory with no files.
    """
    root = Path(src)
    st = _stat_entry(root)
    if stat.S_ISREG(st.st_mode):
        return [(_storable(root.name, root), root, st.st_size)]
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{root} is not a regular file or a directory")
    top = Path(os.path.realpath(root))
    out: list[tuple[str, Path, int]] = []
    # Depth first with an explicit stack (a deep tree must not hit the
    # recursion limit). Each folder carries the (device, inode) of the
    # folders above it: a folder met again among its own ancestors is a loop.
    stack: list[tuple[Path, str, tuple[tuple[int, int], ...]]] = [
        (root, "", ((st.st_dev, st.st_ino),))
    ]
    while stack:
        folder, prefix, above = stack.pop()
        # os.walk would skip an unreadable folder silently; scandir raises.
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it)
        for name in names:
            full = folder / name
            rel = prefix + name
            fst = _stat_entry(full)
            if full.is_symlink() and not follow_outside_links:
                real = Path(os.path.realpath(full))
                if real != top and top not in real.parents:
                    raise ValueError(
                        f"{full} is a symlink to {os.readlink(full)}, outside {root}: "
                        "refusing to push it (copy the file in, or allow links that "
                        "leave the folder with --follow-outside-links)"
                    )
            if stat.S_ISDIR(fst.st_mode):
                here = (fst.st_dev, fst.st_ino)
                if here in above:
                    raise ValueError(f"{full} leads back to a folder above it (a symlink loop)")
                stack.append((full, rel + "/", (*above, here)))
            elif stat.S_ISREG(fst.st_mode):
                out.append((_storable(rel, full), full, fst.st_size))
            else:
                raise ValueError(
                    f"{full} is not a regular file or a folder (a socket, FIFO or device): "
                    "refusing to push"
                )
    if not out:
        raise ValueError(f"{root} holds no files")
    return sorted(out)


def _storable(rel: str, full: Path) -> str:
    """*rel*, refused now if a manifest naming it could never be read back (a backslash)."""
    try:
        return check_file_path(rel)
    except FormatError:
        raise ValueError(f"{full}: a file name the store cannot hold") from None


def _stat_entry(full: Path) -> os.stat_result:
    """``stat`` through symlinks, with a dangling link or a link loop named as such."""
    try:
        return full.stat()
    except OSError as exc:
        if not full.is_symlink():
            raise
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{full} is a symlink loop") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise ValueError(
                f"{full} is a dangling symlink (to {os.readlink(full)}, which does not exist)"
            ) from None
        raise


def _open_regular(path: Path) -> IO[bytes]:
    """*path* opened for reading, refused unless it is (still) a regular file.

    The tree was listed before; a name swapped for a FIFO or a device since
    must be refused, not read (a FIFO would block the push on open).
    O_NONBLOCK makes the open itself return at once whatever the name is now.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is no longer a regular file: refusing to push it")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _HashingWriter:
    """Passes writes through and hashes them (the object digest)."""

    def __init__(self, fp: IO[bytes]) -> None:
        self._fp = fp
        self.digest = ObjectHasher()
        self.size = 0

    def write(self, data: Any) -> int:
        self.digest.update(data)
        n = self._fp.write(data)
        self.size += len(memoryview(data))
        return n if n is not None else len(memoryview(data))

    def flush(self) -> None:
        self._fp.flush()


class _Producing:
    """The file object a producer writes into: hashes the plaintext while it is sealed."""

    def __init__(
        self, writer: SealWriter, plain: Any, hasher: ThreadPoolExecutor, progress: Progress | None
    ) -> None:
        self._writer, self._plain, self._hasher, self._progress = writer, plain, hasher, progress

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        # Hashed on the hashing thread while this one seals, and waited for
        # before returning: the producer may reuse its buffer afterwards.
        done = self._hasher.submit(self._plain.update, view)
        try:
            self._writer.write(view)
        finally:
            done.result()
        if self._progress is not None:
            self._progress(len(view))
        return len(view)

    def flush(self) -> None:
        pass


def _seal_one(
    storage: Any,
    obj_path: str,
    path: Path | bytes | memoryview | Callable[[IO[bytes]], object],
    size: int | None,
    dek: DataKey,
    context: dict[str, str],
    *,
    suite: str,
    chunk_size: int,
    threads: int,
    progress: Progress | None,
    hasher: ThreadPoolExecutor | None,
) -> tuple[str, str, int, str, int | None]:
    """Seal one file into *obj_path*.

    Returns:
        (plaintext sha256, plaintext size, object digest, object size, header
        sha256, the file's permission bits or None for bytes from memory).
    """
    plain = hashlib.sha256()

    def sealer(out: IO[bytes], declared: int | None) -> tuple[_HashingWriter, SealWriter]:
        sink = _HashingWriter(out)
        writer = SealWriter(
            sink,  # type: ignore[arg-type]
            dek,
            suite=suite,
            chunk_size=chunk_size,
            context=context,
            plaintext_size=declared,
            threads=threads,
        )
        return sink, writer

    if callable(path):
        # A producer (a checkpoint's torch.save) writes the plaintext straight
        # into the sealing writer: its length is known only at the end, so the
        # header declares none and the signed manifest records it.
        with storage.open_write(obj_path) as out:
            sink, writer = sealer(out, None)
            with writer:
                path(_Producing(writer, plain, hasher, progress))  # type: ignore[arg-type]
        header_sha = hashlib.sha256(writer.header.encode()).hexdigest()
        return (
            plain.hexdigest(),
            writer.plaintext_written,
            sink.digest.text(),
            sink.size,
            header_sha,
            None,
        )
    # Sized to the file when it is small: a dataset of thousands of small
    # shards must not zero 16 MiB per file. A file grown since it was listed
    # still reads whole (in more blocks) and fails the declared size.
    block = _BLOCK if size is None else max(4096, min(_BLOCK, size))
    bufs = [bytearray(block), bytearray(block)]
    pending: list[Future[None] | None] = [None, None]
    in_memory = isinstance(path, (bytes, memoryview))
    opened = io.BytesIO(path) if in_memory else _open_regular(path)
    with opened as src, storage.open_write(obj_path) as out:
        # The mode of the file actually read (through any symlink), not of a
        # name looked up again. Set-id and sticky bits are never recorded.
        mode = None if in_memory else stat.S_IMODE(os.fstat(src.fileno()).st_mode) & 0o777
        sink, writer = sealer(out, size)
        with writer:
            i = 0
            while True:
                k = i % 2
                if pending[k] is not None:
                    pending[k].result()  # type: ignore[union-attr]
                n = src.readinto(bufs[k])
                if not n:
                    break
                view = memoryview(bufs[k])[:n]
                # The plaintext hash runs on another thread (hashlib drops the GIL)
                # while this one seals the block; one worker keeps updates in order.
                if hasher is None:
                    plain.update(view)
                else:
                    pending[k] = hasher.submit(plain.update, view)
                writer.write(view)
                if progress is not None:
                    progress(n)
                i += 1
            for fut in pending:
                if fut is not None:
                    fut.result()
    header_sha = hashlib.sha256(writer.header.encode()).hexdigest()
    return plain.hexdigest(), size, sink.digest.text(), sink.size, header_sha, mode


def _in_memory(src: Mapping[str, Any]) -> list[tuple[str, Any, int | None]]:
    """Files given as {artifact path: bytes or producer}: sealed from memory, never written plain.

    A producer is a callable that writes the file's bytes into the binary
    file object it is given (only ``write`` and ``flush``); it is streamed.
    """
    out: list[tuple[str, Any, int | None]] = []
    for rel, data in sorted(src.items()):
        check_file_path(rel)
        if callable(data):
            out.append((rel, data, None))
            continue
        view = memoryview(data).cast("B")
        out.append((rel, view, len(view)))
    if not out:
        raise ValueError("nothing to push: no files given")
    return out


def _model_signature(
    src: Any,
    files: list[tuple[str, Any, int | None]],
    *,
    sign_key: Any,
    sign_cert: Any,
    require_signature: bool,
    public_key: Any,
    signature: Any,
) -> tuple[list[tuple[str, Any, int | None]], Any, Any]:
    """(files to push, the verified OMS signature or None, (signing key,
    certificates) or None).

    With *require_signature* the signature and every covered file's SHA-256
    are checked here, before anything is sealed: a pass over the files of its
    own (the seal pass hashes them again and must agree, see
    :func:`_commit_entries`).
    """
    from sealstore.vault import oms

    if sign_key is not None and require_signature:
        raise ValueError(
            "a version carries one model signature: sign it (--sign-key) or keep the "
            "one it has (--require-signature), not both"
        )
    if sign_cert is not None and sign_key is None:
        raise ValueError("--sign-cert goes with --sign-key (the certificate's private key)")
    if sign_key is not None:
        password = os.environ.get("SEALSTORE_SIGN_KEY_PASSWORD")
        key = oms.load_private_key(sign_key, password.encode() if password else None)
        certs = oms.load_certificates(sign_cert) if sign_cert is not None else ()
        if certs and oms.key_hint(certs[0].public_key()) != oms.key_hint(key.public_key()):
            raise ValueError("--sign-cert: the first certificate is not --sign-key's")
        return files, None, (key, certs)
    if not require_signature:
        if public_key is not None or signature is not None:
            raise ValueError("--public-key and --signature go with --require-signature")
        return files, None, None
    if public_key is None:
        raise ValueError("--require-signature needs --public-key KEY (the signer's EC public key)")
    if isinstance(src, Mapping) or not Path(src).is_dir():
        raise ValueError("--require-signature checks a signed model directory: push a folder")
    pub = oms.load_trust(public_key)
    sig_path = Path(signature) if signature is not None else Path(src) / oms.DEFAULT_SIGNATURE
    try:
        with open(sig_path, "rb") as fp:
            bundle = fp.read(64 << 20)
    except FileNotFoundError:
        raise AuthenticationError(
            f"{src} is not signed: no model signature at {sig_path} (refusing to push)"
        ) from None
    sig = oms.verify(bundle, pub, where=f"model signature {sig_path}")
    # The signature is not a file of the model (model_signing leaves it out too).
    real = os.path.realpath(sig_path)
    kept = [f for f in files if os.path.realpath(f[1]) != real]
    actual: dict[str, str] = {}
    for rel, path, _size in kept:
        if sig.covers(rel):
            with _open_regular(path) as fp:
                actual[rel] = hashlib.file_digest(fp, "sha256").hexdigest()
        elif not oms.ignored(rel, sig.ignore_paths):
            actual[rel] = ""  # not covered: check_files names it
    sig.check_files(actual, where=f"{src} (refusing to push)")
    return kept, sig, None


def _next_version(versions: Sequence[str]) -> str:
    numbers = [int(v) for v in versions if v.isdigit()]
    return str(max(numbers, default=0) + 1)


def push(
    store: Any,
    src: str | os.PathLike[str] | Mapping[str, Any],
    ref: str,
    *,
    tenant: str | None = None,
    keys: Sequence[KeySpec] = (),
    dek_from: KeySpec | None = None,
    parent: str | None = "auto",
    bom: BomSpec | str | os.PathLike[str] | None = None,
    suite: str = DEFAULT_SUITE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    threads: int = 2,
    progress: Progress | None = None,
    tag_latest: bool = True,
    follow_outside_links: bool = False,
    sign_key: str | os.PathLike[str] | bytes | None = None,
    sign_cert: str | os.PathLike[str] | bytes | None = None,
    require_signature: bool = False,
    public_key: str | os.PathLike[str] | bytes | None = None,
    signature: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Push a file or a directory as a new version of an artifact.

    Args:
        store: the :class:`~sealstore.vault.store.Store`.
        src: a file, a directory (every file under it, recursively), or
            ``{artifact path: bytes}`` sealed straight from memory, where a
            value may also be a callable that writes the file's bytes into
            the binary file object it is given (streamed as it writes).
        ref: ``NAME`` (the next numeric version) or ``NAME:VERSION``.
        tenant: the tenant (default ``$SEALSTORE_TENANT`` or ``default``).
        keys: key URIs to wrap the version's DEK to (one slot each).
        dek_from: a key whose service generates the DEK (Vault, KMS).
        parent: the version this one derives from: ``"auto"`` (the artifact's
            current newest version, if any), a version, ``NAME:VERSION``, or None.
        bom: a :class:`BomSpec` or the path of a YAML file (datasets, training parameters).
        threads: chunks sealed in parallel per file.
        tag_latest: point the ``latest`` tag at this version.
        follow_outside_links: also follow symlinks that leave the directory
            (see :func:`collect_files`).
        sign_key: the publisher's EC private key (PEM file or bytes; its
            password, if any, in ``$SEALSTORE_SIGN_KEY_PASSWORD``): the version
            gets an OMS model signature over its plaintext files, made from the
            SHA-256s computed while sealing (``sealstore.vault.oms``).
        sign_cert: with *sign_key*: its certificate, then the rest of its
            chain (one PEM file): the signature carries the chain, as
            ``model_signing sign certificate`` makes it.
        require_signature: *src* is a model directory signed with OMS
            (``model_signing sign key``): verified with *public_key* -- the
            signature and every file's SHA-256 -- before anything is sealed,
            and refused otherwise. The signature is kept in the manifest.
        public_key: with *require_signature*: the signer's EC public key
            (PEM), or for a certificate-signed model a PEM file of the
            trusted root certificates.
        signature: where the signature is (default ``SRC/model.sig``); it is
            not pushed as a file of the version.

    Returns:
        The committed manifest.

    Raises:
        FileExistsError: the version exists (or another push of it won a race).
        ValueError: no keys, a bad name, a BoM spec problem, or something
            in the directory that cannot be pushed (see :func:`collect_files`);
            a bad signing or public key.
        AuthenticationError: *require_signature* and the model's signature is
            missing, does not verify, or a file differs from it.
        FormatError: a signature that is not an OMS v1.0 bundle this release reads.
        KeyUnavailable, BackendError: from the key providers and the storage.
    """
    from sealstore.vault.store import default_tenant

    tenant = check_name(tenant or default_tenant(), "tenant")
    r = parse_ref(ref)
    if r.tag:
        raise ValueError(f"push to NAME or NAME:VERSION, not a tag ({ref})")
    if not keys and dek_from is None:
        raise ValueError("at least one key (-k URI) is needed to push")
    if isinstance(src, Mapping):
        files = _in_memory(src)
    else:
        files = collect_files(src, follow_outside_links=follow_outside_links)
    # Before anything is sealed: a model whose signature fails is never uploaded.
    files, oms_sig, oms_key = _model_signature(
        src,
        files,
        sign_key=sign_key,
        sign_cert=sign_cert,
        require_signature=require_signature,
        public_key=public_key,
        signature=signature,
    )
    signer = store.require("publisher", tenant)  # fail before uploading anything
    store.renew(tenant)  # this push re-signs the sequence anyway
    spec = load_bom_spec(bom) if isinstance(bom, (str, os.PathLike)) else (bom or BomSpec())
    datasets = []
    for ds in spec.datasets:
        m = store.manifest(ds, tenant=tenant)
        digest = hashlib.sha256(store.manifest_bytes(m.name, m.version, tenant=tenant)).hexdigest()
        datasets.append(DatasetRef(m.name, m.version, digest))
    existing = store.versions(r.name, tenant=tenant)
    parent_ref = _parent(store, r.name, parent, existing, tenant)

    for _attempt in range(_AUTO_VERSION_TRIES):
        version = r.version or _next_version(existing)
        if version in existing:
            raise FileExistsError(f"{r.name}:{version} already exists in tenant {tenant}")
        context = version_context(tenant, r.name, version)
        made: list[str] = []
        try:
            manifest = _push_version(
                store,
                files,
                tenant,
                r.name,
                version,
                context,
                keys=keys,
                dek_from=dek_from,
                parent=parent_ref,
                spec=spec,
                datasets=datasets,
                suite=suite,
                chunk_size=chunk_size,
                threads=threads,
                progress=progress,
                made=made,
                signer=signer,
                oms_sig=oms_sig,
                oms_key=oms_key,
            )
        except FileExistsError:
            # Lost the race for this version: our objects and BoM are orphans.
            _discard(store, tenant, made)
            if r.version:
                raise FileExistsError(
                    f"{r.name}:{version} was pushed concurrently by another writer"
                ) from None
            existing = store.versions(r.name, tenant=tenant)
            continue
        except BaseException as exc:
            _discard_after(exc, store, tenant, made)
            raise
        if tag_latest:
            try:
                _tag_latest(store, r.name, version, tenant)
            except SealstoreError as exc:
                # The version is committed; a retry would push another one.
                log.warning(
                    "pushed %s:%s but could not move its latest tag: %s", r.name, version, exc
                )
        from sealstore.vault.auditing import record

        detail = {
            "signer": signer.signing_key_id,
            "files": len(manifest.files),
            "bytes": manifest.size,
        }
        if manifest.oms is not None:
            # Which model signature it carries (the BoM's sealstore:oms:bundle-sha256).
            detail["model_signature"] = hashlib.sha256(manifest.oms.encode()).hexdigest()
        record(store, "push", tenant=tenant, artifact=r.name, version=version, detail=detail)
        return manifest
    raise FileExistsError(f"could not find a free version of {r.name} (too many concurrent pushes)")


def seal_object(
    store: Any,
    tenant: str,
    name: str,
    version: str,
    path: str,
    producer: Callable[[IO[bytes]], object],
    dek: DataKey,
    *,
    suite: str = DEFAULT_SUITE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    threads: int = 2,
) -> FileEntry:
    """Seal one file of a version that several writers build, before any manifest exists.

    For versions whose files come from several processes (the ranks of a
    distributed checkpoint): each seals its own files with the version's DEK,
    exactly as a push would (own object, per-file salt, header context naming
    tenant, artifact, version and *path*), and hands the entries to the one
    that calls :func:`commit_version`. Until then the object is unreferenced:
    on failure it is deleted here; an object whose version never commits is
    removed by ``store gc`` after its grace period.

    Args:
        store: the :class:`~sealstore.vault.store.Store`.
        tenant, name, version: the version the file belongs to.
        path: the file's path inside the version.
        producer: writes the plaintext into the binary file object it is
            given (only ``write`` and ``flush``); streamed as it writes.
        dek: the version's data key (the caller keeps and closes it).
        threads: chunks sealed in parallel.

    Returns:
        The file's manifest entry.

    Raises:
        FormatError: a bad path. BackendError: from the storage.
    """
    check_file_path(path)
    obj = new_object_name()
    target = store.object_path(tenant, obj)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="sealstore-hash") as hasher:
            plain, size, obj_digest, obj_size, header_sha, mode = _seal_one(
                store.storage,
                target,
                producer,
                None,
                dek,
                dict(version_context(tenant, name, version), path=path),
                suite=suite,
                chunk_size=chunk_size,
                threads=threads,
                progress=None,
                hasher=hasher,
            )
    except BaseException:
        _discard(store, tenant, [obj])
        raise
    return FileEntry(path, size, plain, obj, obj_size, obj_digest, header_sha, mode)


def commit_version(
    store: Any,
    tenant: str,
    name: str,
    version: str,
    entries: Sequence[FileEntry],
    slots: Sequence[Any],
    *,
    parent: str | None = "auto",
    tag_latest: bool = True,
    discard: Sequence[str] = (),
) -> Manifest:
    """Commit a version whose files were sealed apart (:func:`seal_object`).

    Writes the BoM and the signed manifest listing *entries*, exactly as a
    push commits: the manifest write is the commit, refused if the version
    exists.

    Args:
        store: the :class:`~sealstore.vault.store.Store`.
        tenant, name, version: the version.
        entries: every file of the version.
        slots: the key slots of the DEK the files were sealed with.
        parent: as for :func:`push`.
        tag_latest: point the ``latest`` tag at this version.
        discard: objects (names) of *entries* to delete if nothing was
            committed, with the BoM; never once the manifest is written.

    Returns:
        The committed manifest.

    Raises:
        FileExistsError: the version exists.
        ValueError: no entries, or two with one path.
        Refused: this process's signer may not publish. BackendError: from the storage.
    """
    tenant = check_name(tenant, "tenant")
    check_name(name, "artifact name")
    paths = [e.path for e in entries]
    if not paths or len(set(paths)) != len(paths):
        raise ValueError("a version needs files, each path once")
    signer = store.require("publisher", tenant)
    store.renew(tenant)
    existing = store.versions(name, tenant=tenant)
    if version in existing:
        raise FileExistsError(f"{name}:{version} already exists in tenant {tenant}")
    parent_ref = _parent(store, name, parent, existing, tenant)
    made: list[str] = list(discard)
    try:
        manifest = _commit_entries(
            store,
            tenant,
            name,
            version,
            sorted(entries, key=lambda e: e.path),
            slots,
            signer,
            parent=parent_ref,
            spec=BomSpec(),
            datasets=(),
            made=made,
        )
    except BaseException as exc:
        _discard_after(exc, store, tenant, made)
        raise
    if tag_latest:
        try:
            _tag_latest(store, name, version, tenant)
        except SealstoreError as exc:
            log.warning("committed %s:%s but could not move its latest tag: %s", name, version, exc)
    from sealstore.vault.auditing import record

    detail = {"signer": signer.signing_key_id, "files": len(manifest.files), "bytes": manifest.size}
    record(store, "push", tenant=tenant, artifact=name, version=version, detail=detail)
    return manifest


def _discard_after(exc: BaseException, store: Any, tenant: str, made: list[str]) -> None:
    """After a failed commit, remove what was uploaded (best effort; ``store gc``
    gets whatever a killed process leaves) -- but not when interrupted or the
    backend stopped answering: the manifest write may have landed (then nothing
    it names may go), and each delete would wait for the backend again, holding
    Ctrl-C up to its deadline."""
    if not (isinstance(exc, KeyboardInterrupt) or timed_out(exc)):
        _discard(store, tenant, made)


def _discard(store: Any, tenant: str, made: list[str]) -> None:
    """Delete a failed push's objects (and its BoM: entries ``bom:PATH``)."""
    for item in made:
        path = item[4:] if item.startswith("bom:") else store.object_path(tenant, item)
        with contextlib.suppress(Exception):
            store.storage.delete(path)


def _parent(
    store: Any, name: str, parent: str | None, existing: Sequence[str], tenant: str
) -> str | None:
    if parent is None:
        return None
    if parent == "auto":
        return f"{name}:{existing[-1]}" if existing else None
    pref = parse_ref(parent if ":" in parent or "@" in parent else f"{name}:{parent}")
    m = store.manifest(pref, tenant=tenant)
    return f"{m.name}:{m.version}"


def _push_version(
    store: Any,
    files: list[tuple[str, Any, int | None]],
    tenant: str,
    name: str,
    version: str,
    context: dict[str, str],
    *,
    keys: Sequence[KeySpec],
    dek_from: KeySpec | None,
    parent: str | None,
    spec: BomSpec,
    datasets: list[DatasetRef],
    suite: str,
    chunk_size: int,
    threads: int,
    progress: Progress | None,
    made: list[str],
    signer: Any,
    oms_sig: Any = None,
    oms_key: Any = None,
) -> Manifest:
    # Slots first: a key that cannot wrap fails before any upload.
    dek, slots = new_data_key(keys, context, dek_from=dek_from)
    # A file's SHA-256 (for the BoM) is sequential and, at ~1.6 GB/s, the
    # slowest step: with several files, up to *threads* of them are sealed at
    # once, each with its own hashing thread, so the hashes run side by side.
    workers = max(1, min(threads, len(files)))
    lanes = max(1, threads // workers)
    lock = threading.Lock()

    def report(n: int) -> None:
        if progress is not None:
            with lock:
                progress(n)

    def one(item: tuple[str, Any, int | None]) -> FileEntry:
        rel, path, size = item
        obj = new_object_name()
        with lock:
            made.append(obj)
        # A small file is hashed in line: handing it to a thread costs more
        # than hashing it (a dataset of thousands of shards).
        small = size is not None and size < _HASH_APART
        with (
            contextlib.nullcontext()
            if small
            else ThreadPoolExecutor(1, thread_name_prefix="sealstore-hash")
        ) as hasher:
            plain, size, obj_digest, obj_size, header_sha, mode = _seal_one(
                store.storage,
                store.object_path(tenant, obj),
                path,
                size,
                dek,
                dict(context, path=rel),
                suite=suite,
                chunk_size=chunk_size,
                threads=lanes,
                progress=report,
                hasher=hasher,
            )
        return FileEntry(rel, size, plain, obj, obj_size, obj_digest, header_sha, mode)

    with dek:
        if workers == 1:
            entries = [one(item) for item in files]
        else:
            # On threads that an interrupt does not wait for (see run_jobs):
            # the files in flight are abandoned, `store gc` removes them.
            entries = run_jobs([functools.partial(one, item) for item in files], workers)
    return _commit_entries(
        store,
        tenant,
        name,
        version,
        entries,
        slots,
        signer,
        parent=parent,
        spec=spec,
        datasets=datasets,
        made=made,
        oms_sig=oms_sig,
        oms_key=oms_key,
    )


def _commit_entries(
    store: Any,
    tenant: str,
    name: str,
    version: str,
    entries: Sequence[FileEntry],
    slots: Sequence[Any],
    signer: Any,
    *,
    parent: str | None,
    spec: BomSpec,
    datasets: Sequence[DatasetRef],
    made: list[str],
    oms_sig: Any = None,
    oms_key: Any = None,
) -> Manifest:
    """Write the BoM and the signed manifest of sealed *entries*: the commit.

    *oms_sig*: a model signature verified before sealing; the plaintext
    SHA-256s computed while sealing must match it too (a file changed since
    it was checked is refused here, before the commit). *oms_key*: sign the
    entries' SHA-256s with it.
    """
    from sealstore.vault import oms

    sealed = {e.path: e.sha256 for e in entries}
    if oms_sig is not None:
        oms_sig.check_files(sealed, where=f"{name}:{version} (changed while it was pushed)")
    elif oms_key is not None:
        skip = (*oms.GIT_PATHS, oms.DEFAULT_SIGNATURE)
        covered = {p: d for p, d in sealed.items() if not oms.ignored(p, skip)}
        if not covered:
            raise ValueError(f"{name}:{version} has no file a model signature could cover")
        key, certs = oms_key
        oms_sig = oms.sign(covered, key, model_name=name, ignore_paths=skip, certificates=certs)
    bom = build_bom(
        tenant=tenant,
        name=name,
        version=version,
        files=[(e.path, e.size, e.sha256) for e in entries],
        parent=parent.partition(":")[2] if parent and parent.startswith(name + ":") else parent,
        datasets=list(datasets),
        spec=spec,
        store_id=store.id,
        signature=oms_sig.record() if oms_sig is not None else None,
    )
    bom_sha = hashlib.sha256(bom).hexdigest()
    # Named by its hash: a racing push of the same version cannot overwrite it
    # (an existing file there holds the same bytes).
    bom_path = store.bom_path(tenant, name, version, bom_sha)
    with contextlib.suppress(FileExistsError):
        store.storage.put_new(bom_path, bom)
    made.append("bom:" + bom_path)
    manifest = Manifest(
        store=store.id,
        tenant=tenant,
        name=name,
        version=version,
        created=now(),
        files=tuple(entries),
        slots=tuple(slots),
        parent=parent,
        bom_sha256=bom_sha,
        signer=signer.signing_key_id,
        oms=oms_sig.bundle.decode() if oms_sig is not None else None,
    )
    # Every object durable -- and still there (a gc with too short a grace
    # period could have taken it) -- before a manifest names it.
    store.storage.sync([store.object_path(tenant, e.object) for e in entries])
    for e in entries:
        if not store.storage.exists(store.object_path(tenant, e.object)):
            raise BackendError(f"object of {e.path} vanished before the commit (a gc?)")
    # The commit point: visible now, or (FileExistsError) another push won.
    store.commit_manifest(tenant, name, version, manifest.sign(signer))
    return manifest


def _tag_latest(store: Any, name: str, version: str, tenant: str) -> None:
    from sealstore.vault.store import _version_key

    try:
        current = store.tags(name, tenant=tenant).get("latest")
    except Exception:
        current = None
    if current is None or _version_key(version) >= _version_key(current):
        store.tag(f"{name}:{version}", "latest", tenant=tenant, audit=False, forward_only=True)
