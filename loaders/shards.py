"""A torch dataset over sealed shards: rank- and worker-aware, shuffled per epoch, resumable.

A *shard* is one sealed file (a path, a ``sealstore::URL`` or a store
reference ``sealstore+URL#NAME:VERSION/FILE``) holding many samples; a
*decoder* turns an open shard into its list of samples (built in: Parquet
rows, JSON lines, webdataset-style tar members; or any
``decode(fileobj) -> Sequence``). A shard is the unit of I/O, as in
MosaicML Streaming and webdataset: a worker opens it, authenticates and
decodes it whole, and serves its samples from memory; nothing decrypted
ever reaches the disk.

The order. Each epoch has one global order of the samples, the same in
every rank: the shards permuted by ``(seed, epoch)``, taken in windows of
``shuffle_window`` shards whose samples are permuted together. The order
(padded by wrapping round to a multiple of the world size) is cut into one
contiguous span per rank; a rank's span is cut into one contiguous run of
whole batches per DataLoader worker, so a worker opens only the shards of
its run. The DataLoader takes one batch from each worker in turn, so the
consumer sees the workers' runs interleaved batch by batch: a deterministic
order given the seed, epoch, world size, ``num_workers`` and ``batch_size``.

Resuming. Because that order is deterministic, "how many samples has the
training loop taken" is the whole state: ``state_dict(consumed)`` records
the epoch and that count (summed over ranks), and after
``load_state_dict`` each worker works out which of its batches the
consumer had already taken and starts after them. A run stopped at step
*k* and resumed sees exactly the samples an uninterrupted run sees from
step *k* (same world size, ``num_workers`` and ``batch_size``).

Sample counts come from ``counts=`` (an index you keep) or from one read of
each shard in the process that builds the dataset -- for Parquet only the
footer; the others decode the shard. Workers receive the counts in the
pickle and never open a shard they do not read.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from sealstore.kms.envelope import IdentitySpec

__all__ = ["SealedShards", "ShardSamples", "decode_jsonl", "decode_parquet", "decode_tar"]

Decoder = Callable[[BinaryIO], Sequence[Any]]


def decode_parquet(f: BinaryIO) -> list[dict[str, Any]]:
    """A Parquet shard's rows, as dicts (column name to value)."""
    import pyarrow.parquet as pq

    return pq.read_table(f).to_pylist()  # type: ignore[no-any-return]


def decode_jsonl(f: BinaryIO) -> list[Any]:
    """A JSON-lines shard's records (blank lines skipped)."""
    return [json.loads(line) for line in f if line.strip()]


def decode_tar(f: BinaryIO) -> list[dict[str, Any]]:
    """A webdataset-style tar shard's samples: consecutive members that share a key
    (the name up to its first dot) make one dict ``{"__key__": KEY, EXT: bytes, ...}``."""
    samples: list[dict[str, Any]] = []
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            stem, _, ext = base.partition(".")
            key = member.name[: len(member.name) - len(base)] + stem
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = data
    return samples


def _count_parquet(f: BinaryIO) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(f).metadata.num_rows)  # the footer only


_DECODERS: dict[str, tuple[Decoder, Callable[[BinaryIO], int] | None]] = {
    "parquet": (decode_parquet, _count_parquet),
    "jsonl": (decode_jsonl, None),
    "tar": (decode_tar, None),
}


