"""The audit log: chain, checkpoints, tampering, group commit; store records; the CLI."""

from __future__ import annotations

import base64
import json
import pickle
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sealstore.audit import (
    AuditKey,
    AuditLog,
    Problem,
    event,
    read_records,
    record_hash,
    streams,
    verify_log,
)
from sealstore.errors import AuthenticationError, FormatError, Refused
from sealstore.format import canonical_json
from sealstore.signing import sign_document
from sealstore.vault import backup, safemode
from sealstore.vault.storage import Storage, open_storage
from sealstore.vault.store import Store
from tests.conftest import PASSPHRASE, make_keyring
from tests.s3util import new_bucket, s3_options
from tests.signed_docs import edited, fields, signer

# The commands run in this process (tests.test_cli.in_process): what they do, not
# the process boundary, which tests/test_cli.py and test_fail_closed_cli.py test.
from tests.test_cli import fails, ok
from tests.test_cli import in_process as run
from tests.test_store import model_dir

STREAM = "s1"


def seg(start: int) -> str:
    return f"{start:016d}.jsonl"


def seg_path(start: int, stream: str = STREAM) -> str:
    return f"audit/{stream}/{seg(start)}"


def problems(storage: Storage, **kwargs: Any) -> list[Problem]:
    return [p for rep in verify_log(storage, **kwargs) for p in rep.problems]


def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


class Gate:
    """A storage whose next ``put_new`` waits until released, counting write conflicts.

    While one writer is held there, other appends pile up; the next writer
    then commits them all in one segment -- a segment of several records,
    made by the real writer, for the tamper tests to cut into.
    """

    def __init__(self, inner: Storage, delay: float = 0.0) -> None:
        self.inner = inner
        self.delay = delay
        self.conflicts = 0
        self._hold: threading.Event | None = None
        self.entered = threading.Event()

    def arm(self) -> threading.Event:
        self._hold, self.entered = threading.Event(), threading.Event()
        return self._hold

    def read(self, path: str) -> bytes:
        return self.inner.read(path)

    def list(self, path: str) -> list[str]:
        return self.inner.list(path)

    def put_new(self, path: str, data: bytes) -> None:
        hold, self._hold = self._hold, None
        if hold is not None:
            self.entered.set()
            assert hold.wait(10)
        if self.delay:
            time.sleep(self.delay)
        try:
            self.inner.put_new(path, data)
        except FileExistsError:
            self.conflicts += 1
            raise


def commit_group(log: AuditLog, gate: Gate, names: list[str]) -> None:
    """Append one record per name: the first alone in a segment, the rest in the next one."""
    hold = gate.arm()
    with ThreadPoolExecutor(len(names)) as pool:
        leader = pool.submit(log.append, action="push", artifact=names[0])
        assert gate.entered.wait(10)
        rest = [pool.submit(log.append, action="push", artifact=n) for n in names[1:]]
        # The followers are queued behind the held writer (no public hook says so).
        wait_for(lambda: len(log._pending) == len(rest), "the followers to queue")
        hold.set()
        for f in [leader, *rest]:
            f.result(timeout=10)


@pytest.fixture
def key(tmp_path: Path) -> AuditKey:
    return AuditKey.load_or_create(tmp_path / "audit.key")


@pytest.fixture
def other_key(tmp_path: Path) -> AuditKey:
    return AuditKey.load_or_create(tmp_path / "other.key")


@pytest.fixture(params=["file", "seaweedfs"])
def log_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "file":
        return open_storage(tmp_path / "log")
    services = request.getfixturevalue("services")
    opts = s3_options(services["s3_url"], services["s3_key"], services["s3_secret"])
    return open_storage(f"s3://{new_bucket(opts)}/audit", **opts)


@pytest.fixture
def laid_out(tmp_path: Path, key: AuditKey) -> Storage:
    """A stream of 8 records in segments [0], [1 2 3], [4], [5 6 7], all verified."""
    storage = open_storage(tmp_path / "log")
    gate = Gate(storage)
    log = AuditLog(gate, key, stream=STREAM)  # type: ignore[arg-type]
    commit_group(log, gate, ["a0", "a1", "a2", "a3"])
    commit_group(log, gate, ["a4", "a5", "a6", "a7"])
    assert storage.list(f"audit/{STREAM}") == [seg(0), seg(1), seg(4), seg(5)]
    assert problems(storage) == []
    return storage


