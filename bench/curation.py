"""Benchmark: the Ray Data pipeline against a plain single-process PIL loop doing
identical work on the same generated 2048x1536 JPEGs, reported as images/s and their ratio.

Warm, both of them: the loop runs in a process that has imported everything, so the pipeline is
timed on its second run in the session, after a first run on a few of the images has started its
worker processes and imported the curation code there (a long-lived cluster's state). That first
run's wall time is reported apart, as the start-up a new cluster pays once.

Identical work: the loop calls the same ``Curator.process`` (read, every filter, orient, convert,
LANCZOS, crop, JPEG encode) and the same ``write_shard``/``publish`` as the pipeline, with the same
config and seed, so both produce the same dataset -- ``same_output`` checks their digests agree.
The pipeline time includes Ray Data's planning and scheduling but not ``ray.init``.
Not a timed test: ``make bench`` calls ``benchmark_curation`` and prints the dict.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time

import numpy as np
import psutil
import ray
from PIL import Image

from components.cluster import ray_session
from components.config import Config, CurateConfig, FilterConfig
from components.curation import filters as flt
from components.curation.dedupe import remove_duplicates
from components.curation.pipeline import curate
from components.curation.process import Curator
from components.curation.sources import load_inputs
from components.curation.writer import aggregate, begin, outcomes_table, publish, write_shard
from components.storage import Store


def synthetic_photo(width: int, height: int, seed: int) -> bytes:
    """A JPEG (quality 92, camera EXIF, mean luma ~0.3) with smooth structure and sensor-like noise,
    so it compresses and decodes like a photograph rather than like flat colour or pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 75 + 40 * np.sin(xx / (90 + seed % 50) + seed) * np.cos(yy / (70 + seed % 30))
    img = base[..., None] + rng.uniform(-25, 25, size=3) + rng.normal(0, 5, size=(height, width, 3))
    exif = Image.Exif()
    exif[flt.TAG_MAKE], exif[flt.TAG_MODEL] = "Benchmark", "Synthetic 1"
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


def terminus_filters() -> Config:
    """Default benchmark config: the Terminus filters (every check runs) and 1 MP buckets."""
    filters = FilterConfig(require_exif=True, drop_edited=True, max_watermark=0.7, max_luminance=0.5)
    return Config(curate=CurateConfig(filters=filters, rows_per_shard=64))


def bench_config(base: Config, source: str, output: str, workers: int) -> Config:
    """``base`` with the benchmark's source and output, ``workers`` workers and MLflow off."""
    curate = base.curate.model_copy(update={"source": source, "output": output, "root": None,
                                            "workers": workers, "track": False})
    return base.model_copy(update={"curate": curate})


def _loop(cfg: Config, records: list[dict]) -> dict:
    """The baseline: one process, one image at a time, the same code and the same writes."""
    c = cfg.curate
    store = Store(c.s3_endpoint_url)
    curator = Curator(c, cfg.seed)
    begin(store, c.output)
    results, pending = [], []
    for record in records:
        pending.append(curator.process(record))
        if len(pending) == c.rows_per_shard:
            results.append(write_shard(store, c.output, f"loop-{len(results):05d}",
                                       outcomes_table(pending, c.holdout_fraction)))
            pending = []
    if pending:
        results.append(write_shard(store, c.output, f"loop-{len(results):05d}",
                                   outcomes_table(pending, c.holdout_fraction)))
    agg = aggregate(results)
    if c.filters.dedupe:
        agg = remove_duplicates(store, c.output, "loop", agg)
    return publish(store, c.output, "loop", agg, c.holdout_fraction, {"inputs": agg["inputs"]})


def process_tree_cpu() -> dict[int, float]:
    """CPU seconds (user + system) so far of this process and every process below it: on a local cluster, Ray's
    own processes and its workers are all children of the driver that started it."""
    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:  # it ended in between
            continue
        out[proc.pid] = times.user + times.system
    return out


