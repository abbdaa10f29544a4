"""``load_file``, ``safe_open``, ``save_file`` for sealed safetensors -- the safetensors API.

``load_file`` decrypts the tensor region with ``SealedFile.read_scatter``
(chunks in parallel on a thread pool, cryptography's AEAD drops the GIL)
straight into each tensor's own preallocated storage, so no intermediate
copy of the file exists and no tensor shares memory with another. ``safe_open`` decrypts only
the chunks a requested tensor covers. Every byte returned has been
authenticated; on any failure the buffer is zeroed and nothing is returned.

torch is imported here and nowhere below this floor.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sealstore.errors import FormatError
from sealstore.format import reject_duplicate_keys
from sealstore.kms.envelope import IdentitySpec, KeySpec, atomic_output, seal_writer
from sealstore.loaders.sources import open_source
from sealstore.progress import Progress as ProgressBar
from sealstore.stream import SealedFile

__all__ = ["load_file", "load_state_dict", "safe_open", "save_file"]

_MAX_HEADER = 100_000_000  # safetensors' own limit
Progress = Callable[[int], None]


def _dtypes() -> dict[str, Any]:
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
        "F8_E5M2": torch.float8_e5m2,
        "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
        "C64": torch.complex64,
        "U64": torch.uint64,
        "U32": torch.uint32,
        "U16": torch.uint16,
        "F8_E8M0": torch.float8_e8m0fnu,
    }


# safetensors' write order (its Dtype enum, descending), checked against
# ``safetensors.torch.save`` by tests/test_loaders.py.
_SAVE_ORDER = [
    "U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
    "F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E8M0", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL",
]  # fmt: skip


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _is_uint(x: Any) -> bool:
    return type(x) is int and 0 <= x < (1 << 63)


class _Layout:
    """The safetensors header of a sealed file, validated as strictly as safetensors does.

    Integer fields must be JSON integers (not floats, strings or booleans);
    tensors must tile the data region exactly -- sorted by offset, no gap, no
    overlap, nothing left over -- so no two tensors can alias; metadata is a
    string-to-string map.
    """

    def __init__(self, sf: SealedFile) -> None:
        head = sf.read_range(0, 8)
        if len(head) < 8:
            raise FormatError("not a safetensors file: shorter than 8 bytes")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > sf.size:
            raise FormatError(f"not a safetensors file: header length {n}")
        try:
            header = json.loads(sf.read_range(8, n), parse_constant=_reject_constant,
                                object_pairs_hook=reject_duplicate_keys)  # fmt: skip
        except FormatError:
            raise
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise FormatError(f"safetensors header is not valid: {exc}") from None
        if not isinstance(header, dict):
            raise FormatError("safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not (
            isinstance(meta, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
        ):
            raise FormatError("safetensors __metadata__ must map strings to strings")
        self.metadata: dict[str, str] | None = meta
        self.data_start = 8 + n
        self.data_size = sf.size - self.data_start
        dtypes = _dtypes()
        self.entries: dict[str, tuple[Any, list[int], int, int]] = {}
        for name, spec in header.items():
            if not isinstance(spec, dict) or spec.get("dtype") not in dtypes:
                what = spec.get("dtype") if isinstance(spec, dict) else spec
                raise FormatError(f"safetensors entry {name!r}: unknown dtype {str(what)[:40]!r}")
            dtype = dtypes[spec["dtype"]]
            shape, offsets = spec.get("shape"), spec.get("data_offsets")
            if not (isinstance(shape, list) and all(_is_uint(d) for d in shape)):
                raise FormatError(f"safetensors entry {name!r} has a bad shape")
            if not (isinstance(offsets, list) and len(offsets) == 2
                    and all(_is_uint(x) for x in offsets)):  # fmt: skip
                raise FormatError(f"safetensors entry {name!r} has bad data_offsets")
            start, end = offsets
            count = math.prod(shape)
            if count >= (1 << 63) or not start <= end or (end - start) != count * dtype.itemsize:
                raise FormatError(f"safetensors entry {name!r}: shape and offsets disagree")
            self.entries[name] = (dtype, shape, start, end)
        pos = 0
        for name, (_, _, start, end) in sorted(self.entries.items(), key=lambda e: e[1][2:]):
            if start != pos:
                raise FormatError(f"safetensors entry {name!r} overlaps or leaves a gap")
            pos = end
        if pos != self.data_size:
            raise FormatError("safetensors data region does not match its tensors")


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _progress(progress: bool | Progress, total: int) -> Progress | None:
    if progress is True:
        return ProgressBar("load", total)
    return progress or None


def _check_prefer(prefer: str) -> None:
    if prefer not in ("gpu-direct", "cpu-decrypt"):
        raise ValueError(f"prefer must be 'gpu-direct' or 'cpu-decrypt', not {prefer!r}")


def load_file(
    src: Any,
    device: str = "cpu",
    *,
    threads: int | None = None,
    identities: Sequence[IdentitySpec] = (),
    store: Any = None,
    tenant: str | None = None,
    progress: bool | Progress = False,
    prefer: str = "gpu-direct",
    guard: Any = None,
    module: Any = None,
) -> Any:
    """Load a sealed safetensors file: the same dict ``safetensors.torch.load_file`` gives.

    Args:
        src: a sealed file path or URL, or a store reference (``sealstore+URL#NAME...``
            or ``NAME[:VERSION|@TAG][/FILE]`` with *store*); see ``sealstore.loaders.sources``.
        device: where the tensors go. ``"cuda[:N]"`` decrypts on the GPU: the
            ciphertext is staged in pinned memory and the plaintext exists only
            in device memory (both suites; see ``loaders/gpu.py``). The tensors
            are then views of one device buffer.
        prefer: ``"cpu-decrypt"`` decrypts on the CPU and copies the tensors to
            *device* (any suite; for comparison).
        threads: chunks decrypted in parallel (default: the CPU count, at most 8;
            on 2 cores 1 GiB took 330 ms with 2 threads, 418-478 ms with 3-6).
        progress: ``True`` for a progress bar on stderr (a terminal, loads over
            half a second), or a callable given each decrypted byte count.
        guard: a ``GuardPolicy`` (or its mapping, or True for the default):
            load the tensors into *module* (every one of its parameters must be in
            the file; extra tensors are left out) and return the module with
            the inference guard on it (``sealstore.loaders.inference_guard``), its findings
            recorded against this artifact, stopped by a lockdown at the broker
            that released the key.
        module: the torch module to load into; needed with *guard*.

    Returns:
        name -> tensor, each with its own storage (as safetensors gives), filled
        by decryption directly -- no other copy of the plaintext is made. With
        *guard*: *module*, guarded.

    Raises:
        AuthenticationError: any chunk, signature or hash fails (nothing is returned).
        DeviceUnavailable: a CUDA device was asked for and torch has none.
        KeyUnavailable, NotFound, FormatError.
    """
    if guard is not None and guard is not False and module is None:
        raise TypeError(
            "load_file(guard=...) needs module=: the guard watches the torch module the "
            "tensors are loaded into"
        )
    _check_prefer(prefer)
    if str(device).startswith("cuda"):
        from sealstore.loaders.gpu import check_device

        check_device(str(device))  # before any key is asked for
    opened = open_source(src, store=store, tenant=tenant, identities=identities)
    tensors = _read(opened, opened is not src, device, threads, progress, prefer)
    if guard is None or guard is False:
        return tensors
    from sealstore.loaders.inference_guard import guard_loaded

    # Every parameter and saved buffer of the module comes from the file; tensors the
    # module does not have (a legacy position_ids buffer) are left out.
    result = module.load_state_dict(tensors, strict=False)
    if result.missing_keys:
        raise ValueError(
            f"{src} lacks {len(result.missing_keys)} tensor(s) of {type(module).__name__}, "
            f"e.g. {result.missing_keys[0]}"
        )
    return guard_loaded(module, guard, opened, identities=identities)


def _read(
    opened: SealedFile,
    own: bool,
    device: str,
    threads: int | None,
    progress: bool | Progress,
    prefer: str,
) -> dict[str, Any]:
    import torch

    cuda_device = str(device).startswith("cuda")
    threads = threads or default_threads()
    # own: a SealedFile the caller passed stays open
    with opened if own else contextlib.nullcontext(opened) as sf:
        layout = _Layout(sf)
        if cuda_device and prefer == "gpu-direct":
            from sealstore.loaders.gpu import load_to_cuda

            return load_to_cuda(sf, layout.entries, layout.data_start, str(device))
        # One buffer per tensor, like safetensors: saving, pickling or keeping
        # one tensor must never carry the rest of the decrypted model with it.
        # read_scatter still decrypts every chunk once, straight into them.
        out, pieces = {}, []
        for name, (dtype, shape, start, end) in layout.entries.items():
            buf = torch.empty(end - start, dtype=torch.uint8)
            pieces.append((layout.data_start + start, buf.numpy()))
            out[name] = (buf, dtype, shape)
        bar = _progress(progress, layout.data_size)
        try:
            sf.read_scatter(pieces, threads=threads, progress=bar)
        finally:
            if isinstance(bar, ProgressBar):
                bar.close()
    tensors = {name: buf.view(dtype).reshape(shape) for name, (buf, dtype, shape) in out.items()}
    if device != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


def load_state_dict(
    module: Any, src: Any, *, strict: bool = True, guard: Any = None, **kwargs: Any
) -> Any:
    """``module.load_state_dict(load_file(src, ...), strict=strict)``; returns its result.

    With *guard* (a ``GuardPolicy``): every parameter from *src*; returns *module*, guarded
    (``load_file(src, guard=..., module=module)``).
    """
    if guard is not None and guard is not False:
        if not strict:
            raise ValueError("a guarded load is strict: every parameter comes from the artifact")
        return load_file(src, guard=guard, module=module, **kwargs)
    return module.load_state_dict(load_file(src, **kwargs), strict=strict)


class _Slice:
    """``get_slice(name)``: shape and dtype for free; ``[a:b]`` decrypts only those rows."""

    def __init__(self, owner: SafeOpen, name: str) -> None:
        self._owner = owner
        self._name = name
        self._dtype, self._shape, self._start, self._end = owner._layout.entries[name]

    def get_shape(self) -> list[int]:
        return list(self._shape)

    def get_dtype(self) -> str:
        return next(k for k, v in _dtypes().items() if v == self._dtype)

    def __getitem__(self, index: Any) -> Any:
        first = index[0] if isinstance(index, tuple) and index else index
        rest = index[1:] if isinstance(index, tuple) else ()
        if isinstance(first, slice) and first.step in (None, 1) and self._shape:
            lo, hi, _ = first.indices(self._shape[0])
            hi = max(lo, hi)
            row = math.prod(self._shape[1:]) * self._dtype.itemsize
            part = self._owner._read(
                self._start + lo * row, self._start + hi * row, self._dtype,
                [hi - lo, *self._shape[1:]],
            )  # fmt: skip
            return part[(slice(None), *rest)] if rest else part
        return self._owner.get_tensor(self._name)[index]


class SafeOpen:
    """Lazy access to a sealed safetensors file; use :func:`safe_open`."""

    def __init__(
        self,
        src: Any,
        framework: str = "pt",
        device: str = "cpu",
        *,
        identities: Sequence[IdentitySpec] = (),
        store: Any = None,
        tenant: str | None = None,
        check_digest: bool = False,
        threads: int | None = None,
        prefer: str = "gpu-direct",
    ) -> None:
        if framework not in ("pt", "torch"):
            raise ValueError(f"framework {framework!r} is not supported (only 'pt')")
        _check_prefer(prefer)
        self._gpu_direct = str(device).startswith("cuda") and prefer == "gpu-direct"
        if str(device).startswith("cuda"):
            from sealstore.loaders.gpu import check_device

            check_device(str(device))
        self._device = device
        self._threads = threads or default_threads()
        self._sf = open_source(
            src, store=store, tenant=tenant, identities=identities, check_digest=check_digest
        )
        self._own = self._sf is not src  # a SealedFile the caller passed stays open
        try:
            self._layout = _Layout(self._sf)
        except BaseException:
            self.close()
            raise

    def keys(self) -> list[str]:
        return sorted(self._layout.entries)

    def metadata(self) -> dict[str, str] | None:
        return self._layout.metadata

    def _read(self, start: int, end: int, dtype: Any, shape: list[int]) -> Any:
        import torch

        if self._gpu_direct:
            from sealstore.loaders.gpu import as_tensor, read_to_cuda

            start, end = self._layout.data_start + start, self._layout.data_start + end
            return as_tensor(read_to_cuda(self._sf, start, end, str(self._device)), dtype, shape)
        buf = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            self._sf.read_into(self._layout.data_start + start, buf.numpy(), threads=self._threads)
        t = buf.view(dtype).reshape(shape)
        return t if self._device == "cpu" else t.to(self._device)

    def get_tensor(self, name: str) -> Any:
        """Decrypt only the chunks this tensor covers.

        Raises:
            KeyError: no such tensor.
        """
        dtype, shape, start, end = self._layout.entries[name]
        return self._read(start, end, dtype, shape)

    def get_slice(self, name: str) -> _Slice:
        if name not in self._layout.entries:
            raise KeyError(name)
        return _Slice(self, name)

    def close(self) -> None:
        if self._own:
            self._sf.close()

    def __enter__(self) -> SafeOpen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def safe_open(
    src: Any,
    framework: str = "pt",
    device: str = "cpu",
    **kwargs: Any,
) -> SafeOpen:
    """Open a sealed safetensors file lazily: ``keys``, ``get_tensor``, ``get_slice``, ``metadata``.

    Only the chunks a requested tensor covers are read and decrypted. For a
    store reference the manifest and object header are checked on open; the
    whole-object digest is skipped by default to keep access lazy (pass
    ``check_digest=True`` to hash the object first). ``threads`` decrypt the
    chunks of one tensor in parallel (default: the CPU count, at most 8).

    With ``device="cuda[:N]"`` each requested tensor's chunks are decrypted on
    the GPU (as ``load_file`` does; the tensor is a view of a buffer of whole
    chunks); ``prefer="cpu-decrypt"`` decrypts on the CPU and copies.
    """
    return SafeOpen(src, framework, device, **kwargs)


def _header(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None) -> tuple[bytes, list]:
    """The safetensors header for *tensors*, and the tensors in file order.

    Byte for byte what safetensors writes: tensors ordered by dtype as its
    ``Dtype`` enum sorts them, descending (so larger elements come first and
    every tensor starts aligned), then by name; the JSON compact, padded with
    spaces to a multiple of 8 bytes.
    """
    import torch

    names = {v: k for k, v in _dtypes().items()}
    shared: dict[tuple[Any, int], list[tuple[int, int, str]]] = {}
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"tensor names must be strings, not {type(name).__name__}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name!r} is not a torch.Tensor but {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"{name!r} is a sparse tensor; make it dense first")
        if not t.is_contiguous():
            raise ValueError(f"{name!r} is not contiguous; call .contiguous() before saving")
        if t.dtype not in names:
            raise ValueError(f"{name!r} has a dtype safetensors cannot store: {t.dtype}")
        if t.numel():
            lo = t.storage_offset() * t.element_size()
            key = (t.device, t.untyped_storage().data_ptr())
            shared.setdefault(key, []).append((lo, lo + t.numel() * t.element_size(), name))
    for ranges in shared.values():
        ranges.sort()
        for (_, end, a), (start, _, b) in itertools.pairwise(ranges):
            if start < end:
                raise ValueError(f"tensors {a!r} and {b!r} share memory; save one of them")
    rank = {dt: _SAVE_ORDER.index(name) for dt, name in names.items()}
    order = sorted(tensors.items(), key=lambda kv: (rank[kv[1].dtype], kv[0]))
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    pos = 0
    for name, t in order:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [pos, pos + n]}  # fmt: skip
        pos += n
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def save_file(
    tensors: Mapping[str, Any],
    dst: str | os.PathLike[str],
    *,
    keys: Sequence[KeySpec],
    metadata: Mapping[str, str] | None = None,
    context: Mapping[str, str] | None = None,
    dek_from: KeySpec | None = None,
    threads: int = 2,
) -> None:
    """Write *tensors* as a safetensors file sealed into *dst*, atomically.

    Streamed: the header, then each tensor's bytes, sealed as they are
    written. Nothing is serialised in memory beyond one tensor at a time (a
    CUDA tensor is copied to the CPU just before it is written). The plaintext
    is what ``safetensors.torch.save_file`` writes; the same tensors are refused
    (not contiguous, sparse, sharing memory).

    Raises:
        ValueError: a tensor safetensors cannot store (nothing is written).
    """
    import torch

    head, order = _header(tensors, metadata)
    total = len(head) + sum(t.numel() * t.element_size() for _, t in order)
    with (
        atomic_output(dst) as out,
        seal_writer(
            out, keys, context=context, plaintext_size=total, threads=threads, dek_from=dek_from
        ) as writer,
    ):
        writer.write(head)
        for _, t in order:
            if t.numel():
                data = t.detach().to("cpu").reshape(-1).view(torch.uint8)
                writer.write(data.numpy())
