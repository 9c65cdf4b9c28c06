"""The one storage layer: byte-level I/O on a local path or an ``s3://bucket/key`` URI, prefix
downloads into a local cache, and pyarrow filesystems for Ray Data and Ray Train. Nothing else in the
platform builds a boto3 client or a pyarrow S3 filesystem.

S3 goes through boto3 (its usual credential chain: env, profile, instance role) with an optional
endpoint override for S3-compatible stores (MinIO, moto, R2): ``curate.s3_endpoint_url``, else the
standard ``AWS_ENDPOINT_URL_S3`` variable. Local writes go to a temporary name and are renamed into
place (``os.replace`` is atomic on POSIX), so a reader never sees half a file; an S3 PUT is atomic
by itself (an object is visible whole or not at all).

A failing *store* (endpoint unreachable, connection dropped, timeouts, 5xx left after boto3's own
retries) raises ``StorageUnavailable``, one line naming the operation, the URI and the endpoint. It
is kept apart from a failing *object* (missing, forbidden), which curation counts per input: an
outage must stop the run (no ``_SUCCESS``), never turn every remaining input into "unreadable" and
publish what is left as if it were the dataset. A listing that the store refuses (no such bucket, access
denied, no credentials, an endpoint URL boto3 rejects) is about the whole prefix, not one object: it raises
``StorageRefused``. Both are ``StorageError``s, whose messages are redacted when they are made (they quote
botocore's errors, which quote the endpoint URL with any password in it).
"""

from __future__ import annotations

import importlib
import json
import os
import posixpath
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from components.config import find_cause
from components.redact import redact


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


def dot_segments(key: str) -> bool:
    """True when ``key`` has a ``.`` or ``..`` segment. S3 stores such a key literally, but an HTTP
    layer on the way (a proxy, an S3-compatible server) may resolve it to another object, and a cache
    that maps keys to files would write outside its directory: such keys are refused everywhere."""
    return any(part in (".", "..") for part in key.split("/"))


def object_key(uri: str) -> tuple[str, str]:
    """``split_s3`` for a URI that names one object; ``ValueError`` for a key with dot segments."""
    bucket, key = split_s3(uri)
    if dot_segments(key):
        raise ValueError(f"object key {key!r} has '.' or '..' segments: refused (it could name another object)")
    return bucket, key


class StorageError(RuntimeError):
    """A failure of the store as a whole, in one line, redacted when made (``components.redact``)."""

    def __init__(self, message: str):
        super().__init__(redact(message))


class StorageUnavailable(StorageError):
    """The store itself failed (not one object): stop the run rather than drop or skip inputs."""


class StorageRefused(StorageError):
    """The store refused a request about a whole prefix (a listing): no such bucket, access denied, no
    credentials, a bucket name or an endpoint URL it does not accept. Its settings are the user's to fix."""


def original_unavailable(err: BaseException) -> StorageUnavailable | None:
    """The ``StorageUnavailable`` a worker raised, out of the wrappers around it (Ray's
    ``RayTaskError`` keeps it as ``.cause``; Ray Data adds its own advice to the message)."""
    return find_cause(err, lambda e: type(e) is StorageUnavailable)


def _unavailable(err: Exception) -> bool:
    """Transport failures and server-side errors, as opposed to per-object answers (404, 403)."""
    # botocore loads with the first S3 client (s3_client): a local store never imports it
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(err, BotoConnectionError | HTTPClientError):
        return True
    if isinstance(err, ClientError):
        return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) >= 500
    return False


