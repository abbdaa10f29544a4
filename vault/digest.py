"""The digest of a whole sealed object: ``blake3:HEX`` (``sha256:HEX`` is also read).

The manifest records it so any object can be checked without a key (backups,
``verify --keyless``) and so a holder of the DEK, who could seal other content
under the same header, still cannot substitute an object the signer did not
publish. BLAKE3 rather than SHA-256 because this hash sits on the critical
path of every push and pull: measured here 4.1 GB/s on one core (and it
drops the GIL) against SHA-256's 1.6 GB/s, which alone capped a pull at about
half the speed of a plain copy on a two-core machine. The plaintext hashes in
the manifest and the BoM stay SHA-256: that is what CycloneDX consumers check.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

__all__ = ["ObjectHasher", "check_digest_text", "digests_equal"]

DEFAULT = "blake3"
_FORM = re.compile(r"(blake3|sha256):[0-9a-f]{64}")


class ObjectHasher:
    """An incremental hash of an object; ``text()`` gives ``ALG:HEX``."""

    def __init__(self, alg: str = DEFAULT) -> None:
        self.alg = alg
        if alg == "blake3":
            import blake3

            self._h: Any = blake3.blake3()
        elif alg == "sha256":
            self._h = hashlib.sha256()
        else:
            raise ValueError(f"unknown object digest {alg!r}")

    def update(self, data: Any) -> None:
        self._h.update(data)

    def text(self) -> str:
        return f"{self.alg}:{self._h.hexdigest()}"


def check_digest_text(value: Any) -> bool:
    """Whether *value* is a well-formed ``ALG:HEX`` object digest."""
    return isinstance(value, str) and _FORM.fullmatch(value) is not None


def digests_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
