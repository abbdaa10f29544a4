"""``save_pretrained``: a transformers model (fine-tuned from a sealed base or not) saved sealed.

What ``model.save_pretrained(folder)`` writes -- ``config.json``,
``generation_config.json`` for a generative model, the tokenizer's files,
the weights as safetensors (one file, or shards and their
``model.safetensors.index.json``) -- sealed, either as a new version of a
store artifact or as a local sealed folder (every file ``REL`` as
``REL.seal``; see ``sealstore.loaders.artifact``). Both load back with
``from_pretrained`` / ``load_tokenizer``.

The weights are prepared as transformers prepares them (tied copies dropped
by its own ``remove_tied_weights_from_state_dict``, its weight conversions
reverted, split by ``huggingface_hub.split_torch_state_dict_into_shards``)
and each shard is streamed into the sealing writer, tensor by tensor from
the tensors' own memory: a shard is never serialised whole, and no weight
reaches a file in plaintext. The configs and the tokenizer are written by
transformers' own ``save_pretrained`` (so they are exactly what it writes)
into a private memory-backed folder, read back and sealed; the folder is
removed at once (``sealstore.loaders.scratch``).

Atomic: a store version is committed by its signed manifest, written last;
a folder is built under a hidden temporary name beside the destination and
renamed into place once every file is sealed and synced. A failure leaves
no version and no folder.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from sealstore.kms.envelope import KeySpec, seal_writer
from sealstore.loaders.artifact import INDEX, SUFFIX
from sealstore.loaders.sources import PREFIX

__all__ = ["save_pretrained"]

Producer = Callable[[IO[bytes]], object]


def save_pretrained(
    model: Any,
    dst: str | os.PathLike[str],
    *,
    keys: Sequence[KeySpec] = (),
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
    store: Any = None,
    tenant: str | None = None,
    dek_from: KeySpec | None = None,
    parent: str | None = "auto",
    threads: int = 2,
    scratch_dir: str | os.PathLike[str] | None = None,
) -> str:
    """Save *model* (and *tokenizer*) sealed, as ``model.save_pretrained`` lays it out.

    Args:
        model: a transformers ``PreTrainedModel``.
        dst: a store reference (``sealstore+URL#NAME[:VERSION]``, or ``NAME``
            with *store*): pushed as a new version; or a local folder that
            does not exist yet (or is empty): written as a sealed folder.
        keys: key URIs the data keys are wrapped to (``local:``,
            ``x25519:...``, ``vault-transit://...``, ``aws-kms://...``).
        tokenizer: a tokenizer to save beside the model.
        max_shard_size: the largest shard, as transformers takes it (``"5GB"``,
            ``"200MB"``, an int of bytes); a bigger model is sharded with an index.
        safe_serialization: must be True: weights are saved as safetensors only.
        store, tenant: where a bare ``NAME`` is pushed, and the tenant.
        dek_from: a key whose service generates the data key (Vault, KMS).
        parent: for a store version, the version it derives from, recorded in
            its signed manifest and BoM -- the sealed base it was fine-tuned
            from, e.g. ``"minilm:3"`` (default: the artifact's newest version).
        threads: chunks sealed in parallel.
        scratch_dir: the memory-backed directory the configs and tokenizer
            files pass through (default ``/dev/shm``).

    Returns:
        What ``from_pretrained`` and ``load_tokenizer`` take to load it: the
        folder, or ``sealstore+URL#NAME:VERSION``.

    Raises:
        ValueError: no keys, ``safe_serialization=False``, a model that cannot
            be saved this way (quantized, with adapters, remote code, weights
            offloaded to the meta device).
        FileExistsError: the folder exists and is not empty, or the version exists.
        KeyUnavailable, BackendError: from the key providers and the storage.
    """
    if not safe_serialization:
        raise ValueError("safe_serialization=False is refused: sealed weights are safetensors only")
    if not keys and dek_from is None:
        raise ValueError("save_pretrained needs keys=[...] (or dek_from=) to seal with")
    target = _target(dst, store)
    files = _files(model, tokenizer, max_shard_size, scratch_dir)
    if isinstance(target, Path):
        _write_folder(target, files, keys, dek_from, threads)
        return str(target)
    st, ref = target
    m = st.push(
        files, ref, keys=keys, dek_from=dek_from, tenant=tenant, parent=parent, threads=threads
    )
    return f"{PREFIX}{st.url}#{m.name}:{m.version}"


def _target(dst: str | os.PathLike[str], store: Any) -> Path | tuple[Any, str]:
    """A folder, or (Store, NAME[:VERSION]) to push to; refused before any work."""
    from sealstore.vault.store import Store

    text = os.fspath(dst)
    if text.startswith(PREFIX):
        url, sep, ref = text[len(PREFIX) :].partition("#")
        if not sep or not ref:
            raise ValueError(f"a store reference names the artifact after '#': {text!r}")
        return Store.open(url), ref
    if store is not None:
        return (store if isinstance(store, Store) else Store.open(store)), text
    path = Path(text)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"{path} exists: save_pretrained writes a new sealed folder (atomically); "
            "remove it or name another"
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} does not exist")
    return path


def _check_model(model: Any) -> Any:
    """The model itself (unwrapped from DDP and the like), refused if it cannot be saved here."""
    from transformers import PreTrainedModel
    from transformers.modeling_utils import unwrap_model

    model = unwrap_model(model)  # DDP, FSDP and the like wrap the model in .module
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"save_pretrained takes a transformers model, not {type(model).__name__}")
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError("a quantized model cannot be saved sealed (save the unquantized weights)")
    if getattr(model, "_hf_peft_config_loaded", False):
        raise ValueError("a model with adapters cannot be saved sealed (merge them first)")
    if model.is_remote_code():
        raise ValueError("a model whose code is not in transformers cannot be saved sealed")
    return model


def _weights(model: Any, max_shard_size: int | str) -> dict[str, Producer]:
    """{file: producer} of the safetensors weights, as ``model.save_pretrained`` splits them."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from sealstore.loaders.safetensors import _header, write_tensors

    state = model.state_dict()
    for name in model._keys_to_ignore_on_save or ():
        state.pop(name, None)
    meta = next((k for k, t in state.items() if t.device.type == "meta"), None)
    if meta is not None:
        raise ValueError(f"{meta} is on the meta device (offloaded): load every weight first")
    # transformers' own choice of which tied copy to keep, and its renamings undone,
    # so the files are the ones it writes.
    state = remove_tied_weights_from_state_dict(state, model)
    state = revert_weight_conversion(model, state)
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    metadata = {"format": "pt"}

    def shard(names: list[str]) -> Producer:
        def produce(out: IO[bytes]) -> None:
            # Views of the model's own tensors: only the header is built here.
            tensors = {n: state[n].contiguous() for n in names}
            head, order = _header(tensors, metadata)
            write_tensors(out, head, order)

        return produce

    files: dict[str, Producer] = {
        name: shard(names) for name, names in split.filename_to_tensors.items()
    }
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": model.num_parameters(), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        doc = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
        files[INDEX] = _bytes(doc)
    return files


def _bytes(data: bytes) -> Producer:
    return lambda out: out.write(data)


def _files(
    model: Any, tokenizer: Any, max_shard_size: int | str, scratch_dir: Any
) -> dict[str, Producer]:
    """{artifact path: producer} of everything ``model.save_pretrained`` writes."""
    from sealstore.loaders.scratch import ScratchFolder

    model = _check_model(model)
    # As transformers' save_pretrained records them in the config.
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    files: dict[str, Producer] = {}
    with ScratchFolder(scratch_dir, caller="save_pretrained") as scratch:
        folder = scratch.path
        model.config.save_pretrained(folder)
        if model.can_generate():
            model.generation_config.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                files[path.relative_to(folder).as_posix()] = _bytes(path.read_bytes())
    weights = _weights(model, max_shard_size)
    clash = sorted(files.keys() & weights.keys())
    if clash:
        raise ValueError(f"the tokenizer writes {clash[0]}, a weights file name")
    return {**files, **weights}


def _write_folder(
    dst: Path,
    files: Mapping[str, Producer],
    keys: Sequence[KeySpec],
    dek_from: KeySpec | None,
    threads: int,
) -> None:
    """Seal every file into a hidden folder beside *dst*, then rename it to *dst*."""
    from sealstore.parallel import run_jobs

    save = secrets.token_hex(8)  # the context's "version": files of one save belong together
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.sealstore-tmp-", dir=dst.parent))
    # As a push does: several files at once, one lane each (a lane per file
    # keeps the sealing writer's buffers at a chunk rather than a 16 MiB batch).
    workers = max(1, min(threads, len(files)))
    lanes = max(1, threads // workers)

    def one(rel: str, produce: Producer) -> None:
        path = tmp.joinpath(*rel.split("/")[:-1], rel.split("/")[-1] + SUFFIX)
        context = {"artifact": dst.name, "version": save, "path": rel}
        # "x" and no mkdir here: a job abandoned by an interrupt, once tmp is
        # removed, can only fail -- it never makes the folder again.
        with open(path, "xb") as out:
            with seal_writer(out, keys, context=context, threads=lanes, dek_from=dek_from) as w:
                produce(w)
            out.flush()
            os.fsync(out.fileno())

    try:
        for rel in files:
            tmp.joinpath(*rel.split("/")[:-1]).mkdir(parents=True, exist_ok=True)
        run_jobs([functools.partial(one, rel, produce) for rel, produce in files.items()], workers)
        _fsync_dir(tmp)
        try:
            # Replaces an empty folder; refused (ENOTEMPTY) if one appeared meanwhile.
            os.rename(tmp, dst)
        except OSError as exc:
            raise FileExistsError(f"{dst} appeared while saving: {exc.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(dst.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