STORE_REFUSALS = frozenset({"NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                            "InvalidToken", "AllBucketsRequireSignature"})
"""S3 error codes that refuse every request with these settings, not one object: no object of the store can
be read until the user fixes a bucket name or credentials."""


def _refused_whole(err: Exception) -> bool:
    """No credentials (or bad ones), or no such bucket: a refusal of the settings, whatever the object."""
    # botocore loads with the first S3 client (s3_client): a local store never imports it
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(err, NoCredentialsError | PartialCredentialsError):
        return True
    return isinstance(err, ClientError) and err.response.get("Error", {}).get("Code") in STORE_REFUSALS


def join(root: str, *parts: str) -> str:
    if is_s3(root):
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(root, *parts)


def endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint override: ``endpoint_url`` (a config value), else ``AWS_ENDPOINT_URL_S3``, else None
    (AWS itself)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or None


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client (boto3's credential chain: environment, profile, instance role)."""
    imported_whole("botocore")
    boto3 = imported_whole("boto3")
    return boto3.client("s3", endpoint_url=endpoint(endpoint_url))


def imported_whole(package: str):
    """``package``, imported, with every submodule of it that has finished loading bound on its parent module.

    A completed import binds them itself. An interrupted one may not: Ray cancels a failed run's other tasks
    with a KeyboardInterrupt in their workers (Ray Data does, after an S3 outage). If a task was importing boto3
    for the first time, the submodules that had finished loading stay in ``sys.modules`` while the package is
    dropped. The next import of the package, in the same worker process, does not bind them again. The worker
    then runs the next run's tasks, and each one fails with "module 'boto3' has no attribute 'utils'". Modules
    still being imported (by another thread) are left to their import."""
    module = importlib.import_module(package)
    prefix = package + "."
    for name, sub in list(sys.modules.items()):
        if (not name.startswith(prefix) or sub is None
                or getattr(getattr(sub, "__spec__", None), "_initializing", False)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = sys.modules.get(parent_name)
        if parent is not None and not hasattr(parent, child):
            setattr(parent, child, sub)
    return module


def is_hf(uri: str) -> bool:
    """``hf://datasets/<owner>/<name>/...``: a file of a Hugging Face Hub repository."""
    return uri.startswith("hf://")


def arrow_filesystem(uri: str, endpoint_url: str | None = None):
    """pyarrow's S3 filesystem with the same endpoint as boto3, for ``uri`` on S3; the Hub's filesystem
    (``huggingface_hub.HfFileSystem``, through pyarrow's fsspec bridge) for ``hf://``; None for local paths
    (pyarrow and Ray then use the local filesystem)."""
    if is_hf(uri):
        import pyarrow.fs  # pyarrow and HfFileSystem on first use: model fetches use this module without them
        from huggingface_hub import HfFileSystem

        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(HfFileSystem()))
    if not is_s3(uri):
        return None
    import pyarrow.fs

    url = endpoint(endpoint_url)
    if not url:
        return pyarrow.fs.S3FileSystem()
    scheme, _, host = url.partition("://")
    return pyarrow.fs.S3FileSystem(endpoint_override=host, scheme=scheme)


def filesystem_path(uri: str) -> str:
    """``uri`` as the path its ``arrow_filesystem`` takes: ``bucket/key`` for S3, ``datasets/o/n/...`` for
    the Hub, the path itself for local files."""
    for scheme in ("s3://", "hf://"):
        if uri.startswith(scheme):
            return uri[len(scheme):]
    return uri


def list_files(uri: str, endpoint_url: str | None = None, suffix: str = "") -> list[str]:
    """Every file at ``uri`` (itself when it is a file) whose name ends with ``suffix``, as full URIs,
    sorted. Local paths, ``s3://`` prefixes and ``hf://`` repositories."""
    if is_hf(uri):
        fs = arrow_filesystem(uri)
        import pyarrow.fs  # on first use (see arrow_filesystem)

        base = filesystem_path(uri).rstrip("/")
        info = fs.get_file_info(base)
        if info.type == pyarrow.fs.FileType.File:
            return [uri] if uri.endswith(suffix) else []
        found = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True))
        return sorted(f"hf://{f.path}" for f in found if f.type == pyarrow.fs.FileType.File and f.path.endswith(suffix))
    if is_s3(uri):
        if uri.endswith(suffix) and suffix and Store(endpoint_url).exists(uri):
            return [uri]
        return sorted(u for u in Store(endpoint_url).list(uri) if u.endswith(suffix))
    if os.path.isfile(uri):
        return [uri] if uri.endswith(suffix) else []
    return sorted(u for u in Store().list(uri) if u.endswith(suffix))


def read_parquet(uri: str, endpoint_url: str | None = None, columns: list[str] | None = None):
    """One parquet file (local or s3://) as an Arrow table (``columns``: only these, where present)."""
    import pyarrow.parquet as pq  # on first use (see arrow_filesystem)

    fs = arrow_filesystem(uri, endpoint_url)
    path = uri if fs is None else filesystem_path(uri)
    if columns is not None:
        present = set(pq.read_schema(path, filesystem=fs).names)
        columns = [c for c in columns if c in present]
    return pq.read_table(path, filesystem=fs, columns=columns)


def child(root: str, rel: str) -> str:
    """``root/rel`` for a relative path that stays under ``root`` once normalised; ``ValueError`` for
    one that would leave it (``..``, an absolute path) or names ``root`` itself. For paths read from
    files (a dataset's ``_SUCCESS`` list) that must not point elsewhere."""
    norm = posixpath.normpath(rel) if rel else ""
    if not rel or rel.startswith("/") or norm in (".", "..") or norm.startswith("../") or dot_segments(rel):
        raise ValueError(f"path {rel!r} escapes {root}")
    return join(root, norm)


def safe_relative(key: str, prefix: str) -> str:
    """``key`` (under ``prefix``) as a relative path; ``ValueError`` when it would leave the prefix
    (``..`` segments, an absolute part) or is not in normal form (``.`` segments, ``//``: two keys
    must never name the same cached file), so a hostile object name cannot write outside a cache."""
    rel = key[len(prefix):]
    parts = rel.split("/")
    if not key.startswith(prefix) or not rel or dot_segments(rel) or "" in parts:
        raise ValueError(f"object key {key!r} escapes its prefix {prefix!r} or is not in normal form")
    return rel


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

    @contextmanager
    def _s3(self, op: str, uri: str, whole: bool = False):
        """Translate a failing store into ``StorageUnavailable``, and missing or bad credentials or a missing
        bucket into ``StorageRefused``; other per-object errors pass unchanged, unless ``whole`` (the request is
        about a prefix, not one object): then botocore's other errors, and the ``ValueError`` of an endpoint URL
        it rejects, become ``StorageRefused``."""
        # botocore loads with the first S3 client (s3_client): a local store never imports it
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except Exception as err:
            unavailable = _unavailable(err)
            refused = _refused_whole(err) or whole and isinstance(err, BotoCoreError | ClientError | ValueError)
            if not (unavailable or refused):
                raise
            via = self.client.meta.endpoint_url if self._client is not None else endpoint(self.endpoint_url)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            what = f"{op} {uri} via {via or 'AWS'} failed ({type(err).__name__}: {first})"
            raise (StorageUnavailable(f"S3 store unavailable: {what}") if unavailable
                   else StorageRefused(f"S3 store refused: {what}")) from err

    def read(self, uri: str) -> bytes:
        if is_s3(uri):
            bucket, key = object_key(uri)
            with self._s3("read", uri):
                return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        with open(uri, "rb") as fh:
            return fh.read()

    def read_if_exists(self, uri: str) -> bytes | None:
        """The object's bytes, or None when there is no such object (other failures raise)."""
        if is_s3(uri):
            bucket, key = object_key(uri)
            with self._s3("read", uri):
                try:
                    return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
                except self.client.exceptions.NoSuchKey:
                    return None
        try:
            with open(uri, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def read_text_or_none(self, uri: str) -> str | None:
        """A small text file (a sidecar caption), or None when it cannot be read. A failing store
        still raises ``StorageUnavailable``: an outage must not silently turn captions into file names."""
        try:
            return self.read(uri).decode("utf-8", errors="replace")
        except StorageUnavailable:
            raise
        except Exception:  # missing, permission, S3 NoSuchKey/AccessDenied: the caption policy decides
            return None

    def write(self, uri: str, data: bytes) -> None:
        if is_s3(uri):
            bucket, key = object_key(uri)
            with self._s3("write", uri):
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
            bucket, key = object_key(uri)
            with self._s3("delete", uri):
                self.client.delete_object(Bucket=bucket, Key=key)
        elif os.path.exists(uri):
            os.unlink(uri)

    def list(self, root: str) -> Iterator[str]:
        """Every file under ``root`` (recursive), as full URIs/paths, in sorted order per directory.
        S3 keys come as stored (callers refuse those with dot segments, see ``dot_segments``)."""
        if is_s3(root):
            bucket, prefix = split_s3(root)
            prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
            with self._s3("list", root, whole=True):  # the client, and the pages fetched lazily, inside it
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
            bucket, key = object_key(uri)
            from botocore.exceptions import ClientError  # botocore with the first S3 client (see _unavailable)

            try:
                with self._s3("head", uri):
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


ETAGS = ".etags.json"
"""In a fetched prefix's cache directory: relative path -> the object's ETag when it was downloaded."""


def fetch_prefix(uri: str, cache_root: str | Path, endpoint_url: str | None = None) -> Path:
    """Download ``s3://bucket/prefix`` into ``cache_root/bucket/prefix``; returns that directory.

    A cached file is reused only when the object's ETag is the one it was downloaded with (same-size
    retrained weights are new content). Every key is normalised and must stay under the prefix. A file
    appears in the cache only once complete (downloaded to ``.partial``, then renamed).
    """
    store = Store(endpoint_url)
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    target = Path(cache_root) / bucket / prefix.strip("/")
    etags_path = target / ETAGS
    try:
        etags = json.loads(etags_path.read_text())
    except (OSError, ValueError):
        etags = {}
    found = False
    with store._s3("list", uri):
        pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue
                found = True
                rel = safe_relative(obj["Key"], prefix)
                dest = target / rel
                if dest.is_file() and etags.get(rel) == obj["ETag"]:
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                partial = dest.with_name(dest.name + ".partial")
                store.client.download_file(bucket, obj["Key"], str(partial))
                partial.replace(dest)
                etags[rel] = obj["ETag"]
                target.mkdir(parents=True, exist_ok=True)
                tmp = etags_path.with_name(ETAGS + ".tmp")
                tmp.write_text(json.dumps(etags, sort_keys=True))
                tmp.replace(etags_path)
    if not found:
        raise FileNotFoundError(f"no objects under {uri}")
    return target


def fetch_object(uri: str, cache_root: str | Path, endpoint_url: str | None = None) -> Path:
    """Download one ``s3://bucket/key`` object into ``cache_root/bucket/key``; returns that file.

    Reused when the cached copy was downloaded with the object's current ETag (kept next to it in
    ``<file>.etag``); written to ``.partial`` and renamed, so the cache never holds half a file. A
    missing object is ``FileNotFoundError``.
    """
    store = Store(endpoint_url)
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise ValueError(f"{uri} names a prefix, not an object")
    target = Path(cache_root) / bucket / safe_relative(key, "")
    etag_path = target.with_name(target.name + ".etag")
    from botocore.exceptions import ClientError  # botocore with the first S3 client (see _unavailable)

    with store._s3("head", uri):
        try:
            etag = store.client.head_object(Bucket=bucket, Key=key)["ETag"]
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"no object {uri}") from None
            raise
    if target.is_file() and etag_path.is_file() and etag_path.read_text() == etag:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with store._s3("read", uri):
        store.client.download_file(bucket, key, str(partial))
    partial.replace(target)
    etag_path.write_text(etag)
    return target
