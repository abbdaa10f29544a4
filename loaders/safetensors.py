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
import io
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sealstore.errors import FormatError, NotFound
from sealstore.kms.envelope import IdentitySpec, KeySpec, atomic_output, open_sealed, seal_writer
from sealstore.loaders.artifact import (
    SealedFolder,
    load_partition,
    load_weights,
    shards,
    weight_files,
    whole_artifact,
)
from sealstore.loaders.partition import PartitionPlan, as_plan, byte_ranges
from sealstore.loaders.sources import PREFIX, open_source, verify_at_open
from sealstore.loaders.st_header import Layout, TensorNotFound, header_bytes
from sealstore.progress import LibraryBar, library_bar
from sealstore.stream import SealedFile

__all__ = [
    "load",
    "load_file",
    "load_model",
    "load_state_dict",
    "safe_open",
    "save",
    "save_file",
    "save_model",
]

Progress = Callable[[int], None]
_FRAMEWORKS = {"pt": "pt", "torch": "pt", "np": "np", "numpy": "np"}


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
        "F4": torch.float4_e2m1fn_x2,
    }


def _torch_entry(name: str, code: str, shape: Sequence[int]) -> tuple[Any, list[int]]:
    """torch's dtype and shape for a header entry.

    F4 packs two values per byte: torch's ``float4_e2m1fn_x2`` counts bytes,
    so its last dimension is half the header's (as safetensors loads it).
    """
    shape = list(shape)
    if code == "F4":
        if not shape or shape[-1] % 2:
            raise FormatError(
                f"safetensors entry {name!r}: F4 needs an even last dimension in torch, "
                f"not shape {shape}"
            )
        shape[-1] //= 2
    return _dtypes()[code], shape


def _torch_entries(layout: Layout) -> dict[str, tuple[Any, list[int], int, int]]:
    """name -> (torch dtype, torch shape, start, end), in file order."""
    out = {}
    for name in layout.offset_keys():
        code, shape, start, end = layout.entries[name]
        out[name] = (*_torch_entry(name, code, shape), start, end)
    return out


def _device(device: Any) -> str:
    from sealstore.loaders.gpu import normalize_device

    return normalize_device(device)


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _progress(progress: bool | Progress, total: int) -> Progress | None:
    if progress is True:
        return library_bar("load", total)
    return progress or None


def _check_prefer(prefer: str) -> None:
    if prefer not in ("gpu-direct", "cpu-decrypt"):
        raise ValueError(f"prefer must be 'gpu-direct' or 'cpu-decrypt', not {prefer!r}")