class _Shards:
    """What both views share: the shards, how to open and decode them, their counts."""

    def __init__(
        self,
        shards: Sequence[str | os.PathLike[str]],
        decode: str | Decoder,
        counts: Sequence[int] | None,
        identities: Sequence[IdentitySpec],
        tenant: str | None,
        storage_options: Mapping[str, Any] | None,
    ) -> None:
        self.shards = [os.fspath(s) for s in shards]
        if not self.shards:
            raise ValueError("no shards given")
        if isinstance(decode, str):
            if decode not in _DECODERS:
                raise ValueError(f"unknown decoder {decode!r} (one of {', '.join(_DECODERS)})")
            self.decode, counter = _DECODERS[decode]
        else:
            self.decode, counter = decode, None
        if not all(isinstance(i, (str, os.PathLike)) for i in identities):
            raise TypeError("identities must be file paths: they travel to the workers")
        self.identities = [os.fspath(i) for i in identities]
        self.tenant = tenant
        self.storage_options = dict(storage_options or {})
        if counts is None:
            counts = [self._count(i, counter) for i in range(len(self.shards))]
        if len(counts) != len(self.shards) or any(int(c) < 0 for c in counts):
            raise ValueError("counts must give one non-negative count per shard")
        self.counts = [int(c) for c in counts]
        self.total = sum(self.counts)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def open_shard(self, i: int) -> BinaryIO:
        """Shard *i* as a binary file object (subclasses may read other storage)."""
        from sealstore.fileobj import SealedBufferedReader, wrap
        from sealstore.loaders.fileio import open as sealed_open

        src = self.shards[i]
        if src.startswith("sealstore"):
            # fsspec URLs: a store file system keeps the version's key, so a
            # worker unwraps once per version, not once per shard.
            import fsspec

            options = dict(self.storage_options)
            if self.identities:
                options["identities"] = self.identities
            if self.tenant and src.startswith("sealstore+"):
                options["tenant"] = self.tenant
            fs, path = fsspec.url_to_fs(src, **options)
            raw = wrap(fs.open_sealed(path), name=src, buffered=False)
        else:
            raw = sealed_open(
                src, identities=self.identities, storage_options=self.storage_options, buffering=0
            )
        # Read front to back through a buffer of one chunk: each refill is a
        # whole, aligned chunk decrypted straight into the buffer (no chunk
        # cache to copy through and wipe).
        return SealedBufferedReader(raw, raw.sealed.layout.chunk_size)  # type: ignore[union-attr,arg-type]

    def read_shard(self, i: int) -> Sequence[Any]:
        """Shard *i*'s samples, decoded (every byte authenticated first).

        Raises:
            ValueError: the decoder gave a different number of samples than counted.
        """
        with self.open_shard(i) as f:
            samples = self.decode(f)
        if len(samples) != self.counts[i]:
            raise ValueError(
                f"{self.shards[i]}: decoded {len(samples)} samples, counted {self.counts[i]}"
            )
        return samples

    def _count(self, i: int, counter: Callable[[BinaryIO], int] | None) -> int:
        with self.open_shard(i) as f:
            return counter(f) if counter is not None else len(self.decode(f))


