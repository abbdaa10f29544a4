"""Vault Transit on a real OpenBao server (HTTP and TLS) runs the conformance suite."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import struct
import threading
import time
import uuid
from typing import Any

import hvac
import pytest

from sealstore import BackendError, KeyReleaseDenied, KeyUnavailable
from sealstore.keys import DataKey
from sealstore.kms.envelope import open_sealed, seal_stream
from sealstore.kms.registry import wrapper_for
from sealstore.kms.vault_transit import VaultTransitKey
from tests.conformance.providers import CONTEXT, ProviderConformance


def _client(server: dict[str, str]) -> hvac.Client:
    return hvac.Client(
        url=server["addr"], token=server["token"], verify=server.get("cacert") or False
    )


def _transit(server: dict[str, str], **key_options: Any) -> tuple[str, str]:
    """A fresh transit mount and key on *server*; returns (mount, key)."""
    client = _client(server)
    mount = f"transit-{uuid.uuid4().hex[:8]}"
    client.sys.enable_secrets_engine("transit", path=mount)
    client.secrets.transit.create_key("k", mount_point=mount, **key_options)
    return mount, "k"


def _uri(server: dict[str, str], mount: str, key: str) -> str:
    host = server["addr"].split("://", 1)[1]
    tls = "" if server["addr"].startswith("https") else "?tls=false"
    return f"vault-transit://{host}/{mount}/{key}{tls}"


@pytest.fixture(params=["http", "tls"], scope="module")
def server(
    request: pytest.FixtureRequest, vault_servers: dict[str, dict[str, str]]
) -> dict[str, str]:
    return vault_servers[request.param]


@pytest.fixture
def vault_env(server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("VAULT_TOKEN", server["token"])
    monkeypatch.setenv("VAULT_ADDR", server["addr"])  # the Vault slots may send the token to
    if server.get("cacert"):
        monkeypatch.setenv("VAULT_CACERT", server["cacert"])
    return server


@pytest.mark.parametrize("derived", [True, False], ids=["derived", "plain-key"])
class TestVaultTransit(ProviderConformance):
    kind = "vault-transit"

    @pytest.fixture
    def wrapper(self, vault_env: dict[str, str], derived: bool) -> VaultTransitKey:
        mount, key = _transit(vault_env, derived=derived)
        return wrapper_for(_uri(vault_env, mount, key))  # type: ignore[return-value]

    @pytest.fixture
    def unwrapper(self, wrapper: VaultTransitKey) -> VaultTransitKey:
        return VaultTransitKey(wrapper.key_id)

    @pytest.fixture
    def other_unwrapper(self, vault_env: dict[str, str], derived: bool) -> VaultTransitKey:
        mount, key = _transit(vault_env, derived=derived)
        return VaultTransitKey(_uri(vault_env, mount, key))


def test_seal_and_open_with_only_the_vault_uri(vault_env: dict[str, str]) -> None:
    mount, key = _transit(vault_env, derived=True)
    uri = _uri(vault_env, mount, key)
    out = io.BytesIO()
    seal_stream(io.BytesIO(b"weights" * 1000), out, [uri], context=CONTEXT)
    with open_sealed(out.getvalue()) as f:  # the slot names the key; env has the token
        assert f.read_range(0, 7) == b"weights"


def test_generate_uses_datakey_wrapped(vault_env: dict[str, str]) -> None:
    mount, key = _transit(vault_env, derived=True)
    transit = VaultTransitKey(_uri(vault_env, mount, key))
    dek, slot = transit.generate(CONTEXT)
    assert slot.blob.startswith(b"vault:v1:")
    assert transit.unwrap(slot, CONTEXT).material() == dek.material()
    with pytest.raises(KeyUnavailable):
        transit.unwrap(slot, {**CONTEXT, "tenant": "other"})


def test_rotation_rewraps_to_the_new_version(vault_env: dict[str, str]) -> None:
    mount, key = _transit(vault_env, derived=True)
    transit = VaultTransitKey(_uri(vault_env, mount, key))
    dek = DataKey.generate()
    slot = transit.wrap(dek, CONTEXT)
    client = _client(vault_env)
    client.secrets.transit.rotate_key(key, mount_point=mount)
    new = transit.rewrap(slot, CONTEXT)
    assert new.params["version"] == 2 and new.blob.startswith(b"vault:v2:")
    assert transit.unwrap(new, CONTEXT).material() == dek.material()
    # Retire version 1: the old slot no longer opens, the rewrapped one does.
    client.secrets.transit.update_key_configuration(
        key, mount_point=mount, min_decryption_version=2
    )
    with pytest.raises(KeyUnavailable, match="retired"):
        transit.unwrap(slot, CONTEXT)
    assert transit.unwrap(new, CONTEXT).material() == dek.material()


def test_context_binding_holds_for_a_key_that_is_not_derived(vault_env: dict[str, str]) -> None:
    # Transit ignores `context` for non-derived keys; associated data must bind it.
    mount, key = _transit(vault_env, derived=False)
    transit = VaultTransitKey(_uri(vault_env, mount, key))
    slot = transit.wrap(DataKey.generate(), CONTEXT)
    with pytest.raises(KeyUnavailable, match="encryption context"):
        transit.unwrap(slot, {**CONTEXT, "tenant": "t2"})


def test_permission_denied_is_key_release_denied(vault_env: dict[str, str], monkeypatch) -> None:
    mount, key = _transit(vault_env, derived=True)
    uri = _uri(vault_env, mount, key)
    slot = VaultTransitKey(uri).wrap(DataKey.generate(), CONTEXT)
    client = _client(vault_env)
    client.sys.create_or_update_policy(
        "encrypt-only", f'path "{mount}/encrypt/{key}" {{ capabilities = ["update"] }}'
    )
    token = client.auth.token.create(policies=["encrypt-only"])["auth"]["client_token"]
    monkeypatch.setenv("VAULT_TOKEN", token)
    limited = VaultTransitKey(uri)
    limited.wrap(DataKey.generate(), CONTEXT)  # allowed
    with pytest.raises(KeyReleaseDenied, match="permission denied") as info:
        limited.unwrap(slot, CONTEXT)
    assert uri in str(info.value)


def test_approle_login(vault_env: dict[str, str], monkeypatch) -> None:
    mount, key = _transit(vault_env, derived=True)
    client = _client(vault_env)
    approle = f"approle-{uuid.uuid4().hex[:6]}"
    client.sys.enable_auth_method("approle", path=approle)
    client.sys.create_or_update_policy(
        "transit-use", f'path "{mount}/*" {{ capabilities = ["update"] }}'
    )
    client.auth.approle.create_or_update_approle(
        "loader", token_policies=["transit-use"], mount_point=approle
    )
    role_id = client.auth.approle.read_role_id("loader", mount_point=approle)["data"]["role_id"]
    secret_id = client.auth.approle.generate_secret_id("loader", mount_point=approle)["data"][
        "secret_id"
    ]
    monkeypatch.delenv("VAULT_TOKEN")
    transit = VaultTransitKey(
        _uri(vault_env, mount, key), role_id=role_id, secret_id=secret_id, approle_mount=approle
    )
    dek = DataKey.generate()
    assert transit.unwrap(transit.wrap(dek, CONTEXT), CONTEXT).material() == dek.material()


def test_deleted_key_says_so(vault_env: dict[str, str]) -> None:
    mount, key = _transit(vault_env, derived=True)
    transit = VaultTransitKey(_uri(vault_env, mount, key))
    slot = transit.wrap(DataKey.generate(), CONTEXT)
    client = _client(vault_env)
    client.secrets.transit.update_key_configuration(key, mount_point=mount, deletion_allowed=True)
    client.secrets.transit.delete_key(key, mount_point=mount)
    with pytest.raises(KeyUnavailable, match="does not exist"):
        transit.unwrap(slot, CONTEXT)


def test_unreachable_vault_is_backend_error() -> None:
    transit = VaultTransitKey("vault-transit://127.0.0.1:9/transit/k?tls=false", token="t")
    with pytest.raises(BackendError, match=r"127\.0\.0\.1:9"):
        transit.wrap(DataKey.generate(), CONTEXT)


class _Flaky:
    """A TCP forwarder to a real OpenBao that drops the first *drops* connections."""

    def __init__(self, target: str, drops: int, answer: bytes = b"") -> None:
        host, port = target.split("://", 1)[1].split(":")
        self.target = (host, int(port))
        self.drops = drops
        self.answer = answer  # sent to a dropped connection before closing it, if any
        self.accepted = 0
        self.live: list[socket.socket] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.drops:
                if self.answer:
                    with contextlib.suppress(OSError):
                        conn.recv(65536)
                        conn.sendall(self.answer)
                    conn.close()
                    continue
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()  # a reset: the node went away mid-request
                continue
            upstream = socket.create_connection(self.target)
            self.live += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)


def test_dropped_connections_are_retried_with_backoff(
    vault_servers: dict[str, dict[str, str]],
) -> None:
    server = vault_servers["http"]
    mount, key = _transit(server, derived=True)
    flaky = _Flaky(server["addr"], drops=2)
    try:
        transit = VaultTransitKey(
            f"vault-transit://127.0.0.1:{flaky.port}/{mount}/{key}?tls=false",
            token=server["token"],
        )
        dek = DataKey.generate()
        slot = transit.wrap(dek, CONTEXT)  # the first two attempts are reset
        assert flaky.accepted >= 3
        with transit.unwrap(slot, CONTEXT) as back:
            assert back.material() == dek.material()
        flaky.drops = 10**6  # down for good: a bounded number of tries, then the error
        for conn in flaky.live:  # including the connection the client keeps alive
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        before = flaky.accepted
        with pytest.raises(BackendError, match="unreachable"):
            transit.wrap(dek, CONTEXT)
        assert 2 <= flaky.accepted - before <= 5
    finally:
        flaky.sock.close()


def test_a_rate_limit_is_retried_and_its_retry_after_capped(
    vault_servers: dict[str, dict[str, str]],
) -> None:
    # A quota's 429 asking for an hour: retried after at most a few seconds each.
    server = vault_servers["http"]
    mount, key = _transit(server, derived=True)
    answer = (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3600\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n"
    )
    flaky = _Flaky(server["addr"], drops=1, answer=answer)
    try:
        transit = VaultTransitKey(
            f"vault-transit://127.0.0.1:{flaky.port}/{mount}/{key}?tls=false",
            token=server["token"],
        )
        started = time.monotonic()
        slot = transit.wrap(DataKey.generate(), CONTEXT)
        assert time.monotonic() - started < 30
        assert flaky.accepted >= 2 and slot.blob.startswith(b"vault:v1:")
    finally:
        flaky.sock.close()


def test_no_key_material_in_errors(vault_env: dict[str, str]) -> None:
    mount, key = _transit(vault_env, derived=True)
    transit = VaultTransitKey(_uri(vault_env, mount, key))
    dek = DataKey.generate()
    slot = transit.wrap(dek, CONTEXT)
    with pytest.raises(KeyUnavailable) as info:
        transit.unwrap(slot, {})
    text = str(info.value) + repr(info.value)
    assert base64.b64encode(dek.material()).decode() not in text
    assert vault_env["token"] not in text + repr(transit)
    assert isinstance(info.value.__cause__, hvac.exceptions.InvalidRequest)


def test_rotate_file_local_to_vault_and_to_the_next_key_version(
    vault_env: dict[str, str], tmp_path, monkeypatch
) -> None:
    from sealstore.format import parse_preamble
    from sealstore.kms.envelope import seal_file
    from sealstore.kms.local import LocalKeyring, create_keyring
    from sealstore.kms.rotate import rotate_file

    monkeypatch.setenv("SEALSTORE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SEALSTORE_PASSPHRASE", "pw")
    ring = create_keyring(tmp_path / "home" / "keyring.json", passphrase="pw")
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"w" * 300_000)
    sealed = tmp_path / "plain.seal"
    seal_file(plain, sealed, [ring.key_id], context=CONTEXT, chunk_size=65536)

    def payload() -> bytes:
        data = sealed.read_bytes()
        return data[parse_preamble(data).payload_offset :]

    before = payload()
    mount, key = _transit(vault_env, derived=True)
    uri = _uri(vault_env, mount, key)
    rotate_file(sealed, [uri], remove=[ring.key_id])  # local -> Vault
    assert payload() == before
    LocalKeyring._cache.clear()
    monkeypatch.delenv("SEALSTORE_PASSPHRASE")
    with open_sealed(sealed) as f:
        assert f.read_range(0, 300_000) == plain.read_bytes()

    _client(vault_env).secrets.transit.rotate_key(key, mount_point=mount)
    (slot,) = rotate_file(sealed, [uri])  # Vault key version 1 -> 2, by Transit rewrap
    assert slot.blob.startswith(b"vault:v2:")
    assert payload() == before
    with open_sealed(sealed) as f:
        assert f.read_range(0, 300_000) == plain.read_bytes()


def test_cli_round_trip_and_rotation_through_vault(vault_env: dict[str, str], tmp_path) -> None:
    from tests.test_cli import ok, run

    mount, key = _transit(vault_env, derived=True)
    uri = _uri(vault_env, mount, key)
    env = {"VAULT_TOKEN": vault_env["token"], "VAULT_ADDR": vault_env["addr"]}
    if vault_env.get("cacert"):
        env["VAULT_CACERT"] = vault_env["cacert"]
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"model" * 50_000)
    sealed = tmp_path / "plain.seal"
    ok(run("encrypt", "-k", uri, "--context", "tenant=t1", "-o", sealed, plain, env=env))
    _client(vault_env).secrets.transit.rotate_key(key, mount_point=mount)
    ok(run("keys", "rotate", sealed, "--to", uri, env=env))
    out = tmp_path / "out.bin"
    ok(run("decrypt", "-o", out, sealed, env=env))
    assert out.read_bytes() == plain.read_bytes()
    denied = run(
        "decrypt",
        "-o",
        out,
        sealed,
        env={"VAULT_TOKEN": "not-a-token", **{k: v for k, v in env.items() if k != "VAULT_TOKEN"}},
    )
    assert denied.returncode == 4, denied.stderr
    assert b"permission denied" in denied.stderr


def test_namespaces_are_passed_through(vault_env: dict[str, str]) -> None:
    # OpenBao has namespaces: the same mount and key name in another namespace
    # is another key, reached through ?namespace= in the URI.
    namespace = f"team-{uuid.uuid4().hex[:6]}"
    _client(vault_env).adapter.post(f"/v1/sys/namespaces/{namespace}", json={})
    scoped = hvac.Client(
        url=vault_env["addr"],
        token=vault_env["token"],
        verify=vault_env.get("cacert") or False,
        namespace=namespace,
    )
    scoped.sys.enable_secrets_engine("transit", path="transit")
    scoped.secrets.transit.create_key("k", mount_point="transit", derived=True)
    base = _uri(vault_env, "transit", "k")
    uri = base + ("&" if "?" in base else "?") + f"namespace={namespace}"
    transit = VaultTransitKey(uri)
    dek = DataKey.generate()
    slot = transit.wrap(dek, CONTEXT)
    assert transit.unwrap(slot, CONTEXT).material() == dek.material()
    # Outside the namespace there is no such key.
    with pytest.raises(KeyUnavailable):
        VaultTransitKey(base).unwrap(slot, CONTEXT)


def test_dek_from_vault_datakey(vault_env: dict[str, str], tmp_path) -> None:
    from sealstore.format import parse_preamble
    from tests.test_cli import ok, run

    mount, key = _transit(vault_env, derived=True)
    uri = _uri(vault_env, mount, key)
    out = io.BytesIO()
    seal_stream(io.BytesIO(b"generated"), out, [], context=CONTEXT, dek_from=uri)
    (slot,) = parse_preamble(out.getvalue()).slots
    assert slot.key_id == uri and slot.params["ad"] is False  # from datakey/wrapped
    with open_sealed(out.getvalue()) as f:
        assert f.read_range(0, 9) == b"generated"
    env = {"VAULT_TOKEN": vault_env["token"], "VAULT_ADDR": vault_env["addr"]}
    if vault_env.get("cacert"):
        env["VAULT_CACERT"] = vault_env["cacert"]
    plain = tmp_path / "p.bin"
    plain.write_bytes(b"x" * 1000)
    ok(run("encrypt", "--dek-from", uri, "-o", tmp_path / "p.seal", plain, env=env))
    ok(run("decrypt", "-o", tmp_path / "p.out", tmp_path / "p.seal", env=env))
    assert (tmp_path / "p.out").read_bytes() == plain.read_bytes()


def test_a_planted_slot_gets_no_token(vault_env: dict[str, str], monkeypatch) -> None:
    # Slots are not authenticated: a slot naming another Vault must not make the
    # reader send VAULT_TOKEN there, and must not stop the good slot from opening.
    import socket

    from sealstore.format import parse_preamble
    from sealstore.keys import KeySlot

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    mount, key = _transit(vault_env, derived=True)
    out = io.BytesIO()
    seal_stream(io.BytesIO(b"payload"), out, [_uri(vault_env, mount, key)], context=CONTEXT)
    pre = parse_preamble(out.getvalue())
    planted = KeySlot(
        "vault-transit",
        f"vault-transit://127.0.0.1:{port}/transit/k?tls=false",
        b"vault:v1:AAAA",
        {"ad": False},
    )
    bad_uri = KeySlot("vault-transit", "vault-transit://nohostport", b"x", {})
    forged = pre.with_slots([planted, bad_uri, *pre.slots]) + out.getvalue()[pre.payload_offset :]
    with open_sealed(forged) as f:
        assert f.read_range(0, 7) == b"payload"
    with pytest.raises(OSError):
        listener.accept()  # nobody connected
    listener.close()
    only_planted = pre.with_slots([planted]) + out.getvalue()[pre.payload_offset :]
    with pytest.raises(KeyUnavailable, match="not VAULT_ADDR"):
        open_sealed(only_planted)
    # Naming it explicitly is the user's choice.
    monkeypatch.setenv("SEALSTORE_VAULT_ADDRS", f"http://127.0.0.1:{port}")
    with pytest.raises(BackendError):
        open_sealed(only_planted)


def test_uri_refuses_credentials_and_unknown_options() -> None:
    for query in ("token=s.secret", "secret_id=x", "tls=false&colour=red"):
        with pytest.raises(ValueError, match="only tls= and namespace="):
            VaultTransitKey(f"vault-transit://127.0.0.1:8200/transit/k?{query}", token="t")


def test_dek_from_refuses_a_key_that_is_not_derived(vault_env: dict[str, str]) -> None:
    mount, key = _transit(vault_env, derived=False)
    uri = _uri(vault_env, mount, key)
    with pytest.raises(ValueError, match="derived"):
        seal_stream(io.BytesIO(b"x"), io.BytesIO(), [], context=CONTEXT, dek_from=uri)
