"""Writing a curated dataset so that a crash never leaves one that looks complete.

Protocol (the layout is ``components.dataset``'s contract):

1. ``begin``: delete ``_SUCCESS`` (then ``report.json``) of whatever was at ROOT, so from the first
   byte written the dataset reads as incomplete and ``read_manifest`` refuses it.
2. Ray Data write tasks (``CuratedDatasink``) each write their own shards,
   ``{train,val}/part-<run>-<task>.parquet`` for kept rows and ``rejects/part-<run>-<task>.parquet``
   (source, reason, detail) for dropped ones, and return small stats to the driver. A local file
   is written under a temporary name and renamed; an S3 PUT is atomic per object.
3. ``publish`` (driver): make sure val and train are non-empty (moving one row, chosen by hash,
   if needed), delete every shard under ROOT that this run did not write (an older run's, or a
   failed attempt's), write ``report.json``, and write ``_SUCCESS`` last.

A crash at any point before step 3's last write leaves no ``_SUCCESS``; a rerun into the same
ROOT goes through the same steps and replaces the old dataset cleanly. Readers use the file list
in ``_SUCCESS``, never a glob.

The digest is order-free: the sum (mod 2**256) of a SHA-256 per kept row over its split and every
column (the image bytes by their own hash), so it names the data itself, not how Ray happened to
shard it; the same inputs and config give the same digest on any cluster.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

from components import dataset
from components.curation.process import Outcome, split_of
from components.redact import Redactor, redact_tree
from components.storage import Store, dot_segments, is_s3, join, relative, split_s3


def stage_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema(list(schema) + [("split", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                                     ("caption_fallback", pa.string())])


STAGE_SCHEMA = stage_schema(dataset.SCHEMA)
"""What the curation stage emits: one row per input (kept rows with SCHEMA filled, dropped rows
with ``reason`` and ``source_name``), so the sink can count every input exactly once, per source.
``caption_fallback``: for a row waiting for the captioning model, the caption its source's
missing-caption policy gives if the model gives none (null: drop it)."""

log = logging.getLogger(__name__)
REJECTS = "rejects"
MIN_KEPT_FOR_VAL = 5
MAX_EXAMPLES = 5

def outcomes_table(outcomes: list[Outcome], holdout_fraction: float) -> pa.Table:
    """Stage rows of one block. A dropped row's source and detail are redacted here: the detail quotes
    library errors (an endpoint URL with its credentials), and the rejects shards and the report keep both."""
    rows = []
    scrub = Redactor()
    for o in outcomes:
        if o.kept:
            rows.append({**o.row, "split": split_of(o.row["sha256"], holdout_fraction), "reason": None, "detail": None})
        else:
            rows.append(dropped_row(o.source, o.source_name, str(o.reason), o.detail, scrub))
    return pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)


def dropped_row(source: str, source_name: str, reason: str, detail: str, scrub: Redactor | None = None) -> dict:
    """The stage row of a dropped input (its source and detail redacted)."""
    scrub = scrub or Redactor()
    return {**dataset.blank_row(), "source": scrub(source), "source_name": source_name, "split": None,
            "reason": reason, "detail": scrub(detail), "caption_fallback": None}


def new_source_stats() -> dict:
    return {"inputs": 0, "reasons": {}, "captions": {}, "watermark": {}, "rows": {}}


def _count(stats: dict, key: str, value: str, n: int = 1) -> None:
    stats[key][value] = stats[key].get(value, 0) + n


def _row_hash(split: str, row: dict) -> int:
    """SHA-256 over the split and every column in schema order (bytes columns by their own hash)."""
    values = [split] + [hashlib.sha256(v).hexdigest() if isinstance(v, bytes) else v for v in row.values()]
    return int(hashlib.sha256(json.dumps(values).encode()).hexdigest(), 16)


def _key(r: dict) -> tuple:
    """What dedupe and the per-source counts need of a kept row: (sha256, source, source name, caption
    origin, watermark check)."""
    return (r["sha256"], r["source"], r.get("source_name") or "", r.get("caption_origin") or "",
            r.get("watermark_check") or "")


def _file_info(split: str, rel: str, table: pa.Table) -> dict:
    """Shard stats: rows, the digest sum, the most "other-split-like" row by split score, and each
    row's ``_key`` for ``dedupe.remove_duplicates`` and the per-source counts."""
    rows = table.to_pylist()
    scores = [int(r["sha256"][:16], 16) for r in rows]
    pick = min if split == "train" else max  # train's lowest score is the nearest to val, and back
    idx = scores.index(pick(scores))
    total = sum(_row_hash(split, r) for r in rows) % 2**256
    return {"split": split, "path": rel, "rows": len(rows), "nbytes": table.nbytes, "sum": f"{total:064x}",
            "edge": [scores[idx], idx], "keys": [_key(r) for r in rows]}


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # JPEG bytes do not shrink: stored as they are (zstd spent a third of the write on them); zstd keeps the
    # rest small.
    codecs = {name: "none" if name == "image" else "zstd" for name in table.column_names}
    pq.write_table(table, buf, compression=codecs)
    return buf.getvalue()