def lines(storage: Storage, start: int) -> list[bytes]:
    return storage.read(seg_path(start)).splitlines()


def put_lines(storage: Storage, start: int, new: list[bytes]) -> None:
    storage.put(seg_path(start), b"\n".join(new) + b"\n")


def edit_record(storage: Storage, seq: int, **changes: Any) -> None:
    """Change fields of the record *seq* in place (the line stays valid JSON)."""
    for start in (0, 1, 4, 5):
        ls = lines(storage, start)
        for i, line in enumerate(ls):
            rec = json.loads(line)
            if rec.get("seq") == seq:
                ls[i] = json.dumps(dict(rec, **changes)).encode()
                put_lines(storage, start, ls)
                return
    raise AssertionError(f"no record {seq}")


# -- writing and verifying -------------------------------------------------------------


def test_records_chain_and_verify(log_storage: Storage, key: AuditKey) -> None:
    log = AuditLog(log_storage, key, stream=STREAM)
    out = [log.append(action="push", tenant="t", artifact=f"m{i}", version="1") for i in range(3)]
    assert [r["seq"] for r in out] == [0, 1, 2]
    assert out[1]["prev"] == out[0]["hash"] and out[2]["prev"] == out[1]["hash"]
    assert all(r["hash"] == record_hash({k: v for k, v in r.items() if k != "hash"}) for r in out)
    assert streams(log_storage) == [STREAM]
    got = list(read_records(log_storage))
    assert [r["artifact"] for r in got] == ["m0", "m1", "m2"]
    assert all(r["stream"] == STREAM and "decision" not in r for r in got)
    [rep] = verify_log(log_storage)
    assert (rep.stream, rep.records, rep.seq, rep.head) == (STREAM, 3, 2, out[2]["hash"])
    assert rep.signer == key.signing_key_id and rep.problems == []
    # A second writer object (a restarted process) continues the chain.
    again = AuditLog(log_storage, key, stream=STREAM).append(action="pull")
    assert (again["seq"], again["prev"]) == (3, out[2]["hash"])
    assert verify_log(log_storage, trusted=[key.signing_key_id])[0].problems == []


def test_each_segment_ends_with_a_signed_checkpoint(laid_out: Storage, key: AuditKey) -> None:
    cp = json.loads(lines(laid_out, 5)[-1])["checkpoint"]
    last = fields(cp)
    recs = [json.loads(x) for x in lines(laid_out, 5)[:-1]]
    assert [r["seq"] for r in recs] == [5, 6, 7]
    assert (last["seq"], last["head"], signer(cp)) == (
        7,
        record_hash(recs[-1]),
        key.signing_key_id,
    )


def test_first_record_chains_to_the_stream_name(tmp_path: Path, key: AuditKey) -> None:
    storage = open_storage(tmp_path / "log")
    a = AuditLog(storage, key, stream="a").append(action="x")
    b = AuditLog(storage, key, stream="b").append(action="x")
    assert a["prev"] != b["prev"]
    with pytest.raises(ValueError, match="plain name"):
        AuditLog(storage, key, stream="../etc")


# -- tampering -------------------------------------------------------------------------


def test_edited_record_in_the_middle_of_a_segment(laid_out: Storage) -> None:
    edit_record(laid_out, 2, decision="denied")
    [p] = problems(laid_out)
    assert p.where == f"seq 3 ({seg(1)})" and "does not chain" in p.what


def test_edited_last_record_is_caught_by_the_checkpoint(laid_out: Storage) -> None:
    edit_record(laid_out, 7, artifact="innocent")
    [p] = problems(laid_out)
    assert p.where == seg(5) and "checkpoint covers seq 7 with another head" in p.what


def test_deleted_record_in_the_middle_of_a_segment(laid_out: Storage) -> None:
    ls = lines(laid_out, 1)
    put_lines(laid_out, 1, [ls[0], ls[2], ls[3]])  # seq 2 gone
    [p] = problems(laid_out)
    assert p.where == f"seq 3 ({seg(1)})" and "expected seq 2" in p.what


def test_swapped_records(laid_out: Storage) -> None:
    ls = lines(laid_out, 1)
    put_lines(laid_out, 1, [ls[0], ls[2], ls[1], ls[3]])  # seq 1, 3, 2
    found = problems(laid_out)
    assert found[0].where == f"seq 3 ({seg(1)})" and "out of order" in found[0].what
    assert any(p.where == seg(1) and "checkpoint" in p.what for p in found)


