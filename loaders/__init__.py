"""torch loaders for sealed artifacts: the safetensors API over sealed files and store references.

``load_file``, ``safe_open``, ``save_file``, ``load`` / ``save`` (bytes),
``save_model`` / ``load_model`` (tied weights) and ``load_state_dict`` mirror
``safetensors.torch`` on a sealed file path or URL, or a store reference
(``sealstore+URL#NAME[:VERSION|@TAG]``); ``sealstore.loaders.safetensors_np``
mirrors ``safetensors.numpy`` without importing torch;
``from_pretrained`` / ``load_tokenizer`` build transformers objects from a pushed
Hugging Face directory or a sealed folder, and ``save_pretrained`` saves one sealed;
``torch_save`` / ``torch_load`` seal ``.pt`` payloads
(loaded with ``weights_only=True``); ``save_checkpoint`` / ``load_latest_checkpoint``
keep encrypted training checkpoints; ``load_sentence_transformer`` builds a
``SentenceTransformer`` from a pushed sentence-transformers directory; ``guard``
watches a loaded model's callers for extraction and abuse (``guard=`` on
``load_file`` / ``from_pretrained`` / ``load_sentence_transformer`` too);
``SealedShards`` / ``ShardSamples`` are torch datasets over sealed shards;
``tensor_parallel`` / ``PartitionPlan`` / ``TensorSlice`` give ``load_file`` and
``safe_open`` one tensor-parallel rank's slices (``plan=``).
Each is imported on first use (PEP 562): torch, transformers and the
other loaders load only when one is used -- a vLLM process that imports the
plugin (``sealstore.loaders.vllm_plugin``) pays for nothing else.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sealstore.loaders.checkpoint import load_latest_checkpoint, save_checkpoint
    from sealstore.loaders.gpu import DeviceUnavailable
    from sealstore.loaders.hf import from_pretrained, load_tokenizer
    from sealstore.loaders.hf_save import save_pretrained
    from sealstore.loaders.inference_guard import GuardPolicy, as_caller, guard
    from sealstore.loaders.partition import PartitionPlan, TensorSlice, tensor_parallel
    from sealstore.loaders.safetensors import (
        SharedTensors,
        load,
        load_file,
        load_model,
        load_state_dict,
        safe_open,
        save,
        save_file,
        save_model,
    )
    from sealstore.loaders.sentence_transformers import load_sentence_transformer
    from sealstore.loaders.shards import SealedShards, ShardSamples
    from sealstore.loaders.st_header import TensorNotFound
    from sealstore.loaders.torch_io import torch_load, torch_save

_LAZY = {
    "load_latest_checkpoint": "sealstore.loaders.checkpoint",
    "save_checkpoint": "sealstore.loaders.checkpoint",
    "DeviceUnavailable": "sealstore.loaders.gpu",
    "from_pretrained": "sealstore.loaders.hf",
    "load_tokenizer": "sealstore.loaders.hf",
    "save_pretrained": "sealstore.loaders.hf_save",
    "GuardPolicy": "sealstore.loaders.inference_guard",
    "as_caller": "sealstore.loaders.inference_guard",
    "guard": "sealstore.loaders.inference_guard",
    "PartitionPlan": "sealstore.loaders.partition",
    "TensorSlice": "sealstore.loaders.partition",
    "tensor_parallel": "sealstore.loaders.partition",
    "SharedTensors": "sealstore.loaders.safetensors",
    "load": "sealstore.loaders.safetensors",
    "load_file": "sealstore.loaders.safetensors",
    "load_model": "sealstore.loaders.safetensors",
    "load_state_dict": "sealstore.loaders.safetensors",
    "safe_open": "sealstore.loaders.safetensors",
    "save": "sealstore.loaders.safetensors",
    "save_file": "sealstore.loaders.safetensors",
    "save_model": "sealstore.loaders.safetensors",
    "load_sentence_transformer": "sealstore.loaders.sentence_transformers",
    "SealedShards": "sealstore.loaders.shards",
    "ShardSamples": "sealstore.loaders.shards",
    "TensorNotFound": "sealstore.loaders.st_header",
    "torch_load": "sealstore.loaders.torch_io",
    "torch_save": "sealstore.loaders.torch_io",
}

__all__ = [
    "DeviceUnavailable",
    "GuardPolicy",
    "PartitionPlan",
    "SealedShards",
    "ShardSamples",
    "SharedTensors",
    "TensorNotFound",
    "TensorSlice",
    "as_caller",
    "from_pretrained",
    "guard",
    "load",
    "load_file",
    "load_latest_checkpoint",
    "load_model",
    "load_sentence_transformer",
    "load_state_dict",
    "load_tokenizer",
    "safe_open",
    "save",
    "save_checkpoint",
    "save_file",
    "save_model",
    "save_pretrained",
    "tensor_parallel",
    "torch_load",
    "torch_save",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sealstore.loaders' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
