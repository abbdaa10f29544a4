"""torch loaders for sealed artifacts: the safetensors API over sealed files and store references.

``load_file``, ``safe_open``, ``save_file`` and ``load_state_dict`` work on a
sealed file path or URL, or a store reference (``sealstore+URL#NAME[:VERSION|@TAG]``).
torch is imported only when one of them is used.
"""

from sealstore.loaders.safetensors import load_file, load_state_dict, safe_open, save_file

__all__ = ["load_file", "load_state_dict", "safe_open", "save_file"]