def test_deleted_middle_segment(laid_out: Storage) -> None:
    laid_out.delete(seg_path(1))
    found = problems(laid_out)
    assert found[0].where == seg(4)
    assert "starts at seq 4, expected 1: records deleted before it" in found[0].what


def test_record_moved_from_another_stream(laid_out: Storage, key: AuditKey) -> None:
    other = AuditLog(laid_out, key, stream="s2")
    moved = [other.append(action="push", artifact=f"b{i}") for i in range(3)][2]
    ls = lines(laid_out, 1)
    ls[1] = canonical_json({k: v for k, v in moved.items() if k != "hash"})  # s1's seq 2
    put_lines(laid_out, 1, ls)
    reports = {r.stream: r for r in verify_log(laid_out)}
    assert reports["s2"].problems == []
    assert reports[STREAM].problems[0] == Problem(
        STREAM, f"seq 2 ({seg(1)})", "belongs to stream 's2': moved here"
    )


def test_truncated_tail_needs_the_anchor(laid_out: Storage, key: AuditKey) -> None:
    [rep] = verify_log(laid_out)
    anchor = {STREAM: {"seq": rep.seq, "head": rep.head, "signer": rep.signer}}
    assert problems(laid_out, anchors=anchor) == []
    laid_out.delete(seg_path(5))
    assert problems(laid_out) == []  # a chain alone cannot show it
    [p] = problems(laid_out, anchors=anchor)
    assert p.where == "tail" and "truncated" in p.what and "covers seq 7" in p.what
    # A writer that carries on after the cut reuses seqs 5.. : the anchored head differs.
    AuditLog(laid_out, key, stream=STREAM).append(action="a")
    AuditLog(laid_out, key, stream=STREAM).append(action="b")
    AuditLog(laid_out, key, stream=STREAM).append(action="c")
    [p] = problems(laid_out, anchors=anchor)
    assert p.where == "seq 7" and "rewritten" in p.what
    # The whole stream deleted.
    for name in laid_out.list(f"audit/{STREAM}"):
        laid_out.delete(f"audit/{STREAM}/{name}")
    found = problems(laid_out, anchors=anchor)  # the empty folder is still there
    assert found[0].where == "tail" and "ends at seq -1" in found[0].what
    (laid_out.root / "audit" / STREAM).rmdir()  # type: ignore[attr-defined]
    [p] = problems(laid_out, anchors=anchor)
    assert (p.stream, p.where) == (STREAM, "stream") and "deleted: it had 8 records" in p.what


def _resign(storage: Storage, start: int, signer: Any, **changes: Any) -> None:
    ls = lines(storage, start)
    body = fields(json.loads(ls[-1])["checkpoint"])
    ls[-1] = canonical_json(
        {"checkpoint": sign_document("audit-checkpoint", dict(body, **changes), signer)}
    )
    put_lines(storage, start, ls)


def test_one_checkpoint_resigned_by_another_key(laid_out: Storage, other_key: AuditKey) -> None:
    _resign(laid_out, 4, other_key)
    [p] = problems(laid_out)
    assert p.where == seg(4) and "untrusted key" in p.what


def test_every_checkpoint_resigned_by_another_key(
    laid_out: Storage, key: AuditKey, other_key: AuditKey
) -> None:
    [rep] = verify_log(laid_out)
    anchor = {STREAM: {"seq": rep.seq, "head": rep.head, "signer": rep.signer}}
    for start in (0, 1, 4, 5):
        _resign(laid_out, start, other_key)
    # Self-consistent: only a reader who knows the writer's key (or its last head) sees it.
    assert problems(laid_out) == []
    [p] = problems(laid_out, anchors=anchor)
    assert p.where == "stream" and other_key.signing_key_id in p.what
    assert f"earlier by {key.signing_key_id}" in p.what
    found = problems(laid_out, trusted=[key.signing_key_id])
    assert [p.where for p in found] == [seg(0), seg(1), seg(4), seg(5)]
    assert all("not trusted here" in p.what for p in found)


