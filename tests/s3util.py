"""Buckets on the real S3 servers of the test services (SeaweedFS, moto)."""

from __future__ import annotations

import uuid
from typing import Any


def s3_options(url: str, key: str, secret: str) -> dict[str, Any]:
    """s3fs storage options for one endpoint (not the environment: two servers run at once)."""
    return {"endpoint_url": url, "key": key, "secret": secret}


def new_bucket(options: dict[str, Any]) -> str:
    """A fresh bucket; its name."""
    import boto3

    name = "sealstore-" + uuid.uuid4().hex[:16]
    client = boto3.client(
        "s3",
        endpoint_url=options["endpoint_url"],
        aws_access_key_id=options["key"],
        aws_secret_access_key=options["secret"],
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)
    return name


def incomplete_uploads(options: dict[str, Any], bucket: str) -> list[str]:
    """Keys with a multipart upload begun and neither completed nor aborted."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=options["endpoint_url"],
        aws_access_key_id=options["key"],
        aws_secret_access_key=options["secret"],
        region_name="us-east-1",
    )
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