def load_file(
    src: Any,
    device: str | int = "cpu",
    *,
    threads: int | None = None,
    identities: Sequence[IdentitySpec] = (),
    store: Any = None,
    tenant: str | None = None,
    progress: bool | Progress = False,
    prefer: str = "gpu-direct",
    allow_table_aes: bool = False,
    guard: Any = None,
    module: Any = None,
    plan: Any = None,
    verify_signature: bool = False,
    public_key: Any = None,
) -> Any:
    """Load a sealed safetensors file: the same dict ``safetensors.torch.load_file`` gives.

    Args:
        src: a sealed file path or URL, or a store reference (``sealstore+URL#NAME...``
            or ``NAME[:VERSION|@TAG][/FILE]`` with *store*); see ``sealstore.loaders.sources``.
        device: where the tensors go. ``"cuda[:N]"`` (or the int ``N``, as in
            safetensors, or a ``torch.device``) decrypts on the GPU: the ciphertext
            is staged in pinned memory and the plaintext -- the header's chunks
            too -- exists only in device memory, each tensor in its own storage
            (see ``loaders/gpu_file.py``).
        prefer: ``"cpu-decrypt"`` decrypts on the CPU and copies the tensors to
            *device* (any suite; for comparison).
        allow_table_aes: decrypt an AES-256-GCM file on the GPU all the same
            (refused by default: the device AES kernel uses lookup tables, a
            timing side channel on a shared GPU; see docs/SECURITY.md).
        threads: chunks decrypted in parallel (default: the CPU count, at most 8;
            on 2 cores 1 GiB took 330 ms with 2 threads, 418-478 ms with 3-6).
        progress: ``True`` for a progress bar (loads over half a second):
            tqdm.auto's when tqdm is installed (the ``progress`` extra: a widget in
            Jupyter, text in a log), else one on a terminal's stderr; or a callable
            given each decrypted byte count.
        guard: a ``GuardPolicy`` (or its mapping, or True for the default):
            load the tensors into *module* (every one of its parameters must be in
            the file; extra tensors are left out) and return the module with
            the inference guard on it (``sealstore.loaders.inference_guard``), its findings
            recorded against this artifact, stopped by a lockdown at the broker
            that released the key.
        module: the torch module to load into; needed with *guard*.
        plan: a tensor-parallel rank's part (a ``PartitionPlan``, a mapping
            ``name -> TensorSlice`` or a callable; ``sealstore.loaders.partition``):
            only the tensors it names, each sliced, are returned, and only the
            chunks they cover are decrypted (on the CPU; then copied to *device*).
            Of a sharded model only the shards holding them are opened.
        verify_signature: a store version: check its OMS model signature
            (``sealstore push --sign-key`` or ``--require-signature``) with
            *public_key* (an EC public key, PEM path or bytes, or a PEM file of
            root certificates for a certificate-signed model; default
            ``$SEALSTORE_OMS_PUBLIC_KEY``) before any key is asked for, and
            each file's plaintext SHA-256 against it beside the decryption;
            nothing is returned before it matched. Decrypts on the CPU.

    Returns:
        name -> tensor, each with its own storage (as safetensors gives), filled
        by decryption directly -- no other copy of the plaintext is made. With
        *guard*: *module*, guarded.

    Raises:
        AuthenticationError: any chunk, signature or hash fails (nothing is returned).
        DeviceUnavailable: a CUDA device was asked for and torch has none.
        ValueError: a GPU-direct load of an AES-256-GCM file without *allow_table_aes*.
        TensorNotFound: *plan* names a tensor the file (or the index) lacks.
        ValueError: a *plan* slice outside its tensor, or a split that does not divide evenly.
        ValueError: *verify_signature* with *plan*, a GPU-direct load, a source
            that is not a store version, or no public key.
        KeyUnavailable, NotFound, FormatError: opening the source.
    """
    if guard is not None and guard is not False and module is None:
        raise TypeError(
            "load_file(guard=...) needs module=: the guard watches the torch module the "
            "tensors are loaded into"
        )
    if verify_signature and plan is not None:
        raise ValueError("verify_signature hashes whole files; a plan= load reads parts of them")
    if plan is not None:
        if guard is not None and guard is not False:
            raise TypeError("load_file(plan=...) loads part of a model; it cannot be guarded")
        plan = as_plan(plan)
    _check_prefer(prefer)
    device = _device(device)
    if verify_signature and isinstance(src, SealedFile):
        raise ValueError("verify_signature checks a store version: name it, not an open file")
    if verify_signature and device.startswith("cuda") and prefer == "gpu-direct":
        raise ValueError(
            "verify_signature hashes the plaintext on the CPU as it is decrypted: "
            "use prefer='cpu-decrypt' (or load without it on the GPU)"
        )
    if device.startswith("cuda"):
        from sealstore.loaders.gpu import check_device

        check_device(device)  # before any key is asked for
    art = whole_artifact(
        src,
        store,
        tenant,
        identities,
        caller="load_file",
        verify_signature=verify_signature,
        public_key=public_key,
    )
    if art is not None:
        with art:
            index, files = weight_files(art, None, how=f"as {art.name('FILE')}")
            if index is not None and plan is not None:
                return load_partition(art, index, plan, threads=threads, device=device)
            if index is not None:
                # A sharded model named as a whole: its state dict, as the index lays it out.
                tensors = load_weights(art, index, threads=threads, device=device, prefer=prefer)
                if guard is None or guard is False:
                    return tensors
                return _guarded(src, tensors, module, guard, None, identities, art)
        if isinstance(art, SealedFolder):
            opened = art.open(files[0])
            src = opened  # closed by _read below
        else:
            src, store = f"{art.where}/{files[0]}", art.store
    opened = open_source(
        src,
        store=store,
        tenant=tenant,
        identities=identities,
        verify_signature=verify_signature,
        public_key=public_key,
    )
    own = opened is not src or art is not None
    if plan is not None:
        where = art.name(files[0]) if art is not None else _where(src)
        return _read(opened, own, device, threads, progress, prefer, (plan, where))
    tensors = _read(opened, own, device, threads, progress, prefer, allow_table_aes=allow_table_aes)
    if guard is None or guard is False:
        return tensors
    return _guarded(src, tensors, module, guard, opened, identities, None)


def _guarded(
    src: Any,
    tensors: dict[str, Any],
    module: Any,
    guard: Any,
    opened: SealedFile | None,
    identities: Sequence[IdentitySpec],
    art: Any,
) -> Any:
    from sealstore.loaders.inference_guard import guard_loaded

    # Every parameter and saved buffer of the module comes from the file; tensors the
    # module does not have (a legacy position_ids buffer) are left out.
    result = module.load_state_dict(tensors, strict=False)
    if result.missing_keys:
        raise ValueError(
            f"{src} lacks {len(result.missing_keys)} tensor(s) of {type(module).__name__}, "
            f"e.g. {result.missing_keys[0]}"
        )
    if art is not None:
        return guard_loaded(
            module, guard, manifest=art.manifest, store=art.store, identities=identities
        )
    return guard_loaded(module, guard, opened, identities=identities)


def _where(src: Any) -> str:
    """How error lines name a loader's *src*."""
    return str(os.fspath(src)) if isinstance(src, (str, os.PathLike)) else "the sealed file"