def test_rechained_rewrite_without_the_key(laid_out: Storage) -> None:
    """Edit seq 2, re-chain every later record, fix every checkpoint's head: no signature."""
    prev = None
    heads: dict[int, tuple[int, str]] = {}
    for start in (0, 1, 4, 5):
        ls = lines(laid_out, start)
        for i, line in enumerate(ls[:-1]):
            rec = json.loads(line)
            if rec["seq"] == 2:
                rec["decision"] = "denied"
            if rec["seq"] > 2:
                rec["prev"] = prev
            ls[i] = canonical_json(rec)
            prev = record_hash(rec)
            heads[start] = (rec["seq"], prev)
        cp = json.loads(ls[-1])
        cp["checkpoint"] = edited(cp["checkpoint"], head=heads[start][1])
        ls[-1] = canonical_json(cp)
        put_lines(laid_out, start, ls)
    found = problems(laid_out)
    assert [p.where for p in found] == [seg(1), seg(4), seg(5)]
    assert all("signature does not verify" in p.what for p in found)


def test_garbage_and_missing_checkpoint(laid_out: Storage) -> None:
    ls = lines(laid_out, 5)
    put_lines(laid_out, 5, ls[:-1])  # the checkpoint line cut off
    [p] = problems(laid_out)
    assert p.where == seg(5) and "no checkpoint" in p.what
    put_lines(laid_out, 5, [*ls[:-1], ls[-1], ls[0]])  # a record after the checkpoint
    [p] = problems(laid_out)
    assert p.where == seg(5) and "checkpoint before the end" in p.what
    put_lines(laid_out, 5, ls)
    put_lines(laid_out, 1, [b"{not json"])
    [p] = [p for p in problems(laid_out) if p.where == seg(1)]
    assert "line 1 is not JSON" in p.what


def test_read_records_skips_only_the_bad_line(laid_out: Storage) -> None:
    """read_records: "Lines that do not parse are skipped here; verify_log reports them"."""
    ls = lines(laid_out, 1)
    put_lines(laid_out, 1, [ls[0], b"{not json", *ls[1:]])
    assert any("line 2 is not JSON" in p.what for p in problems(laid_out))
    assert [r["seq"] for r in read_records(laid_out)] == list(range(8))


def test_writer_refuses_to_chain_after_a_head_it_cannot_verify(
    laid_out: Storage, key: AuditKey, other_key: AuditKey
) -> None:
    # Another key cannot continue the stream (a replaced audit key needs a new stream).
    with pytest.raises(AuthenticationError, match="untrusted key"):
        AuditLog(laid_out, other_key, stream=STREAM).append(action="x")
    edit_record(laid_out, 7, artifact="innocent")
    with pytest.raises(AuthenticationError, match="does not match its checkpoint"):
        AuditLog(laid_out, key, stream=STREAM).append(action="x")
    assert laid_out.list(f"audit/{STREAM}") == [seg(0), seg(1), seg(4), seg(5)]


# -- group commit and concurrent writers -------------------------------------------------


def test_group_commit_of_50_threads(log_storage: Storage, key: AuditKey) -> None:
    gate = Gate(log_storage, delay=0.02)  # a remote store's latency: callers pile up behind it
    log = AuditLog(gate, key, stream=STREAM)  # type: ignore[arg-type]
    barrier = threading.Barrier(50)

    def one(i: int) -> dict[str, Any]:
        barrier.wait()
        return log.append(action="release", artifact=f"m{i}")

    with ThreadPoolExecutor(50) as pool:
        out = list(pool.map(one, range(50)))
    assert sorted(r["seq"] for r in out) == list(range(50))
    assert sorted(r["artifact"] for r in out) == sorted(f"m{i}" for i in range(50))
    [rep] = verify_log(log_storage)
    assert rep.problems == [] and rep.records == 50 and rep.seq == 49
    assert len(log_storage.list(f"audit/{STREAM}")) < 50
    assert gate.conflicts == 0


def test_two_processes_on_one_stream(log_storage: Storage, key: AuditKey) -> None:
    gate = Gate(log_storage)
    a = AuditLog(gate, key, stream=STREAM)  # type: ignore[arg-type]
    b = AuditLog(gate, key, stream=STREAM)  # type: ignore[arg-type]
    for i in range(4):
        a.append(action="a", artifact=f"a{i}")
        b.append(action="b", artifact=f"b{i}")
    # From the second round on, each writer's cached head is stale: put_new refuses, it
    # re-reads the head and chains after the other one.
    assert gate.conflicts == 6

    def hammer(log: AuditLog, tag: str) -> None:
        for i in range(8):
            log.append(action=tag, artifact=f"{tag}{i}")

    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(hammer, a, "x"), pool.submit(hammer, b, "y")]:
            f.result(timeout=60)
    [rep] = verify_log(log_storage)
    assert rep.problems == [] and rep.records == 24 and rep.seq == 23
    recs = list(read_records(log_storage))
    assert sorted(r["seq"] for r in recs) == list(range(24))


