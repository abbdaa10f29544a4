"""transformers models and tokenizers straight from a sealed store artifact.

``from_pretrained("sealstore+URL#NAME[:VERSION|@TAG]")`` reads ``config.json``,
the tokenizer files and the weights of one pushed Hugging Face directory
through the store -- signatures, digests and chunk tags checked -- into
memory only: no plaintext file is written anywhere, and no network is used.
The version is resolved once, so config, tokenizer and weights always come
from the same version even if a tag moves meanwhile.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from sealstore.errors import FormatError, NotFound
from sealstore.kms.envelope import IdentitySpec
from sealstore.loaders.safetensors import load_file
from sealstore.loaders.sources import PREFIX, _pick_file

__all__ = ["from_pretrained", "load_tokenizer", "read_artifact_file"]

log = logging.getLogger(__name__)


def _artifact(src: str, store: Any, tenant: str | None) -> tuple[Any, Any]:
    """(Store, verified manifest) of ``sealstore+URL#REF`` or ``REF`` with *store*."""
    from sealstore.vault.store import Store

    if src.startswith(PREFIX):
        url, sep, ref = src[len(PREFIX) :].partition("#")
        if not sep or not ref:
            raise ValueError(f"a store reference names the artifact after '#': {src!r}")
        store = Store.open(url)
    elif store is None:
        raise ValueError("from_pretrained needs a store reference (sealstore+URL#NAME) or store=")
    else:
        ref = src
        if not isinstance(store, Store):
            store = Store.open(store)
    if "/" in ref:
        raise ValueError("from_pretrained takes a whole artifact (NAME[:VERSION|@TAG]), not a file")
    from sealstore.vault.pull import served
    from sealstore.vault.store import default_tenant

    return store, served(store, ref, tenant or default_tenant(), "load", granted=False)


def read_artifact_file(
    store: Any,
    manifest: Any,
    path: str,
    *,
    identities: Sequence[IdentitySpec] = (),
) -> bytes:
    """The plaintext of one (small) file of a verified version, in memory.

    Raises:
        NotFound: the version has no such file.
    """
    from sealstore.stream import SealedFile
    from sealstore.vault.pull import open_file

    ref = f"{manifest.name}:{manifest.version}"
    _m, _entry, fp, pre, dek = open_file(
        store, ref, path, tenant=manifest.tenant, identities=identities
    )
    with dek, SealedFile(fp, dek, preamble=pre, close_src=True) as sf:
        return sf.read_range(0, sf.size)


def _json(store: Any, m: Any, path: str, identities: Sequence[IdentitySpec]) -> dict[str, Any]:
    try:
        doc = json.loads(read_artifact_file(store, m, path, identities=identities))
    except ValueError:
        raise FormatError(f"{m.name}:{m.version}/{path} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{m.name}:{m.version}/{path} is not a JSON object")
    return doc