def _read(
    opened: SealedFile,
    own: bool,
    device: str,
    threads: int | None,
    progress: bool | Progress,
    prefer: str,
    plan: tuple[PartitionPlan, str] | None = None,
    *,
    allow_table_aes: bool = False,
) -> dict[str, Any]:
    # own: a SealedFile the caller passed stays open
    with opened if own else contextlib.nullcontext(opened) as sf:
        if plan is None and device.startswith("cuda") and prefer == "gpu-direct":
            from sealstore.loaders.gpu_file import opened as gpu_opened

            # The header too is decrypted on the device: no plaintext byte on the host.
            with gpu_opened(sf, device, allow_table_aes) as gpu:
                return gpu.tensors(_torch_entries(gpu.layout))
        layout = Layout.before_full_read(sf)
        if plan is not None:
            slices = plan[0].resolve(layout.entries, plan[1], strict=True)
            return _read_slices(sf, layout, slices, device, threads, progress)
        return _read_all(sf, layout, device, threads, progress, prefer)


def _read_slices(
    sf: SealedFile,
    layout: Layout,
    slices: Mapping[str, tuple[int, int, int] | None],
    device: str,
    threads: int | None,
    progress: bool | Progress,
) -> dict[str, Any]:
    """The tensors of *slices* (name -> ``(dim, start, stop)``, None: whole), in file order.

    Whole tensors and dim-0 slices (one byte range each) are decrypted in one
    ``read_scatter`` pass straight into their own buffers. A slice of dim > 0
    is one segment per row, and ``read_scatter`` pays Python time for every
    piece (2.4x the whole tensor's load for 8,192 rows, measured): such a
    tensor is decrypted whole into a scratch buffer, reused and wiped after
    each, and its slice copied out with one strided copy. It touches every
    chunk of the tensor either way. For a *device* other than the CPU the
    slices are decrypted on the host, copied, and the host buffers wiped.
    """
    import numpy as np
    import torch

    out, pieces, strided = {}, [], []
    for name in layout.offset_keys():
        if name not in slices:
            continue
        code, shape, start, end = layout.entries[name]
        part = slices[name]
        if part is None:
            sliced, ranges = shape, [(0, end - start)]
        else:
            sliced, ranges = byte_ranges(name, code, shape, *part)
        dtype, tshape = _torch_entry(name, code, sliced)
        buf = torch.empty(sum(b - a for a, b in ranges), dtype=torch.uint8)
        out[name] = (buf, dtype, tshape)
        if len(ranges) > 1:
            # ranges[k] = (k * row + lo, k * row + lo + n): rows of *row* bytes.
            row = ranges[1][0] - ranges[0][0]
            strided.append((start, end, row, ranges[0][0], ranges[0][1] - ranges[0][0], buf))
        elif ranges:
            pieces.append((layout.data_start + start + ranges[0][0], buf.numpy()))
    total = sum(len(v) for _, v in pieces) + sum(item[-1].numel() for item in strided)
    bar = _progress(progress, total)
    threads = threads or default_threads()
    try:
        sf.read_scatter(pieces, threads=threads, progress=bar)
        if strided:
            scratch = torch.empty(max(e - s for s, e, *_ in strided), dtype=torch.uint8)
            try:
                for start, end, row, lo, n, buf in strided:
                    whole = scratch[: end - start]
                    sf.read_into(layout.data_start + start, whole.numpy(), threads=threads)
                    # numpy copies row by row with memcpy: 4x torch's uint8 copy_ (measured).
                    np.copyto(
                        buf.numpy().reshape(-1, n), whole.numpy().reshape(-1, row)[:, lo : lo + n]
                    )
                    if bar is not None:
                        bar(buf.numel())
            finally:
                scratch.zero_()  # other ranks' parts never outlive the load
    except BaseException:
        for buf, *_ in out.values():
            buf.zero_()
        raise
    finally:
        if isinstance(bar, LibraryBar):
            bar.close()
    return _typed_on(out, device)


def _typed_on(out: dict[str, Any], device: str) -> dict[str, Any]:
    """name -> tensor from *out*'s ``(uint8 buffer, dtype, shape)``, moved to *device*.

    For another device the host buffers are zeroed once the copies have read
    them: the plaintext stays on the host no longer than the copy.
    """
    tensors = {name: buf.view(dtype).reshape(shape) for name, (buf, dtype, shape) in out.items()}
    if device != "cpu":
        try:
            tensors = {k: v.to(device) for k, v in tensors.items()}
        finally:
            # A blocking copy has read the host buffer when .to returns.
            for buf, *_ in out.values():
                buf.zero_()
    return tensors


def _read_all(
    sf: SealedFile,
    layout: Layout,
    device: str,
    threads: int | None,
    progress: bool | Progress,
    prefer: str,
) -> dict[str, Any]:
    """Every tensor of *sf*, in file order (as ``safetensors`` returns them)."""
    import torch

    entries = _torch_entries(layout)
    # One buffer per tensor, like safetensors: saving, pickling or keeping
    # one tensor must never carry the rest of the decrypted model with it.
    # read_scatter still decrypts every chunk once, straight into them.
    out, pieces = {}, []
    for name, (dtype, shape, start, end) in entries.items():
        buf = torch.empty(end - start, dtype=torch.uint8)
        pieces.append((layout.data_start + start, buf.numpy()))
        out[name] = (buf, dtype, shape)
    bar = _progress(progress, layout.data_size)
    try:
        sf.read_scatter(pieces, threads=threads or default_threads(), progress=bar)
    finally:
        if isinstance(bar, LibraryBar):
            bar.close()
    return _typed_on(out, device)


