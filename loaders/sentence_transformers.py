"""sentence-transformers models straight from a sealed store artifact.

``load_sentence_transformer("sealstore+URL#NAME[:VERSION|@TAG]")`` builds a
``SentenceTransformer`` from one pushed sentence-transformers directory
(``modules.json``, ``config_sentence_transformers.json``, the modules' configs,
the tokenizer and the weights). The reference is resolved to one version
first, so every file comes from the same version.

sentence-transformers and transformers read configs and tokenizers only from a
directory, so the small non-weight files are decrypted into a private folder on
a memory-backed file system (``/dev/shm``, mode 0700), held locked while the
model is built and removed as soon as it is (a ``finally``, at interpreter exit,
and by the next load if this process was killed). The weights never reach a
file: each module class that reads weights is subclassed for the load so that
it takes them from ``load_file`` (decrypted in memory, every chunk
authenticated) -- the ``Transformer`` through transformers' own
``from_pretrained(state_dict=...)``, a ``Dense`` and the like through
``load_torch_weights`` -- and is set back to its own class afterwards, so the
model saves, pickles and reloads like one loaded from a folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

from sealstore.errors import FormatError, NotFound
from sealstore.kms.envelope import IdentitySpec
from sealstore.loaders.artifact import resolve_artifact
from sealstore.loaders.hf import read_artifact_file
from sealstore.loaders.safetensors import load_file
from sealstore.loaders.scratch import ScratchFolder, is_weight, scratch_root

__all__ = ["load_sentence_transformer"]

_SCRATCH_PREFIX = "sealstore-st-"


class _Weights:
    """Decrypts a module's safetensors weights from the artifact, in memory."""

    def __init__(
        self,
        store: Any,
        m: Any,
        identities: Sequence[IdentitySpec],
        threads: Any,
        public_key: Any = None,
    ) -> None:
        self.store, self.m, self.identities, self.threads = store, m, identities, threads
        self.paths = {f.path for f in m.files}
        self.public_key = public_key  # set: check the OMS model signature (loaders/oms)

    def load(self, subfolder: str) -> dict[str, Any]:
        """The state dict of the module in *subfolder* (``""``: the artifact's root).

        Raises:
            NotFound: no ``model.safetensors`` (or sharded safetensors index) there.
        """
        base = subfolder.strip("/")
        join = (lambda name: f"{base}/{name}") if base else (lambda name: name)
        index = join("model.safetensors.index.json")
        if join("model.safetensors") in self.paths:
            files = [join("model.safetensors")]
        elif index in self.paths:
            try:
                doc = json.loads(_read(self.store, self.m, index, self.identities, self.public_key))
                files = sorted({join(v) for v in doc["weight_map"].values()})
            except (ValueError, KeyError, TypeError, AttributeError):
                raise FormatError(f"{self._name(index)} is not a safetensors index") from None
        else:
            other = [
                p
                for p in self.paths
                if is_weight(p) and PurePosixPath(p).parent == PurePosixPath(base or ".")
            ]
            hint = f" (it has {other[0]}: only safetensors weights are loaded)" if other else ""
            raise NotFound(f"{self._name(join('model.safetensors'))} is missing{hint}")
        state: dict[str, Any] = {}
        for path in files:
            state.update(
                load_file(
                    f"{self.m.name}:{self.m.version}/{path}",
                    store=self.store,
                    tenant=self.m.tenant,
                    identities=self.identities,
                    threads=self.threads,
                    verify_signature=self.public_key is not None,
                    public_key=self.public_key,
                )
            )
        return state

    def _name(self, path: str) -> str:
        return f"{self.m.name}:{self.m.version}/{path}"