# -- events and keys ---------------------------------------------------------------------


def test_event_refuses_bytes_and_unknown_fields(tmp_path: Path, key: AuditKey) -> None:
    with pytest.raises(TypeError, match="bytes are never written"):
        event(action="push", reason=b"\x00" * 32)
    with pytest.raises(TypeError, match="bytes"):
        event(action="push", detail={"dek": bytearray(32)})
    with pytest.raises(TypeError, match="bytes"):
        event(action="push", detail={"keys": [memoryview(b"k")]})
    with pytest.raises(TypeError, match="unknown audit field 'dek'"):
        event(action="push", dek="00" * 32)
    with pytest.raises(TypeError, match="not a loggable value"):
        event(action="push", detail={"key": key})
    with pytest.raises(ValueError, match="needs an action"):
        event(who="me")
    with pytest.raises(ValueError, match="decision must be one of"):
        event(action="push", decision="maybe")
    assert event(action="push", tenant=None, reason="x" * 600)["reason"] == "x" * 500 + "..."
    storage = open_storage(tmp_path / "log")
    log = AuditLog(storage, key, stream=STREAM)
    with pytest.raises(TypeError):
        log.append(action="push", detail={"dek": b"secret"})
    assert storage.list("audit") == []  # nothing written for a refused event


def test_audit_key_is_opaque(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "audit.key"
    k = AuditKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    seed = path.read_bytes()
    assert len(seed) == 32
    assert AuditKey.load_or_create(path).signing_key_id == k.signing_key_id  # loaded, not new
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(k)
    text = repr(k) + str(k)
    assert text == f"AuditKey({k.signing_key_id})" * 2
    for form in (seed.hex(), base64.b64encode(seed).decode(), repr(seed)):
        assert form not in text
    log = AuditLog(open_storage(tmp_path / "log"), k, stream=STREAM)
    assert seed.hex() not in repr(log)
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"short")
    with pytest.raises(FormatError, match="not a 32-byte"):
        AuditKey.load_or_create(bad)


def test_audit_key_created_once_by_racing_threads(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "audit.key"
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: AuditKey.load_or_create(path).signing_key_id, range(8)))
    assert len(ids) == 1
    assert [p.name for p in path.parent.iterdir()] == ["audit.key"]  # no temporary file left


# -- the store writes records ------------------------------------------------------------


def _root(store: Store) -> Path:
    return Path(store.url[len("file://") :])


def _actions(storage: Storage) -> list[tuple[Any, ...]]:
    return [
        (r["action"], r.get("decision"), r.get("artifact"), r.get("version"))
        for r in read_records(storage)
    ]


