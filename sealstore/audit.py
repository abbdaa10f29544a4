"""The audit log: append-only, hash-chained JSON lines with Ed25519-signed checkpoints.

Every writer (a machine's CLI, one broker replica) appends to its own
*stream*, a folder of immutable segment files on any storage with
``put_new``/``read``/``list`` (the store's fsspec backend, or a local path)::

    audit/STREAM/0000000000000000.jsonl   records 0..k, then one signed checkpoint line
    audit/STREAM/00000000000000k+1.jsonl  ...

Each record carries its stream, its sequence number and ``prev``, the SHA-256
of the record before it (the first one chains to a hash of the stream's
name), so an edited, dropped or reordered record breaks the chain. Each
segment ends with a checkpoint -- the stream's head hash and length, signed
by the writer -- so a writer without the key cannot re-chain edited records.
What a chain cannot show by itself is a *truncated* tail (whole trailing
segments deleted): for that a verifier holds on to the last checkpoint it
saw (an *anchor*) and checks the stream still reaches it.

Segments are never rewritten: a writer creates the next one only if it is
absent (``put_new``), so two processes sharing a stream never fork it --
the loser re-reads the head and chains after the winner. Appends are group
committed: concurrent callers wait while one of them writes every pending
record in one segment, and :meth:`AuditLog.append` returns only once its
record is durable. That is the point -- an operation that must be audited
(a key release) fails if its record cannot be written.

A record holds who, what, which tenant/artifact/version, the decision, a
reason code and a free-text reason -- never key material: the event fields
are checked to be short scalars, and callers pass names and codes only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealstore.errors import AuthenticationError, FormatError, NotFound
from sealstore.format import canonical_json
from sealstore.signing import Signer, key_id_for, sign_document, signer_ids, verify_document

__all__ = [
    "AuditKey",
    "AuditLog",
    "Problem",
    "StreamReport",
    "read_records",
    "streams",
    "verify_log",
]

PREFIX = "audit"
CHECKPOINT = "sealstore-audit-checkpoint-v1"
DOMAIN = "audit-checkpoint"
# The fields a caller may set; the log adds v, stream, seq, prev and time.
FIELDS = ("who", "action", "tenant", "artifact", "version", "decision", "code", "reason", "detail")
DECISIONS = ("ok", "granted", "denied", "failed", "flagged")
_MAX_TEXT = 500
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SEGMENT = re.compile(r"^(\d{16})\.jsonl$")


class AuditStorage(Protocol):
    """What the log needs of a storage backend (``vault.storage.Storage`` has it)."""

    def read(self, path: str) -> bytes: ...

    def put_new(self, path: str, data: bytes) -> None: ...

    def list(self, path: str) -> list[str]: ...


class AuditKey:
    """An Ed25519 key file that signs a stream's checkpoints (raw 32-byte seed, mode 0600).

    Not a store signing key: it proves only that the writer of a checkpoint
    held this file, so a reader's machine can have one without being trusted
    to publish anything.
    """

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._key = private
        raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.signing_key_id = key_id_for(raw)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> AuditKey:
        """The key in *path*, created (0600, atomically) if the file does not exist.

        Raises:
            FormatError: the file is not a 32-byte key.
        """
        p = Path(path)
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, os.urandom(32))
                os.fsync(fd)
                os.close(fd)
                # link() refuses an existing target: of two processes creating
                # the key at once, both end up using the first one's.
                os.link(tmp, p)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        seed = p.read_bytes()
        if len(seed) != 32:
            raise FormatError(f"audit key {p} is not a 32-byte Ed25519 key")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"AuditKey({self.signing_key_id})"

    def __reduce__(self) -> Any:
        raise TypeError("an audit key cannot be pickled")


def genesis(stream: str) -> str:
    """The ``prev`` of a stream's first record: binds the chain to the stream's name."""
    return hashlib.sha256(b"sealstore/v1/audit-genesis\x00" + stream.encode()).hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(dict(record))).hexdigest()


def _timestamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_value(value: Any, where: str, depth: int = 0) -> Any:
    """Short JSON scalars, or small lists/maps of them: nothing that could carry a key."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value if len(value) <= _MAX_TEXT else value[:_MAX_TEXT] + "..."
    if isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"audit field {where}: bytes are never written to the audit log")
    if depth < 2 and isinstance(value, list | tuple) and len(value) <= 64:
        return [_check_value(v, where, depth + 1) for v in value]
    if depth < 2 and isinstance(value, Mapping) and len(value) <= 64:
        return {str(k): _check_value(v, f"{where}.{k}", depth + 1) for k, v in value.items()}
    raise TypeError(f"audit field {where}: {type(value).__name__} is not a loggable value")


