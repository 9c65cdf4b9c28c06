"""The curation pipeline on Ray Data: records -> curate -> shards (sink) -> publish.

    ray.data.from_blocks(records)                one small row per input, no pixels
      .map_batches(curate_block, compute=TaskPoolStrategy(size=workers))
                                                 fetch, filter, orient, convert, resize, crop, JPEG
      .write_datasink(CuratedDatasink)           shards written where they were made, stats to the driver
    publish()                                    balance splits, clean stale shards, report, _SUCCESS

Ray Data fuses the map and the write into one task per block (``MapBatches(curate_block)->Write``):
the curated JPEGs never cross the object store, and no second pool of workers has to start. Tasks
rather than an actor pool, because the per-block set-up is cheap (no model) and only tasks fuse
with the write (see docs/benchmarks.md for what each layout measured).

Streaming and memory-bounded: a task holds one block (at most ``rows_per_shard`` records, small
strings) and decodes one image at a time; only per-shard stats return to the driver. A retried task
rewrites the same shard names, so a worker lost mid-block costs time, not data. Exact duplicates
are removed over the whole dataset once the shards are written (``dedupe.remove_duplicates``), so
tasks never wait on each other. Nothing here assumes one node: tasks read sources and write shards
themselves (local paths must then be on shared storage; S3 always works).
"""

from __future__ import annotations

import logging
import time
import uuid

import pyarrow as pa

from components.config import Config, CurateConfig
from components.curation.buckets import make_buckets
from components.curation.dedupe import remove_duplicates
from components.curation.filters import Reason
from components.curation.process import Curator
from components.curation.remote import worker_args
from components.curation.sources import Inputs, check_no_overlap, check_output, load_inputs
from components.curation.writer import CuratedDatasink, aggregate, begin, outcomes_table, publish
from components.redact import redact
from components.storage import StorageUnavailable, Store, original_unavailable

log = logging.getLogger(__name__)
LUMA = "BT.709 luma of gamma-encoded sRGB: 0.2126 R' + 0.7152 G' + 0.0722 B' (0..1)"


def curate_block(block: pa.Table, cfg: CurateConfig, seed: int) -> pa.Table:
    """Ray Data task function: a block of records in, one stage row per record out."""
    curator = Curator(cfg, seed)
    return outcomes_table([curator.process(r) for r in block.to_pylist()], cfg.holdout_fraction)


def blocks(records: pa.Table, workers: int, rows_per_shard: int) -> list[pa.Table]:
    """Input blocks, each one curation task: about 8 per worker, so the last round of tasks is
    short and the workers finish together, and at most ``rows_per_shard`` records each."""
    n = records.num_rows
    size = max(1, min(rows_per_shard, -(-n // (workers * 8))))
    return [records.slice(i, size) for i in range(0, n, size)] or [records]


def run_pipeline(cfg: Config, records: pa.Table, run_id: str) -> list[dict]:
    """Stream the records through the actor pool into the sink; returns the write tasks' stats."""
    import ray

    c = cfg.curate
    # from_blocks keeps our block boundaries and computes their metadata here; from_arrow would
    # launch one remote task per block just to read row counts (seconds of worker start-up).
    ds = ray.data.from_blocks(blocks(records, c.workers, c.rows_per_shard))
    args = worker_args(cfg, num_cpus=1)  # the same for the map and the write, so that they fuse
    ds = ds.map_batches(curate_block, fn_kwargs={"cfg": c, "seed": cfg.seed},
                        compute=ray.data.TaskPoolStrategy(size=c.workers), batch_size=None,
                        batch_format="pyarrow", **args)
    sink = CuratedDatasink(c.output, run_id, c.s3_endpoint_url, min_rows_per_write=None)
    ds.write_datasink(sink, ray_remote_args=args, concurrency=c.workers)
    return sink.results


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
    """Curate ``cfg.curate.source`` into ``cfg.curate.output``; returns the report (also at ROOT/report.json).

    Needs a Ray session (``components.cluster.ray_session``). ``inputs``: what ``prepare`` gave (the flow
    prepares before starting Ray, so bad sources fail in one line before any cluster work).
    """
    c = cfg.curate
    inputs = inputs if inputs is not None else prepare(cfg)
    store = Store(c.s3_endpoint_url)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    log.info("curating %d records from %s into %s (run %s)", inputs.records.num_rows, redact(inputs.description),
             redact(c.output), run_id)
    begin(store, c.output)
    start = time.perf_counter()
    try:
        results = run_pipeline(cfg, inputs.records, run_id) if inputs.records.num_rows else []
    except StorageUnavailable as err:  # a worker's, wrapped by Ray: one line for people
        first = str(original_unavailable(err) or err).strip().splitlines()[0]  # Ray Data appends advice
        raise StorageUnavailable(f"{first}; curation stopped, {c.output} has no _SUCCESS: rerun when the store is back") from err
    agg = aggregate(results)
    if c.filters.dedupe:
        agg = remove_duplicates(store, c.output, run_id, agg)
    wall = time.perf_counter() - start
    if agg["inputs"] != inputs.records.num_rows:  # one outcome per record is an invariant, not a hope
        raise RuntimeError(f"curation lost records: {inputs.records.num_rows} in, {agg['inputs']} accounted for")
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
    }
    report = publish(store, c.output, run_id, agg, c.holdout_fraction, report)
    if c.cache_latents:
        from components.curation.latents import cache_latents

        cache = cache_latents(cfg)
        report["latents"] = {"output": cache["output"], "digest": cache["digest"], "rows": cache["splits"]}
    if c.track:
        from components.curation.lineage import log_curation

        report["mlflow_run_id"] = log_curation(cfg, report)
    return report
