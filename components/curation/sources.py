"""Where the inputs come from: the sources of ``curate.sources`` (or the one-source shorthand).

Four kinds (docs/sources.md):

- ``files``: a local directory, an ``s3://bucket/prefix``, or a manifest of paths. Listing and manifest
  parsing happen on the driver and hold only a few strings per image; the bytes are read by the
  pipeline's workers.
- ``urls``: parquet files of image URLs with their metadata (LAION's layout: URL, TEXT, WIDTH, HEIGHT,
  pwatermark, punsafe, similarity). The driver lists the files and reads their footers (row counts,
  columns); Ray Data reads the rows in the workers and the workers download the images.
- ``huggingface``: a dataset in the Hugging Face Hub's parquet layout (an image column, the Hub's
  ``{bytes, path}`` struct, raw bytes, a path or a URL, and a caption column), from a local copy of the
  repository, an ``s3://`` prefix or ``hf://datasets/<owner>/<name>``; read by Ray Data the same way.
- ``webdataset``: tar shards (``components/curation/webdataset.py``): the driver lists them, Ray Data
  reads them, each sample becomes one record with its image bytes inline.

Every source becomes rows of ``RECORD_SCHEMA`` (``components/curation/records.py``; one per input, no
pixels except a Hugging Face dataset's or a webdataset's inline bytes): ``source`` (full path, s3:// URI,
URL, ``file#image`` or ``shard#key``), ``source_name`` (the source's name), ``fetch`` (how the bytes are
got: ``path``, ``url`` or ``inline``), ``data`` (inline bytes), ``name`` (a file name for the ``filename``
caption policy when ``source`` is none), ``caption``, ``sidecar`` (a .txt caption file), the metadata
scores ``pwatermark``, ``punsafe``, ``similarity``, and ``reject``/``detail`` for records refused before
any I/O (a manifest path that escapes its root).

Manifests (.jsonl, .csv, .parquet) have a path column (``path_column``), an optional caption column and
optional metadata (LAION's ``pwatermark``). Relative paths resolve against ``root``: a local directory,
an ``s3://`` prefix, ``pkg:<package>/<subdir>`` (a directory inside an installed Python package, e.g.
``pkg:skimage/data`` for scikit-image's sample photos), or, when unset, the manifest's own directory. A
path that resolves outside its root (``..``, an absolute path elsewhere, a symlink out) is refused with
reason ``path_escape``.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from components.config import CurateConfig, SourceConfig, SourceKind
from components.curation.filters import Reason
from components.curation.records import RECORD_SCHEMA, SourceError, float_or_none, setting
from components.curation.webdataset import shard_list, shard_root
from components.storage import (
    Store,
    arrow_filesystem,
    dot_segments,
    filesystem_path,
    is_hf,
    is_s3,
    list_files,
    split_s3,
)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif", ".ppm", ".pgm"}
)
MANIFEST_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")

METADATA_SCORES = ("pwatermark", "punsafe", "similarity")
"""Metadata columns of URL and Hugging Face sources the filters read (LAION's names; the watermark
column's name is ``filters.watermark_column``)."""
SPLIT_WORDS = ("train", "training", "validation", "valid", "val", "dev", "test", "testing", "eval")
"""Split names the Hub recognises in file and folder names (docs/sources.md)."""


@dataclass
class SourceInputs:
    """One source, ready for the pipeline: its records (``files``, made on the driver) or its parquet
    files (``urls``, ``huggingface``, read by Ray Data) and the columns to read from them."""

    source: SourceConfig
    rows: int  # inputs of this source (records, or the parquet footers' row count)
    description: str
    records: pa.Table | None = None  # RECORD_SCHEMA, for ``files``
    files: list[str] = field(default_factory=list)  # for ``urls`` and ``huggingface``
    columns: dict[str, str] = field(default_factory=dict)  # role (url, image, caption, pwatermark...) -> column
    image_type: str = ""  # huggingface: "struct", "binary" or "string"
    ignored: int = 0  # files in a directory source that are neither images nor sidecars
    shards: list[str] = field(default_factory=list)  # ``webdataset``: its tars (``rows`` 0: counted as read)
    places: list[tuple[str, str]] = field(default_factory=list)  # (what, place) curation reads


@dataclass
class Inputs:
    sources: list[SourceInputs]

    @property
    def rows(self) -> int:
        """Inputs known before the run: every source's but a webdataset's, whose samples are counted as
        its shards are read."""
        return sum(s.rows for s in self.sources)

    @property
    def readable(self) -> list[SourceInputs]:
        """The sources with anything to read: known rows, or shards."""
        return [s for s in self.sources if s.rows or s.shards]

    @property
    def ignored(self) -> int:
        return sum(s.ignored for s in self.sources)

    @property
    def description(self) -> str:
        return "; ".join(f"{s.source.name}: {s.description}" for s in self.sources)

    @property
    def records(self) -> pa.Table:
        """The driver-made records of every ``files`` source, in source order (RECORD_SCHEMA)."""
        tables = [s.records for s in self.sources if s.records is not None]
        return pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()


def _as_source(cfg: CurateConfig | SourceConfig) -> SourceConfig:
    return cfg if isinstance(cfg, SourceConfig) else cfg.resolved_sources()[0]


def _records(rows: dict[str, list], src: SourceConfig) -> pa.Table:
    n = len(rows["source"])
    full = {name: rows.get(name) or [None] * n for name in RECORD_SCHEMA.names}
    full["source_name"] = [src.name] * n
    full["fetch"] = ["path"] * n
    return pa.table(full, schema=RECORD_SCHEMA)


def resolve_root(root: str | None, manifest: str, key: str = "curate.root") -> str:
    """The directory manifest paths are relative to (see the module docstring); ``key`` names the setting
    in errors."""
    if root is None:
        if is_s3(manifest):
            return manifest.rsplit("/", 1)[0]
        return os.path.dirname(os.path.abspath(manifest))
    if root.startswith("pkg:"):
        package, _, subdir = root[len("pkg:"):].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise SourceError(f"{key} {root!r}: no installed package {package!r}")
        path = os.path.join(list(spec.submodule_search_locations)[0], subdir)
        if not os.path.isdir(path):
            raise SourceError(f"{key} {root!r}: {path} is not a directory")
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


def from_manifest(cfg: CurateConfig | SourceConfig, store: Store) -> SourceInputs:
    src = _as_source(cfg)
    try:
        blob = store.read(src.location)
    except Exception as err:
        raise SourceError(f"cannot read manifest {src.location}: {type(err).__name__}: {err}") from None
    mark_col = src.filters.watermark_column
    rows = _manifest_rows(blob, src.location, [src.path_column, src.caption_column, mark_col, "punsafe", "similarity"])
    if rows and src.path_column not in rows[0]:
        raise SourceError(f"manifest {src.location} has no {src.path_column!r} column ({setting(src, 'path_column')})")
    root = resolve_root(src.root, src.location, setting(src, "root"))
    out: dict[str, list] = {name: [] for name in ("source", "caption", "pwatermark", "punsafe", "similarity",
                                                  "reject", "detail")}
    for row in rows:
        raw = str(row.get(src.path_column) or "")
        full, why = resolve_path(root, raw)
        caption = row.get(src.caption_column)
        out["source"].append(full or raw)
        out["caption"].append(None if caption is None else str(caption))
        out["pwatermark"].append(float_or_none(row.get(mark_col)))
        out["punsafe"].append(float_or_none(row.get("punsafe")))
        out["similarity"].append(float_or_none(row.get("similarity")))
        out["reject"].append(None if full else str(Reason.PATH_ESCAPE))
        out["detail"].append(why or None)
    records = _records(out, src)
    return SourceInputs(src, records.num_rows, f"manifest {src.location} (root {root})", records=records,
                        places=[("the manifest's folder", _folder_of(src.location)), ("the manifest root", root)])


def _folder_of(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if is_s3(uri) or is_hf(uri) else os.path.dirname(os.path.abspath(uri))


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


def from_listing(cfg: CurateConfig | SourceConfig, store: Store) -> SourceInputs:
    """A directory or prefix: every file with an image extension is an input; ``name.txt`` beside
    ``name.jpg`` is its caption; other files are counted as ignored. An input whose image or caption
    resolves outside the source (a symlink out, an S3 key with ``..``) is refused as ``path_escape``
    before any read, as manifest paths are."""
    src = _as_source(cfg)
    location = src.location
    files = list(store.list(location))
    if not files and not is_s3(location) and not os.path.isdir(location):
        raise SourceError(f"{setting(src, 'location')} {location} is not a directory, an s3:// prefix or a manifest")
    base = None if is_s3(location) else os.path.realpath(location)
    texts = {os.path.splitext(f)[0]: f for f in files if f.lower().endswith(".txt")}
    out: dict[str, list] = {name: [] for name in ("source", "sidecar", "reject", "detail")}
    ignored = 0
    for path in files:
        stem, ext = os.path.splitext(path)
        if ext.lower() not in IMAGE_EXTENSIONS:
            ignored += ext.lower() != ".txt"
            continue
        sidecar = texts.get(stem)
        why = _listing_escape(location, base, path)
        if why is None and sidecar is not None:
            caption_why = _listing_escape(location, base, sidecar)
            why = f"caption {caption_why}" if caption_why else None
        out["source"].append(path)
        out["sidecar"].append(None if why else sidecar)
        out["reject"].append(str(Reason.PATH_ESCAPE) if why else None)
        out["detail"].append(why)
    records = _records(out, src)
    return SourceInputs(src, records.num_rows, f"listing of {location}", records=records, ignored=ignored,
                        places=[(setting(src, "location"), location)])


# --- parquet sources (URLs, Hugging Face datasets), read by Ray Data ------------------------------------


def _find_column(names: list[str], wanted: str) -> str | None:
    """``wanted`` among ``names``: exactly, else the one name equal to it ignoring case (LAION's releases
    write ``URL``/``TEXT`` or ``url``/``caption``)."""
    if wanted in names:
        return wanted
    folded = [n for n in names if n.lower() == wanted.lower()]
    return folded[0] if len(folded) == 1 else None


def split_of_file(path: str) -> str | None:
    """The split a Hub data file belongs to by its name (``data/train-00000-of-00002.parquet``,
    ``validation/0000.parquet``, ``default/test/0000.parquet``), or None when nothing names one."""
    parts = path.lower().split("/")
    for part in reversed(parts):
        stem = part.removesuffix(".parquet")
        for word in SPLIT_WORDS:
            if stem == word or stem.startswith((word + "-", word + "_", word + ".")):
                return {"training": "train", "valid": "validation", "val": "validation", "dev": "validation",
                        "testing": "test", "eval": "test"}.get(word, word)
    return None


def hub_files(files: list[str], split: str) -> list[str]:
    """The parquet files of ``split`` in a Hub dataset repository, by the Hub's naming rule: files whose
    path names a split belong to it; when none names one, every file is ``train``."""
    named = {f: split_of_file(f) for f in files}
    if not any(named.values()):
        return files if split == "train" else []
    want = {"training": "train", "valid": "validation", "val": "validation", "dev": "validation",
            "testing": "test", "eval": "test"}.get(split, split)
    return [f for f, s in named.items() if s == want]


def _footers(files: list[str], endpoint_url: str | None) -> tuple[int, pa.Schema]:
    """(rows in all ``files``, the first file's schema), from the parquet footers only (threads: a footer is
    one small ranged read)."""
    def one(uri: str):
        fs = arrow_filesystem(uri, endpoint_url)
        return pq.read_metadata(filesystem_path(uri) if fs is not None else uri, filesystem=fs)

    with ThreadPoolExecutor(max_workers=16) as pool:
        metas = list(pool.map(one, files))
    return sum(m.num_rows for m in metas), metas[0].schema.to_arrow_schema()


def from_parquet(src: SourceConfig, endpoint_url: str | None) -> SourceInputs:
    """A ``urls`` or ``huggingface`` source: its parquet files, their row count and the columns to read;
    every check that can fail (no files, a missing column) fails here, before any work."""
    where = setting(src, "location")
    try:
        files = list_files(src.location, endpoint_url, suffix=".parquet")
    except Exception as err:
        raise SourceError(f"{where} {src.location}: cannot list it ({type(err).__name__}: {err})") from None
    if src.kind is SourceKind.HUGGINGFACE:
        files = [f for f in hub_files(files, src.split) if "/.cache/" not in f]
    if not files:
        what = f"no parquet files of split {src.split!r}" if src.kind is SourceKind.HUGGINGFACE else "no parquet files"
        raise SourceError(f"{where} {src.location}: {what}")
    try:
        rows, schema = _footers(files, endpoint_url)
    except Exception as err:
        raise SourceError(
            f"{where} {src.location}: cannot read a parquet footer ({type(err).__name__}: {err})") from None
    names = schema.names
    image_role, image_key = ("url", "url_column") if src.kind is SourceKind.URLS else ("image", "image_column")
    wanted = {image_role: getattr(src, image_key), "caption": src.caption_column,
              "pwatermark": src.filters.watermark_column, "punsafe": "punsafe", "similarity": "similarity"}
    columns = {role: col for role, name in wanted.items() if (col := _find_column(names, name)) is not None}
    if image_role not in columns:
        raise SourceError(f"{where} {src.location}: no column {wanted[image_role]!r} "
                          f"({setting(src, image_key)}); columns: {', '.join(names)[:300]}")
    image_type = ""
    if src.kind is SourceKind.HUGGINGFACE:
        kind = schema.field(columns["image"]).type
        if pa.types.is_struct(kind) and {"bytes", "path"} & {f.name for f in kind}:
            image_type = "struct"
        elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            image_type = "binary"
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            image_type = "string"
        else:
            raise SourceError(f"{where} {src.location}: image column {columns['image']!r} is {kind}, not an image "
                              "struct (bytes, path), bytes, a path or a URL")
    described = f"{src.kind.value} {src.location} ({len(files)} parquet file(s), {rows} rows)"
    folder = src.location if not src.location.endswith(".parquet") else _folder_of(src.location)
    return SourceInputs(src, rows, described, files=files, columns=columns, image_type=image_type,
                        places=[(where, folder)])


def _score(column) -> list[float | None]:
    values = column.to_pylist() if column is not None else None
    return [float_or_none(v) for v in values] if values is not None else None


def parquet_records(batch: pa.Table, source: dict, columns: dict[str, str], image_type: str,
                    files_root: str) -> pa.Table:
    """Ray Data map function (pure pyarrow): rows of a ``urls`` or ``huggingface`` source's parquet
    (with Ray's ``path`` column, the file each row came from) -> ``RECORD_SCHEMA`` records.

    A URL becomes a ``url`` record; a Hub image struct or raw bytes an ``inline`` record (the bytes
    travel in the record); a path inside the dataset a ``path`` record, refused as ``path_escape`` when
    it leaves the dataset's folder."""
    src = SourceConfig.model_validate(source)
    n = batch.num_rows
    col = {role: (batch[name] if name in batch.column_names else None) for role, name in columns.items()}
    files = [_display(f, src.location) for f in batch["path"].to_pylist()] if "path" in batch.column_names \
        else [src.location] * n
    out: dict[str, list] = {k: [None] * n for k in RECORD_SCHEMA.names}
    out["source_name"] = [src.name] * n
    captions = col["caption"].to_pylist() if col.get("caption") is not None else [None] * n
    out["caption"] = [None if c is None else str(c) for c in captions]
    for score in METADATA_SCORES:
        values = _score(col.get(score))
        if values is not None:
            out[score] = values
    if src.kind is SourceKind.URLS:
        urls = col["url"].to_pylist()
        out["source"] = [str(u) if u else "" for u in urls]
        out["fetch"] = ["url"] * n
        for i, u in enumerate(urls):
            if not u:
                out["reject"][i], out["detail"][i] = str(Reason.HTTP_ERROR), "empty URL"
        return pa.table(out, schema=RECORD_SCHEMA)
    images = col["image"].to_pylist()
    for i, image in enumerate(images):
        file = files[i]
        data, path = None, None
        if image_type == "struct" and isinstance(image, dict):
            data, path = image.get("bytes"), image.get("path")
        elif image_type == "binary":
            data = image
        elif isinstance(image, str):
            path = image
        if data:
            digest = hashlib.sha256(data).hexdigest()[:16]
            out["source"][i] = f"{file}#{path or digest}"
            out["fetch"][i], out["data"][i], out["name"][i] = "inline", data, path
        elif path and path.startswith(("http://", "https://")):
            out["source"][i], out["fetch"][i] = path, "url"
        elif path and is_hf(files_root):
            out["source"][i], out["fetch"][i] = path, "path"
            out["reject"][i] = str(Reason.UNREADABLE)
            out["detail"][i] = "image paths of an hf:// dataset are not read: use a local or s3:// copy"
        elif path:
            full, why = resolve_path(files_root, path)
            out["source"][i], out["fetch"][i] = full or path, "path"
            if full is None:
                out["reject"][i], out["detail"][i] = str(Reason.PATH_ESCAPE), why
        else:
            out["source"][i], out["fetch"][i] = f"{file}#row", "inline"
            out["reject"][i], out["detail"][i] = str(Reason.EMPTY), "no image bytes and no path"
    return pa.table(out, schema=RECORD_SCHEMA)


def _display(path: str, location: str) -> str:
    """A parquet file as the user named it: Ray hands ``bucket/key`` and ``datasets/o/n/...`` without
    their scheme."""
    for scheme in ("s3://", "hf://"):
        if location.startswith(scheme) and not path.startswith(scheme):
            return scheme + path
    return path


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
    """(what, place) of everything curation reads: a listed folder or prefix; a manifest's folder and the
    root its paths resolve against; the folder of a URL or Hugging Face source's parquet files; the folder
    or prefix a webdataset's shards lie under (``webdataset.shard_root``; http(s) shards are elsewhere)."""
    places = []
    for src in cfg.resolved_sources():
        key = setting(src, "location")
        if src.kind is SourceKind.WEBDATASET:
            root = shard_root(src.location)
            places += [(key, root)] if root else []
        elif src.kind is not SourceKind.FILES:
            places.append((key, src.location if not src.location.endswith(".parquet") else _folder_of(src.location)))
        elif not src.location.lower().endswith(MANIFEST_EXTENSIONS):
            places.append((key, src.location))
        else:
            places += [("the manifest's folder", _folder_of(src.location)),
                       ("the manifest root", resolve_root(src.root, src.location, setting(src, "root")))]
    return [(what, place) for what, place in places if not is_hf(place)]


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
            raise SourceError(
                f"curate.output {output}: bucket {bucket!r} not usable ({type(err).__name__}: {err})") from None
    else:
        try:
            os.makedirs(output, exist_ok=True)
        except OSError as err:
            raise SourceError(f"curate.output {output}: cannot create it ({err.strerror})") from None


def from_webdataset(src: SourceConfig, store: Store) -> SourceInputs:
    """A ``webdataset`` source: its shard list (``webdataset.shard_list``); its samples are counted as read."""
    shards = shard_list(src, store)
    root = shard_root(src.location)
    return SourceInputs(src, 0, f"webdataset {src.location} ({len(shards)} shard(s))", shards=shards,
                        places=[(setting(src, "location"), root)] if root else [])


def load_source(src: SourceConfig, store: Store) -> SourceInputs:
    if src.kind is SourceKind.WEBDATASET:
        return from_webdataset(src, store)
    if src.kind is SourceKind.FILES:
        if src.location.lower().endswith(MANIFEST_EXTENSIONS):
            return from_manifest(src, store)
        return from_listing(src, store)
    return from_parquet(src, store.endpoint_url)


def load_inputs(cfg: CurateConfig, store: Store) -> Inputs:
    """Every source of ``cfg``, listed or opened on the driver (one ``SourceError`` line if one cannot be)."""
    return Inputs([load_source(src, store) for src in cfg.resolved_sources()])
