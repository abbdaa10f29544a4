"""torch loaders for sealed artifacts: the safetensors API over sealed files and store references.

``load_file``, ``safe_open``, ``save_file`` and ``load_state_dict`` work on a
sealed file path or URL, or a store reference (``sealstore+URL#NAME[:VERSION|@TAG]``);
``from_pretrained`` / ``load_tokenizer`` build transformers objects from a pushed
Hugging Face directory; ``torch_save`` / ``torch_load`` seal ``.pt`` payloads
(loaded with ``weights_only=True``); ``save_checkpoint`` / ``load_latest_checkpoint``
keep encrypted training checkpoints; ``load_sentence_transformer`` builds a
``SentenceTransformer`` from a pushed sentence-transformers directory; ``guard``
watches a loaded model's callers for extraction and abuse (``guard=`` on
``load_file`` / ``from_pretrained`` / ``load_sentence_transformer`` too).
torch is imported only when one is used.
"""

from sealstore.loaders.checkpoint import load_latest_checkpoint, save_checkpoint
from sealstore.loaders.gpu import DeviceUnavailable
from sealstore.loaders.hf import from_pretrained, load_tokenizer
from sealstore.loaders.inference_guard import GuardPolicy, as_caller, guard
from sealstore.loaders.safetensors import load_file, load_state_dict, safe_open, save_file
from sealstore.loaders.sentence_transformers import load_sentence_transformer
from sealstore.loaders.torch_io import torch_load, torch_save

__all__ = [
    "DeviceUnavailable",
    "GuardPolicy",
    "as_caller",
    "from_pretrained",
    "guard",
    "load_file",
    "load_latest_checkpoint",
    "load_sentence_transformer",
    "load_state_dict",
    "load_tokenizer",
    "safe_open",
    "save_checkpoint",
    "save_file",
    "torch_load",
    "torch_save",
]
