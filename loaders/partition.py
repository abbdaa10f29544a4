"""Partition plans: which tensors, and which slice of each, one tensor-parallel rank loads.

A plan maps a tensor name to a :class:`TensorSlice` -- the whole tensor, or
``[start, stop)`` along one dimension, or part *rank* of *world* equal parts
of one dimension -- the shape Megatron's and vLLM's tensor parallelism give
each rank. ``load_file(src, plan=...)`` and ``safe_open(src, plan=...)`` then
read and decrypt only the chunks those slices cover (and the final chunk,
which authenticates the file's length).

The bytes a slice covers in a row-major tensor: a slice of dimension 0 is
one contiguous range; a slice of dimension *d* > 0 is one contiguous segment
for each index of the dimensions before *d* (one per row of a 2-D weight),
so it touches every chunk the tensor spans. Only dimension-0 slices save
decryption; :func:`byte_ranges` is the one place this is computed, for the
plan readers and for ``get_slice``.

Nothing here imports torch: shapes and dtype codes are the safetensors
header's (``loaders/st_header.py``).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sealstore.loaders.st_header import BITS, TensorNotFound

__all__ = ["PartitionPlan", "TensorSlice", "as_plan", "byte_ranges", "tensor_parallel"]


@dataclass(frozen=True)
class TensorSlice:
    """One tensor's part for a rank.

    ``TensorSlice()`` is the whole tensor (replicated);
    ``TensorSlice(dim, start, stop)`` is ``[start, stop)`` along *dim*
    (``stop=None``: to the end); ``TensorSlice.part(dim, rank, world)`` is part
    *rank* of *world* equal parts of *dim*, sized once the shape is known.

    Attributes:
        dim: the dimension sliced, or None for the whole tensor.
        start, stop: the range along *dim* (ignored with *world*).
        rank, world: an equal part, when *world* is set.
        whole_if_1d: a 1-D tensor is loaded whole (a row-parallel linear's
            bias, added after the all-reduce).
    """

    dim: int | None = None
    start: int = 0
    stop: int | None = None
    rank: int = 0
    world: int | None = None
    whole_if_1d: bool = False

    def __post_init__(self) -> None:
        world = self.world
        if world is not None and not (isinstance(world, int) and world >= 1):
            raise ValueError(f"world size must be a positive int, not {world!r}")
        if world is not None and not 0 <= self.rank < world:
            raise ValueError(f"rank {self.rank} is not in range(world) for world size {world}")

    @classmethod
    def part(cls, dim: int, rank: int, world: int) -> TensorSlice:
        """Part *rank* of *world* equal parts of *dim*.

        Raises:
            ValueError: *rank* is not in ``range(world)``.
        """
        return cls(dim=dim, rank=rank, world=world)

    def resolve(self, name: str, shape: Sequence[int]) -> tuple[int, int, int] | None:
        """``(dim, start, stop)`` for a tensor of *shape*, or None for the whole tensor.

        Equal parts follow vLLM's ``divide``: the dimension must split evenly
        into *world* parts, else the plan is refused (no padding, no ragged
        last part).

        Raises:
            ValueError: *dim* is not a dimension of *shape*, the range lies
                outside it, or the dimension does not split evenly.
        """
        if self.dim is None or (self.whole_if_1d and len(shape) < 2):
            return None
        ndim = len(shape)
        if not -ndim <= self.dim < ndim:
            raise ValueError(f"plan slices dim {self.dim} of {name}, which has shape {list(shape)}")
        dim = self.dim % ndim
        size = shape[dim]
        if self.world is not None:
            if size % self.world:
                raise ValueError(
                    f"plan splits dim {dim} of {name} (size {size}) into {self.world} parts: "
                    "it does not divide evenly"
                )
            step = size // self.world
            return dim, self.rank * step, (self.rank + 1) * step
        stop = size if self.stop is None else self.stop
        if not 0 <= self.start <= stop <= size:
            raise ValueError(
                f"plan slice [{self.start}, {stop}) of dim {dim} is outside {name}'s "
                f"shape {list(shape)}"
            )
        return dim, self.start, stop


WHOLE = TensorSlice()


class PartitionPlan:
    """Which tensors a rank loads and which slice of each.

    Build one with :func:`tensor_parallel` (Megatron/vLLM rules by name
    pattern), from a mapping ``name -> TensorSlice`` (only those tensors, each
    of which the file must hold), or from a callable ``(name) -> TensorSlice |
    None`` (None: the rank does not load that tensor); :func:`as_plan` takes
    any of them.
    """

    def __init__(
        self,
        pick: Callable[[str], TensorSlice | None],
        *,
        required: Sequence[str] = (),
    ) -> None:
        """
        Args:
            pick: name -> the tensor's slice, or None when this rank skips it.
            required: names the file (or the index) must hold.
        """
        self._pick = pick
        self.required = tuple(required)

    def slice_for(self, name: str) -> TensorSlice | None:
        """The tensor's slice, or None when this rank does not load it."""
        got = self._pick(name)
        if got is not None and not isinstance(got, TensorSlice):
            raise TypeError(f"a plan gives a TensorSlice or None for {name}, not {type(got)}")
        return got

    def check_names(self, names: Any, where: str) -> None:
        """Refuse a plan that names a tensor *names* lacks.

        Raises:
            TensorNotFound: a tensor the plan names is not in *names*.
        """
        for name in self.required:
            if name not in names:
                raise TensorNotFound(f"the plan names tensor {name}, which {where} does not hold")

    def resolve(
        self, entries: Mapping[str, tuple[str, list[int], int, int]], where: str, *, strict: bool
    ) -> dict[str, tuple[int, int, int] | None]:
        """name -> ``(dim, start, stop)`` or None (whole), for the tensors of *entries* it loads.

        Args:
            entries: a header's entries (``Layout.entries``).
            where: the file, for the error lines.
            strict: every tensor the plan names must be in *entries*.

        Raises:
            TensorNotFound, ValueError: see :meth:`check_names`, :meth:`TensorSlice.resolve`.
        """
        if strict:
            self.check_names(entries, where)
        out: dict[str, tuple[int, int, int] | None] = {}
        for name, (_code, shape, _s, _e) in entries.items():
            part = self.slice_for(name)
            if part is not None:
                out[name] = part.resolve(name, shape)
        return out