def load(
    data: bytes | bytearray | memoryview,
    *,
    identities: Sequence[IdentitySpec] = (),
    threads: int | None = None,
) -> dict[str, Any]:
    """Load sealed safetensors bytes (what :func:`save` returns), as ``safetensors.torch.load``.

    Args:
        data: the sealed file's bytes.
        identities: identity files or unwrappers to try first.
        threads: chunks decrypted in parallel.

    Returns:
        name -> CPU tensor, each with its own storage, in file order.

    Raises:
        TypeError: *data* is not bytes-like.
        AuthenticationError, KeyUnavailable, FormatError: opening *data*.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load() takes the sealed bytes, not {type(data).__name__}")
    return _read(open_sealed(data, identities), True, "cpu", threads, False, "cpu-decrypt")


def load_state_dict(
    module: Any,
    src: Any,
    *,
    strict: bool = True,
    guard: Any = None,
    device: str | int = "cpu",
    threads: int | None = None,
    identities: Sequence[IdentitySpec] = (),
    store: Any = None,
    tenant: str | None = None,
    progress: bool | Progress = False,
    prefer: str = "gpu-direct",
    allow_table_aes: bool = False,
    plan: Any = None,
    verify_signature: bool = False,
    public_key: Any = None,
) -> Any:
    """``module.load_state_dict(load_file(src, ...), strict=strict)``; returns its result.

    With *guard* (a ``GuardPolicy``): every parameter from *src*; returns *module*, guarded
    (``load_file(src, guard=..., module=module)``).

    Args:
        module: the ``torch.nn.Module`` to load into.
        src: as :func:`load_file`.
        strict: as ``torch.nn.Module.load_state_dict``; a guarded load is always strict.
        guard, device, threads, identities, store, tenant: as :func:`load_file`.
        progress, prefer, allow_table_aes, plan: as :func:`load_file`.
        verify_signature, public_key: as :func:`load_file`.

    Returns:
        What ``module.load_state_dict`` returns (missing and unexpected keys), or with
        *guard* the guarded *module*.

    Raises:
        ValueError: a guard with ``strict=False``.
        AuthenticationError, KeyUnavailable, NotFound, FormatError, DeviceUnavailable: as
            :func:`load_file`.
    """
    guarded = guard is not None and guard is not False
    if guarded and not strict:
        raise ValueError("a guarded load is strict: every parameter comes from the artifact")
    loaded = load_file(
        src,
        device,
        threads=threads,
        identities=identities,
        store=store,
        tenant=tenant,
        progress=progress,
        prefer=prefer,
        allow_table_aes=allow_table_aes,
        guard=guard if guarded else None,
        module=module if guarded else None,
        plan=plan,
        verify_signature=verify_signature,
        public_key=public_key,
    )
    return loaded if guarded else module.load_state_dict(loaded, strict=strict)


class _Slice:
    """``get_slice(name)``: shape and dtype for free; ``[a:b]`` decrypts only those rows."""

    def __init__(self, owner: SafeOpen, name: str) -> None:
        self._owner = owner
        self._name = name
        self._code, self._shape, self._start, self._end = owner._layout.entry(name)

    def get_shape(self) -> list[int]:
        """The header's shape (for F4, twice torch's last dimension, as safetensors says)."""
        return list(self._shape)

    def get_dtype(self) -> str:
        """The safetensors dtype code (``"F32"``, ``"BF16"``...)."""
        return self._code

    def __getitem__(self, index: Any) -> Any:
        first = index[0] if isinstance(index, tuple) and index else index
        rest = index[1:] if isinstance(index, tuple) else ()
        # Rows are whole bytes except for a 1-D F4 tensor: that one is read whole.
        rows = len(self._shape) > (1 if self._code == "F4" else 0)
        if isinstance(first, slice) and first.step in (None, 1) and rows:
            lo, hi, _ = first.indices(self._shape[0])
            part = self._owner._read_part(self._name, (0, lo, max(lo, hi)))
            return part[(slice(None), *rest)] if rest else part
        return self._owner.get_tensor(self._name)[index]


class SafeOpen:
    """Lazy access to a sealed safetensors file; use :func:`safe_open`."""

    def __init__(
        self,
        src: Any,
        framework: str = "pt",
        device: str | int = "cpu",
        *,
        identities: Sequence[IdentitySpec] = (),
        store: Any = None,
        tenant: str | None = None,
        check_digest: bool = False,
        threads: int | None = None,
        prefer: str = "gpu-direct",
        allow_table_aes: bool = False,
        plan: Any = None,
        verify_signature: bool = False,
        public_key: Any = None,
    ) -> None:
        self._gpu: Any = None
        if framework not in _FRAMEWORKS:
            raise ValueError(
                f"framework {framework!r} is not supported (only 'pt' / 'torch', 'np' / 'numpy')"
            )
        self._framework = _FRAMEWORKS[framework]
        _check_prefer(prefer)
        device = _device(device)
        if self._framework == "np" and device != "cpu":
            raise ValueError(f"device {device!r} is not supported for framework numpy")
        self._gpu_direct = device.startswith("cuda") and prefer == "gpu-direct"
        self._prefer = prefer
        if device.startswith("cuda"):
            from sealstore.loaders.gpu import check_device

            check_device(device)
        self._device = device
        self._threads = threads or default_threads()
        self._plan = None if plan is None else as_plan(plan)
        key = None
        if verify_signature:
            key = _signature_key(src, store, public_key, device, prefer)
        where = _where(src)
        art = whole_artifact(
            src,
            store,
            tenant,
            identities,
            caller="safe_open",
            verify_signature=verify_signature,
            public_key=public_key,
        )
        if art is not None:
            with art:
                index, files = weight_files(art, None, how=f"as {art.name('FILE')}")
                if index is not None:
                    _by_tensor, files = shards(art, index)
                    raise NotFound(
                        f"{art.where} is a sharded model: {index} names {len(files)} "
                        f"shards; safe_open opens one file, e.g. {art.name(min(files))} "
                        "(load_file or from_pretrained of the whole model loads them all)"
                    )
            where = art.name(files[0])
            if isinstance(art, SealedFolder):
                src = art.open(files[0])
                self._sf = src
            else:
                src, store = f"{art.where}/{files[0]}", art.store
        if art is None or not isinstance(art, SealedFolder):
            self._sf = open_source(
                src, store=store, tenant=tenant, identities=identities, check_digest=check_digest
            )
        # A SealedFile the caller passed stays open (one opened here from a folder does not).
        self._own = self._sf is not src or art is not None
        try:
            if key is not None:
                # Random access: any tensor may be read first, so the whole
                # file is checked now, in one streaming pass (see safe_open).
                verify_at_open(self._sf, key, threads=self._threads)
            if self._gpu_direct:
                from sealstore.loaders.gpu_file import GpuFile

                # Kept until close: key, staging and scratch are set up once per file.
                self._gpu = GpuFile(self._sf, device, allow_table_aes=allow_table_aes)
                self._layout = self._gpu.layout
            else:
                self._layout = Layout(self._sf)
            # name -> (dim, start, stop) or None (whole): this rank's part, or every tensor whole.
            self._slices: dict[str, tuple[int, int, int] | None] = (
                dict.fromkeys(self._layout.entries)
                if self._plan is None
                else self._plan.resolve(self._layout.entries, where, strict=True)
            )
        except BaseException:
            self.close()
            raise

    def keys(self) -> list[str]:
        """The tensor names, sorted (with a plan: the tensors it loads)."""
        return sorted(self._slices)

    def offset_keys(self) -> list[str]:
        """The tensor names in file order (by offset; with a plan: the tensors it loads)."""
        return [k for k in self._layout.offset_keys() if k in self._slices]

    def metadata(self) -> dict[str, str] | None:
        """``__metadata__``: ``{}`` when the file has an empty one, None when it has none."""
        return self._layout.metadata

    def _read(self, name: str, start: int, end: int, code: str, shape: list[int]) -> Any:
        if self._framework == "np":
            from sealstore.loaders.safetensors_np import read_array

            return read_array(self._sf, self._layout, name, start, end, code, shape, self._threads)
        import torch

        dtype, shape = _torch_entry(name, code, shape)
        if self._gpu is not None:
            return self._gpu.tensor(start, end, dtype, shape)
        buf = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            self._sf.read_into(self._layout.data_start + start, buf.numpy(), threads=self._threads)
        t = buf.view(dtype).reshape(shape)
        if self._device == "cpu":
            return t
        try:
            return t.to(self._device)
        finally:
            buf.zero_()  # decrypted on the host (prefer="cpu-decrypt"): wiped once copied

    def _read_part(self, name: str, part: tuple[int, int, int] | None) -> Any:
        """Tensor *name*, whole (*part* None) or its ``(dim, start, stop)`` slice."""
        self._check_open()
        code, shape, start, end = self._layout.entry(name)
        if part is None:
            return self._read(name, start, end, code, shape)
        sliced, ranges = byte_ranges(name, code, shape, *part)
        if len(ranges) <= 1:  # one contiguous range: the plain path (numpy, GPU-direct too)
            a, b = ranges[0] if ranges else (0, 0)
            return self._read(name, start + a, start + b, code, sliced)
        if self._framework == "np":
            raise ValueError(f"a slice of {name} along dim {part[0]} > 0 needs framework 'pt'")
        one = {name: part}
        return _read_slices(self._sf, self._layout, one, self._device, self._threads, False)[name]

    def get_tensor(self, name: str) -> Any:
        """Decrypt only the chunks this tensor covers (with a plan: this rank's slice of it).

        Raises:
            TensorNotFound: no such tensor (a ``KeyError`` and safetensors'
                ``SafetensorError``), or one the plan does not load.
            ValueError: a GPU-direct ``safe_open`` used after close.
        """
        if name not in self._slices:
            if name in self._layout.entries:
                raise TensorNotFound(f"tensor {name} is not in this rank's plan")
            self._layout.entry(name)  # raises safetensors' message
        return self._read_part(name, self._slices[name])

    def get_tensors(self) -> dict[str, Any]:
        """Every tensor, in file order: what ``load_file`` gives, in one decrypting pass.

        With a plan: this rank's slices, in one pass (as ``load_file(plan=...)``).

        Raises:
            AuthenticationError: any chunk fails (nothing is returned).
            ValueError: a GPU-direct ``safe_open`` used after close.
        """
        self._check_open()
        if self._plan is not None:
            if self._framework == "np":
                return {k: self._read_part(k, v) for k, v in self._slices.items()}
            return _read_slices(
                self._sf, self._layout, self._slices, self._device, self._threads, False
            )
        if self._framework == "np":
            from sealstore.loaders.safetensors_np import read_arrays

            return read_arrays(self._sf, self._layout, self._threads)
        if self._gpu is not None:
            return self._gpu.tensors(_torch_entries(self._layout))
        return _read_all(self._sf, self._layout, self._device, self._threads, False, self._prefer)

    def _check_open(self) -> None:
        """Refuse a GPU-direct file after close: never fall back to decrypting on the host.

        Raises:
            ValueError: this GPU-direct ``safe_open`` is closed.
        """
        if self._gpu_direct and self._gpu is None:
            raise ValueError("this GPU-direct safe_open is closed")

    def get_slice(self, name: str) -> _Slice:
        """Shape and dtype without decrypting; index it to decrypt only those rows.

        Raises:
            TensorNotFound: no such tensor.
        """
        return _Slice(self, name)

    def close(self) -> None:
        """Close the file (one the caller passed in as a ``SealedFile`` stays open).

        A GPU-direct file's device key and scratch are wiped and its buffers released.
        """
        gpu, self._gpu = self._gpu, None
        try:
            if gpu is not None:
                gpu.close()
        finally:
            if self._own:
                self._sf.close()

    def __enter__(self) -> SafeOpen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _signature_key(src: Any, store: Any, public_key: Any, device: str, prefer: str) -> Any:
    """The public key ``safe_open(verify_signature=True)`` checks with, or why it cannot.

    Raises:
        ValueError: not a store version, a GPU-direct open (the check decrypts
            on the CPU), or no public key.
    """
    from sealstore.vault.oms import public_key_from

    text = os.fspath(src) if isinstance(src, (str, os.PathLike)) else None
    if text is None or not (text.startswith(PREFIX) or store is not None):
        raise ValueError(
            "verify_signature checks a store version's model signature: "
            "name one (sealstore+URL#NAME... or store=)"
        )
    if device.startswith("cuda") and prefer == "gpu-direct":
        raise ValueError(
            "verify_signature hashes the plaintext on the CPU at open: "
            "use prefer='cpu-decrypt' (or open without it on the GPU)"
        )
    return public_key_from(public_key)


def safe_open(
    src: Any,
    framework: str = "pt",
    device: str | int = "cpu",
    *,
    identities: Sequence[IdentitySpec] = (),
    store: Any = None,
    tenant: str | None = None,
    check_digest: bool = False,
    threads: int | None = None,
    prefer: str = "gpu-direct",
    allow_table_aes: bool = False,
    plan: Any = None,
    verify_signature: bool = False,
    public_key: Any = None,
) -> SafeOpen:
    """Open a sealed safetensors file lazily, as ``safetensors.safe_open``.

    ``keys``, ``offset_keys``, ``get_tensor``, ``get_tensors``, ``get_slice``,
    ``metadata``. Only the chunks a requested tensor covers are read and
    decrypted. For a store reference the manifest and object header are
    checked on open; the whole-object digest is skipped by default to keep
    access lazy (pass ``check_digest=True`` to hash the object first).
    ``threads`` decrypt the chunks of one tensor in parallel (default: the CPU
    count, at most 8).

    *framework* is ``"pt"`` (or ``"torch"``) for torch tensors, ``"np"`` (or
    ``"numpy"``) for numpy arrays (CPU only; torch is not imported).

    With ``device="cuda[:N]"`` (or the int ``N``, or a ``torch.device``) the
    header and each requested tensor's chunks are decrypted on the GPU (as
    ``load_file`` does; each tensor in its own storage); the device key,
    staging and scratch are set up once on open and wiped at close.
    ``prefer="cpu-decrypt"`` decrypts on the CPU and copies. An AES-256-GCM
    file needs ``allow_table_aes=True`` on the GPU (see ``load_file``).

    ``plan=`` (as for ``load_file``): ``keys`` lists the tensors the plan loads,
    ``get_tensor`` returns this rank's slice, ``get_tensors`` all of them in one
    pass; ``get_slice`` still indexes the whole tensor. The plan is checked
    against the header on open.

    ``verify_signature=True`` (a store version): the version's OMS model
    signature is checked with *public_key* (an EC public key, PEM path or
    bytes, or root certificates; default ``$SEALSTORE_OMS_PUBLIC_KEY``), and
    the file's plaintext SHA-256 against it **at open**, in one streaming
    pass: a random-access reader may read any tensor first, and none may be
    returned before the file matched. That pass costs one decryption and one
    SHA-256 of the whole file (on the CPU) before the first tensor; the
    tensors read afterwards are decrypted again. To load every tensor,
    ``load_file(verify_signature=True)`` hashes beside its single decryption.

    Args:
        src, device, identities, store, tenant, threads, prefer, allow_table_aes, plan:
            as :func:`load_file`.
        framework: ``"pt"``/``"torch"`` or ``"np"``/``"numpy"``.
        check_digest: a store reference: hash the whole object on open.
        verify_signature, public_key: check the OMS model signature at open (above).

    Returns:
        The open file (a context manager; ``close`` wipes its key).

    Raises:
        ValueError: an unsupported framework, or numpy with a device other than the CPU,
            or a plan slice outside its tensor.
        TensorNotFound: the plan names a tensor the file lacks.
        DeviceUnavailable: a CUDA device was asked for and torch has none.
        ValueError: *verify_signature* for a source that is not a store version,
            a GPU-direct open, or without a public key.
        AuthenticationError, KeyUnavailable, NotFound, FormatError: opening the
            source; with *verify_signature*, no signature, another signer's, or a
            file that differs from it.
    """
    return SafeOpen(
        src,
        framework,
        device,
        identities=identities,
        store=store,
        tenant=tenant,
        check_digest=check_digest,
        threads=threads,
        prefer=prefer,
        allow_table_aes=allow_table_aes,
        plan=plan,
        verify_signature=verify_signature,
        public_key=public_key,
    )


class SharedTensors(ValueError, RuntimeError):
    """Tensors passed to ``save_file`` overlap in memory (tied weights: use ``save_model``).

    A ``ValueError`` (sealstore's misuse) and a ``RuntimeError`` (what
    ``safetensors.torch.save_file`` raises), so code written for either catches it.
    """


def _header(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None) -> tuple[bytes, list]:
    """The safetensors header for *tensors*, and the tensors in file order (``header_bytes``)."""
    import torch

    if not isinstance(tensors, Mapping):
        raise ValueError(f"expected a dict of str -> torch.Tensor, not {type(tensors).__name__}")
    codes = {v: k for k, v in _dtypes().items()}
    shared: dict[tuple[Any, int], list[tuple[int, int, str]]] = {}
    items, values = [], []
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"tensor names must be strings, not {type(name).__name__}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name!r} is not a torch.Tensor but {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"{name!r} is a sparse tensor; make it dense first")
        if not t.is_contiguous():
            raise ValueError(f"{name!r} is not contiguous; call .contiguous() before saving")
        if t.dtype not in codes:
            raise ValueError(f"{name!r} has a dtype safetensors cannot store: {t.dtype}")
        shape = list(t.shape)
        if codes[t.dtype] == "F4":
            if not shape:
                raise ValueError(f"{name!r}: a 0-d F4 tensor does not end on a byte boundary")
            shape[-1] *= 2  # the header counts 4-bit values, torch counts bytes
        if t.numel():
            lo = t.storage_offset() * t.element_size()
            key = (t.device, t.untyped_storage().data_ptr())
            shared.setdefault(key, []).append((lo, lo + t.numel() * t.element_size(), name))
        items.append((name, codes[t.dtype], shape, t.numel() * t.element_size()))
        values.append(t)
    for ranges in shared.values():
        ranges.sort()
        for (_, end, a), (start, _, b) in itertools.pairwise(ranges):
            if start < end:
                raise SharedTensors(
                    f"tensors {a!r} and {b!r} share memory; save one of them, or the model "
                    "with save_model (tied weights)"
                )
    head, order = header_bytes(items, metadata)
    return head, [(items[i][0], values[i]) for i in order]


def _seal(
    head: bytes,
    order: list,
    out: Any,
    keys: Sequence[KeySpec],
    context: Mapping[str, str] | None,
    dek_from: KeySpec | None,
    threads: int,
) -> None:

    total = len(head) + sum(t.numel() * t.element_size() for _, t in order)
    with seal_writer(
        out, keys, context=context, plaintext_size=total, threads=threads, dek_from=dek_from
    ) as writer:
        write_tensors(writer, head, order)


def write_tensors(writer: Any, head: bytes, order: list) -> int:
    """Write a safetensors file -- *head* and *order* from ``_header`` -- into *writer*.

    Each tensor's bytes go straight from its own memory (a CUDA tensor is
    copied to the CPU one at a time): nothing is serialised whole.

    Returns:
        The bytes written.
    """
    import torch

    writer.write(head)
    total = len(head)
    for _, t in order:
        if t.numel():
            data = t.detach().to("cpu").reshape(-1).view(torch.uint8)
            writer.write(data.numpy())
            total += data.numel()
    return total


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

    Args:
        tensors: name -> contiguous, dense tensor.
        dst: the sealed file to write.
        keys: the key specs the data key is wrapped for.
        metadata: the ``__metadata__`` string map (``{}`` is written as ``{}``).
        context: the encryption context.
        dek_from: reuse this key's data key (see ``seal_writer``).
        threads: chunks sealed in parallel.

    Raises:
        ValueError: a tensor safetensors cannot store (nothing is written).
        SharedTensors: two tensors overlap in memory (also a ``RuntimeError``).
    """
    head, order = _header(tensors, metadata)
    with atomic_output(dst) as out:
        _seal(head, order, out, keys, context, dek_from, threads)


