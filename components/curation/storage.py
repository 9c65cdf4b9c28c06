"""Byte-level I/O on a local path or an ``s3://bucket/key`` URI, the one place that knows both.

S3 goes through boto3 (its usual credential chain: env, profile, instance role) with an optional
endpoint override for S3-compatible stores (MinIO, moto, R2): ``curate.s3_endpoint_url``, else the
standard ``AWS_ENDPOINT_URL_S3`` variable. Local writes go to a temporary name and are renamed into
place (``os.replace`` is atomic on POSIX), so a reader never sees half a file; an S3 PUT is atomic
by itself (an object is visible whole or not at all).
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Iterator


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri}")
    return bucket, key


def join(root: str, *parts: str) -> str:
    if is_s3(root):
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(root, *parts)


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client; ``endpoint_url`` wins over ``AWS_ENDPOINT_URL_S3``."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or None)


class Store:
    """Reads, writes, lists and deletes on local paths and s3:// URIs with one lazily made client."""

    def __init__(self, endpoint_url: str | None = None):
        self.endpoint_url = endpoint_url
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client(self.endpoint_url)
        return self._client

    def read(self, uri: str) -> bytes:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        with open(uri, "rb") as fh:
            return fh.read()

    def read_text_or_none(self, uri: str) -> str | None:
        """A small text file (a sidecar caption), or None when it cannot be read for any reason."""
        try:
            return self.read(uri).decode("utf-8", errors="replace")
        except Exception:  # missing, permission, S3 NoSuchKey/AccessDenied: the caption policy decides
            return None

    def write(self, uri: str, data: bytes) -> None:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
            return
        directory = os.path.dirname(uri) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, uri)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def delete(self, uri: str) -> None:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self.client.delete_object(Bucket=bucket, Key=key)
        elif os.path.exists(uri):
            os.unlink(uri)

    def list(self, root: str) -> Iterator[str]:
        """Every file under ``root`` (recursive), as full URIs/paths, in sorted order per directory."""
        if is_s3(root):
            bucket, prefix = split_s3(root)
            prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        yield f"s3://{bucket}/{obj['Key']}"
            return
        for directory, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                yield os.path.join(directory, name)

    def exists(self, uri: str) -> bool:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            from botocore.exceptions import ClientError

            try:
                self.client.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError:
                return False
        return os.path.exists(uri)


def relative(root: str, uri: str) -> str:
    """``uri`` relative to ``root`` with ``/`` separators (the form ``_SUCCESS`` records)."""
    if is_s3(root):
        return uri[len(root.rstrip("/")) + 1:]
    return posixpath.join(*os.path.relpath(uri, root).split(os.sep))
