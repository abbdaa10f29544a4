"""Buckets on the real S3 servers of the test services (SeaweedFS, moto)."""

from __future__ import annotations

import uuid
from typing import Any


def s3_options(url: str, key: str, secret: str) -> dict[str, Any]:
    """s3fs storage options for one endpoint (not the environment: two servers run at once)."""
    return {"endpoint_url": url, "key": key, "secret": secret}


_BUCKETS: dict[str, str] = {}


def new_bucket(options: dict[str, Any]) -> str:
    """A fresh, empty location ``BUCKET/PREFIX`` on the endpoint.

    One bucket per endpoint and test session, a new prefix per call:
    SeaweedFS gives every bucket (a "collection") volumes of its own and
    runs out of them after a few dozen buckets.
    """
    import boto3

    endpoint = options["endpoint_url"]
    if endpoint not in _BUCKETS:
        name = "sealstore-" + uuid.uuid4().hex[:16]
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=options["key"],
            aws_secret_access_key=options["secret"],
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=name)
        _BUCKETS[endpoint] = name
    return f"{_BUCKETS[endpoint]}/t-{uuid.uuid4().hex[:12]}"


def incomplete_uploads(options: dict[str, Any], location: str) -> list[str]:
    """Keys under ``BUCKET/PREFIX`` with a multipart upload neither completed nor aborted."""
    import boto3

    bucket, _, prefix = location.partition("/")

    client = boto3.client(
        "s3",
        endpoint_url=options["endpoint_url"],
        aws_access_key_id=options["key"],
        aws_secret_access_key=options["secret"],
        region_name="us-east-1",
    )
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return [u["Key"] for u in uploads if u["Key"].startswith(prefix + "/")]
