"""torch.distributed.checkpoint storage sealed into a store version.

:class:`SealedStorageWriter` and :class:`SealedStorageReader` implement DCP's
``StorageWriter`` / ``StorageReader`` over a :class:`~sealstore.vault.store.Store`:
checkpoint ``STEP`` of a run is version ``NAME:STEP``, one data key per
version, committed by one signed manifest once every rank has finished.

Saving. The coordinator (rank 0) makes the version's data key in
``prepare_global_plan`` and wraps it to the keys given, as a push does; only
the wrapped slots travel to the other ranks, in their plans, and each rank
unwraps them once. Each rank seals its items (``torch.save`` of each tensor,
DCP's own byte layout) into one object of its own, streamed -- no plaintext
file, no plaintext copy of the shard -- and returns the object's manifest
entry with its write results. In ``finish`` the coordinator seals DCP's
metadata as one more file and writes the signed manifest listing every file:
that write is the commit. A rank that fails makes DCP skip ``finish``, so no
version appears; the objects sealed by the ranks that did finish stay
unreferenced until ``store gc`` removes them (after its grace period).
``keep_last=N`` then crypto-shreds the numbered versions older than the N
newest (:func:`sealstore.vault.lifecycle.prune`).

Loading. Every rank reads the metadata through the signed manifest (every
chunk authenticated, the object's digest checked) and unpickles it with
torch's weights-only unpickler and DCP's metadata types allowed -- never
arbitrary pickle. Each item DCP asks for is decrypted from its byte range
only (``SealedFile.read_into``: just the chunks it covers), with the version's
key unwrapped once per rank (a ``DekCache``). DCP reshards on load: a
checkpoint saved by N ranks loads on M.

By hand because DCP's ``FileSystemWriter`` writes plaintext files through an
``fsspec``-like file system with no place for a per-version key, a manifest or
an atomic multi-rank commit.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import uuid
from collections.abc import Sequence
from typing import IO, Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from sealstore.dekcache import DekCache
from sealstore.errors import FormatError, NotFound, SealstoreError
from sealstore.keys import DataKey, KeySlot
from sealstore.kms.envelope import IdentitySpec, KeySpec, new_data_key
from sealstore.vault.manifest import FileEntry, Manifest, check_name, version_context

__all__ = ["METADATA", "SealedStorageReader", "SealedStorageWriter"]

log = logging.getLogger(__name__)

#: The file of a checkpoint version that holds DCP's metadata.
METADATA = ".metadata"

#: What DCP's metadata pickles to beyond torch's weights-only set.
_METADATA_GLOBALS = [
    dcp_metadata.Metadata,
    dcp_metadata.TensorStorageMetadata,
    dcp_metadata.BytesStorageMetadata,
    dcp_metadata.ChunkStorageMetadata,
    dcp_metadata.TensorProperties,
    dcp_metadata.MetadataIndex,
    dcp_metadata.StorageMeta,
    dcp_metadata._MEM_FORMAT_ENCODING,
    torch.Size,
    torch.layout,
    torch.memory_format,
]


@dataclasses.dataclass(frozen=True)
class _RankPlan:
    """What the coordinator tells each rank: its file, the version, the wrapped key."""

    path: str
    version: str
    slots: tuple[dict[str, Any], ...]  # KeySlot JSON: wrapped, never the key itself


@dataclasses.dataclass(frozen=True)
class _Stored:
    """Where an item lies in its rank's file; the first carries the file's manifest entry."""

    path: str
    offset: int
    length: int
    entry: dict[str, Any] | None = None


def _raw(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, shared (any dtype: viewed as uint8)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class _Counting:
    """A write-only stream that knows its position (DCP records each item's offset)."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._pos = 0

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        self._out.write(data)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._out.flush()


def _open_store(store: Any) -> Any:
    from sealstore.vault.store import Store

    return store if isinstance(store, Store) else Store.open(store)


def _step(checkpoint_id: Any) -> str:
    """A checkpoint id (an int or a string of digits) as a version string."""
    text = str(
        os.fspath(checkpoint_id) if isinstance(checkpoint_id, os.PathLike) else checkpoint_id
    )
    if isinstance(checkpoint_id, bool) or not text.isdigit():
        raise ValueError(f"a checkpoint id is a step, a non-negative integer (got {text!r})")
    return str(int(text))


class SealedStorageWriter(StorageWriter):
    """DCP ``StorageWriter`` that commits a checkpoint as store version ``NAME:STEP``.

    Every rank makes its own writer with the same arguments. Works with
    ``torch.distributed.checkpoint.save`` and ``async_save`` (its default,
    thread-based checkpointer; the process-based one is not tested).

    Args:
        store: the :class:`~sealstore.vault.store.Store` or its URL.
        name: the artifact (the training run).
        step: the step; or pass ``checkpoint_id=STEP`` to ``save``.
        keys, dek_from: as for ``Store.push`` (used on the coordinator).
        identities: to unwrap the version's key on the other ranks (default:
            the local keyring and the key services' environment).
        tenant: the tenant (default ``$SEALSTORE_TENANT`` or ``default``).
        keep_last: after the commit, crypto-shred numbered versions older than
            the newest *keep_last* (tagged ones and the new one are kept).
        threads: chunks sealed in parallel per rank.
        tag_latest: point the ``latest`` tag at the new version.

    Raises:
        ValueError: (on use) a bad step, no keys, or a save without collectives.
        FileExistsError: (on save) the step exists.
    """

    def __init__(
        self,
        store: Any,
        name: str,
        step: int | str | None = None,
        *,
        keys: Sequence[KeySpec] = (),
        dek_from: KeySpec | None = None,
        identities: Sequence[IdentitySpec] = (),
        tenant: str | None = None,
        keep_last: int | None = None,
        threads: int = 2,
        tag_latest: bool = True,
    ) -> None:
        from sealstore.vault.store import default_tenant

        super().__init__()
        self.store = _open_store(store)
        self.name = check_name(name, "artifact name")
        self.tenant = check_name(tenant or default_tenant(), "tenant")
        self.step = None if step is None else _step(step)
        self.keys, self.dek_from, self.identities = tuple(keys), dek_from, tuple(identities)
        if keep_last is not None:
            from sealstore.vault.lifecycle import check_keep_last

            check_keep_last(keep_last)
        self.keep_last, self.threads, self.tag_latest = keep_last, threads, tag_latest
        self.is_coordinator = False
        self.rank = 0
        self._save_id = uuid.uuid4().hex
        self._dek: DataKey | None = None
        self._slots: tuple[dict[str, Any], ...] = ()

    def __repr__(self) -> str:
        return f"SealedStorageWriter({self.name}:{self.step}, tenant={self.tenant})"

    def reset(self, checkpoint_id: str | os.PathLike[str] | int | None = None) -> None:
        if checkpoint_id is not None:
            self.step = _step(checkpoint_id)
        self._save_id = uuid.uuid4().hex
        self._close_key()

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("use_collectives", True):
            # Without collectives no coordinator sees every rank's files: nothing could commit.
            raise ValueError("a sealed checkpoint needs DCP's collectives (use_collectives=True)")
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        version = self._version()
        if version in self.store.versions(self.name, tenant=self.tenant):
            raise FileExistsError(f"{self.name}:{version} already exists in tenant {self.tenant}")
        self.store.require("publisher", self.tenant)  # fail before any rank seals anything
        if not self.keys and self.dek_from is None:
            raise ValueError("at least one key is needed to save a sealed checkpoint")
        self._close_key()
        context = version_context(self.tenant, self.name, version)
        self._dek, slots = new_data_key(self.keys, context, dek_from=self.dek_from)
        self._slots = tuple(s.to_json() for s in slots)
        return [
            dataclasses.replace(plan, storage_data=_RankPlan(f"__{i}.distcp", version, self._slots))
            for i, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        from sealstore.vault.push import seal_object

        rank_plan: _RankPlan = plan.storage_data
        results: list[WriteResult] = []
        fut: Future[list[WriteResult]] = Future()
        if not plan.items:
            fut.set_result(results)
            return fut
        dek = self._dek if self._dek is not None else self._unwrap(rank_plan)
        path = rank_plan.path

        def produce(out: IO[bytes]) -> None:
            stream = _Counting(out)
            for item in plan.items:
                data = planner.resolve_data(item)
                offset = stream.tell()
                if item.type == WriteItemType.BYTE_IO:
                    stream.write(data.getbuffer())
                else:
                    # Raw bytes, C order: the metadata holds each chunk's dtype and
                    # shape, and a load decrypts straight into the target tensor.
                    stream.write(_raw(data.detach().cpu().contiguous()))
                stored = _Stored(path, offset, stream.tell() - offset)
                results.append(WriteResult(item.index, stored.length, stored))

        try:
            entry = seal_object(
                self.store,
                self.tenant,
                self.name,
                rank_plan.version,
                path,
                produce,
                dek,
                threads=self.threads,
            )
        finally:
            if dek is not self._dek:
                dek.close()
        first = results[0]
        results[0] = dataclasses.replace(
            first, storage_data=dataclasses.replace(first.storage_data, entry=entry.to_json())
        )
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        from sealstore.vault.lifecycle import prune
        from sealstore.vault.push import commit_version, seal_object

        version = self._version()
        if self._dek is None:
            raise RuntimeError("finish() without a global plan: nothing to commit")
        entries = [
            FileEntry.from_json(wr.storage_data.entry)
            for rank in results
            for wr in rank
            if wr.storage_data.entry is not None
        ]
        # Plain tuples in the sealed metadata: they unpickle weights-only.
        metadata.storage_data = {
            wr.index: (wr.storage_data.path, wr.storage_data.offset, wr.storage_data.length)
            for rank in results
            for wr in rank
        }
        metadata.storage_meta = StorageMeta(
            checkpoint_id=f"{self.name}:{version}", save_id=self._save_id
        )
        try:
            meta = seal_object(
                self.store,
                self.tenant,
                self.name,
                version,
                METADATA,
                lambda out: torch.save(metadata, out),
                self._dek,
                threads=self.threads,
            )
            # The metadata object goes if nothing is committed -- never after:
            # a failure past the manifest write (the audit record) leaves a
            # committed version whose files must all stay.
            commit_version(
                self.store,
                self.tenant,
                self.name,
                version,
                [*entries, meta],
                [KeySlot.from_json(s) for s in self._slots],
                tag_latest=self.tag_latest,
                discard=[meta.object],
            )
        finally:
            self._close_key()
        if self.keep_last is not None:
            try:
                gone = prune(
                    self.store,
                    self.name,
                    keep_last=self.keep_last,
                    tenant=self.tenant,
                    keep=[version],
                )
            except SealstoreError as exc:
                # The checkpoint is committed; retention is retried on the next save.
                log.warning("saved %s:%s; older steps not removed: %s", self.name, version, exc)
            else:
                if gone:
                    log.info("removed %s steps %s (keep_last=%d)", self.name, gone, self.keep_last)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=f"{self.name}:{self.step}", save_id=self._save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        # Never picked by DCP on its own: a sealed checkpoint is asked for by name.
        return False

    def _version(self) -> str:
        if self.step is None:
            raise ValueError("no step: pass step= or save(..., checkpoint_id=STEP)")
        return self.step

    def _unwrap(self, rank_plan: _RankPlan) -> DataKey:
        """The version's key from the wrapped slots the coordinator sent (one unwrap)."""
        from sealstore.vault.pull import unwrap_version_key

        shell = Manifest(
            store=self.store.id,
            tenant=self.tenant,
            name=self.name,
            version=rank_plan.version,
            created="",
            files=(),
            slots=tuple(KeySlot.from_json(s) for s in rank_plan.slots),
        )
        return unwrap_version_key(shell, None, self.identities)

    def _close_key(self) -> None:
        dek = getattr(self, "_dek", None)  # absent when __init__ raised
        if dek is not None:
            dek.close()
            self._dek = None

    def __del__(self) -> None:
        # A save that failed on another rank never reaches finish(): the key
        # is wiped when the writer goes, not left in freed memory.
        self._close_key()


class SealedStorageReader(StorageReader):
    """DCP ``StorageReader`` over store version ``NAME:STEP`` (verified; ranged decryption).

    Args:
        store: the :class:`~sealstore.vault.store.Store` or its URL.
        name: the artifact.
        step: the step; default the newest one not shredded (the coordinator's
            choice binds every rank: a rank that resolved another refuses).
        tenant, identities: the tenant and the keys to open it with.
        threads: chunks decrypted in parallel per item.
        safe_globals: types the checkpoint's non-tensor values may hold beyond
            torch's weights-only set, as for ``torch.serialization.safe_globals``;
            anything else is refused before DCP unpickles it.

    Raises:
        (on load) NotFound: no such step. AuthenticationError: a manifest,
        object or chunk fails verification. KeyUnavailable: no key opens it.
    """

    def __init__(
        self,
        store: Any,
        name: str,
        step: int | str | None = None,
        *,
        tenant: str | None = None,
        identities: Sequence[IdentitySpec] = (),
        threads: int = 2,
        safe_globals: Sequence[Any] = (),
    ) -> None:
        from sealstore.vault.store import default_tenant

        super().__init__()
        self.store = _open_store(store)
        self.name = check_name(name, "artifact name")
        self.tenant = check_name(tenant or default_tenant(), "tenant")
        self.step = None if step is None else _step(step)
        self.identities, self.threads = tuple(identities), threads
        self.safe_globals = tuple(safe_globals)
        self._metadata = Metadata(state_dict_metadata={})
        self._version: str | None = None
        self._storage: dict[Any, tuple[str, int, int]] = {}
        self._cache = DekCache()

    def __repr__(self) -> str:
        return f"SealedStorageReader({self.name}:{self.step}, tenant={self.tenant})"

    def reset(self, checkpoint_id: str | os.PathLike[str] | int | None = None) -> None:
        if checkpoint_id is not None:
            self.step = _step(checkpoint_id)
        self._version = None
        self._cache.clear()

    def read_metadata(self) -> Metadata:
        """DCP's metadata of the version, verified and unpickled weights-only.

        Raises:
            NotFound, AuthenticationError, KeyUnavailable.
        """
        from sealstore.loaders.sources import open_source

        version = self.step if self.step is not None else self._newest()
        with open_source(
            f"{self.name}:{version}/{METADATA}",
            store=self.store,
            tenant=self.tenant,
            identities=self.identities,
            cache=self._cache,
        ) as sealed:
            buf = bytearray(sealed.size)
            sealed.read_into(0, buf, threads=self.threads)
        with torch.serialization.safe_globals(_METADATA_GLOBALS):
            metadata = torch.load(io.BytesIO(buf), map_location="cpu", weights_only=True)
        if not isinstance(metadata, Metadata):
            raise NotFound(f"{self.name}:{version}/{METADATA} holds no checkpoint metadata")
        self._version = version
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self._metadata = metadata
        self._storage = dict(metadata.storage_data or {})

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        # The coordinator's version binds every rank (see read_data).
        return [dataclasses.replace(p, storage_data=self._version) for p in plans]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if plan.storage_data is not None and plan.storage_data != self._version:
            raise ValueError(
                f"this rank read {self.name}:{self._version} but the coordinator "
                f"{self.name}:{plan.storage_data} (a step was saved meanwhile): pass step="
            )
        per_file: dict[str, list[Any]] = {}
        for req in plan.items:
            per_file.setdefault(self._where(req)[0], []).append(req)
        written: list[torch.Tensor] = []
        try:
            self._read_files(per_file, planner, written)
        except BaseException:
            # Nothing half-loaded: every tensor this read wrote is zeroed
            # (the default planner's targets are views of the state dict's).
            for t in written:
                t.zero_()
            raise
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _where(self, req: Any) -> tuple[str, int, int]:
        try:
            return self._storage[req.storage_index]
        except KeyError:
            raise FormatError(
                f"{self.name}:{self._version}: the checkpoint's metadata has no storage for "
                f"{req.storage_index.fqn}"
            ) from None

    def _read_files(
        self,
        per_file: dict[str, list[Any]],
        planner: LoadPlanner,
        written: list[torch.Tensor],
    ) -> None:
        from sealstore.loaders.sources import open_source

        for path, reqs in per_file.items():
            with open_source(
                f"{self.name}:{self._version}/{path}",
                store=self.store,
                tenant=self.tenant,
                identities=self.identities,
                cache=self._cache,
            ) as sealed:
                for req in sorted(reqs, key=lambda r: self._where(r)[1]):
                    _, offset, length = self._where(req)
                    # Only the chunks this item covers are read and authenticated.
                    if req.type == LoadItemType.BYTE_IO:
                        buf = bytearray(length)
                        sealed.read_into(offset, buf, threads=self.threads)
                        self._check_bytes(path, buf)
                        planner.load_bytes(req, io.BytesIO(buf))
                        continue
                    target = planner.resolve_tensor(req).detach()
                    written.append(target)
                    self._read_tensor(sealed, req, offset, length, target)
                    planner.commit_tensor(req, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def _read_tensor(
        self, sealed: Any, req: Any, offset: int, length: int, target: torch.Tensor
    ) -> None:
        """Decrypt one saved chunk's bytes into *target* (or the part of it DCP asks for)."""
        md = self._metadata.state_dict_metadata[req.storage_index.fqn]
        chunks = md.chunks  # type: ignore[union-attr]
        hint, at = req.storage_index.index, req.storage_index.offset
        if hint is not None and hint < len(chunks) and chunks[hint].offsets == at:
            chunk = chunks[hint]
        else:
            found = [c for c in chunks if c.offsets == at]
            if not found:
                raise FormatError(
                    f"item {req.storage_index.fqn}: no saved chunk at offsets {list(at)}"
                )
            chunk = found[0]
        dtype = md.properties.dtype  # type: ignore[union-attr]
        if length != chunk.sizes.numel() * dtype.itemsize:
            raise FormatError(f"item {req.storage_index.fqn} has {length} bytes, not its shape's")
        whole = list(req.lengths) == list(chunk.sizes) and not any(req.storage_offsets)
        if whole and target.numel() != chunk.sizes.numel():
            raise ValueError(
                f"item {req.storage_index.fqn} is {tuple(chunk.sizes)}, "
                f"the state dict wants {tuple(target.size())}"
            )
        if (
            whole
            and target.is_contiguous()
            and target.dtype == dtype
            and target.device.type == "cpu"
        ):
            # The whole chunk into the tensor's own memory: no copy, and on a
            # failure read_into zeroes it -- no partial plaintext stays there.
            sealed.read_into(offset, _raw(target), threads=self.threads)
            return
        whole_chunk = torch.empty(chunk.sizes, dtype=dtype)
        try:
            sealed.read_into(offset, _raw(whole_chunk), threads=self.threads)
            part = narrow_tensor_by_index(whole_chunk, req.storage_offsets, req.lengths)
            if target.size() != part.size():
                raise ValueError(
                    f"item {req.storage_index.fqn} is {tuple(part.size())}, "
                    f"the state dict wants {tuple(target.size())}"
                )
            target.copy_(part)
        finally:
            # The rows other ranks load stay nowhere in this one's freed memory.
            whole_chunk.zero_()

    def _check_bytes(self, path: str, buf: bytearray) -> None:
        """Refuse a non-tensor value that would unpickle more than weights-only allows.

        DCP's planner unpickles these with ``weights_only=False``; trying the
        restricted unpickler first keeps a checkpoint from running code.
        """
        with torch.serialization.safe_globals(list(self.safe_globals)):
            torch.load(io.BytesIO(buf), map_location="cpu", weights_only=True)

    def _newest(self) -> str:
        for v in sorted(
            (v for v in self.store.versions(self.name, tenant=self.tenant) if v.isdigit()),
            key=int,
            reverse=True,
        ):
            if not self.store.manifest(f"{self.name}:{v}", tenant=self.tenant).shredded:
                return v
        raise NotFound(f"no checkpoint of {self.name} in tenant {self.tenant}")