def from_pretrained(
    src: str,
    cls: Any = None,
    *,
    store: Any = None,
    tenant: str | None = None,
    identities: Sequence[IdentitySpec] = (),
    weights: str | None = None,
    threads: int | None = None,
    guard: Any = None,
    **config_overrides: Any,
) -> Any:
    """A transformers model built from a sealed artifact's config and weights.

    Args:
        src: ``sealstore+URL#NAME[:VERSION|@TAG]``, or ``NAME[...]`` with *store*.
        cls: the model class (default ``transformers.AutoModel``): an Auto
            class or a concrete model class.
        weights: the weights file in the artifact (default: its one
            ``.safetensors`` file, or ``model.safetensors``).
        config_overrides: set on the config before the model is built.
        guard: a ``GuardPolicy`` (or its mapping, or True): put the inference
            guard on the model (``sealstore.loaders.inference_guard``), its findings
            recorded in this store's audit log against this version, stopped
            by a lockdown at the broker that released the key.

    Returns:
        The model, in eval mode (guarded, with *guard*).

    Raises:
        ValueError: the weights do not fit the model (missing parameters).
        AuthenticationError, KeyUnavailable, NotFound, FormatError.
    """
    from transformers import AutoConfig, AutoModel

    store, m = _artifact(src, store, tenant)
    conf = _json(store, m, "config.json", identities)
    model_type = conf.pop("model_type", None)
    if not model_type:
        raise FormatError(f"{m.name}:{m.version}/config.json names no model_type")
    conf.update(config_overrides)
    config = AutoConfig.for_model(model_type, **conf)
    cls = cls or AutoModel
    # Auto classes build from a config with from_config; concrete model classes
    # (GPT2LMHeadModel, BertModel...) take the config in their constructor.
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    path = weights or _pick_file(m, ".safetensors")
    state = load_file(
        f"{m.name}:{m.version}/{path}",
        store=store,
        tenant=m.tenant,
        identities=identities,
        threads=threads,
    )
    missing, unexpected = _load(model, state)
    if missing:
        raise ValueError(
            f"{m.name}:{m.version}/{path} lacks {len(missing)} parameter(s) of "
            f"{type(model).__name__}, e.g. {missing[0]}"
        )
    if unexpected:
        log.info("ignored %d unused tensor(s) of %s, e.g. %s", len(unexpected), path, unexpected[0])
    model.eval()
    if guard is None or guard is False:
        return model
    from sealstore.loaders.inference_guard import guard_loaded

    return guard_loaded(model, guard, manifest=m, store=store, identities=identities)


def _load(model: Any, state: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Load *state*, adding or removing the base-model prefix when the names need it."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    wanted = set(model.state_dict())
    candidates = [state]
    if prefix:
        candidates.append({f"{prefix}.{k}": v for k, v in state.items()})
        cut = f"{prefix}."
        candidates.append({k[len(cut) :] if k.startswith(cut) else k: v for k, v in state.items()})
    best = max(candidates, key=lambda c: len(wanted & set(c)))
    result = model.load_state_dict(best, strict=False)
    missing = list(result.missing_keys)
    if missing:
        # Tied weights (an LM head sharing the embeddings) are stored once:
        # tie them, then a "missing" tensor that shares storage with a loaded
        # one is not missing. transformers' own ignore patterns apply too.
        import re

        if hasattr(model, "tie_weights"):
            model.tie_weights()
        current = model.state_dict()
        loaded = {current[k].data_ptr() for k in current if k not in set(missing)}
        patterns = getattr(model, "_keys_to_ignore_on_load_missing", None) or []
        missing = [
            k
            for k in missing
            if current[k].data_ptr() not in loaded and not any(re.search(p, k) for p in patterns)
        ]
    return missing, list(result.unexpected_keys)


def load_tokenizer(
    src: str,
    *,
    store: Any = None,
    tenant: str | None = None,
    identities: Sequence[IdentitySpec] = (),
) -> Any:
    """A fast tokenizer from the artifact's ``tokenizer.json`` and ``tokenizer_config.json``.

    Raises:
        NotFound: the artifact has no ``tokenizer.json`` (slow tokenizers need files).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    store, m = _artifact(src, store, tenant)
    paths = {f.path for f in m.files}
    if "tokenizer.json" not in paths:
        raise NotFound(f"{m.name}:{m.version} has no tokenizer.json")
    tok = Tokenizer.from_str(
        read_artifact_file(store, m, "tokenizer.json", identities=identities).decode("utf-8")
    )
    kwargs: dict[str, Any] = {}
    if "tokenizer_config.json" in paths:
        kwargs = _json(store, m, "tokenizer_config.json", identities)
    if "special_tokens_map.json" in paths:
        for k, v in _json(store, m, "special_tokens_map.json", identities).items():
            kwargs.setdefault(k, v)
    for key in ("tokenizer_class", "name_or_path", "auto_map", "tokenizer_file"):
        kwargs.pop(key, None)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
