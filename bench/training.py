"""Training and caching benchmarks for ``make bench``, each a side-by-side ratio.

Absolute timings on a shared machine are noise; a ratio of two things measured in the same run, on
the same data and the same thread count, is not (much). Here:

- ``benchmark_training``: the Ray Train step (TorchTrainer, 1 worker, reading each epoch's planned
  batches from the split in Ray's object store exactly as ``components.training.loop`` does) against a
  plain PyTorch loop doing the same steps with ``components.diffusion.loss.diffusion_loss`` on the same rows. Both are
  timed per step after a warm-up, from fetching the batch to ``optimizer.step``; the Ray side is timed inside the
  training function, so the Ray figure is the per-step cost a training run pays, and Ray Train's start-up is reported
  apart. The plain loop runs in a fresh Python process of its own (as ``python train.py`` would),
  before and after the Ray run (A-B-A) to expose drift in the machine's load, with the worker's
  thread count (Ray gives a 1-CPU worker one torch thread). Both sides run with glibc's malloc
  thresholds pinned (``bench.process.PINNED_MALLOC``): with its default dynamic mmap threshold,
  the same loop ran 0.28-0.44 s per step depending on the process it ran in, which swamped what Ray adds.
- ``benchmark_caching``: steps on curation's latent cache (posterior parameters and both text
  encoders' embeddings, encoded by ``components.curation.latents.EncodeBatch`` itself) against
  steps that encode pixels on the fly, same model, batch and thread count, alternating step by step.

``bench.report`` runs these with the curation, serving and ZT-SNR benchmarks and puts
each figure next to its target and anchor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import ray.train
import ray.train.torch
import torch
from ray.train.torch import TorchTrainer

from bench.curation import synthetic_photo
from bench.process import PINNED_MALLOC
from components.config import Config
from components.curation.latents import EncodeBatch
from components.curation.writer import STAGE_SCHEMA, aggregate, publish, write_shard
from components.dataset import CuratedManifest, read_manifest
from components.diffusion.loss import NoiseDraw
from components.environment import snapshot as environ_snapshot
from components.storage import Store
from components.training import loop
from components.training.batches import bucket_batches, read_index, rows_to_batch
from components.training.driver import training_data
from components.training.loop import EpochReader, step_generator

# --- data ---------------------------------------------------------------------------------------


def bucket_side(cfg: Config) -> int:
    """The square bucket of the config's pixel area (tiny: 65536 -> 256), a multiple of the step."""
    b = cfg.curate.buckets
    return max(b.step, int(math.sqrt(b.area)) // b.step * b.step)


def write_bench_dataset(root: str | Path, rows: int, side: int, seed: int = 0) -> CuratedManifest:
    """A curated dataset of ``rows`` photo-like ``side``-square JPEGs, all in the train split,
    written through curation's own writer (``write_shard`` + ``publish``: the real contract)."""
    images = [synthetic_photo(side, side, seed + i) for i in range(rows)]
    table = pa.Table.from_pylist([
        {"image": img, "caption": f"a synthetic photograph, number {i}", "original_h": 2 * side,
         "original_w": 2 * side, "crop_top": 0, "crop_left": 0, "target_h": side, "target_w": side,
         "bucket": f"{side}x{side}", "source": f"bench/{i:05d}.jpg", "sha256": hashlib.sha256(img).hexdigest(),
         "split": "train", "reason": None, "detail": None}
        for i, img in enumerate(images)
    ], schema=STAGE_SCHEMA)
    store, root = Store(), str(root)
    publish(store, root, "bench", aggregate([write_shard(store, root, "bench", table)]), 0.0, {"kind": "bench"})
    return read_manifest(root)


def read_rows(manifest: CuratedManifest, split: str = "train") -> list[dict]:
    return pq.read_table(manifest.paths(split)).to_pylist()


# --- one training step: the worker loop's own ---------------------------------------------------------


@dataclass
class Trainee:
    """The worker loop's trainee (``loop.Trainee``: model, optimizer, LR schedule, EMA, scaler) with the config
    in the precision used and the loss settings its steps take."""

    cfg: Config
    loop: object  # components.training.loop.Trainee
    spec: object  # components.diffusion.loss.LossSpec
    device: torch.device

    @property
    def parts(self):
        return self.loop.parts


def build_trainee(cfg: Config, device: torch.device | str = "cpu", steps: int = 10_000) -> Trainee:
    """The trainee ``train_loop_per_worker`` builds (``loop.build_trainee``, one worker, ``steps`` for its LR
    schedule), in the precision the loop uses on ``device`` (``loop.with_precision_used``: the configured
    bf16 only where the device computes it natively); ``Trainee.cfg.train.precision`` is that one."""
    device = torch.device(device)
    cfg = loop.with_precision_used(cfg, device)
    t = loop.build_trainee(cfg, device, 1, steps)
    return Trainee(cfg, t, loop.loss_spec(cfg, t, device), device)


def train_step(t: Trainee, rows: list[dict], step: int, batch=None) -> float:
    """The worker loop's step (``loop.train_step``) on the rows decoded (unless ``batch`` is given) as one
    micro-batch, with the noise draw rank 0 takes at ``step``; returns the loss."""
    batch = rows_to_batch(rows, t.device) if batch is None else batch.to(t.device)
    draw = NoiseDraw(step_generator(t.cfg.seed, 0, step, 0))
    loss, _ = loop.train_step(t.loop, [batch], t.spec, [draw], t.cfg.train.clip_grad_norm)
    return loss


def cycle_epochs(epoch_batches: Callable[[int], Iterator[list[dict]]]) -> Iterator[list[dict]]:
    """Batches of epoch 0, 1, 2, ... (each epoch a fresh pass, as the training loop makes it)."""
    epoch = 0
    while True:
        produced = False
        for rows in epoch_batches(epoch):
            produced = True
            yield rows
        if not produced:
            raise RuntimeError("the benchmark data gives no full batch: raise rows or lower train.batch_size")
        epoch += 1


def timed_step(batches: Iterator[list[dict]], t: Trainee, step: int) -> tuple[float, float, float]:
    """(seconds, of which fetching the batch, loss) of one step, timed from fetching its batch."""
    start = time.perf_counter()
    rows = next(batches, None)
    if rows is None:
        raise RuntimeError("the benchmark ran out of batches: write more rows or lower train.batch_size")
    fetched = time.perf_counter()
    loss = train_step(t, rows, step)
    return time.perf_counter() - start, fetched - start, loss


def timed_steps(batches: Iterator[list[dict]], t: Trainee, warmup: int, steps: int) -> dict:
    warmup_s = sum(timed_step(batches, t, i)[0] for i in range(warmup))
    times, fetch, losses = zip(*(timed_step(batches, t, warmup + i) for i in range(steps)), strict=True)
    return {**step_stats(times, fetch, losses), "warmup_s": warmup_s}


def step_stats(times, fetch, losses) -> dict:
    """Mean, median and spread of the step times; ``fetch_s``: mean seconds of a step spent waiting for data."""
    return {"steps": len(times), "s_per_step": statistics.fmean(times), "median_s": statistics.median(times),
            "min_s": min(times), "max_s": max(times), "fetch_s": statistics.fmean(fetch),
            "times_s": [round(x, 4) for x in times], "first_loss": losses[0], "last_loss": losses[-1],
            "finite": all(math.isfinite(x) for x in losses)}


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --- training: Ray Train vs a plain loop ------------------------------------------------------------


def _ray_worker(loop_config: dict) -> None:
    """TorchTrainer's training function: the epochs planned and read by ``loop.EpochReader``, as in training."""
    cfg = Config.model_validate(loop_config["config"])
    start = time.perf_counter()
    trainee = build_trainee(cfg, ray.train.torch.get_device())
    reader = EpochReader(loop_config["data"], cfg)
    setup_s = time.perf_counter() - start
    batches = reader.batches(0, 0, 1, 0)
    out = timed_steps(batches, trainee, loop_config["warmup"], loop_config["steps"])
    out.update(leftover_batches=sum(1 for _ in batches), epoch_start_s=None,  # epoch 0 ends, as in training
               torch_threads=torch.get_num_threads(), setup_s=setup_s, precision=str(trainee.cfg.train.precision),
               mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    if loop_config["epoch_probe"]:  # each epoch is a new plan: its first batch waits for it
        start = time.perf_counter()
        next(reader.batches(1, 0, 1, 0))
        out["epoch_start_s"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:  # metrics without a checkpoint are not kept (Ray Train V2)
        Path(tmp, "timings.json").write_text(json.dumps(out))
        ray.train.report({"s_per_step": out["s_per_step"]}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def plain_loop(spec: dict) -> dict:
    """The baseline's body: the curated rows in memory, ``timed_steps`` on one trainee."""
    cfg = Config.model_validate(spec["config"])
    data = read_rows(read_manifest(spec["root"]))
    with torch_threads(spec["threads"]):
        trainee = build_trainee(cfg)
        out = timed_steps(bucket_batches(data, cfg.train.batch_size), trainee, spec["warmup"], spec["steps"])
    return {**out, "torch_threads": torch.get_num_threads(), "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "precision": str(trainee.cfg.train.precision)}


def _plain_process(cfg: Config, manifest: CuratedManifest, warmup: int, steps: int, threads: int) -> dict:
    """``plain_loop`` in a fresh interpreter with ``PINNED_MALLOC``; its JSON is the last stdout line."""
    spec = {"config": cfg.model_dump(mode="json"), "root": manifest.root, "warmup": warmup, "steps": steps,
            "threads": threads}
    code = ("import json, sys; from bench.training import plain_loop; "
            "print(json.dumps(plain_loop(json.load(sys.stdin))))")
    env = {**environ_snapshot(), **PINNED_MALLOC, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(spec), capture_output=True, text=True,
                          env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"the plain loop failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ray_train(cfg: Config, manifest: CuratedManifest, warmup: int, steps: int, epoch_probe: bool,
               storage: str) -> dict:
    ctx = ray.data.DataContext.get_current()
    order = ctx.execution_options.preserve_order
    try:
        start = time.perf_counter()
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"config": cfg.model_dump(mode="json"), "warmup": warmup, "steps": steps,
                               "epoch_probe": epoch_probe, "data": training_data(cfg, manifest)},
            scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False,
                                                   resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
            run_config=ray.train.RunConfig(name="bench-train", storage_path=storage,
                                           failure_config=ray.train.FailureConfig(max_failures=0),
                                           worker_runtime_env={"env_vars": PINNED_MALLOC}),
        )
        result = trainer.fit()
        wall = time.perf_counter() - start
    finally:
        ctx.execution_options.preserve_order = order
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as d:
        out = json.loads(Path(d, "timings.json").read_text())
    out["fit_wall_s"] = wall
    # Ray Train's start-up and tear-down: all but what the training function timed itself
    out["startup_s"] = wall - out["setup_s"] - out["warmup_s"] - sum(out["times_s"]) - (out["epoch_start_s"] or 0.0)
    return out


def used_precision(*sides: dict) -> str:
    """The one precision every side of a comparison computed in (they must agree: else it compares two)."""
    used = {side["precision"] for side in sides}
    if len(used) != 1:
        raise RuntimeError(f"the benchmark's sides trained in different precisions: {sorted(used)}")
    return used.pop()


def benchmark_training(cfg: Config, *, warmup: int = 3, steps: int = 12, epoch_probe: bool = True,
                       workdir: str | None = None) -> dict:
    """Per-step seconds of the Ray Train step and of a plain PyTorch loop; ``overhead`` = ray / plain - 1.

    Needs a Ray session (``components.cluster.ray_session``). Data: one epoch of ``warmup + steps``
    batches of ``train.batch_size`` photo-like JPEGs at the preset's bucket size. One epoch, because
    on the tiny model a new pass over the shard (``epoch_start_s``, seconds on a busy machine) would
    weigh on a handful of steps as it never does on a real epoch (Terminus v2: ~32,000 micro-batches
    of 24); it is measured and reported apart, as is Ray Train's start-up.
    """
    threads = cfg.train.cpus_per_worker
    rows = cfg.train.batch_size * (warmup + steps)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        manifest = write_bench_dataset(Path(tmp, "data"), rows, bucket_side(cfg), cfg.seed)
        before = _plain_process(cfg, manifest, warmup, steps, threads)
        ray_side = _ray_train(cfg, manifest, warmup, steps, epoch_probe, str(Path(tmp, "ray")))
        after = _plain_process(cfg, manifest, warmup, steps, threads)
    plain_times = before["times_s"] + after["times_s"]
    return {
        "rows": rows, "batch_size": cfg.train.batch_size, "image_side": bucket_side(cfg), "warmup": warmup,
        "steps": steps, "precision": str(cfg.train.precision), "plain_threads": threads,
        "precision_used": used_precision(before, ray_side, after),
        "threads_match": ray_side["torch_threads"] == before["torch_threads"] == threads,
        "malloc_pinned": (ray_side["mmap_threshold"] == before["mmap_threshold"]
                          == PINNED_MALLOC["MALLOC_MMAP_THRESHOLD_"]),
        "plain_before": before, "plain_after": after, "ray": ray_side,
        "plain_s_per_step": statistics.fmean(plain_times), "ray_s_per_step": ray_side["s_per_step"],
        "overhead": ray_side["s_per_step"] / statistics.fmean(plain_times) - 1,
        "overhead_median": ray_side["median_s"] / statistics.median(plain_times) - 1,
        "plain_drift": after["s_per_step"] / before["s_per_step"] - 1,  # the machine's noise, same work
        "ray_startup_s": ray_side["startup_s"], "ray_epoch_start_s": ray_side["epoch_start_s"],
    }


# --- input: the data wait at a step as fast as a GPU's ----------------------------------------------------


def benchmark_input(cfg: Config, *, batches: int = 128, speedup: float = 10.0, workdir: str | None = None) -> dict:
    """The share of step time spent waiting for data when the step is ``speedup`` times faster than this
    CPU's (a GPU's pace), with the training loop's own reader (``loop.EpochReader.prepared``, streaming the
    split's shards) at ``train.prefetch_batches`` and without prefetching (0), no Ray.

    The step is emulated: the real step's seconds on a decoded batch are measured here (median of 3 after
    a warm-up), then each emulated step sleeps that / ``speedup``, which frees the CPU as a GPU step frees it.
    ``wait_share`` = waits / wall over the batches after the first (the first batch of an epoch has
    nothing to overlap with; it is reported as ``first_wait_s``).
    """
    side, size = bucket_side(cfg), cfg.train.batch_size
    threads = cfg.train.cpus_per_worker
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, torch_threads(threads):
        manifest = write_bench_dataset(Path(tmp, "data"), size * (batches + 1), side, cfg.seed)
        trainee = build_trainee(cfg)
        rows = read_rows(manifest)[:size]
        start = time.perf_counter()
        decoded = rows_to_batch(rows)
        decode_s = time.perf_counter() - start
        train_step(trainee, rows, 0, decoded)  # warm-up
        step_times = []
        for i in range(3):
            start = time.perf_counter()
            train_step(trainee, rows, i + 1, decoded)
            step_times.append(time.perf_counter() - start)
        step_s = statistics.median(step_times)
        fake_s = step_s / speedup
        data = {"index": read_index(manifest.paths("train")), "mixture": {"repeats": {}}, "mode": "blocks"}
        arms = {}
        for label, depth in (("no_prefetch", 0), ("prefetch", cfg.train.prefetch_batches)):
            arm_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"prefetch_batches": depth})})
            it = EpochReader(data, arm_cfg).prepared(0, 0, 1, 0)
            start = time.perf_counter()
            next(it)
            first = time.perf_counter() - start
            waits, start = [], time.perf_counter()
            for _ in range(batches - 1):
                time.sleep(fake_s)  # the emulated step
                fetch = time.perf_counter()
                next(it)
                waits.append(time.perf_counter() - fetch)
            wall = time.perf_counter() - start
            it.close()
            arms[label] = {"depth": depth, "first_wait_s": first, "mean_wait_s": statistics.fmean(waits),
                           "max_wait_s": max(waits), "wait_share": sum(waits) / wall, "wall_s": wall}
    return {"batch_size": size, "image_side": side, "batches": batches, "speedup": speedup,
            "precision": str(cfg.train.precision), "precision_used": str(trainee.cfg.train.precision),
            "step_s": step_s, "emulated_step_s": fake_s, "decode_batch_s": decode_s,
            "prefetch_threads": cfg.train.prefetch_threads, **arms}