def save(
    tensors: Mapping[str, Any],
    *,
    keys: Sequence[KeySpec],
    metadata: Mapping[str, str] | None = None,
    context: Mapping[str, str] | None = None,
    dek_from: KeySpec | None = None,
    threads: int = 2,
) -> bytes:
    """``save_file`` into memory: the sealed bytes, as ``safetensors.torch.save`` returns its own.

    Only ciphertext is held in memory; the plaintext is never assembled.

    Raises:
        ValueError, SharedTensors: as :func:`save_file`.
    """
    head, order = _header(tensors, metadata)
    out = io.BytesIO()
    _seal(head, order, out, keys, context, dek_from, threads)
    return out.getvalue()


def save_model(
    model: Any,
    dst: str | os.PathLike[str],
    *,
    keys: Sequence[KeySpec],
    metadata: Mapping[str, str] | None = None,
    force_contiguous: bool = True,
    context: Mapping[str, str] | None = None,
    dek_from: KeySpec | None = None,
    threads: int = 2,
) -> None:
    """Seal a torch module's state dict, tied weights included, as ``safetensors.torch.save_model``.

    Of each group of tensors sharing memory (tied embeddings) one name is kept
    -- the name safetensors keeps, chosen by its own code -- and each dropped
    name is recorded in the metadata as ``dropped -> kept`` (unless the caller's
    metadata already has that key), so the plaintext is byte for byte what
    ``save_model`` writes. :func:`load_model` restores the ties.

    Args:
        model: the ``torch.nn.Module``.
        dst: the sealed file to write.
        keys, metadata, context, dek_from, threads: as :func:`save_file` (*metadata*
            is not modified).
        force_contiguous: save non-contiguous tensors as contiguous copies.

    Raises:
        ValueError: a tensor that cannot be stored.
        RuntimeError: a group of shared tensors none of which covers its whole storage.
    """
    # safetensors' private helper, so the kept names match its by construction;
    # tests/test_loaders_parity.py compares the plaintext with save_model's.
    from safetensors.torch import _remove_duplicate_names

    state_dict = model.state_dict()
    meta = dict(metadata) if metadata is not None else None
    for kept, dropped in _remove_duplicate_names(state_dict).items():
        for name in dropped:
            meta = {} if meta is None else meta
            meta.setdefault(name, kept)
            del state_dict[name]
    if force_contiguous:
        state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    try:
        save_file(
            state_dict,
            dst,
            keys=keys,
            metadata=meta,
            context=context,
            dek_from=dek_from,
            threads=threads,
        )
    except ValueError as exc:
        raise ValueError(f"{exc}; or use save_model(..., force_contiguous=True)") from None


