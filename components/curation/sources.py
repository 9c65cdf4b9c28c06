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
from components.redact import redact
from components.storage import Store, dot_segments, is_s3, split_s3

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
    """A source that cannot be used at all (missing, unreadable manifest, no path column, an output that
    overlaps it). The message is redacted when the error is made: it often quotes a library's error
    text, which may carry an endpoint URL with its credentials."""

    def __init__(self, message: str):
        super().__init__(redact(message))


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


def _listing_escape(source: str, base: str | None, path: str) -> str | None:
    """Why a listed file does not really lie inside the listed source, or None. A local file may be a
    symlink to anywhere (a caption linked to a credentials file would become training text); an S3
    key may have ``..`` segments (``storage.dot_segments``)."""
    if is_s3(path):
        return f"{path}: key has '.' or '..' segments" if dot_segments(split_s3(path)[1]) else None
    real = os.path.realpath(path)
    if os.path.commonpath([base, real]) != base:
        return f"{path} is a link to {real}, outside {source}"
    return None


def from_listing(cfg: CurateConfig, store: Store) -> Inputs:
    """A directory or prefix: every file with an image extension is an input; ``name.txt`` beside
    ``name.jpg`` is its caption; other files are counted as ignored. An input whose image or caption
    resolves outside the source (a symlink out, an S3 key with ``..``) is refused as ``path_escape``
    before any read, as manifest paths are."""
    files = list(store.list(cfg.source))
    if not files and not is_s3(cfg.source) and not os.path.isdir(cfg.source):
        raise SourceError(f"curate.source {cfg.source} is not a directory, an s3:// prefix or a manifest")
    base = None if is_s3(cfg.source) else os.path.realpath(cfg.source)
    texts = {os.path.splitext(f)[0]: f for f in files if f.lower().endswith(".txt")}
    out: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}
    ignored = 0
    for path in files:
        stem, ext = os.path.splitext(path)
        if ext.lower() not in IMAGE_EXTENSIONS:
            ignored += ext.lower() != ".txt"
            continue
        sidecar = texts.get(stem)
        why = _listing_escape(cfg.source, base, path)
        if why is None and sidecar is not None:
            caption_why = _listing_escape(cfg.source, base, sidecar)
            why = f"caption {caption_why}" if caption_why else None
        out["source"].append(path)
        out["caption"].append(None)
        out["sidecar"].append(None if why else sidecar)
        out["pwatermark"].append(None)
        out["reject"].append(str(Reason.PATH_ESCAPE) if why else None)
        out["detail"].append(why)
    return Inputs(pa.table(out, schema=RECORD_SCHEMA), ignored, f"listing of {cfg.source}")


def _location(uri: str) -> tuple[str, str]:
    """(``s3://bucket`` or ``""`` for local, the normalised path or prefix) for comparing places."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return f"s3://{bucket}", posixpath.normpath("/" + key)
    return "", os.path.realpath(os.path.expanduser(uri))


def _overlap(a: str, b: str) -> str | None:
    """How place ``a`` relates to place ``b`` ("is", "is inside", "contains"), or None when apart."""
    (store_a, pa_), (store_b, pb) = _location(a), _location(b)
    if store_a != store_b:
        return None
    sep = "/" if store_a else os.sep
    if pa_ == pb:
        return "is"
    if pa_.startswith(pb.rstrip(sep) + sep):
        return "is inside"
    if pb.startswith(pa_.rstrip(sep) + sep):
        return "contains"
    return None


def source_places(cfg: CurateConfig) -> list[tuple[str, str]]:
    """(what, place) of everything curation reads: the listed folder or prefix; for a manifest, the
    manifest's folder and the root its paths resolve against."""
    if not cfg.source.lower().endswith(MANIFEST_EXTENSIONS):
        return [("curate.source", cfg.source)]
    folder = cfg.source.rsplit("/", 1)[0] if is_s3(cfg.source) else os.path.dirname(os.path.abspath(cfg.source))
    return [("the manifest's folder", folder), ("the manifest root", resolve_root(cfg.root, cfg.source))]


def check_no_overlap(cfg: CurateConfig) -> None:
    """Refuse, before any work, outputs that overlap what curation reads: publishing deletes every file
    under the output's ``train/``, ``val/`` and ``rejects/`` that the run did not write, so an output
    that is, contains or lies inside a source would delete (or re-read) the source's own files. The
    latent cache's output is checked the same way, and against ``curate.output``."""
    outputs = [("curate.output", cfg.output)]
    if cfg.cache_latents:
        outputs.append(("curate.cache_output", cfg.cache_output or cfg.output.rstrip("/") + "-latents"))
    places = source_places(cfg)
    for i, (name, out) in enumerate(outputs):
        for what, place in places + outputs[:i]:
            how = _overlap(out, place)
            if how:
                raise SourceError(f"{name} {out} {how} {what} {place}: it must be a separate folder, since "
                                  "publishing deletes the files under it that the run did not write")


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
