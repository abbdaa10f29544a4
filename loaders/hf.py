"""transformers models and tokenizers straight from a sealed store artifact.

``from_pretrained("sealstore+URL#NAME[:VERSION|@TAG]")`` reads ``config.json``,
the tokenizer files and the weights of one pushed Hugging Face directory
through the store -- signatures, digests and chunk tags checked -- into
memory only: no plaintext file is written anywhere, and no network is used.
The version is resolved once, so config, tokenizer and weights always come
from the same version even if a tag moves meanwhile. A local sealed folder
(what ``save_pretrained`` writes) loads the same way. A tokenizer without a
``tokenizer.json`` is built by transformers from its files, which pass
through a private memory-backed folder (``sealstore.loaders.scratch``).

The weights (one ``.safetensors`` file, or the shards a
``model.safetensors.index.json`` names) are decrypted straight into the
tensors the model keeps: transformers' own ``from_pretrained`` is given them
as ``state_dict`` and builds the model on the meta device, so nothing is
randomly initialised and then overwritten, head classes, tied weights,
``dtype`` and ``attn_implementation`` behave exactly as transformers makes
them, and the peak memory is the weights once.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

from sealstore.dekcache import DekCache
from sealstore.errors import FormatError, NotFound
from sealstore.kms.envelope import IdentitySpec
from sealstore.loaders.artifact import load_weights, open_artifact

__all__ = ["from_pretrained", "load_tokenizer", "read_artifact_file"]

log = logging.getLogger(__name__)


# Options of transformers' from_pretrained that act on the model being built,
# not on where its files come from: handed to transformers as given.
_PASSED = frozenset(
    {
        "dtype",
        "torch_dtype",
        "attn_implementation",
        "experts_implementation",
        "ignore_mismatched_sizes",
        "key_mapping",
        "quantization_config",
        "max_memory",
        "offload_buffers",
        "fusion_config",
        "generation_config",
        "distributed_config",
        "device_mesh",
    }
)
# Accepted and true of every sealed load already.
_NO_OPS = frozenset({"low_cpu_mem_usage", "local_files_only"})
# Options that only make sense for files on the Hub or on disk, or that would
# run code or write plaintext: refused with the reason, never ignored.
_REFUSED = {
    **dict.fromkeys(
        ("cache_dir", "force_download", "proxies", "token", "mirror"),
        "nothing is downloaded or cached for a sealed artifact",
    ),
    **dict.fromkeys(
        ("subfolder", "variant", "gguf_file", "from_tf", "from_flax", "state_dict"),
        "the weights are the artifact's safetensors files (name one with weights=)",
    ),
    **dict.fromkeys(
        ("offload_folder", "offload_state_dict"),
        "offloading would write plaintext weights to disk",
    ),
    **dict.fromkeys(
        ("use_kernels", "kernel_config", "allow_all_kernels"),
        "Hub kernels are code fetched from the network",
    ),
    **dict.fromkeys(
        ("adapter_kwargs", "adapter_name"), "adapters are not loaded from sealed artifacts"
    ),
}
_AUTO_MAPS = frozenset({"auto", "balanced", "balanced_low_0", "sequential"})


def read_artifact_file(
    store: Any,
    manifest: Any,
    path: str,
    *,
    identities: Sequence[IdentitySpec] = (),
    cache: DekCache | None = None,
) -> bytes:
    """The plaintext of one (small) file of a verified version, in memory.

    Args:
        cache: where the version's DEK is taken from or kept (one unwrap for
            every file of a load).

    Raises:
        NotFound: the version has no such file.
    """
    from sealstore.loaders.sources import open_source

    # The object's digest is hashed from the bytes the read fetches (on S3: the
    # same ranged GETs, not a second download) and checked before it returns.
    ref = f"{manifest.name}:{manifest.version}/{path}"
    with open_source(
        ref, store=store, tenant=manifest.tenant, identities=identities, cache=cache
    ) as sf:
        return sf.read_range(0, sf.size)


def _check_options(options: dict[str, Any], trust_remote_code: bool) -> dict[str, Any]:
    """The options handed to transformers; the rest stay in *options* (config or model args).

    Raises:
        ValueError: remote code, or an option that fetches, offloads or names other files.
    """
    if trust_remote_code:
        raise ValueError(
            "trust_remote_code=True is refused: code shipped in a sealed artifact is never "
            "run; only model types built into transformers load"
        )
    for name, why in _REFUSED.items():
        if name in options:
            raise ValueError(f"from_pretrained({name}=...) is refused: {why}")
    if options.get("use_safetensors") is False:
        raise ValueError("use_safetensors=False is refused: sealed weights are safetensors only")
    attn = options.get("attn_implementation")
    if isinstance(attn, str) and "/" in attn:
        raise ValueError(
            f"attn_implementation={attn!r} is refused: Hub kernels are code fetched from "
            "the network"
        )
    for name in (*_NO_OPS, "use_safetensors", "weights_only"):
        options.pop(name, None)
    return {k: options.pop(k) for k in list(options) if k in _PASSED}


def _placement(device_map: Any) -> tuple[Any, Any]:
    """(device_map for transformers, the one device to move the model to after).

    transformers without accelerate refuses every ``device_map``, ``"cpu"``
    included; a map onto one device needs no dispatch, so it is placed here.

    Raises:
        ValueError: a map that offloads to ``"disk"`` (plaintext on disk), or
            one that needs accelerate when it is not installed.
        DeviceUnavailable: a CUDA device torch cannot use.
    """
    import torch
    from transformers.utils import is_accelerate_available

    if device_map is None:
        return None, None
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    if any(str(v) == "disk" for v in values):
        raise ValueError(
            "device_map with 'disk' is refused: offloading would write plaintext weights to disk"
        )
    if is_accelerate_available():
        return device_map, None
    if isinstance(device_map, str) and device_map in _AUTO_MAPS:
        raise ValueError(
            f"device_map={device_map!r} needs accelerate (pip install accelerate), as in "
            "transformers; a map onto one device ('cpu', 'cuda:0') works without it"
        )
    try:
        devices = {_device(v) for v in values}
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device_map names an unknown device: {device_map!r}") from None
    if len(devices) != 1:
        raise ValueError(
            "a device_map over several devices needs accelerate (pip install accelerate), "
            "as in transformers"
        )
    device = devices.pop()
    if device.type == "cuda":
        from sealstore.loaders.gpu import check_device

        check_device(str(device))  # before any key is asked for
    return None, (None if device == torch.device("cpu") else device)


def _device(value: Any) -> Any:
    import torch

    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("negative device index")
        return torch.device("cuda", value)
    return torch.device(value)


def _model_class(cls: Any, config: Any) -> Any:
    """The concrete model class: an Auto class resolved through *config*."""
    from transformers import PreTrainedModel

    mapping = getattr(cls, "_model_mapping", None)
    if mapping is not None:
        from transformers.models.auto.auto_factory import _get_model_class

        try:
            return _get_model_class(config, mapping)
        except KeyError:
            raise ValueError(f"{cls.__name__} has no model for {type(config).__name__}") from None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise TypeError(f"cls must be a transformers model or Auto class, not {cls!r}")
    return cls


def _split_kwargs(options: dict[str, Any], config: Any, model_class: Any) -> dict[str, Any]:
    """Set config attributes from *options* (as transformers does); return the model's args.

    Raises:
        ValueError: an option that is neither a config attribute nor a model argument.
    """
    params = inspect.signature(model_class.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    init: dict[str, Any] = {}
    for name, value in options.items():
        # A config attribute, as transformers sets them -- never a method.
        if hasattr(config, name) and not callable(getattr(type(config), name, None)):
            setattr(config, name, value)
        elif name in params or takes_any:
            init[name] = value
        else:
            raise ValueError(
                f"from_pretrained got an unknown argument {name!r}: not a transformers loading "
                f"option, a {type(config).__name__} attribute or a {model_class.__name__} argument"
            )
    return init


def _check_covered(model: Any, device_map: dict[str, Any]) -> None:
    for name, _ in (*model.named_parameters(), *model.named_buffers()):
        if not any(k == "" or name == k or name.startswith(k + ".") for k in device_map):
            raise ValueError(f"device_map does not place {name}")


def from_pretrained(
    src: str | os.PathLike[str],
    cls: Any = None,
    *,
    store: Any = None,
    tenant: str | None = None,
    identities: Sequence[IdentitySpec] = (),
    weights: str | None = None,
    threads: int | None = None,
    guard: Any = None,
    strict: bool = False,
    revision: str | int | None = None,
    device_map: Any = None,
    trust_remote_code: bool = False,
    output_loading_info: bool = False,
    verify_signature: bool = False,
    public_key: Any = None,
    **kwargs: Any,
) -> Any:
    """A transformers model built from a sealed artifact's config and weights.

    Mirrors ``AutoModel.from_pretrained``: the model is built by transformers
    on the meta device and takes the decrypted tensors as they are (no random
    init, no copy). Head classes on a base checkpoint get their missing head
    initialised with transformers' load report (a warning).

    Args:
        src: ``sealstore+URL#NAME[:VERSION|@TAG]``, ``NAME[...]`` with *store*,
            or a sealed folder (``save_pretrained``; see ``loaders/artifact.py``).
        cls: the model class (default ``transformers.AutoModel``): an Auto
            class or a concrete model class.
        weights: the weights in the artifact: a ``.safetensors`` file or a
            ``*.safetensors.index.json`` (default: ``model.safetensors``, else
            ``model.safetensors.index.json``, else the one of either).
        strict: refuse weights that leave parameters of the model missing or
            mismatched, or hold tensors it has no place for.
        revision: the version (digits) or tag, as transformers' ``revision``;
            ``"main"`` is the latest. Conflicts with a version in *src* are refused.
        device_map: ``"cpu"``, ``"cuda:0"``, an int, a ``torch.device`` or a
            dict onto one device; ``"auto"`` and maps over several devices go
            through accelerate (refused without it, as transformers does).
        trust_remote_code: must be False (remote code is refused).
        output_loading_info: also return transformers' loading info dict.
        verify_signature: check the version's OMS model signature with
            *public_key* (EC public key, PEM path or bytes, or a PEM file of
            root certificates; default ``$SEALSTORE_OMS_PUBLIC_KEY``) before
            any key is asked for; every
            file read (config, weights) is hashed against it as it is
            decrypted, and nothing is returned before it matched.
        guard: a ``GuardPolicy`` (or its mapping, or True): put the inference
            guard on the model (``sealstore.loaders.inference_guard``), its findings
            recorded in this store's audit log against this version, stopped
            by a lockdown at the broker that released the key.
        kwargs: transformers' model options (``dtype``/``torch_dtype``,
            ``attn_implementation``, ``ignore_mismatched_sizes``, ...;
            ``low_cpu_mem_usage`` is accepted and always true), then config
            attributes (``num_labels=3``), then arguments of the model class;
            anything else is refused.

    Returns:
        The model, in eval mode (guarded, with *guard*); with
        *output_loading_info*, ``(model, info)``.

    Raises:
        ValueError: an unknown or refused option, or (with *strict*) weights
            that do not fit the model.
        AuthenticationError, KeyUnavailable, NotFound, FormatError: opening the source.
    """
    from transformers import AutoConfig, AutoModel, PretrainedConfig

    user_config = kwargs.pop("config", None)
    if user_config is not None and not isinstance(user_config, PretrainedConfig):
        raise ValueError("config= takes a PretrainedConfig (the artifact's config.json otherwise)")
    passed = _check_options(kwargs, trust_remote_code)
    hf_device_map, move_to = _placement(device_map)
    # One unwrap for a store version: config, index and every shard share its DEK.
    with open_artifact(
        src,
        store,
        tenant,
        revision,
        identities,
        caller="from_pretrained",
        verify_signature=verify_signature,
        public_key=public_key,
    ) as art:
        where = art.where
        if user_config is not None:
            config = copy.deepcopy(user_config)
        else:
            conf = art.json("config.json")
            model_type = conf.pop("model_type", None)
            if not model_type:
                raise FormatError(f"{where}/config.json names no model_type")
            config = AutoConfig.for_model(model_type, **conf)
        model_class = _model_class(cls or AutoModel, config)
        init_kwargs = _split_kwargs(kwargs, config, model_class)
        if "generation_config" not in passed and "generation_config.json" in art.paths:
            # transformers reads it beside the weights; given the tensors, it is handed over.
            from transformers import GenerationConfig

            gen = art.json("generation_config.json")
            passed["generation_config"] = GenerationConfig.from_dict(gen)
        state = load_weights(art, weights, threads=threads)
    model, info = model_class.from_pretrained(
        None,
        config=config,
        state_dict=state,
        device_map=hf_device_map,
        output_loading_info=True,
        **passed,
        **init_kwargs,
    )
    del state  # tensors the model did not take go now
    if isinstance(device_map, dict) and hf_device_map is None:
        _check_covered(model, device_map)
    if strict:
        for kind in ("missing_keys", "mismatched_keys", "unexpected_keys"):
            keys = sorted(info.get(kind) or [])
            if keys:
                what = kind.replace("_keys", "")
                raise ValueError(
                    f"{where}: {len(keys)} {what} parameter(s) for {model_class.__name__} "
                    f"(strict=True), e.g. {keys[0]}"
                )
    if move_to is not None:
        model.to(move_to)
    model.eval()
    if guard is not None and guard is not False:
        from sealstore.loaders.inference_guard import guard_loaded

        model = guard_loaded(
            model, guard, manifest=art.manifest, store=art.store, identities=identities
        )
    return (model, info) if output_loading_info else model


# Files a tokenizer is built from; one of them must be there.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


def load_tokenizer(
    src: str | os.PathLike[str],
    *,
    store: Any = None,
    tenant: str | None = None,
    identities: Sequence[IdentitySpec] = (),
    revision: str | None = None,
    use_fast: bool = True,
    scratch_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """The artifact's tokenizer, as ``AutoTokenizer.from_pretrained`` builds it from its files.

    With a ``tokenizer.json`` (and *use_fast*) it is built in memory. Otherwise
    -- a ``vocab.txt``-only BERT, ``use_fast=False``, a sentencepiece model --
    transformers builds it from the files, which it reads only from a folder:
    the tokenizer's files (never weights) are decrypted into a private
    memory-backed folder (see ``sealstore.loaders.scratch``), removed as soon
    as the tokenizer is built.

    Args:
        src: a store reference (``sealstore+URL#NAME[:VERSION|@TAG]``, or
            ``NAME`` with *store*), or a sealed folder (``save_pretrained``).
        revision: the version or tag, as in :func:`from_pretrained`.
        use_fast: as for ``AutoTokenizer``.
        scratch_dir: the memory-backed directory for that folder (default ``/dev/shm``).

    Raises:
        NotFound: the artifact has no tokenizer files.
        ValueError: transformers cannot build a tokenizer from them (one line
            naming what is missing, e.g. the ``sentencepiece`` package).
    """
    with open_artifact(src, store, tenant, revision, identities, caller="load_tokenizer") as art:
        paths = set(art.paths)
        if not paths & set(_TOKENIZER_FILES) and not any(p.endswith(".model") for p in paths):
            raise NotFound(
                f"{art.where} has no tokenizer files (tokenizer.json, vocab.txt, "
                "vocab.json, or a sentencepiece .model)"
            )
        if use_fast and "tokenizer.json" in paths:
            return _fast_tokenizer(art)
        return _tokenizer_from_files(art, use_fast, scratch_dir)


def _fast_tokenizer(art: Any) -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(art.read("tokenizer.json").decode("utf-8"))
    kwargs: dict[str, Any] = {}
    if "tokenizer_config.json" in art.paths:
        kwargs = art.json("tokenizer_config.json")
    if "special_tokens_map.json" in art.paths:
        for k, v in art.json("special_tokens_map.json").items():
            kwargs.setdefault(k, v)
    for key in ("tokenizer_class", "name_or_path", "auto_map", "tokenizer_file"):
        kwargs.pop(key, None)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def _tokenizer_from_files(art: Any, use_fast: bool, scratch_dir: Any) -> Any:
    from transformers import AutoTokenizer

    from sealstore.loaders.scratch import ScratchFolder, is_weight, scratch_root

    spm = [p for p in art.paths if p.endswith(".model")]
    if spm and not (use_fast and "tokenizer.json" in art.paths):
        import importlib.util

        # transformers would otherwise fall back to other converters and name
        # the wrong missing package.
        if importlib.util.find_spec("sentencepiece") is None:
            raise ValueError(
                f"{art.where}: its tokenizer is a sentencepiece model ({spm[0]}), which needs "
                "the sentencepiece package (pip install sentencepiece)"
            )
    root = scratch_root(scratch_dir, "load_tokenizer")
    with ScratchFolder(root, caller="load_tokenizer") as scratch:
        for path in art.paths:
            # README.md is the model card; weights never leave memory.
            if not is_weight(path) and path != "README.md":
                scratch.write(path, art.read(path))
        try:
            return AutoTokenizer.from_pretrained(
                str(scratch.path), use_fast=use_fast, local_files_only=True, trust_remote_code=False
            )
        except (ImportError, OSError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "sentencepiece" in str(exc).lower():
                raise ValueError(
                    f"{art.where}: this tokenizer needs the sentencepiece package "
                    "(pip install sentencepiece)"
                ) from None
            raise ValueError(
                f"{art.where}: transformers cannot build a tokenizer from its files: "
                + first.replace(str(scratch.path), "<artifact>")
            ) from None
