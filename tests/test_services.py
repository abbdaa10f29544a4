"""Each real service the integration tests rely on answers (nothing here skips)."""

from __future__ import annotations

import subprocess
import uuid
from typing import TYPE_CHECKING

import boto3
import hvac
from botocore.config import Config

if TYPE_CHECKING:
    from tests.services import S3, Vault


def test_openbao_http_health(vault: Vault) -> None:
    health = hvac.Client(url=vault.addr, token=vault.token).sys.read_health_status(method="GET")
    assert health["initialized"] is True
    assert health["sealed"] is False


def test_openbao_tls_health(vault: Vault) -> None:
    client = hvac.Client(url=vault.tls_addr, token=vault.token, verify=vault.cacert)
    health = client.sys.read_health_status(method="GET")
    assert health["initialized"] is True
    assert health["sealed"] is False
    assert client.is_authenticated()


def test_openbao_transit(vault: Vault) -> None:
    client = hvac.Client(url=vault.addr, token=vault.token)
    mount = f"transit-{uuid.uuid4().hex[:8]}"
    client.sys.enable_secrets_engine("transit", path=mount)
    try:
        client.secrets.transit.create_key("k", mount_point=mount)
        key = client.secrets.transit.generate_data_key("k", key_type="plaintext", mount_point=mount)
        assert key["data"]["ciphertext"].startswith("vault:v1:")
    finally:
        client.sys.disable_secrets_engine(mount)


def test_moto_kms(moto_url: str) -> None:
    kms = boto3.client(
        "kms",
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    key_id = kms.create_key(Description="sealstore services test")["KeyMetadata"]["KeyId"]
    dk = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    assert len(dk["Plaintext"]) == 32
    assert kms.decrypt(CiphertextBlob=dk["CiphertextBlob"])["Plaintext"] == dk["Plaintext"]


def test_seaweedfs_s3_put_get(s3: S3) -> None:
    client = boto3.client(
        "s3",
        endpoint_url=s3.url,
        region_name="us-east-1",
        aws_access_key_id=s3.key,
        aws_secret_access_key=s3.secret,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    bucket = f"sealstore-{uuid.uuid4().hex[:12]}"
    body = uuid.uuid4().bytes * 1000
    client.create_bucket(Bucket=bucket)
    try:
        client.put_object(Bucket=bucket, Key="obj", Body=body)
        assert client.get_object(Bucket=bucket, Key="obj")["Body"].read() == body
        ranged = client.get_object(Bucket=bucket, Key="obj", Range="bytes=16-31")
        assert ranged["Body"].read() == body[16:32]
    finally:
        client.delete_object(Bucket=bucket, Key="obj")
        client.delete_bucket(Bucket=bucket)


def test_seaweedfs_rejects_wrong_secret(s3: S3) -> None:
    client = boto3.client(
        "s3",
        endpoint_url=s3.url,
        region_name="us-east-1",
        aws_access_key_id=s3.key,
        aws_secret_access_key=s3.secret + "x",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    try:
        client.list_buckets()
    except client.exceptions.ClientError as exc:
        assert exc.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied"}
    else:
        raise AssertionError("SeaweedFS accepted a wrong secret key")


def test_swtpm_getrandom_cli(tpm_tcti: str) -> None:
    out = subprocess.run(
        ["tpm2_getrandom", "8", "-T", tpm_tcti], capture_output=True, timeout=30, check=True
    )
    assert len(out.stdout) == 8


def test_swtpm_getrandom_pytss(tpm_tcti: str) -> None:
    from tpm2_pytss import ESAPI

    with ESAPI(tpm_tcti) as esapi:
        assert len(bytes(esapi.get_random(8))) == 8
