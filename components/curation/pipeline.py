"""The curation pipeline on Ray Data: sources -> records -> curate -> [caption] -> shards (sink) -> publish.

    per source:
      files:        ray.data.from_blocks(records)              one small row per input, made on the driver
      urls, hf:     ray.data.read_parquet(files, columns)       the source's own rows, read by Ray's tasks
                      .map_batches(parquet_records)             -> records (URL, inline bytes or path)
                      .repartition(target_num_rows_per_block)   curation-sized blocks
      webdataset:   ray.data.read_webdataset(shards)            raw members grouped by key, read by Ray's tasks
                      .map_batches(webdataset_records)          -> records (image bytes inline)
                      .repartition(rows_per_shard)              its sample count is known only as it is read
    union(every source)
      .map_batches(curate_block, compute=TaskPoolStrategy(size=workers))
                                                 caption, metadata filters, fetch (downloads in threads),
                                                 filter, orient, convert, resize, crop, JPEG
      [.map_batches(CaptionBatch, compute=ActorPoolStrategy)]   only with curate.captioner.model
      .write_datasink(CuratedDatasink)           shards written where they were made, stats to the driver
    publish()                                    balance splits, clean stale shards, report, _SUCCESS

Without a captioning model, Ray Data fuses the curation map and the write into one task per block
(``MapBatches(curate_block)->Write``): the curated JPEGs never cross the object store, and no second
pool of workers has to start. Tasks rather than an actor pool, because the per-block set-up is cheap
(no model) and only tasks fuse with the write (see docs/benchmarks.md for what each layout measured).
With one, the captioning actors sit between the two (they see only kept images), and the write tasks
take no CPU of their own (the actors may hold them all; ``remote.write_to``).

Streaming and memory-bounded: a task holds one block (at most ``rows_per_shard`` records; for a Hugging
Face source with inline images, their bytes) and decodes one image at a time, with at most
``2 x download.threads`` reads or downloads ahead; only per-shard stats return to the driver. A failed
download is a counted reason, never an error of the task. A retried task rewrites the same shard names,
so a worker lost mid-block costs time, not data. Exact duplicates are removed over the whole dataset
once the shards are written (``dedupe.remove_duplicates``), so tasks never wait on each other. Nothing
here assumes one node: tasks read sources and write shards themselves (local paths must then be on
shared storage; S3 always works).
"""

from __future__ import annotations

import logging
import tarfile
import time
import uuid

import pyarrow as pa
import ray

from components.config import CaptionerConfig, Config, CurateConfig, FilterConfig, SourceKind
from components.curation.buckets import make_buckets
from components.curation.captioner import CaptionBatch
from components.curation.dedupe import remove_duplicates
from components.curation.filters import Reason
from components.curation.latents import cache_latents
from components.curation.lineage import log_curation
from components.curation.process import Curator
from components.curation.remote import worker_args
from components.curation.sources import (
    Inputs,
    SourceInputs,
    check_no_overlap,
    check_output,
    load_inputs,
    parquet_records,
)
from components.curation.webdataset import read_shards, unreadable_shard
from components.curation.writer import CuratedDatasink, aggregate, begin, outcomes_table, publish
from components.redact import redact
from components.storage import StorageUnavailable, Store, arrow_filesystem, filesystem_path, is_hf, original_unavailable

log = logging.getLogger(__name__)
LUMA = "BT.709 luma of gamma-encoded sRGB: 0.2126 R' + 0.7152 G' + 0.0722 B' (0..1)"


def curate_block(block: pa.Table, cfg: CurateConfig, seed: int) -> pa.Table:
    """Ray Data task function: a block of records in, one stage row per record out."""
    curator = Curator(cfg, seed)
    return outcomes_table(curator.process_all(block.to_pylist()), cfg.holdout_fraction)


TASKS_PER_WORKER = 4
"""About this many curation tasks per worker: enough that the last round is short and the workers finish
together, few enough that what each task costs beyond its images (Ray Data noticing it finished, at its
next 100 ms ``ray.wait``, and dispatching the next; the task's set-up and its shard's write) stays small.
At 8 per worker, 16-image tasks on the benchmark spent about 0.2 s each between tasks (docs/benchmarks.md)."""


