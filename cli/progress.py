"""The CLI's progress bar (it lives on the ground floor so the loaders can use it too)."""

from sealstore.progress import Progress, counted, human_bytes

__all__ = ["Progress", "counted", "human_bytes"]
