"""The aws-kms provider runs the conformance suite against a real moto server.

The server is started once for this module (``moto_server`` from the venv),
unless ``SEALSTORE_TEST_MOTO_URL`` names one that is already running. Keys
and aliases get unique names, so a shared server is safe to reuse.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

boto3 = pytest.importorskip("boto3")
from botocore.exceptions import ClientError  # noqa: E402

from sealstore.errors import BackendError, KeyReleaseDenied, KeyUnavailable  # noqa: E402
from sealstore.keys import DataKey, KeySlot  # noqa: E402
from sealstore.kms import registry  # noqa: E402
from sealstore.kms.envelope import open_sealed, seal_stream  # noqa: E402
from tests.conformance.providers import CONTEXT, ProviderConformance  # noqa: E402
from tests.services import spawned  # noqa: E402

AwsKmsKey = pytest.importorskip("sealstore.kms.aws_kms").AwsKmsKey

MOTO_ENV = "SEALSTORE_TEST_MOTO_URL"
SCHEME = "aws-kms"
TARGET = "sealstore.kms.aws_kms:AwsKmsKey"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=1) as resp:  # noqa: S310
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running moto server: the shared one if named, else one of our own."""
    shared = os.environ.get(MOTO_ENV)
    if shared:
        if not _ready(shared.rstrip("/")):
            pytest.fail(f"{MOTO_ENV}={shared} does not answer GET /moto-api/")
        yield shared.rstrip("/")
        return
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        pytest.skip('moto_server not installed (pip install "moto[server]")')
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    cmd = [str(exe), "-H", "127.0.0.1", "-p", str(port)]
    with spawned(cmd, log, lambda: _ready(url), "moto_server"):
        yield url