def write_shard(store: Store, root: str, name: str, table: pa.Table, schema: pa.Schema = dataset.SCHEMA) -> dict:
    """Write one bundle of stage rows (``schema`` + split, reason, detail) as shards; return its stats,
    in total and per source (``sources``: inputs and drop reasons; what the kept rows are is counted from
    the final shard list by ``kept_by_source``, after dedupe and the split balance)."""
    reason = table["reason"]
    kept = table.filter(pc.is_null(reason))
    dropped = table.filter(pc.is_valid(reason))
    result: dict = {"inputs": table.num_rows, "reasons": {}, "buckets": {}, "examples": {}, "files": [], "rejects": [],
                    "sources": {}}
    for split in dataset.SPLITS:
        part = kept.filter(pc.equal(kept["split"], split)).select(schema.names).cast(schema)
        if part.num_rows:
            rel = f"{split}/part-{name}.parquet"
            store.write(join(root, rel), _parquet_bytes(part))
            result["files"].append(_file_info(split, rel, part))
    result["buckets"] = dict(Counter(kept["bucket"].to_pylist())) if "bucket" in schema.names else {}
    names = table["source_name"].to_pylist() if "source_name" in table.column_names else [""] * table.num_rows
    for source_name in names:
        result["sources"].setdefault(source_name or "", new_source_stats())["inputs"] += 1
    if dropped.num_rows:
        rel = f"{REJECTS}/part-{name}.parquet"
        columns = ["source", "reason", "detail"] + (["source_name"] if "source_name" in dropped.column_names else [])
        store.write(join(root, rel), _parquet_bytes(dropped.select(columns)))
        result["rejects"].append(rel)
        for row in dropped.select(columns).to_pylist():
            result["reasons"][row["reason"]] = result["reasons"].get(row["reason"], 0) + 1
            _count(result["sources"].setdefault(row.get("source_name") or "", new_source_stats()), "reasons",
                   row["reason"])
            examples = result["examples"].setdefault(row["reason"], [])
            if len(examples) < MAX_EXAMPLES:
                examples.append({"source": row["source"], "detail": row["detail"]})
    return result