def _sealed_classes(modules: list[dict[str, Any]], weights: _Weights) -> dict[str, type]:
    """``modules.json`` type -> a subclass of it that reads its weights from *weights*."""
    from sentence_transformers.base.modules.module import Module
    from sentence_transformers.base.modules.router import Router
    from sentence_transformers.base.modules.transformer import (
        TRANSFORMER_TASK_TO_AUTO_MODEL,
        Transformer,
    )
    from sentence_transformers.util import import_from_string

    out: dict[str, type] = {}
    for entry in modules:
        ref = entry.get("type") if isinstance(entry, dict) else None
        # Anything outside sentence_transformers is left to sentence-transformers,
        # which refuses it without trust_remote_code.
        if not isinstance(ref, str) or not ref.startswith("sentence_transformers.") or ref in out:
            continue
        try:
            base = import_from_string(ref)
        except ImportError:
            continue  # sentence-transformers names the problem itself
        if not (isinstance(base, type) and issubclass(base, Module)):
            continue
        if issubclass(base, Router):
            # Its inner modules are listed in its own config, out of this map's reach.
            raise ValueError(f"{weights._name('modules.json')}: a Router model is not supported")
        attrs: dict[str, Any] = {"__module__": base.__module__, "__qualname__": base.__qualname__}
        if issubclass(base, Transformer):

            def _load_model(
                self: Any,
                model_name_or_path: str,
                transformer_task: str,
                config: Any,
                backend: str,
                is_peft_model: bool,
                **model_kwargs: Any,
            ) -> Any:
                if backend != "torch" or is_peft_model:
                    raise ValueError(
                        "a sealed sentence-transformers model loads with torch, no adapter"
                    )
                # No path and a state_dict: transformers builds the model on the meta
                # device and loads these tensors into it -- from memory, not a file.
                state = weights.load(model_kwargs.pop("subfolder", ""))
                kw = {**model_kwargs, "state_dict": state, "output_loading_info": True}
                loaded = None
                if transformer_task == "feature-extraction":
                    # sentence-transformers' own pick of an encoder-only class (T5...).
                    loaded = self._load_encoder_only_model(None, config, **kw)
                if loaded is None:
                    auto = TRANSFORMER_TASK_TO_AUTO_MODEL[transformer_task]
                    loaded = auto._model_mapping[type(config)].from_pretrained(
                        None, config=config, **kw
                    )
                model, info = loaded
                missing = sorted(info.get("missing_keys") or ())
                bad = sorted(info.get("mismatched_keys") or ())
                if missing or bad:
                    raise ValueError(
                        f"{weights._name('model.safetensors')} does not fit "
                        f"{type(model).__name__}: {len(missing)} missing, {len(bad)} mismatched, "
                        f"e.g. {(missing or bad)[0]}"
                    )
                return model

            attrs["_load_model"] = _load_model
        else:

            def load_torch_weights(
                cls: Any,
                model_name_or_path: str,
                subfolder: str = "",
                *a: Any,
                model: Any = None,
                **k: Any,
            ) -> Any:
                state = weights.load(subfolder)
                if model is None:
                    return state
                model.load_state_dict(state, strict=True)
                return model

            attrs["load_torch_weights"] = classmethod(load_torch_weights)
        out[ref] = type(base.__name__, (base,), attrs)
    return out


def _read(
    store: Any, m: Any, path: str, identities: Sequence[IdentitySpec], public_key: Any
) -> bytes:
    """One small file of the version, checked against its OMS signature with *public_key*."""
    data = read_artifact_file(store, m, path, identities=identities)
    if public_key is None:
        return data
    from sealstore.vault.oms import check_bytes, of_version

    return check_bytes(data, of_version(m, public_key), path, f"{m.name}:{m.version}/{path}")