@pytest.fixture(scope="module", autouse=True)
def aws_env(moto_url: str) -> Iterator[None]:
    """Point boto3 at moto with throwaway credentials; register the provider."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", moto_url)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        was_registered = SCHEME in registry.known_schemes()
        registry.register_provider(SCHEME, TARGET, 'pip install "sealstore[aws]"')
        try:
            yield
        finally:
            if not was_registered:
                registry._REGISTRY.pop(SCHEME, None)
                registry._loaded.pop(SCHEME, None)


@pytest.fixture(scope="module")
def kms(moto_url: str, aws_env: None) -> Any:
    return boto3.client("kms", endpoint_url=moto_url, region_name="us-east-1")


def _new_key(kms: Any) -> dict[str, Any]:
    return dict(kms.create_key(Description="sealstore test")["KeyMetadata"])


@pytest.fixture(scope="module")
def key(kms: Any) -> dict[str, Any]:
    meta = _new_key(kms)
    meta["Alias"] = f"alias/sealstore-{uuid.uuid4().hex[:12]}"
    kms.create_alias(AliasName=meta["Alias"], TargetKeyId=meta["KeyId"])
    return meta


@pytest.fixture(scope="module")
def other_key(kms: Any) -> dict[str, Any]:
    return _new_key(kms)


class TestAwsKms(ProviderConformance):
    kind = "aws-kms"

    @pytest.fixture
    def wrapper(self, key):
        return AwsKmsKey.from_uri(f"aws-kms://{key['KeyId']}")

    @pytest.fixture
    def unwrapper(self, key):
        return AwsKmsKey.from_uri(f"aws-kms://{key['KeyId']}")

    @pytest.fixture
    def other_unwrapper(self, other_key):
        return AwsKmsKey.from_uri(f"aws-kms://{other_key['KeyId']}")


class TestAwsKmsViaAlias(TestAwsKms):
    """Wrapping through the alias; the unwrapper is the one the registry finds for the slot."""

    @pytest.fixture
    def wrapper(self, key):
        return registry.wrapper_for(f"aws-kms://{key['Alias']}")

    @pytest.fixture
    def unwrapper(self, key):
        return AwsKmsKey.from_uri(f"aws-kms://{key['Alias']}")


# -- URIs and options ------------------------------------------------------------------


def test_alias_and_arn_uris_open_each_others_slots(key: dict[str, Any]) -> None:
    by_alias = AwsKmsKey.from_uri(f"aws-kms://{key['Alias']}")
    by_arn = AwsKmsKey.from_uri(f"aws-kms://{key['Arn']}")
    by_id = AwsKmsKey.from_uri(f"aws-kms://{key['KeyId']}")
    dek = DataKey.generate()
    for maker in (by_alias, by_arn, by_id):
        slot = maker.wrap(dek, CONTEXT)
        assert slot.key_id == maker.key_id
        assert slot.params["arn"] == key["Arn"]
        for opener in (by_alias, by_arn, by_id):
            assert opener.can_unwrap(slot)
            with opener.unwrap(slot, CONTEXT) as back:
                assert back.material() == dek.material()


def test_bad_uris() -> None:
    for uri in ("aws-kms://", "aws-kms:KEY", "kms://abc", "aws-kms://a b"):
        with pytest.raises(ValueError):
            AwsKmsKey.from_uri(uri)
    with pytest.raises(TypeError, match="colour"):
        AwsKmsKey.from_uri("aws-kms://abc", colour="blue")  # type: ignore[call-arg]


def test_region_from_options_arn_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert AwsKmsKey.from_uri("aws-kms://k").region == "us-east-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert AwsKmsKey.from_uri("aws-kms://k").region == "eu-west-1"
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    assert AwsKmsKey.from_uri("aws-kms://k").region == "eu-central-1"
    arn = "arn:aws:kms:ap-south-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    assert AwsKmsKey.from_uri(f"aws-kms://{arn}").region == "ap-south-1"
    assert AwsKmsKey.from_uri("aws-kms://k", region="us-west-2").region == "us-west-2"


def test_the_profiles_region_and_the_kms_endpoint_variable_are_honoured(
    moto_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Resolved by botocore as the AWS CLI does: a profile's region in the config
    # file, AWS_ENDPOINT_URL_KMS before the global AWS_ENDPOINT_URL.
    region = "eu-west-3"
    made = boto3.client("kms", endpoint_url=moto_url, region_name=region).create_key()
    key_id = made["KeyMetadata"]["KeyId"]
    config = tmp_path / "config"
    config.write_text(f"[profile sealtest]\nregion = {region}\n")
    creds = tmp_path / "credentials"  # a named profile takes its keys from here, not the env
    creds.write_text("[sealtest]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "sealtest")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", moto_url)
    kek = AwsKmsKey.from_uri(f"aws-kms://{key_id}", max_attempts=1)
    assert kek.region == region
    dek = DataKey.generate()
    slot = kek.wrap(dek, CONTEXT)
    assert f":{region}:" in slot.params["arn"]
    assert kek.endpoint == moto_url
    with AwsKmsKey.unwrapper_for_slot(slot).unwrap(slot, CONTEXT) as back:  # type: ignore[union-attr]
        assert back.material() == dek.material()
    # The key lives in eu-west-3 only: the default region does not know it.
    monkeypatch.delenv("AWS_PROFILE")
    with pytest.raises(KeyUnavailable, match="not found"):
        AwsKmsKey.from_uri(f"aws-kms://{key_id}", max_attempts=1).wrap(dek, CONTEXT)


def test_repr_and_pickling(key: dict[str, Any]) -> None:
    k = AwsKmsKey.from_uri(f"aws-kms://{key['KeyId']}")
    assert key["KeyId"] in repr(k)
    assert "testing" not in repr(k)
    with pytest.raises(TypeError):
        pickle.dumps(k)


# -- generate, rewrap, end to end ----------------------------------------------------


def test_generate(key: dict[str, Any]) -> None:
    k = AwsKmsKey.from_uri(f"aws-kms://{key['Alias']}")
    dek, slot = k.generate(CONTEXT)
    with dek:
        assert slot.kind == "aws-kms" and slot.params["arn"] == key["Arn"]
        assert dek.material() not in slot.blob
        with k.unwrap(slot, CONTEXT) as back:
            assert back.material() == dek.material()
    with pytest.raises(KeyUnavailable):
        k.unwrap(slot, {})


def test_rewrap_to_another_key(key: dict[str, Any], other_key: dict[str, Any]) -> None:
    src = AwsKmsKey.from_uri(f"aws-kms://{key['KeyId']}")
    to_uri = f"aws-kms://{other_key['Arn']}"
    dek = DataKey.generate()
    moved = src.rewrap(src.wrap(dek, CONTEXT), CONTEXT, to_uri)
    assert moved.key_id == to_uri and moved.params["arn"] == other_key["Arn"]
    dst = AwsKmsKey.unwrapper_for_slot(moved)
    assert dst is not None
    with dst.unwrap(moved, CONTEXT) as back:
        assert back.material() == dek.material()
    with pytest.raises(KeyUnavailable):
        src.unwrap(moved, CONTEXT)
    with pytest.raises(ValueError):
        src.rewrap(moved, CONTEXT, "local:/tmp/x")


def test_seal_and_open_with_only_the_uri(key: dict[str, Any]) -> None:
    data = os.urandom(200_000)
    out = io.BytesIO()
    seal_stream(io.BytesIO(data), out, [f"aws-kms://{key['Alias']}"], context=CONTEXT)
    with open_sealed(out.getvalue()) as f:
        assert f.read_range(0, len(data)) == data


# -- failures -----------------------------------------------------------------------


def test_unreachable_endpoint_is_backend_error(key: dict[str, Any]) -> None:
    with socket.socket() as s:
        # Bound but never listening: connections to it are refused, and no
        # other process can take the port while the test runs.
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        k = AwsKmsKey.from_uri(f"aws-kms://{key['KeyId']}", endpoint_url=url, max_attempts=1)
        with pytest.raises(BackendError, match=url) as info:
            k.wrap(DataKey.generate(), CONTEXT)
        assert "\n" not in str(info.value)
        assert info.value.__cause__ is not None
        slot = KeySlot("aws-kms", k.key_id, b"\x01" * 64, {"arn": key["Arn"]})
        with pytest.raises(BackendError, match=url):
            k.unwrap(slot, CONTEXT)


def test_unknown_key_is_key_unavailable() -> None:
    missing = AwsKmsKey.from_uri(f"aws-kms://{uuid.uuid4()}")
    with pytest.raises(KeyUnavailable, match="key not found") as info:
        missing.wrap(DataKey.generate(), CONTEXT)
    assert isinstance(info.value.__cause__, ClientError)
    with pytest.raises(KeyUnavailable, match="key not found"):
        AwsKmsKey.from_uri("aws-kms://alias/sealstore-no-such-alias").generate(CONTEXT)


def test_moto_keeps_using_a_key_pending_deletion(kms: Any) -> None:
    """moto deviates from KMS: a disabled key or one pending deletion still works.

    Real KMS answers DisabledException / KMSInvalidStateException here; the
    mapping of those codes is tested below against botocore's own error type.
    This test pins moto's behaviour so a moto upgrade that fixes it is noticed.
    """
    meta = _new_key(kms)
    k = AwsKmsKey.from_uri(f"aws-kms://{meta['KeyId']}")
    slot = k.wrap(DataKey.generate(), CONTEXT)
    kms.disable_key(KeyId=meta["KeyId"])
    k.unwrap(slot, CONTEXT).close()
    kms.enable_key(KeyId=meta["KeyId"])
    kms.schedule_key_deletion(KeyId=meta["KeyId"], PendingWindowInDays=7)
    assert kms.describe_key(KeyId=meta["KeyId"])["KeyMetadata"]["KeyState"] == "PendingDeletion"
    k.unwrap(slot, CONTEXT).close()
    k.wrap(DataKey.generate(), CONTEXT)


def _client_error(code: str, message: str = "", status: int = 400) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "Decrypt",
    )


@pytest.mark.parametrize(
    ("code", "message", "status", "op", "expected", "text"),
    [
        ("DisabledException", "k is disabled.", 400, "decrypt", KeyUnavailable, "key is disabled"),
        (
            "KMSInvalidStateException",
            "pending deletion",
            400,
            "encrypt",
            KeyUnavailable,
            "pending deletion",
        ),
        ("NotFoundException", "", 400, "encrypt", KeyUnavailable, "key not found"),
        ("IncorrectKeyException", "", 400, "decrypt", KeyUnavailable, "does not open"),
        ("InvalidCiphertextException", "", 400, "decrypt", KeyUnavailable, "does not open"),
        (
            "AccessDeniedException",
            "User: arn:aws:iam::1:user/u is not authorized to perform: kms:Decrypt",
            400,
            "decrypt",
            KeyReleaseDenied,
            "denied decrypt",
        ),
        ("AccessDeniedException", "", 400, "encrypt", KeyReleaseDenied, "denied encrypt"),
        (
            "AccessDeniedException",
            "The ciphertext refers to a customer master key that does not exist",
            400,
            "decrypt",
            KeyUnavailable,
            "names a key",
        ),
        ("UnrecognizedClientException", "bad token", 400, "decrypt", KeyReleaseDenied, "denied"),
        ("KMSInternalException", "", 500, "decrypt", BackendError, "http://kms.test"),
        ("ThrottlingException", "", 400, "encrypt", BackendError, "http://kms.test"),
        ("InternalFailure", "", 503, "decrypt", BackendError, "http://kms.test"),
    ],
)
def test_error_mapping(code, message, status, op, expected, text) -> None:
    k = AwsKmsKey.from_uri("aws-kms://alias/x", endpoint_url="http://kms.test")
    err = k._translate(_client_error(code, message, status), op)
    assert type(err) is expected
    assert text in str(err) and "aws-kms://alias/x" in str(err) and "\n" not in str(err)


def test_non_string_context_is_value_error(key: dict[str, Any]) -> None:
    k = AwsKmsKey.from_uri(f"aws-kms://{key['KeyId']}")
    dek = DataKey.generate()
    with pytest.raises(ValueError) as info:
        k.wrap(dek, {"n": 1})  # type: ignore[dict-item]
    assert dek.material().hex() not in str(info.value)


def test_rotate_file_kms_to_kms(key: dict[str, Any], other_key: dict[str, Any], tmp_path) -> None:
    from sealstore.format import parse_preamble
    from sealstore.kms.envelope import seal_file
    from sealstore.kms.rotate import rotate_file

    a, b = f"aws-kms://{key['KeyId']}", f"aws-kms://{other_key['KeyId']}"
    plain = tmp_path / "plain.bin"
    plain.write_bytes(os.urandom(300_000))
    sealed = tmp_path / "plain.seal"
    seal_file(plain, sealed, [a], context=CONTEXT, chunk_size=65536)

    def payload() -> bytes:
        data = sealed.read_bytes()
        return data[parse_preamble(data).payload_offset :]

    before = payload()
    (slot,) = rotate_file(sealed, [b], remove=[a])
    assert slot.key_id == b
    assert payload() == before
    with open_sealed(sealed) as f:
        assert f.read_range(0, 300_000) == plain.read_bytes()


def test_dek_from_kms_generate_data_key(key: dict[str, Any]) -> None:
    from sealstore.format import parse_preamble

    uri = f"aws-kms://{key['KeyId']}"
    out = io.BytesIO()
    seal_stream(io.BytesIO(b"generated by KMS"), out, [uri], context=CONTEXT, dek_from=uri)
    slots = parse_preamble(out.getvalue()).slots
    assert [s.key_id for s in slots] == [uri]  # not wrapped twice
    with open_sealed(out.getvalue()) as f:
        assert f.read_range(0, 100) == b"generated by KMS"