def block_size(n: int, workers: int, rows_per_shard: int) -> int:
    """Records per curation task: about ``TASKS_PER_WORKER`` tasks per worker, at most ``rows_per_shard``."""
    return max(1, min(rows_per_shard, -(-n // (workers * TASKS_PER_WORKER))))


def blocks(records: pa.Table, workers: int, rows_per_shard: int) -> list[pa.Table]:
    """Input blocks of driver-made records, each one curation task (``block_size``)."""
    n = records.num_rows
    size = block_size(n, workers, rows_per_shard)
    return [records.slice(i, size) for i in range(0, n, size)] or [records]


def tasks_in_flight(workers: int, cluster_cpus: float, fused: bool) -> int:
    """Curation tasks Ray Data keeps submitted at once. ``workers`` of them run; where they take every CPU of
    the cluster (the default, ``curate.workers`` = its CPUs) and the stage is one fused operator, as many
    again wait at Ray's scheduler, each handed a CPU the moment a task frees one, instead of after Ray
    Data's next 100 ms ``ray.wait`` and a dispatch. Ray's CPU
    accounting still runs at most ``workers`` at once; the waiting ones hold only their input records."""
    return 2 * workers if fused and cluster_cpus and workers >= cluster_cpus else workers


def source_rows(cfg: Config, src: SourceInputs, total: int):
    """One source's records as a Ray Dataset: the driver's records (``files``), or its parquet files or tar
    shards read by Ray Data and turned into records in the read tasks (``urls``, ``huggingface``,
    ``webdataset``)."""
    c = cfg.curate
    if src.shards:  # how many samples they hold is unknown here: tasks of rows_per_shard samples
        ds = read_shards(src.source, src.shards, c.s3_endpoint_url, worker_args(cfg, num_cpus=1))
        return ds.repartition(target_num_rows_per_block=c.rows_per_shard)
    if src.records is not None:
        # from_blocks keeps our block boundaries and computes their metadata here; from_arrow would
        # launch one remote task per block just to read row counts (seconds of worker start-up).
        return ray.data.from_blocks(blocks(src.records, c.workers, c.rows_per_shard))
    fs = arrow_filesystem(src.files[0], c.s3_endpoint_url)
    paths = [filesystem_path(f) for f in src.files] if is_hf(src.files[0]) else src.files
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=sorted(set(src.columns.values())), include_paths=True,
                               ray_remote_args=worker_args(cfg, num_cpus=1))
    root = src.source.location if src.source.kind is SourceKind.HUGGINGFACE else ""
    ds = ds.map_batches(parquet_records, batch_size=None, batch_format="pyarrow",
                        fn_kwargs={"source": src.source.model_dump(mode="json"), "columns": src.columns,
                                   "image_type": src.image_type, "files_root": root})
    return ds.repartition(target_num_rows_per_block=block_size(total, c.workers, c.rows_per_shard))


def captioner_gpus(captioner: CaptionerConfig, cluster_gpus: float) -> float:
    """GPUs per captioning actor: as configured, else one where the cluster has a GPU, else none."""
    if captioner.num_gpus is not None:
        return captioner.num_gpus
    return 1.0 if cluster_gpus >= 1 else 0.0


def run_pipeline(cfg: Config, inputs: Inputs, run_id: str) -> list[dict]:
    """Stream every source's records through the curation tasks (and the captioning actors) into the
    sink; returns the write tasks' stats."""
    c = cfg.curate
    parts = [source_rows(cfg, s, inputs.rows) for s in inputs.readable]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    args = worker_args(cfg, num_cpus=1)  # the same for the map and the write, so that they fuse
    captioning = c.captioner.model is not None
    fused = not captioning and all(s.records is not None for s in inputs.readable)
    in_flight = tasks_in_flight(c.workers, ray.cluster_resources().get("CPU", 0), fused)
    ds = ds.map_batches(curate_block, fn_kwargs={"cfg": c, "seed": cfg.seed},
                        compute=ray.data.TaskPoolStrategy(size=in_flight), batch_size=None,
                        batch_format="pyarrow", **args)
    if captioning:
        gpus = captioner_gpus(c.captioner, ray.cluster_resources().get("GPU", 0))
        device = "cuda" if gpus > 0 else "cpu"
        log.info("captioning with %s: %d actor(s) on %s", c.captioner.model, c.captioner.workers,
                 f"{gpus:g} GPU each" if gpus else "CPU")
        ds = ds.map_batches(CaptionBatch, batch_size=None, batch_format="pyarrow",
                            fn_constructor_kwargs={"captioner": c.captioner.model_dump(mode="json"),
                                                   "cache_dir": str(cfg.state_path("cache")), "device": device},
                            compute=ray.data.ActorPoolStrategy(size=c.captioner.workers),
                            num_gpus=gpus, **args)
    sink = CuratedDatasink(c.output, run_id, c.s3_endpoint_url, min_rows_per_write=None)
    if fused:
        # One operator (curate fused with the write) fed from the driver's blocks: Ray Data's per-operator
        # reservation has nothing to protect here, and it held the second task back for about a task's
        # length, and kept tasks from queueing ahead (docs/benchmarks.md).
        ds.context.op_resource_reservation_enabled = False
    ds.write_datasink(sink, ray_remote_args=worker_args(cfg, num_cpus=0) if captioning else args,
                      concurrency=in_flight if fused else c.workers)
    return sink.results


def source_meta(cfg: CurateConfig) -> dict[str, dict]:
    """What the report and ``_SUCCESS`` record of each source's configuration."""
    return {s.name: {"kind": s.kind.value, "location": s.location, "repeats": s.repeats,
                     **({"weight": s.weight} if s.weight is not None else {}),
                     "caption_column": s.caption_column, "missing_caption": s.missing_caption.value,
                     "caption_with_model": s.caption_with_model and cfg.captioner.model is not None,
                     "filters": s.filters.model_dump(mode="json")} for s in cfg.resolved_sources()}


def policy_lines(cfg: CurateConfig) -> list[str]:
    """One line per source for people (``flows/curate.py --dry-run``): where it is read from, its
    captions, its mixture weight, and the filters it sets beyond the defaults."""
    defaults = FilterConfig().model_dump(mode="json")
    lines = []
    for name, meta in source_meta(cfg).items():
        own = {k: v for k, v in meta["filters"].items() if v != defaults[k]}
        filters = ", ".join(f"{k}={v}" for k, v in own.items()) or "none beyond the defaults"
        model = ", then the captioning model" if meta["caption_with_model"] else ""
        mix = f"weight {meta['weight']}" if "weight" in meta else f"repeats {meta['repeats']}"
        column = (f".json field {meta['caption_column']!r}, .txt member" if meta["kind"] == "webdataset" else
                  f"column {meta['caption_column']!r}{', sidecar .txt' if meta['kind'] == 'files' else ''}")
        lines.append(f"{name}: {meta['kind']} {meta['location']} | captions: {column}{model}, "
                     f"else {meta['missing_caption']} | {mix} | filters: {filters}")
    return lines


def prepare(cfg: Config) -> Inputs:
    """Everything checked before Ray starts: the buckets, that the outputs do not overlap the sources,
    the output, the sources (listed or read as a manifest). Raises ``SourceError`` with one line."""
    c = cfg.curate
    make_buckets(c.buckets)
    check_no_overlap(c)  # before check_output creates anything
    store = Store(c.s3_endpoint_url)
    check_output(store, c.output)
    return load_inputs(c, store)


def curate(cfg: Config, inputs: Inputs | None = None) -> dict:
    """Curate ``cfg.curate``'s sources into ``cfg.curate.output``; returns the report (also at ROOT/report.json).

    Needs a Ray session (``components.cluster.ray_session``). ``inputs``: what ``prepare`` gave (the flow
    prepares before starting Ray, so bad sources fail in one line before any cluster work).
    """
    c = cfg.curate
    inputs = inputs if inputs is not None else prepare(cfg)
    store = Store(c.s3_endpoint_url)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    log.info("curating %d records from %s into %s (run %s)", inputs.rows, redact(inputs.description),
             redact(c.output), run_id)
    begin(store, c.output)
    start = time.perf_counter()
    try:
        results = run_pipeline(cfg, inputs, run_id) if inputs.readable else []
    except StorageUnavailable as err:  # a worker's, wrapped by Ray: one line for people
        first = str(original_unavailable(err) or err).strip().splitlines()[0]  # Ray Data appends advice
        raise StorageUnavailable(
            f"{first}; curation stopped, {c.output} has no _SUCCESS: rerun when the store is back") from err
    except tarfile.ReadError as err:  # Ray's RayTaskError(ReadError): a webdataset shard that is not a tar
        raise unreadable_shard(err, [s.source for s in inputs.sources if s.shards], c.output) from err
    agg = aggregate(results)
    deduped = {s.name for s in c.resolved_sources() if s.filters.dedupe}
    if deduped:  # byte-identical images among the rows of these sources (one stays)
        agg = remove_duplicates(store, c.output, run_id, agg, deduped)
    wall = time.perf_counter() - start
    # One outcome per record is an invariant, not a hope: per source, and so in all. A webdataset's samples
    # are counted only as its shards are read, so its outcomes are its count.
    read = 0
    for src in inputs.sources:
        counted = agg["sources"].get(src.source.name, {}).get("inputs", 0)
        if src.shards:
            read += counted
        elif counted != src.rows:
            raise RuntimeError(
                f"curation lost records of source {src.source.name}: {src.rows} in, {counted} accounted for")
    if agg["inputs"] != inputs.rows + read:
        raise RuntimeError(f"curation lost records: {inputs.rows + read} in, {agg['inputs']} accounted for")
    dropped = sum(agg["reasons"].values())
    report = {
        "run_id": run_id,
        "source": inputs.description,
        "output": c.output,
        "config_digest": cfg.digest(),
        "inputs": agg["inputs"],
        "ignored_files": inputs.ignored,
        "kept": agg["inputs"] - dropped,
        "dropped": dropped,
        "reasons": {str(r): agg["reasons"].get(str(r), 0) for r in Reason},
        "buckets": agg["buckets"],
        "examples": agg["examples"],
        "wall_s": round(wall, 3),
        "images_per_s": round(agg["inputs"] / wall, 2) if wall > 0 else None,
        "luma": LUMA,
        "workers": c.workers,
        "captioner": c.captioner.model,
    }
    meta = source_meta(c)
    for src in inputs.sources:  # a webdataset's lineage: the tars its location named, in the order read
        if src.shards:
            meta[src.source.name]["shards"] = list(src.shards)
    report = publish(store, c.output, run_id, agg, c.holdout_fraction, report, sources=meta)
    if c.cache_latents:
        cache = cache_latents(cfg)
        report["latents"] = {"output": cache["output"], "digest": cache["digest"], "rows": cache["splits"]}
    if c.track:
        report["mlflow_run_id"] = log_curation(cfg, report)
    return report