def as_plan(plan: Any) -> PartitionPlan:
    """A :class:`PartitionPlan` from a plan, a mapping ``name -> TensorSlice`` or a callable.

    Raises:
        TypeError: none of those.
    """
    if isinstance(plan, PartitionPlan):
        return plan
    if isinstance(plan, Mapping):
        table = dict(plan)
        for name, part in table.items():
            if not isinstance(part, TensorSlice):
                raise TypeError(f"a plan maps names to TensorSlice; {name} maps to {type(part)}")
        return PartitionPlan(table.get, required=list(table))
    if callable(plan):
        return PartitionPlan(plan)
    raise TypeError(f"plan= takes a PartitionPlan, a mapping or a callable, not {type(plan)}")


def tensor_parallel(
    rank: int,
    world: int,
    *,
    column: Sequence[str] = (),
    row: Sequence[str] = (),
    vocab: Sequence[str] = (),
    skip: Sequence[str] = (),
) -> PartitionPlan:
    """Megatron / vLLM tensor parallelism by name pattern (``fnmatch`` globs, first match wins).

    * *column*: column-parallel linears -- split dim 0 of the ``[out, in]``
      weight and of its bias.
    * *row*: row-parallel linears -- split dim 1 of the weight; a 1-D tensor
      matched here (the bias, added after the all-reduce) is loaded whole.
    * *vocab*: embeddings split by vocabulary (dim 0).
    * *skip*: tensors this rank does not load at all.
    * Everything else is replicated (loaded whole).

    Every split must divide evenly by *world* (vLLM's ``divide``); a load
    with a plan that does not is refused with the tensor named.

    Raises:
        ValueError: *rank* is not in ``range(world)``.
    """
    dim0 = TensorSlice.part(0, rank, world)
    dim1_row = TensorSlice(dim=1, rank=rank, world=world, whole_if_1d=True)

    def matches(name: str, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    def pick(name: str) -> TensorSlice | None:
        if matches(name, skip):
            return None
        if matches(name, column) or matches(name, vocab):
            return dim0
        if matches(name, row):
            return dim1_row
        return WHOLE

    return PartitionPlan(pick)


def byte_ranges(
    name: str, code: str, shape: Sequence[int], dim: int, start: int, stop: int
) -> tuple[list[int], list[tuple[int, int]]]:
    """The sliced shape, and the byte ranges (relative to the tensor) a slice covers, in order.

    A dim-0 slice is one range; a dim-*d* slice one range per index of the
    dimensions before *d*. Adjacent ranges are merged (a slice covering a
    whole dimension, or ``stop == start``, collapses).

    Raises:
        ValueError: the slice does not start and end on a byte boundary (F4
            along its last dimension, at an odd index).
    """
    shape = list(shape)
    inner_bits = math.prod(shape[dim + 1 :]) * BITS[code]
    lo_bits, len_bits, row_bits = (
        start * inner_bits,
        (stop - start) * inner_bits,
        shape[dim] * inner_bits,
    )
    if lo_bits % 8 or len_bits % 8 or row_bits % 8:
        raise ValueError(
            f"plan slice [{start}, {stop}) of dim {dim} of {name} ({code}) splits a byte"
        )
    lo, n, row = lo_bits // 8, len_bits // 8, row_bits // 8
    sliced = [*shape[:dim], stop - start, *shape[dim + 1 :]]
    if n == 0:
        return sliced, []
    if n == row:  # the whole dimension: the rows follow one another
        outer = math.prod(shape[:dim])
        return sliced, [(0, outer * row)]
    return sliced, [(k * row + lo, k * row + lo + n) for k in range(math.prod(shape[:dim]))]
