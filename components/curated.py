"""The curated-dataset contract between curation (writer) and training/evaluation (readers).

Layout of a curated dataset at ``ROOT`` (a local directory or ``s3://bucket/prefix``):

    ROOT/train/part-*.parquet   ROOT/val/part-*.parquet   ROOT/report.json   ROOT/_SUCCESS

``_SUCCESS`` is written last (a JSON manifest with the shard list and the digest); a dataset
without it is incomplete and is refused, so a crashed curation never looks complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pyarrow as pa

SUCCESS = "_SUCCESS"
REPORT = "report.json"
SPLITS = ("train", "val")

SCHEMA = pa.schema(
    [
        ("image", pa.binary()),  # encoded JPEG of the cropped image, exactly target size
        ("caption", pa.string()),
        ("original_h", pa.int32()),  # true pre-resize size (SDXL micro-conditioning)
        ("original_w", pa.int32()),
        ("crop_top", pa.int32()),  # crop top-left in the resized image
        ("crop_left", pa.int32()),
        ("target_h", pa.int32()),
        ("target_w", pa.int32()),
        ("bucket", pa.string()),  # "WxH"
        ("source", pa.string()),
        ("sha256", pa.string()),  # of the source file's bytes
    ]
)


class IncompleteDatasetError(RuntimeError):
    pass


@dataclass(frozen=True)
class CuratedManifest:
    root: str
    digest: str
    files: dict[str, list[str]]  # split -> shard paths relative to root
    rows: dict[str, int]

    def paths(self, split: str) -> list[str]:
        return [join(self.root, f) for f in self.files.get(split, [])]


def join(root: str, *parts: str) -> str:
    if root.startswith("s3://"):
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(root, *parts)


def _read_text(path: str, endpoint_url: str | None = None) -> str | None:
    if path.startswith("s3://"):
        import boto3

        bucket, _, key = path[len("s3://"):].partition("/")
        client = boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3"))
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        except client.exceptions.NoSuchKey:
            return None
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return fh.read()


def read_manifest(root: str, endpoint_url: str | None = None) -> CuratedManifest:
    text = _read_text(join(root, SUCCESS), endpoint_url)
    if text is None:
        raise IncompleteDatasetError(
            f"{root} has no {SUCCESS} marker: curation did not finish there; run flows/curate.py first"
        )
    data = json.loads(text)
    return CuratedManifest(root=root, digest=data["digest"], files=data["files"], rows=data["rows"])


def success_text(digest: str, files: dict[str, list[str]], rows: dict[str, int], **extra) -> str:
    """The body of ``_SUCCESS`` that ``read_manifest`` parses (extra keys are informational)."""
    return json.dumps({"digest": digest, "files": files, "rows": rows, **extra}, indent=2, sort_keys=True)


def mlflow_dataset(manifest: CuratedManifest, name: str | None = None):
    """The curated dataset as an MLflow dataset (source = ROOT, digest = the curation digest), for
    ``mlflow.log_input(mlflow_dataset(read_manifest(root)), context="training")`` so a run records
    exactly which curated data it used."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, DataType, Schema

    kinds = {pa.binary(): DataType.binary, pa.string(): DataType.string, pa.int32(): DataType.integer}
    schema = Schema([ColSpec(kinds[field.type], field.name) for field in SCHEMA])
    with warnings.catch_warnings():  # a local path matches two equivalent "local" source classes
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(manifest.root)
    label = name or manifest.root.rstrip("/").rsplit("/", 1)[-1]
    return MetaDataset(source, name=label, digest=manifest.digest, schema=schema)