class CuratedDatasink(Datasink[dict]):
    """Ray Data sink: each write task writes its shards directly (no pixels go through the driver)."""

    def __init__(self, root: str, run_id: str, endpoint_url: str | None, *, min_rows_per_write: int | None,
                 schema: pa.Schema = dataset.SCHEMA):
        self.root = root
        self.schema = schema
        self.run_id = run_id
        self._min_rows = min_rows_per_write
        self.endpoint_url = endpoint_url
        self.results: list[dict] = []

    @property
    def min_rows_per_write(self) -> int | None:
        """Rows Ray Data gathers before a write task (None: each block as it comes, the curation
        stage's fused map-and-write, whose blocks are already sized)."""
        return self._min_rows

    def write(self, blocks: Iterable[Block], ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return write_shard(Store(self.endpoint_url), self.root, "", stage_schema(self.schema).empty_table(),
                               self.schema)
        return write_shard(Store(self.endpoint_url), self.root, f"{self.run_id}-{ctx.task_idx:05d}",
                           pa.concat_tables(tables), self.schema)

    def on_write_complete(self, write_result: WriteResult[dict]) -> None:
        self.results = list(write_result.write_returns)


def merge_sources(into: dict, other: dict) -> dict:
    """Add per-source stats ``other`` into ``into`` (both ``{name: new_source_stats()}``)."""
    for name, stats in other.items():
        mine = into.setdefault(name, new_source_stats())
        mine["inputs"] += stats["inputs"]
        for key in ("reasons", "captions", "watermark", "rows"):
            for value, n in stats[key].items():
                _count(mine, key, value, n)
    return into


def kept_by_source(files: list[dict]) -> dict[str, dict]:
    """Per source, the kept rows of ``files``: by split (``rows``), caption origin and watermark check."""
    sources: dict[str, dict] = {}
    for f in files:
        for _sha, _source, source_name, origin, check in f["keys"]:
            stats = sources.setdefault(source_name, new_source_stats())
            _count(stats, "captions", origin)
            _count(stats, "watermark", check)
            _count(stats, "rows", f["split"])
    return sources


def aggregate(results: list[dict]) -> dict:
    reasons: Counter = Counter()
    buckets: Counter = Counter()
    examples: dict[str, list] = {}
    sources: dict[str, dict] = {}
    for r in results:
        reasons.update(r["reasons"])
        buckets.update(r["buckets"])
        merge_sources(sources, r.get("sources", {}))
        for reason, items in r["examples"].items():
            examples.setdefault(reason, []).extend(items)
    return {
        "inputs": sum(r["inputs"] for r in results),
        "reasons": dict(sorted(reasons.items())),
        "buckets": dict(sorted(buckets.items())),
        "examples": {k: v[:MAX_EXAMPLES] for k, v in sorted(examples.items())},
        "files": [f for r in results for f in r["files"]],
        "rejects": sorted(p for r in results for p in r["rejects"]),
        "sources": dict(sorted(sources.items())),
    }


def begin(store: Store, root: str) -> None:
    """Mark ROOT incomplete before anything is written there."""
    store.delete(join(root, dataset.SUCCESS))
    store.delete(join(root, dataset.REPORT))


def _read_table(store: Store, root: str, rel: str) -> pa.Table:
    return pq.read_table(io.BytesIO(store.read(join(root, rel))))


def _move_one(store: Store, root: str, run_id: str, files: list[dict], src: str, dst: str) -> list[dict]:
    """Move the ``src`` row whose score lies nearest the split boundary into a new ``dst`` shard."""
    pick = min if src == "train" else max
    info = pick((f for f in files if f["split"] == src), key=lambda f: f["edge"][0])
    table = _read_table(store, root, info["path"])
    idx = info["edge"][1]
    keep = pa.array([i != idx for i in range(table.num_rows)])
    out = [f for f in files if f is not info]
    moved_rel = f"{dst}/part-{run_id}-moved.parquet"
    store.write(join(root, moved_rel), _parquet_bytes(table.slice(idx, 1)))
    out.append(_file_info(dst, moved_rel, table.slice(idx, 1)))
    rest = table.filter(keep)
    if rest.num_rows:
        rest_rel = f"{src}/part-{run_id}-rest.parquet"
        store.write(join(root, rest_rel), _parquet_bytes(rest))
        out.append(_file_info(src, rest_rel, rest))
    store.delete(join(root, info["path"]))
    return out


def balance(store: Store, root: str, run_id: str, files: list[dict], holdout_fraction: float) -> list[dict]:
    """Non-empty val once ``MIN_KEPT_FOR_VAL`` images are kept (with a non-zero holdout); train
    never empty when anything is kept. The hash split alone can leave a small dataset without val."""
    rows = Counter()
    for f in files:
        rows[f["split"]] += f["rows"]
    total = sum(rows.values())
    if holdout_fraction > 0 and total >= MIN_KEPT_FOR_VAL and rows["val"] == 0:
        files = _move_one(store, root, run_id, files, "train", "val")
    elif total and rows["train"] == 0:
        files = _move_one(store, root, run_id, files, "val", "train")
    return files


def digest(files: list[dict]) -> str:
    total = sum(int(f["sum"], 16) for f in files) % 2**256
    return hashlib.sha256(f"{total:064x}".encode()).hexdigest()[:16]


def cleanup(store: Store, root: str, keep: set[str]) -> int:
    """Delete every shard (and stray temporary file) under ROOT that is not in ``keep``. An S3 key with
    ``.``/``..`` segments is left alone (deleting it could delete another object, ``dot_segments``);
    readers never see it, since they read the files ``_SUCCESS`` lists."""
    removed = 0
    for sub in (*dataset.SPLITS, REJECTS):
        for uri in list(store.list(join(root, sub))):
            if is_s3(uri) and dot_segments(split_s3(uri)[1]):
                log.warning("left %s alone: a key with '.' or '..' segments is never deleted", uri)
                continue
            if relative(root, uri) not in keep:
                store.delete(uri)
                removed += 1
    return removed


def source_report(agg: dict, files: list[dict], meta: dict[str, dict] | None) -> dict[str, dict]:
    """Per source: ``meta`` (what the config says of it: kind, location, repeats, filters) and its counts,
    which add up: ``inputs = kept + dropped``, ``dropped`` = the sum of ``reasons``, ``kept`` = the sum of
    ``captions`` = the sum of ``watermark`` = the sum of ``rows``."""
    kept = kept_by_source(files)
    out = {}
    for name in sorted(set(agg.get("sources", {})) | set(kept) | set(meta or {})):
        counted = agg.get("sources", {}).get(name, new_source_stats())
        mine = kept.get(name, new_source_stats())
        dropped = sum(counted["reasons"].values())
        out[name] = {**(meta or {}).get(name, {}), "inputs": counted["inputs"], "kept": sum(mine["rows"].values()),
                     "dropped": dropped, "reasons": dict(sorted(counted["reasons"].items())),
                     "captions": dict(sorted(mine["captions"].items())),
                     "watermark": dict(sorted(mine["watermark"].items())), "rows": dict(sorted(mine["rows"].items()))}
    return out


def publish(store: Store, root: str, run_id: str, agg: dict, holdout_fraction: float, report: dict,
            sources: dict[str, dict] | None = None) -> dict:
    """Steps 3 of the protocol; returns the report as written (with digest, files, rows and the per-source
    counts; ``sources``: what the config says of each source, recorded in the report and, with each
    source's kind, repeats and rows, in ``_SUCCESS`` for training's mixture)."""
    files = balance(store, root, run_id, agg["files"], holdout_fraction)
    by_split = {s: sorted(f["path"] for f in files if f["split"] == s) for s in dataset.SPLITS}
    rows = {s: sum(f["rows"] for f in files if f["split"] == s) for s in dataset.SPLITS}
    nbytes = {s: sum(f.get("nbytes", 0) for f in files if f["split"] == s) for s in dataset.SPLITS}
    per_source = source_report(agg, files, sources)
    captions: Counter = Counter()
    watermark: Counter = Counter()
    for stats in per_source.values():
        captions.update(stats["captions"])
        watermark.update(stats["watermark"])
    # The report quotes sources and error details: no credential that turned up there is published.
    report = redact_tree({**report, "digest": digest(files), "splits": rows, "sources": per_source,
                          "captions": dict(sorted(captions.items())), "watermark": dict(sorted(watermark.items()))})
    cleanup(store, root, {f["path"] for f in files} | set(agg["rejects"]))
    store.write(join(root, dataset.REPORT), json.dumps(report, indent=2, sort_keys=True).encode())
    recorded = {name: {"kind": s.get("kind"), "repeats": s.get("repeats", 1.0), "rows": s["rows"],
                       **({"weight": s["weight"]} if s.get("weight") is not None else {})}
                for name, s in report["sources"].items()}
    store.write(
        join(root, dataset.SUCCESS),
        dataset.success_text(report["digest"], by_split, rows, run_id=run_id, rejects=agg["rejects"],
                             nbytes=nbytes, sources=recorded).encode(),
    )
    return report