def load_sentence_transformer(
    src: str | os.PathLike[str],
    *,
    store: Any = None,
    tenant: str | None = None,
    identities: Sequence[IdentitySpec] = (),
    device: str | None = None,
    trust_remote_code: bool = False,
    threads: int | None = None,
    guard: Any = None,
    scratch_dir: str | os.PathLike[str] | None = None,
    verify_signature: bool = False,
    public_key: Any = None,
) -> Any:
    """A ``SentenceTransformer`` built from a sealed store artifact.

    Args:
        src: ``sealstore+URL#NAME[:VERSION|@TAG]``, or ``NAME[...]`` with *store*
            (a ``Store`` or its URL). The artifact is a pushed sentence-transformers
            directory (with ``modules.json``).
        device: where the model runs (``"cpu"``, ``"cuda[:N]"``; default: what
            sentence-transformers picks). Weights are decrypted on the CPU, then moved.
        trust_remote_code: must stay False: code named by the artifact is never run.
        threads: chunks decrypted in parallel (as for ``load_file``).
        guard: a ``GuardPolicy`` (or its mapping, or True): put the inference guard
            on the model, its findings recorded against this version (GUARD.md).
        scratch_dir: a memory-backed directory for the decrypted configs and
            tokenizer files (default ``/dev/shm``); never the weights.
        verify_signature: check the version's OMS model signature with
            *public_key* (default ``$SEALSTORE_OMS_PUBLIC_KEY``) before any key
            is asked for, and every file read against it (weights beside their
            decryption, as ``load_file``); files the signer left out (git
            metadata) are not read.

    Returns:
        The model, in eval mode (guarded, with *guard*).

    Raises:
        ValueError: ``trust_remote_code=True``; no usable scratch directory; the
            weights do not fit the model.
        NotFound: the artifact has no ``modules.json`` or no safetensors weights.
        DeviceUnavailable: a CUDA device was asked for and torch has none.
        AuthenticationError, KeyUnavailable, FormatError: as for ``load_file``.
    """
    if trust_remote_code:
        raise ValueError(
            "trust_remote_code=True is refused: a sealed model never runs code it names"
        )
    if device is not None and str(device).startswith("cuda"):
        from sealstore.loaders.gpu import check_device

        check_device(str(device))  # before any key is asked for
    root = scratch_root(scratch_dir, "load_sentence_transformer")  # before any key
    from sentence_transformers import SentenceTransformer

    key = sig = None
    if verify_signature:
        from sealstore.vault.oms import of_version, public_key_from

        key = public_key_from(public_key)
    store, m = resolve_artifact(src, store, tenant, caller="load_sentence_transformer")
    paths = [f.path for f in m.files]
    if key is not None:
        sig = of_version(m, key)
        paths = [p for p in paths if sig.covers(p)]
    if "modules.json" not in paths:
        raise NotFound(
            f"{m.name}:{m.version} has no modules.json (not a sentence-transformers model)"
        )
    try:
        modules = json.loads(_read(store, m, "modules.json", identities, key))
    except ValueError:
        raise FormatError(f"{m.name}:{m.version}/modules.json is not valid JSON") from None
    if not isinstance(modules, list):
        raise FormatError(f"{m.name}:{m.version}/modules.json is not a list of modules")
    weights = _Weights(store, m, identities, threads, key)
    classes = _sealed_classes(modules, weights)
    with ScratchFolder(root, prefix=_SCRATCH_PREFIX, caller="load_sentence_transformer") as scratch:
        for path in paths:
            # README.md is the model card: not needed to build the model.
            if not is_weight(path) and path != "README.md":
                scratch.write(path, _read(store, m, path, identities, key))
        model = SentenceTransformer._load_with_module_classes(
            str(scratch.path),
            classes,
            device=device,
            local_files_only=True,
            trust_remote_code=False,
        )
    # The load-time subclasses only changed where weights come from: give each
    # module its own class back, so the model saves and reloads as usual.
    sealed = set(classes.values())
    for module in model.modules():
        if type(module) in sealed:
            module.__class__ = type(module).__bases__[0]
    model.eval()
    if guard is None or guard is False:
        return model
    from sealstore.loaders.inference_guard import guard_loaded

    return guard_loaded(model, guard, manifest=m, store=store, identities=identities)