class SealedShards(IterableDataset, _Shards):  # type: ignore[type-arg]
    """Samples of sealed shards for a ``DataLoader``: sharded over ranks and workers,
    shuffled per epoch from a seed, resumable mid-epoch.

    Args:
        shards: the shards, in a fixed order: sealed file paths or URLs, or
            store references (``sealstore+file:///srv/store#corpus:3/train/part-0.parquet``).
        decode: ``"parquet"``, ``"jsonl"``, ``"tar"``, or a picklable
            ``decode(fileobj) -> Sequence`` of samples.
        counts: each shard's sample count, if known (skips counting).
        batch_size: the DataLoader's ``batch_size`` (the order is laid out in
            whole batches per worker; resuming needs the same value).
        shuffle: permute shards and samples (default); False keeps the given order.
        seed: the shuffle's seed, the same in every rank.
        shuffle_window: how many shards' samples are permuted together (and
            held decoded in a worker at once).
        rank, world_size: default: ``torch.distributed``'s when initialised, else 0 and 1.
        identities: identity file paths to try (they must exist in the workers too).
        tenant: the store tenant for store references.
        storage_options: fsspec / store options (``endpoint_url``, ...).

    Raises:
        ValueError: no shards, an unknown decoder, bad counts or sizes.
        TypeError: an identity that is not a file path.
        AuthenticationError, KeyUnavailable, NotFound, FormatError: counting a
            shard (the message names it).
    """

    def __init__(
        self,
        shards: Sequence[str | os.PathLike[str]],
        *,
        decode: str | Decoder,
        counts: Sequence[int] | None = None,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_window: int = 4,
        rank: int | None = None,
        world_size: int | None = None,
        identities: Sequence[IdentitySpec] = (),
        tenant: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if batch_size < 1 or shuffle_window < 1:
            raise ValueError("batch_size and shuffle_window must be at least 1")
        _Shards.__init__(self, shards, decode, counts, identities, tenant, storage_options)
        if world_size is None or rank is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            world_size = (
                world_size if world_size is not None else (dist.get_world_size() if on else 1)
            )
            rank = rank if rank is not None else (dist.get_rank() if on else 0)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size
        self.shuffle, self.seed, self.shuffle_window = shuffle, seed, shuffle_window
        self.epoch = 0
        self._resume = 0  # samples of this epoch the rank's consumer had taken before a resume
        self._windows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # -- the order ---------------------------------------------------------------------

    def __len__(self) -> int:
        """Samples this rank yields per epoch (the order padded to the world size)."""
        return -(-self.total // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch *epoch*'s order (call it before each epoch, in every rank).

        Moving to another epoch than the one resumed drops the resume point.
        """
        if epoch != self.epoch:
            self._resume = 0
        self.epoch = epoch

    def _shard_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.shards))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))

    def _layout(self) -> tuple[list[np.ndarray], np.ndarray]:
        """The epoch's windows (shard ids) and each window's first global position."""
        order = self._shard_order()
        k = self.shuffle_window
        windows = [order[i : i + k] for i in range(0, len(order), k)]
        sizes = [sum(self.counts[s] for s in w) for w in windows]
        return windows, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def _window(self, wi: int, shards: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Window *wi*: (its shards, their first offsets in it, its sample permutation)."""
        key = (self.epoch, wi)
        hit = self._windows.get(key)
        if hit is None:
            cum = np.concatenate([[0], np.cumsum([self.counts[s] for s in shards])])
            n = int(cum[-1])
            if self.shuffle:
                perm = np.random.default_rng([self.seed, self.epoch, 1 + wi]).permutation(n)
            else:
                perm = np.arange(n)
            hit = (shards, cum.astype(np.int64), perm)
            self._windows = {key: hit}  # one window at a time
        return hit

    def _worker_runs(self, worker: int, workers: int) -> tuple[int, int, int]:
        """(first position in the rank's span, samples, batches already taken) for a worker.

        The span's batches are dealt out so that the DataLoader's round robin
        (batch *i* from worker ``i % workers``) hands the consumer whole
        batches and the short last batch last: worker *w* has batches
        ``w, w + workers, ...`` of the consumer's order, laid out contiguously.
        """
        span, b = len(self), self.batch_size
        batches = -(-span // b)
        counts = [batches // workers + (w < batches % workers) for w in range(workers)]
        last = (batches - 1) % workers  # holds the short batch: its run goes at the end
        layout = [w for w in range(workers) if w != last] + [last]
        start = sum(counts[w] for w in layout[: layout.index(worker)]) * b
        size = counts[worker] * b - ((batches * b - span) if worker == last else 0)
        k = self._resume // b  # consumer batches taken before the resume
        taken = max(0, -(-(k - worker) // workers)) if self._resume < span else counts[worker]
        return start, max(0, size), min(taken, counts[worker])

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader's round robin starts at its worker 0 however far the
        # consumer had got: after a resume at batch k that worker plays the part
        # of the one batch k came from.
        worker = (worker + self._resume // self.batch_size) % workers
        start, size, taken = self._worker_runs(worker, workers)
        windows, starts = self._layout()
        base = self.rank * len(self)
        shard, samples = -1, None
        decoded: OrderedDict[int, Sequence[Any]] = OrderedDict()
        for p in range(start + taken * self.batch_size, start + size):
            g = (base + p) % self.total  # padding wraps round to the start
            wi = int(np.searchsorted(starts, g, side="right")) - 1
            shards, cum, perm = self._window(wi, windows[wi])
            j = int(perm[g - starts[wi]])
            at = int(np.searchsorted(cum, j, side="right")) - 1
            shard = int(shards[at])
            samples = decoded.get(shard)
            if samples is None:
                # Keep at most one window's shards decoded: the run moves on
                # through the windows and does not come back (but for padding).
                while len(decoded) >= self.shuffle_window:
                    decoded.popitem(last=False)
                samples = decoded[shard] = self.read_shard(shard)
            yield samples[j - int(cum[at])]

    # -- resuming ----------------------------------------------------------------------

    def state_dict(self, consumed: int) -> dict[str, Any]:
        """Where this epoch stands, to resume from.

        Args:
            consumed: samples this rank's training loop has taken from the
                DataLoader since it began this iteration (steps x batch_size);
                samples taken before a resume are added here.

        Returns:
            ``{"epoch", "samples" (taken, summed over ranks), "seed",
            "world_size", "batch_size", "total"}``: plain data (``torch.save``s).

        Raises:
            ValueError: *consumed* is not a whole number of batches (or the epoch's end).
        """
        taken = self._resume + consumed
        if taken < 0 or taken > len(self) or (taken % self.batch_size and taken != len(self)):
            raise ValueError(
                f"consumed={consumed}: give whole batches of {self.batch_size} "
                f"(at most {len(self) - self._resume})"
            )
        return {
            "epoch": self.epoch,
            "samples": taken * self.world_size,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "total": self.total,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration starts where *state*'s consumer stopped.

        Call it before creating the DataLoader's iterator (workers take a copy
        of the dataset then), with the same world size, ``num_workers`` and
        ``batch_size`` as the run that saved *state*. The resume point holds
        until :meth:`set_epoch` moves to another epoch (workers cannot report
        back that they used it): call ``set_epoch`` before every epoch.

        Raises:
            ValueError: *state* is of another dataset, seed, world size or batch size.
        """
        mine = {"seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size}
        mine["total"] = self.total
        wrong = [k for k, v in mine.items() if state.get(k) != v]
        if wrong:
            raise ValueError(f"the state does not match this dataset ({', '.join(wrong)} differ)")
        self.epoch = int(state["epoch"])
        self._resume = int(state["samples"]) // self.world_size

    def map_style(self) -> ShardSamples:
        """The same shards as a map-style dataset (``ds[i]``, samples in the given order)."""
        return ShardSamples(
            self.shards,
            decode=self.decode,
            counts=self.counts,
            identities=self.identities,
            tenant=self.tenant,
            storage_options=self.storage_options,
        )


class ShardSamples(Dataset, _Shards):  # type: ignore[type-arg]
    """The samples of sealed shards by index (shard by shard, in the order given):
    a map-style dataset for a sampler (``DistributedSampler``, ``RandomSampler``).

    Random access decodes the shard an index falls in and keeps the last
    ``keep`` shards decoded, so read in shard order where you can.

    Its arguments are :class:`SealedShards`' (``decode``, ``counts``, ``identities``,
    ``tenant``, ``storage_options``), and ``keep`` (shards held decoded).
    """

    def __init__(
        self,
        shards: Sequence[str | os.PathLike[str]],
        *,
        decode: str | Decoder,
        counts: Sequence[int] | None = None,
        keep: int = 2,
        identities: Sequence[IdentitySpec] = (),
        tenant: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        _Shards.__init__(self, shards, decode, counts, identities, tenant, storage_options)
        self.keep = max(1, keep)
        self._decoded: OrderedDict[int, Sequence[Any]] = OrderedDict()

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: int) -> Any:
        """Sample *index* (negative counts from the end).

        Raises:
            IndexError: out of range.
        """
        if index < 0:
            index += self.total
        if not 0 <= index < self.total:
            raise IndexError(f"sample {index} of {self.total}")
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        samples = self._decoded.get(shard)
        if samples is None:
            while len(self._decoded) >= self.keep:
                self._decoded.popitem(last=False)
            samples = self._decoded[shard] = self.read_shard(shard)
        else:
            self._decoded.move_to_end(shard)
        return samples[index - int(self.offsets[shard])]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_decoded"] = OrderedDict()  # plaintext stays in this process
        return state