def event(**fields: Any) -> dict[str, Any]:
    """An audit event from keyword fields (see FIELDS), checked; None fields dropped.

    Raises:
        TypeError: an unknown field, or a value that is not a short scalar.
        ValueError: no action, or a decision that is not one of DECISIONS.
    """
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown audit field {unknown[0]!r}")
    if not isinstance(fields.get("action"), str) or not fields["action"]:
        raise ValueError("an audit event needs an action")
    if fields.get("decision", "ok") not in DECISIONS:
        raise ValueError(f"audit decision must be one of {', '.join(DECISIONS)}")
    return {k: _check_value(v, k) for k, v in fields.items() if v is not None}


def stream_name(*parts: str) -> str:
    """A stream name from *parts* (host, port, ...), reduced to safe characters."""
    text = "-".join(p for p in parts if p)
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-") or "stream"
    return text[:100]


def default_stream(signer: Signer) -> str:
    """One stream per machine and key: ``HOST-FINGERPRINT``."""
    fp = hashlib.sha256(signer.signing_key_id.encode()).hexdigest()[:12]
    return stream_name(socket.gethostname(), fp)


@dataclass
class _Pending:
    fields: dict[str, Any]
    time: float
    record: dict[str, Any] | None = None
    error: BaseException | None = None


class AuditLog:
    """One writer's stream of an audit log.

    Args:
        storage: where the log lives (its ``audit/`` folder).
        signer: signs the checkpoints (an :class:`AuditKey` or a store signer).
        stream: the stream's name (default: this host and the signer's key).
        clock: seconds since the epoch.
    """

    RETRIES = 20

    def __init__(
        self,
        storage: AuditStorage,
        signer: Signer,
        *,
        stream: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.signer = signer
        self.stream = stream or default_stream(signer)
        if not _NAME.match(self.stream):
            raise ValueError(f"audit stream name {self.stream!r} is not a plain name")
        self._clock = clock
        self._cv = threading.Condition()
        self._pending: list[_Pending] = []
        self._writing = False
        self._head: tuple[int, str] | None = None  # (next seq, prev hash), once read

    def __repr__(self) -> str:
        return f"AuditLog({self.stream!r}, signer={self.signer.signing_key_id})"

    def append(self, **fields: Any) -> dict[str, Any]:
        """Write one record; return it once it is durable (with seq and hash).

        Raises:
            TypeError, ValueError: a bad event (see :func:`event`).
            BackendError, AuthenticationError: the log could not be written,
                or this stream's last segment does not verify.
        """
        item = _Pending(event(**fields), self._clock())
        with self._cv:
            self._pending.append(item)
            while item.record is None and item.error is None and self._writing:
                self._cv.wait()
            if item.record is not None or item.error is not None:
                return self._result(item)
            # Nobody is writing: this caller writes everything pending.
            self._writing = True
            batch, self._pending = self._pending, []
        try:
            records = self._write(batch)
        except BaseException as exc:
            with self._cv:
                for p in batch:
                    p.error = exc
                self._writing = False
                self._cv.notify_all()
            raise
        with self._cv:
            for p, rec in zip(batch, records, strict=True):
                p.record = rec
            self._writing = False
            self._cv.notify_all()
        return self._result(item)

    @staticmethod
    def _result(item: _Pending) -> dict[str, Any]:
        if item.error is not None:
            raise item.error
        assert item.record is not None
        return item.record

    def _folder(self) -> str:
        return f"{PREFIX}/{self.stream}"

    def _read_head(self) -> tuple[int, str]:
        """The next seq and prev hash, from the stream's last segment (verified)."""
        names = sorted(n for n in self.storage.list(self._folder()) if _SEGMENT.match(n))
        if not names:
            return 0, genesis(self.stream)
        path = f"{self._folder()}/{names[-1]}"
        records, cp = _parse_segment(self.storage.read(path), path)
        if cp is None:
            raise AuthenticationError(f"audit segment {path} has no checkpoint")
        body = verify_document(
            DOMAIN, cp, [self.signer.signing_key_id], what=f"audit checkpoint of {path}"
        )
        if not records or body.get("head") != record_hash(records[-1]):
            raise AuthenticationError(f"audit segment {path} does not match its checkpoint")
        return int(records[-1]["seq"]) + 1, record_hash(records[-1])

    def _write(self, batch: list[_Pending]) -> list[dict[str, Any]]:
        for _ in range(self.RETRIES):
            if self._head is None:
                self._head = self._read_head()
            seq, prev = self._head
            records = []
            for p in batch:
                rec = {
                    "v": 1,
                    "stream": self.stream,
                    "seq": seq,
                    "prev": prev,
                    "time": _timestamp(p.time),
                    **p.fields,
                }
                prev = record_hash(rec)
                seq += 1
                records.append(rec)
            body = {
                "format": CHECKPOINT,
                "stream": self.stream,
                "seq": seq - 1,
                "head": prev,
                "time": _timestamp(self._clock()),
            }
            cp = sign_document(DOMAIN, body, self.signer)
            lines = [canonical_json(r) for r in records] + [canonical_json({"checkpoint": cp})]
            try:
                self.storage.put_new(
                    f"{self._folder()}/{self._head[0]:016d}.jsonl", b"\n".join(lines) + b"\n"
                )
            except FileExistsError:
                # Another process on this stream wrote first: chain after it.
                self._head = None
                continue
            self._head = (seq, prev)
            return [dict(r, hash=record_hash(r)) for r in records]
        raise AuthenticationError(f"audit stream {self.stream}: too many concurrent writers")


def _parse_segment(data: bytes, path: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The records of a segment and its checkpoint (None if the last line is not one)."""
    records: list[dict[str, Any]] = []
    cp = None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, line in enumerate(lines):
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise FormatError(f"{path} line {i + 1} is not JSON") from None
        if not isinstance(obj, dict):
            raise FormatError(f"{path} line {i + 1} is not a JSON object")
        if "checkpoint" in obj:
            if i != len(lines) - 1 or not isinstance(obj["checkpoint"], dict):
                raise FormatError(f"{path} line {i + 1}: a checkpoint before the end")
            cp = obj["checkpoint"]
        else:
            records.append(obj)
    return records, cp


# -- reading and verifying ------------------------------------------------------------


def streams(storage: AuditStorage) -> list[str]:
    """The names of the log's streams."""
    return sorted(n for n in storage.list(PREFIX) if _NAME.match(n))


def _segments(storage: AuditStorage, stream: str) -> list[str]:
    names = storage.list(f"{PREFIX}/{stream}")
    return sorted(n for n in names if _SEGMENT.match(n))


def read_records(storage: AuditStorage) -> Iterator[dict[str, Any]]:
    """Every record of every stream, oldest first (by time, then stream and seq); unverified.

    Lines that do not parse are skipped here; :func:`verify_log` reports them.
    """
    out = []
    for s in streams(storage):
        for name in _segments(storage, s):
            try:
                data = storage.read(f"{PREFIX}/{s}/{name}")
            except NotFound:
                continue
            for line in data.split(b"\n"):
                try:
                    rec = json.loads(line)
                except (ValueError, UnicodeDecodeError, RecursionError):
                    continue  # one bad line hides nothing else
                if isinstance(rec, dict) and isinstance(rec.get("time"), str):
                    out.append(rec)
    out.sort(key=lambda r: (r["time"], str(r.get("stream")), _int(r.get("seq"))))
    yield from out


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else -1


@dataclass(frozen=True)
class Problem:
    stream: str
    where: str  # a segment file, or "seq N"
    what: str

    def __str__(self) -> str:
        return f"{self.stream} {self.where}: {self.what}"


@dataclass
class StreamReport:
    stream: str
    records: int = 0
    signer: str | None = None
    head: str | None = None  # the hash of the last verified checkpoint's record
    seq: int = -1  # that record's seq
    problems: list[Problem] = field(default_factory=list)


def verify_log(
    storage: AuditStorage,
    *,
    trusted: Iterable[str] | None = None,
    anchors: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[StreamReport]:
    """Check every stream: chain, sequence, checkpoint signatures, and the anchors.

    Args:
        trusted: key ids allowed to sign checkpoints (None: any, each stream
            held to the key its first checkpoint names).
        anchors: stream -> ``{"seq": N, "head": HASH}``, checkpoints seen
            earlier: the stream must still reach seq N with that hash.

    Returns:
        One report per stream (and one per anchored stream that is gone).
    """
    trusted_set = None if trusted is None else set(trusted)
    anchors = anchors or {}
    reports = [_verify_stream(storage, s, trusted_set, anchors.get(s)) for s in streams(storage)]
    present = {r.stream for r in reports}
    for s in sorted(set(anchors) - present):
        gone = Problem(s, "stream", f"deleted: it had {_int(anchors[s].get('seq')) + 1} records")
        reports.append(StreamReport(s, problems=[gone]))
    return reports


def _verify_stream(
    storage: AuditStorage,
    stream: str,
    trusted: set[str] | None,
    anchor: Mapping[str, Any] | None,
) -> StreamReport:
    rep = StreamReport(stream)

    def bad(where: str, what: str) -> None:
        rep.problems.append(Problem(stream, where, what))

    seq, prev = 0, genesis(stream)
    hashes: dict[int, str] = {}
    for name in _segments(storage, stream):
        path = f"{PREFIX}/{stream}/{name}"
        start = int(_SEGMENT.match(name).group(1))  # type: ignore[union-attr]
        if start != seq:
            what = "records deleted before it" if start > seq else "overlaps the segment before"
            bad(name, f"starts at seq {start}, expected {seq}: {what}")
            seq = start
        try:
            records, cp = _parse_segment(storage.read(path), path)
        except (FormatError, NotFound) as exc:
            bad(name, str(exc))
            continue
        for rec in records:
            rseq = _int(rec.get("seq"))
            where = f"seq {rseq if rseq >= 0 else '?'} ({name})"
            if rec.get("stream") != stream:
                bad(where, f"belongs to stream {rec.get('stream')!r}: moved here")
            if rseq != seq:
                bad(where, f"out of order: expected seq {seq} (reordered or deleted records)")
            elif rec.get("prev") != prev:
                bad(
                    where,
                    "does not chain to the record before it (that one was edited, "
                    "or records were deleted or reordered)",
                )
            prev = record_hash(rec)
            hashes[rseq] = prev
            seq = rseq + 1 if rseq >= 0 else seq + 1
            rep.records += 1
        if cp is None:
            bad(name, "has no checkpoint (truncated?)")
            continue
        named = signer_ids(cp)
        if rep.signer is None:
            rep.signer = named[0] if named else None
        allowed = [rep.signer] if rep.signer else []
        if trusted is not None:
            allowed = [k for k in allowed if k in trusted]
        try:
            body = verify_document(DOMAIN, cp, allowed, what=f"checkpoint of {name}")
        except AuthenticationError as exc:
            why = "signed by a key not trusted here" if allowed == [] else str(exc)
            bad(name, f"checkpoint: {why}")
            continue
        if body.get("stream") != stream or body.get("format") != CHECKPOINT:
            bad(name, "checkpoint is for another stream")
        elif body.get("seq") != seq - 1 or body.get("head") != prev:
            bad(
                name,
                f"checkpoint covers seq {body.get('seq')} with another head: a record "
                "in this segment was edited, removed or added",
            )
        else:
            rep.seq, rep.head = seq - 1, prev
    if anchor is not None:
        aseq, ahead = _int(anchor.get("seq")), anchor.get("head")
        if aseq >= seq:
            bad(
                "tail",
                f"truncated: the stream ends at seq {seq - 1}, but a checkpoint seen "
                f"earlier covers seq {aseq}",
            )
        elif hashes.get(aseq) != ahead:
            bad(f"seq {aseq}", "differs from the checkpoint seen earlier: rewritten")
        if anchor.get("signer") and rep.signer != anchor["signer"]:
            bad("stream", f"now signed by {rep.signer}, earlier by {anchor['signer']}")
    return rep


def export_lines(records: Iterable[Mapping[str, Any]]) -> Iterator[bytes]:
    """Records as JSON lines (canonical encoding, one per line)."""
    for r in records:
        yield canonical_json(dict(r)) + b"\n"
