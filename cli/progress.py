"""The CLI's progress bar (it lives on the ground floor so the loaders can use it too)."""

from sealstore.progress import Progress, human_bytes

__all__ = ["Progress", "human_bytes"]