def load_model(
    model: Any,
    src: Any,
    *,
    strict: bool = True,
    device: str | int = "cpu",
    threads: int | None = None,
    identities: Sequence[IdentitySpec] = (),
    store: Any = None,
    tenant: str | None = None,
    progress: bool | Progress = False,
    prefer: str = "gpu-direct",
    allow_table_aes: bool = False,
    plan: Any = None,
    verify_signature: bool = False,
    public_key: Any = None,
) -> tuple[list[str], list[str]]:
    """Load a sealed file into *model*, restoring tied weights, as ``safetensors.torch.load_model``.

    Args:
        model: the ``torch.nn.Module`` to load into.
        src: as :func:`load_file`.
        strict: raise if a parameter is missing or a tensor unexpected.
        device, threads, identities, store, tenant: as :func:`load_file`.
        progress, prefer, allow_table_aes, plan: as :func:`load_file`.
        verify_signature, public_key: as :func:`load_file`.

    Returns:
        ``(missing, unexpected)``: names of *model* the file did not fill (a
        tied name whose partner was loaded does not count), and tensors of the
        file the model has no place for.

    Raises:
        RuntimeError: *strict* and something missing or unexpected (safetensors' message).
        AuthenticationError, KeyUnavailable, NotFound, FormatError, DeviceUnavailable: as
            :func:`load_file`.
    """
    from safetensors.torch import _remove_duplicate_names

    state_dict = load_file(
        src,
        device,
        threads=threads,
        identities=identities,
        store=store,
        tenant=tenant,
        progress=progress,
        prefer=prefer,
        allow_table_aes=allow_table_aes,
        plan=plan,
        verify_signature=verify_signature,
        public_key=public_key,
    )
    to_removes = _remove_duplicate_names(model.state_dict(), preferred_names=state_dict.keys())
    missing_keys, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = set(missing_keys)
    for group in to_removes.values():
        for name in group:
            if name not in missing:
                unexpected.append(name)
            else:
                missing.remove(name)
    if strict and (missing or unexpected):
        error = f"Error(s) in loading state_dict for {model.__class__.__name__}:"
        if missing:
            error += "\n    Missing key(s) in state_dict: " + ", ".join(
                f'"{k}"' for k in sorted(missing)
            )
        if unexpected:
            error += "\n    Unexpected key(s) in state_dict: " + ", ".join(
                f'"{k}"' for k in sorted(unexpected)
            )
        raise RuntimeError(error)
    return sorted(missing), list(unexpected)