def test_store_operations_are_recorded(store: Store, tmp_path: Path) -> None:
    src = model_dir(tmp_path, {"w.bin": 5000})
    store.push(src, "m", keys=["local:"])
    store.push(src, "m", keys=["local:"])
    store.pull("m:1", tmp_path / "out")
    new_ring = make_keyring(tmp_path / "new.json")
    store.rotate("m:1", [f"local:{new_ring.path}"])
    store.shred("m:2")
    other = make_keyring(tmp_path / "other.json")
    store.grant(str(other.signing_key_id), "reader", tenant="default")
    store.grant(str(other.signing_key_id), None, tenant="default")
    snap, _ = backup.create(store, f"file://{tmp_path}/bk")
    backup.restore(f"file://{tmp_path}/bk", store=store)
    safemode.enter(store, "incident 7")
    with pytest.raises(Refused):
        store.pull("m:1", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert _actions(store.storage) == [
        ("push", "ok", "m", "1"),
        ("push", "ok", "m", "2"),
        ("pull", "granted", "m", "1"),
        ("rotate", "ok", "m", "1"),
        ("shred", "ok", "m", "2"),
        ("policy.grant", "ok", None, None),
        ("policy.revoke", "ok", None, None),
        ("backup", "ok", None, None),
        ("restore", "ok", None, None),
        ("safe-mode.enter", "ok", None, None),
        ("pull", "denied", None, None),
    ]
    recs = list(read_records(store.storage))
    assert all(r["detail"]["store"] == store.id and "@" in r["who"] for r in recs)
    grant = recs[5]
    assert (grant["tenant"], grant["detail"]["key"], grant["detail"]["role"]) == (
        "default",
        other.signing_key_id,
        "reader",
    )
    assert recs[7]["detail"]["snapshot"] == snap.id
    assert recs[9]["reason"] == "incident 7"
    denied = recs[-1]
    assert (denied["tenant"], denied["code"], denied["detail"]["ref"]) == (
        "default",
        "safe-mode",
        "m:1",
    )
    assert "safe mode" in denied["reason"]
    [rep] = verify_log(store.storage)
    assert rep.problems == [] and rep.records == len(recs)


def test_tag_is_audited(store: Store, tmp_path: Path) -> None:
    """vault/auditing.py: "push, pull, load, tag, rotate, ... each append one record"."""
    store.push(model_dir(tmp_path, {"w.bin": 10}), "m", keys=["local:"])
    store.tag("m:1", "prod")
    assert [a[0] for a in _actions(store.storage)] == ["push", "tag"]


def test_load_is_recorded(store: Store, tmp_path: Path) -> None:
    from sealstore.vault.pull import open_file

    store.push(model_dir(tmp_path, {"w.bin": 10}), "m", keys=["local:"])
    _, _, fp, _, dek = open_file(store, "m:1", "w.bin")
    fp.close()
    dek.close()
    last = list(read_records(store.storage))[-1]
    assert (last["action"], last["decision"], last["detail"]["path"]) == (
        "load",
        "granted",
        "w.bin",
    )


def test_no_key_material_in_the_audit_log(store: Store, tmp_path: Path) -> None:
    from sealstore.format import read_preamble
    from sealstore.vault.pull import unwrap_version_key

    m = store.push(model_dir(tmp_path, {"w.bin": 70_000}), "m", keys=["local:"])
    store.pull("m", tmp_path / "out")
    with store.storage.open_read(store.object_path("default", m.files[0].object)) as fp:
        dek = unwrap_version_key(m, read_preamble(fp)).material()
    store.shred("m:1")
    files = [p for p in (_root(store) / "audit").rglob("*") if p.is_file()]
    assert len(files) == 3  # push, pull, shred
    needles = [dek, dek.hex().encode(), base64.b64encode(dek), PASSPHRASE.encode()]
    for p in files:
        data = p.read_bytes()
        for needle in needles:
            assert needle not in data, p


def test_pull_fails_closed_when_the_log_cannot_be_written(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.push(model_dir(tmp_path, {"w.bin": 100}), "m", keys=["local:"])
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a folder")
    monkeypatch.setenv("SEALSTORE_AUDIT", str(blocker / "log"))
    with pytest.raises(OSError):
        store.pull("m:1", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    with pytest.raises(OSError):
        Store.open(store.url).pull("m:1", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # The CLI: one line, no output.
    line = fails(run("pull", "m:1", "-o", tmp_path / "cli", "--store", store.url), 5)
    assert "a-file" in line
    assert not (tmp_path / "cli").exists()
    monkeypatch.delenv("SEALSTORE_AUDIT")
    store.pull("m:1", tmp_path / "out")
    assert (tmp_path / "out" / "w.bin").exists()


def test_separate_log_location(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEALSTORE_AUDIT", str(tmp_path / "elsewhere"))
    store.push(model_dir(tmp_path, {"w.bin": 10}), "m", keys=["local:"])
    assert [a[0] for a in _actions(open_storage(tmp_path / "elsewhere"))] == ["push"]
    assert not (_root(store) / "audit").exists()


# -- the CLI ---------------------------------------------------------------------------


@pytest.fixture
def env(store: Store) -> dict[str, str]:
    return {"SEALSTORE_STORE": store.url}


def _segments(store: Store) -> list[Path]:
    [folder] = (_root(store) / "audit").iterdir()
    return sorted(folder.glob("*.jsonl"))


def test_cli_show_and_export(store: Store, tmp_path: Path, env: dict[str, str]) -> None:
    src = model_dir(tmp_path, {"w.bin": 10})
    store.push(src, "a", keys=["local:"])
    store.push(src, "b", keys=["local:"])
    store.pull("a", tmp_path / "out")
    shown = ok(run("audit", "show", "--since", "1h", "--artifact", "a", env=env)).stdout.decode()
    rows = shown.splitlines()
    assert len(rows) == 2, shown
    assert " push ok default/a:1 by " in rows[0] and " pull granted default/a:1 by " in rows[1]
    assert ok(run("audit", "show", "--since", "2999-01-01", env=env)).stdout == b""
    assert len(ok(run("audit", "show", "--action", "push", env=env)).stdout.splitlines()) == 2
    out = tmp_path / "audit.jsonl"
    ok(run("audit", "export", "-o", out, env=env))
    exported = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert exported == list(read_records(store.storage))
    assert len(exported) == 3
    bad = run("audit", "show", "--since", "yesterday-ish", env=env)
    assert bad.returncode == 2 and b"--since" in bad.stderr


def test_cli_verify_catches_an_edited_record(
    store: Store, tmp_path: Path, env: dict[str, str]
) -> None:
    src = model_dir(tmp_path, {"w.bin": 10})
    store.push(src, "a", keys=["local:"])
    store.pull("a", tmp_path / "out")
    key_id = ok(run("audit", "key")).stdout.decode().strip()
    proc = ok(run("audit", "verify", env=env))
    assert f": 2 records, signed by {key_id}" in proc.stdout.decode()
    first = _segments(store)[0]
    rec, cp = first.read_bytes().splitlines()
    first.write_bytes(json.dumps(dict(json.loads(rec), artifact="b")).encode() + b"\n" + cp + b"\n")
    proc = run("audit", "verify", env=env)
    assert proc.returncode == 1, proc.stderr
    fail = [x for x in proc.stdout.decode().splitlines() if x.startswith("FAIL ")]
    assert fail and seg(0) in fail[0] and "checkpoint covers seq 0" in fail[0]
    assert b"problem(s)" in proc.stderr
    other = AuditKey.load_or_create(tmp_path / "other.key").signing_key_id
    proc = run("audit", "verify", "--trust", other, env=env)
    assert proc.returncode == 1 and b"not trusted here" in proc.stdout


def test_cli_verify_pins_heads_and_catches_truncation(
    store: Store, tmp_path: Path, env: dict[str, str], sealstore_env: Path
) -> None:
    src = model_dir(tmp_path, {"w.bin": 10})
    store.push(src, "a", keys=["local:"])
    store.push(src, "a", keys=["local:"])
    ok(run("audit", "verify", env=env))
    pins = json.loads((sealstore_env / "audit-anchors.json").read_text())
    [(stream, head)] = pins[store.url].items()
    assert head["seq"] == 1 and head["signer"].startswith("ed25519:")
    _segments(store)[-1].unlink()
    proc = run("audit", "verify", env=env)
    assert proc.returncode == 1
    assert f"FAIL {stream} tail: truncated" in proc.stdout.decode()


def test_cli_anchor_file_round_trip(store: Store, tmp_path: Path, env: dict[str, str]) -> None:
    src = model_dir(tmp_path, {"w.bin": 10})
    store.push(src, "a", keys=["local:"])
    store.push(src, "a", keys=["local:"])
    anchor = tmp_path / "anchor.json"
    ok(run("audit", "verify", "--save-anchor", anchor, env=env))
    saved = json.loads(anchor.read_text())
    assert saved["log"] == store.url and len(saved["streams"]) == 1
    _segments(store)[-1].unlink()
    # Another machine (nothing pinned there): the cut shows only against the anchor.
    home = tmp_path / "auditor"
    home.mkdir()
    auditor = dict(env, SEALSTORE_HOME=str(home))
    ok(run("audit", "verify", env=auditor))
    proc = run("audit", "verify", "--anchor", anchor, env=auditor)
    assert proc.returncode == 1 and b"tail: truncated" in proc.stdout
    proc = run("audit", "verify", "--anchor", tmp_path / "missing.json", env=auditor)
    assert proc.returncode == 5


def test_cli_verify_a_separate_log(
    store: Store, tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("SEALSTORE_AUDIT", str(elsewhere))
    store.push(model_dir(tmp_path, {"w.bin": 10}), "m", keys=["local:"])
    monkeypatch.delenv("SEALSTORE_AUDIT")
    assert not (_root(store) / "audit").exists()
    proc = ok(run("audit", "verify", "--log", elsewhere, env=env))
    assert ": 1 records" in proc.stdout.decode()
    shown = ok(run("audit", "show", "--log", elsewhere, env=env)).stdout.decode()
    assert " push ok default/m:1 " in shown
    # The store's own location has no log at all.
    assert ok(run("audit", "show", env=env)).stdout == b""