# --- caching: cached latents + embeddings vs encoding on the fly ------------------------------------


def encode_cache(cfg: Config, manifest: CuratedManifest) -> tuple[list[dict], float]:
    """The train rows as curation's latent cache stores them (``EncodeBatch``), and the seconds it took."""
    table = pq.read_table(manifest.paths("train"))
    table = table.append_column("split", pa.array(["train"] * table.num_rows))
    start = time.perf_counter()
    cached = EncodeBatch(cfg.model_dump(mode="json"), "cpu", cfg.curate.cache_dtype)(table)
    return cached.to_pylist(), time.perf_counter() - start


def benchmark_caching(cfg: Config, *, rows: int = 16, warmup: int = 2, steps: int = 8,
                      workdir: str | None = None) -> dict:
    """Per-step seconds on pixels (VAE + text encoders every step) and on the latent cache; no Ray.

    The two trainees start from the same weights and alternate step by step (order swapped every
    step), so a change in the machine's load hits both alike. ``speedup`` = pixels / cached.
    """
    threads = cfg.train.cpus_per_worker
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, torch_threads(threads):
        manifest = write_bench_dataset(Path(tmp, "data"), rows, bucket_side(cfg), cfg.seed)
        arms = {"pixels": read_rows(manifest)}
        arms["cached"], encode_s = encode_cache(cfg, manifest)
    trainees = {name: build_trainee(cfg) for name in arms}
    batches = {name: cycle_epochs(lambda epoch, d=d: bucket_batches(d, cfg.train.batch_size))
               for name, d in arms.items()}
    timings: dict[str, list[tuple[float, float, float]]] = {name: [] for name in arms}
    with torch_threads(threads):
        for i in range(warmup + steps):
            for name in (list(arms) if i % 2 == 0 else list(arms)[::-1]):
                timing = timed_step(batches[name], trainees[name], i)
                if i >= warmup:
                    timings[name].append(timing)
    out = {name: step_stats(*zip(*timings[name], strict=True)) for name in arms}
    cached_shape = arms["cached"][0]["latent_shape"]
    return {
        "rows": rows, "batch_size": cfg.train.batch_size, "image_side": bucket_side(cfg), "warmup": warmup,
        "steps": steps, "threads": threads, "cache_dtype": cfg.curate.cache_dtype, "latent_dist_shape": cached_shape,
        "precision": str(cfg.train.precision),
        "precision_used": used_precision(*({"precision": str(t.cfg.train.precision)} for t in trainees.values())),
        "cache_encode_s_per_image": encode_s / rows, **out,
        "pixels_s_per_step": out["pixels"]["s_per_step"], "cached_s_per_step": out["cached"]["s_per_step"],
        "speedup": out["pixels"]["s_per_step"] / out["cached"]["s_per_step"],
    }
