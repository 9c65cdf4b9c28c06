"""Where the inputs come from: a local directory, an ``s3://bucket/prefix``, or a manifest.

Every source becomes the same small Arrow table of *records* (one per input, no pixels):
``source`` (full path or s3:// URI), ``caption``, ``sidecar`` (a .txt caption file), ``pwatermark``,
and ``reject``/``detail`` for records refused before any I/O (a manifest path that escapes its root).
Listing and manifest parsing happen on the driver and hold only these few strings per image;
the bytes are read by the pipeline's workers.

Manifests (.jsonl, .csv, .parquet) have a path column (``curate.path_column``), an optional caption
column and optional metadata (LAION's ``pwatermark``). Relative paths resolve against
``curate.root``: a local directory, an ``s3://`` prefix, ``pkg:<package>/<subdir>`` (a directory
inside an installed Python package, e.g. ``pkg:skimage/data`` for scikit-image's sample photos),
or, when unset, the manifest's own directory. A path that resolves outside its root (``..``,
an absolute path elsewhere, a symlink out) is refused with reason ``path_escape``.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import posixpath
from dataclasses import dataclass

import pyarrow as pa

from components.config import CurateConfig
from components.curation.filters import Reason
from components.storage import Store, is_s3, split_s3

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif", ".ppm", ".pgm"}
)
MANIFEST_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")

RECORD_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("caption", pa.string()),
        ("sidecar", pa.string()),
        ("pwatermark", pa.float64()),
        ("reject", pa.string()),
        ("detail", pa.string()),
    ]
)


class SourceError(ValueError):
    """A source that cannot be used at all (missing, unreadable manifest, no path column)."""


@dataclass
class Inputs:
    records: pa.Table  # RECORD_SCHEMA, one row per input
    ignored: int  # files in a directory source that are neither images nor sidecars
    description: str


def resolve_root(root: str | None, manifest: str) -> str:
    """The directory manifest paths are relative to (see the module docstring)."""
    if root is None:
        if is_s3(manifest):
            return manifest.rsplit("/", 1)[0]
        return os.path.dirname(os.path.abspath(manifest))
    if root.startswith("pkg:"):
        package, _, subdir = root[len("pkg:"):].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise SourceError(f"curate.root {root!r}: no installed package {package!r}")
        path = os.path.join(list(spec.submodule_search_locations)[0], subdir)
        if not os.path.isdir(path):
            raise SourceError(f"curate.root {root!r}: {path} is not a directory")
        return path
    if is_s3(root):
        return root.rstrip("/")
    return os.path.abspath(root)


def resolve_path(root: str, raw: str) -> tuple[str | None, str]:
    """(full path or URI, "") when ``raw`` lies inside ``root``; (None, why) when it escapes."""
    if not raw:
        return None, "empty path"
    if is_s3(root):
        bucket, prefix = split_s3(root)
        if is_s3(raw):
            raw_bucket, key = split_s3(raw)
            if raw_bucket != bucket:
                return None, f"{raw} is outside {root}"
        elif raw.startswith("/"):
            return None, f"absolute path {raw} under an s3:// root"
        else:
            key = posixpath.join(prefix, raw) if prefix else raw
        norm = posixpath.normpath(key)
        base = posixpath.normpath(prefix) if prefix else ""
        if norm.startswith("..") or (base and norm != base and not norm.startswith(base + "/")):
            return None, f"{raw} resolves outside {root}"
        return f"s3://{bucket}/{norm}", ""
    if is_s3(raw):
        return None, f"{raw} is outside the local root {root}"
    base = os.path.realpath(root)
    full = os.path.realpath(raw if os.path.isabs(raw) else os.path.join(base, raw))
    if os.path.commonpath([base, full]) != base:
        return None, f"{raw} resolves outside {root}"
    return full, ""


def _manifest_rows(text_or_bytes: bytes, name: str, columns: list[str]) -> list[dict]:
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(io.BytesIO(text_or_bytes))
        present = [c for c in columns if c in pf.schema_arrow.names]
        return pf.read(columns=present).to_pylist()
    text = text_or_bytes.decode("utf-8-sig")
    if name.endswith(".csv"):
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SourceError(f"{name}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise SourceError(f"{name}:{lineno}: each line must be a JSON object")
        rows.append(row)
    return rows


def _float_or_none(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def from_manifest(cfg: CurateConfig, store: Store) -> Inputs:
    try:
        blob = store.read(cfg.source)
    except Exception as err:
        raise SourceError(f"cannot read manifest {cfg.source}: {type(err).__name__}: {err}") from None
    mark_col = cfg.filters.watermark_column
    rows = _manifest_rows(blob, cfg.source, [cfg.path_column, cfg.caption_column, mark_col])
    if rows and cfg.path_column not in rows[0]:
        raise SourceError(f"manifest {cfg.source} has no {cfg.path_column!r} column (curate.path_column)")
    root = resolve_root(cfg.root, cfg.source)
    out: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}
    for row in rows:
        raw = str(row.get(cfg.path_column) or "")
        full, why = resolve_path(root, raw)
        caption = row.get(cfg.caption_column)
        out["source"].append(full or raw)
        out["caption"].append(None if caption is None else str(caption))
        out["sidecar"].append(None)
        out["pwatermark"].append(_float_or_none(row.get(mark_col)))
        out["reject"].append(None if full else str(Reason.PATH_ESCAPE))
        out["detail"].append(why or None)
    return Inputs(pa.table(out, schema=RECORD_SCHEMA), 0, f"manifest {cfg.source} (root {root})")


def from_listing(cfg: CurateConfig, store: Store) -> Inputs:
    """A directory or prefix: every file with an image extension is an input; ``name.txt`` beside
    ``name.jpg`` is its caption; other files are counted as ignored."""
    files = list(store.list(cfg.source))
    if not files and not is_s3(cfg.source) and not os.path.isdir(cfg.source):
        raise SourceError(f"curate.source {cfg.source} is not a directory, an s3:// prefix or a manifest")
    texts = {os.path.splitext(f)[0]: f for f in files if f.lower().endswith(".txt")}
    out: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}
    ignored = 0
    for path in files:
        stem, ext = os.path.splitext(path)
        if ext.lower() not in IMAGE_EXTENSIONS:
            ignored += ext.lower() != ".txt"
            continue
        out["source"].append(path)
        out["caption"].append(None)
        out["sidecar"].append(texts.get(stem))
        out["pwatermark"].append(None)
        out["reject"].append(None)
        out["detail"].append(None)
    return Inputs(pa.table(out, schema=RECORD_SCHEMA), ignored, f"listing of {cfg.source}")


def check_output(store: Store, output: str) -> None:
    """Fail before any work when the output cannot be written: a missing bucket, bad credentials."""
    if is_s3(output):
        bucket, _ = split_s3(output)
        try:
            store.client.head_bucket(Bucket=bucket)
        except Exception as err:
            raise SourceError(f"curate.output {output}: bucket {bucket!r} not usable ({type(err).__name__}: {err})") from None
    else:
        try:
            os.makedirs(output, exist_ok=True)
        except OSError as err:
            raise SourceError(f"curate.output {output}: cannot create it ({err.strerror})") from None


def load_inputs(cfg: CurateConfig, store: Store) -> Inputs:
    if cfg.source.lower().endswith(MANIFEST_EXTENSIONS):
        return from_manifest(cfg, store)
    return from_listing(cfg, store)