def cpu_breakdown(before: dict[int, float], after: dict[int, float], wall_s: float, cores: int, workers: int,
                  loop_cpu_s: float) -> dict:
    """Where the pipeline's time went, from CPU seconds per process over its run (``process_tree_cpu`` before and
    after): the share of the cores its processes kept busy, and the CPU it spent against the loop's for the same
    work, split into the task workers (the ``workers`` busiest processes) and the rest (Ray's own processes and the
    driver). Up to the loop's own threads, speed-up = cores x busy share / (pipeline CPU / loop CPU)."""
    deltas = sorted((cpu - before.get(pid, 0.0) for pid, cpu in after.items()), reverse=True)
    total, busiest = sum(deltas), sum(deltas[:workers])
    return {"pipeline_cpu_s": total, "workers_cpu_s": busiest, "others_cpu_s": total - busiest,
            "loop_cpu_s": loop_cpu_s, "cores": cores, "cores_busy": total / (wall_s * cores),
            "cpu_vs_loop": total / loop_cpu_s, "workers_cpu_vs_loop": busiest / loop_cpu_s,
            "others_cpu_vs_loop": (total - busiest) / loop_cpu_s}


def benchmark_curation(n_images: int = 64, *, width: int = 2048, height: int = 1536,
                       workers: int | None = None, cfg: Config | None = None,
                       workdir: str | None = None, warmup_images: int | None = None) -> dict:
    """images/s of the pipeline and of the single-process loop on ``n_images`` generated JPEGs.

    ``warmup_images``: the first pipeline run's size (default: 4 per worker, at most ``n_images``).

    ``cfg``: whose ``curate`` filters, buckets, crop and quality to use (default: the Terminus
    filters with 1 MP buckets). Starts a local Ray (all CPUs) unless one is connected;
    ``workers`` defaults to the cluster's CPUs.
    """
    base = cfg or terminus_filters()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, ray_session():
        # Inputs and outputs in separate folders: curation refuses an output inside a source's root.
        inputs, outputs = os.path.join(tmp, "inputs"), os.path.join(tmp, "outputs")
        images = os.path.join(inputs, "images")
        os.makedirs(images)
        os.makedirs(outputs)
        with open(os.path.join(inputs, "manifest.jsonl"), "w") as fh:
            for i in range(n_images):
                with open(os.path.join(images, f"{i:05d}.jpg"), "wb") as img:
                    img.write(synthetic_photo(width, height, i))
                fh.write(json.dumps({"path": f"images/{i:05d}.jpg", "caption": f"synthetic photo {i}"}) + "\n")
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = workers or max(1, cpus)
        manifest = os.path.join(inputs, "manifest.jsonl")
        loop_cfg = bench_config(base, manifest, os.path.join(outputs, "out-loop"), workers)
        records = load_inputs(loop_cfg.curate, Store()).records.to_pylist()

        start, cpu_start = time.perf_counter(), time.process_time()
        loop_report = _loop(loop_cfg, records)
        loop_s, loop_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start

        warm = min(n_images, warmup_images or 4 * workers)
        warm_manifest = os.path.join(inputs, "warmup.jsonl")
        with open(manifest) as src, open(warm_manifest, "w") as dst:
            dst.writelines(src.readlines()[:warm])
        start = time.perf_counter()
        curate(bench_config(base, warm_manifest, os.path.join(outputs, "out-warmup"), workers))
        first_run_s = time.perf_counter() - start

        pipe_cfg = bench_config(base, manifest, os.path.join(outputs, "out-ray"), workers)
        cpu_before, start = process_tree_cpu(), time.perf_counter()
        pipe_report = curate(pipe_cfg)
        pipe_s = time.perf_counter() - start
        # Only for a cluster this process started (its processes all run below this one), not one at RAY_ADDRESS
        local = len(cpu_before) > 1
        cores = len(os.sched_getaffinity(0))  # the machine's, whatever the cluster was told it has
        breakdown = cpu_breakdown(cpu_before, process_tree_cpu(), pipe_s, cores, workers, loop_cpu_s) if local else None

    loop_ips, pipe_ips = n_images / loop_s, n_images / pipe_s
    return {
        "n_images": n_images,
        "size": f"{width}x{height}",
        "cpus": cpus,
        "workers": workers,
        "loop_s": round(loop_s, 3),
        "loop_images_per_s": round(loop_ips, 2),
        "first_run_images": warm,
        "first_run_s": round(first_run_s, 3),
        "pipeline_s": round(pipe_s, 3),
        "pipeline_images_per_s": round(pipe_ips, 2),
        "speedup": round(pipe_ips / loop_ips, 3),
        "kept": pipe_report["kept"],
        "same_output": pipe_report["digest"] == loop_report["digest"],
        "cpu": breakdown,
    }

