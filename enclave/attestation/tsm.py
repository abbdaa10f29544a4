"""Collect SEV-SNP reports and TDX quotes through Linux configfs-tsm.

The kernel's interface (Documentation/ABI/testing/configfs-tsm): make a
directory under ``/sys/kernel/config/tsm/report``, write up to 64 bytes of
report_data to its ``inblob``, read the evidence from ``outblob`` (an SNP
report or a TDX quote; ``provider`` says which) and, for SNP, the
certificates from ``auxblob``; ``generation`` counts writes, so a reader can
tell that another process changed the request between its write and its
read. The root is a parameter (``SEALSTORE_TSM_ROOT``): tests point it at a
folder holding real sample reports.
"""

from __future__ import annotations

import contextlib
import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sealstore.errors import AttestationError

__all__ = ["TSM_ROOT", "TsmEvidence", "collect", "parse_cert_table"]

TSM_ROOT = "/sys/kernel/config/tsm/report"

# GUIDs of the SEV-SNP extended report's certificate table (GHCB spec).
CERT_GUIDS = {
    "63da758d-e664-4564-adc5-f4b93be8accd": "vcek",
    "a8074bc2-a25a-483e-aae6-39c045a0b8a1": "vlek",
    "4ab7b379-bbac-4fe4-a02f-05aef327c782": "ask",
    "c0b406a4-a803-4952-9743-3fb6014cd0ae": "ark",
}
_KINDS = {"sev_guest": "snp", "tdx_guest": "tdx"}


@dataclass(frozen=True)
class TsmEvidence:
    """What configfs-tsm gave: the evidence kind ("snp" / "tdx"), its bytes, SNP certificates."""

    kind: str
    blob: bytes = field(repr=False)
    certs: dict[str, bytes] = field(default_factory=dict, repr=False)


def parse_cert_table(aux: bytes) -> dict[str, bytes]:
    """The certificates of an SNP certificate table: ``{"vcek": DER, "ask": DER, ...}``.

    Entries are (GUID, offset, length), ending with an all-zero entry; offsets
    count from the table's start. Unknown GUIDs are skipped.

    Raises:
        AttestationError: an entry points outside the table (code tsm-format).
    """
    out: dict[str, bytes] = {}
    for pos in range(0, len(aux) - 23, 24):
        raw, off, length = struct.unpack_from("<16sII", aux, pos)
        if raw == bytes(16) and off == 0 and length == 0:
            return out
        if off + length > len(aux):
            raise AttestationError("an SNP certificate table entry points past it", "tsm-format")
        name = CERT_GUIDS.get(str(uuid.UUID(bytes_le=raw)))
        if name:
            out[name] = aux[off : off + length]
    raise AttestationError("the SNP certificate table has no terminating entry", "tsm-format")


def _is_configfs(path: Path) -> bool:
    return str(path.resolve()).startswith("/sys/kernel/config/")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AttestationError(f"cannot read {path}: {exc.strerror}", "tsm-unavailable") from None


def collect(
    report_data: bytes, *, root: str | os.PathLike[str] | None = None, entry: str | None = None
) -> TsmEvidence:
    """Ask the TEE for evidence carrying *report_data* (at most 64 bytes).

    Args:
        root: the configfs-tsm report folder (default ``$SEALSTORE_TSM_ROOT``
            or ``/sys/kernel/config/tsm/report``).
        entry: use this existing request folder instead of creating (and then
            removing) a fresh one.

    Raises:
        AttestationError: no configfs-tsm (code tsm-unavailable), an unknown
            provider, or another writer raced this request (tsm-race).
    """
    if len(report_data) > 64:
        raise ValueError("report_data is at most 64 bytes")
    base = Path(root or os.environ.get("SEALSTORE_TSM_ROOT") or TSM_ROOT)
    if not base.is_dir():
        raise AttestationError(
            f"no configfs-tsm at {base} (not a confidential VM, or configfs not mounted)",
            "tsm-unavailable",
        )
    made = entry is None
    folder = base / (entry or f"sealstore-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if made:
            folder.mkdir()
        (folder / "inblob").write_bytes(report_data.ljust(64, b"\0"))
        gen = _read(folder / "generation") if (folder / "generation").exists() else b""
        provider = _read(folder / "provider").decode(errors="replace").strip()
        kind = _KINDS.get(provider)
        if kind is None:
            raise AttestationError(
                f"configfs-tsm provider {provider!r} is not supported", "tsm-format"
            )
        blob = _read(folder / "outblob")
        aux = _read(folder / "auxblob") if (folder / "auxblob").exists() else b""
        if gen and _read(folder / "generation") != gen:
            raise AttestationError("another writer changed the configfs-tsm request", "tsm-race")
    except OSError as exc:
        raise AttestationError(
            f"configfs-tsm request in {folder} failed: {exc}", "tsm-unavailable"
        ) from None
    finally:
        if made:
            # configfs removes a request's attributes with it; a plain folder
            # standing in for configfs needs its inblob removed first.
            with contextlib.suppress(OSError):
                if not _is_configfs(base):
                    (folder / "inblob").unlink(missing_ok=True)
                folder.rmdir()
    return TsmEvidence(kind, blob, parse_cert_table(aux) if aux and kind == "snp" else {})
