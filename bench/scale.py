"""``make bench``'s scale section (``python flows/bench.py --only scale``): the training loop's bookkeeping at the
Terminus run's size, on synthetic data, without a model.

1. **The epoch plan** (``batches.epoch_plan`` through ``loop.EpochReader``, as the loop calls it) on a synthetic
   train-split index of ``rows`` rows (each a size in ``ROWS``): the preset's two sources and their mixture
   (``driver.mixture`` on the preset's ``curate.sources``), its batch size and world size, shards of
   ``curate.rows_per_shard`` rows, each row in the SDXL aspect bucket (``curation.buckets``) nearest a drawn
   image aspect (``ASPECTS``: photo-like for LAION, mostly square for Midjourney). Timed: building one epoch's plan,
   and a resume mid-epoch, which is what the loop does after a restart: a new ``EpochReader``, the epoch's plan
   built again, and the batches before the checkpoint's position skipped. Memory: the peak of Python's
   allocations during the build (``tracemalloc``, numpy included) and the process's resident-set growth (the
   kernel's high-water mark, reset before each build), each measured in a run apart from the timed one.
2. **MLflow logging** (``run_logger.RunLogger`` as the loop drives it: ``metrics`` each step, then ``maybe_flush``,
   a final ``flush``) of the loop's per-step metric keys (``loop.mix_metrics`` for the preset's sources,
   ``loop.peak_memory``, ``val_loss`` every ``train.val_every`` steps, ``epoch_mix.*`` once an epoch) for
   ``steps`` steps, into a SQLite store in a temporary directory and into a local ``mlflow server`` on
   127.0.0.1 (SQLite backend; its own process group, stopped by its pid). Reported: the calling thread's time
   per step (the flushes included, which run on it), its longest single call, the store's size on disk, and the
   time ``MlflowClient.get_metric_history`` takes to return one key's whole history (what the UI's chart reads).

The run is kept as ``bench/results/scale_<hardware>_<yyyy-mm-dd>.json`` (the report's shape: ``meta``,
``sections``, ``figures``) with its ``.md``; one PNG per part (matplotlib, where installed) goes to ``PLOTS``, since
bench/results holds only ``.json`` and ``.md`` files (``tests/unit/bench/test_results_table.py``).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import requests
import torch

from bench.report import RESULTS, Figure, hardware, machine, render_markdown
from components.config import Config, load_config
from components.curation.buckets import make_buckets
from components.curation.pipeline import source_meta
from components.training.driver import mixture
from components.training.loop import EpochReader, mix_metrics, peak_memory
from components.training.row_index import RowIndex
from components.training.run_logger import RunLogger

PRESET = Path(__file__).resolve().parents[1] / "flows" / "configs" / "terminus_v2.yaml"
"""The preset the section measures: the Terminus run's sources, mixture, batch and world size."""
PLOTS = PRESET.parents[2] / ".state" / "bench"
"""Where the plots go by default (git ignores ``.state/``), named after the results file."""
ROWS = (10_000, 100_000, 770_000)
"""Index sizes; 770k is the Terminus run's train split."""
TERMINUS_STEPS = 128_000
"""The Terminus run's optimizer steps (770k images x 60 epochs / 360 per step): where the logging is extrapolated
to when it is measured at fewer."""
STEPS = (2_000, 8_000)
"""Logged steps by default, one run per size per store: a flush of 1000 metrics takes most of a second on 2 cores,
so 128k steps (1.8M metrics) would take about 20 minutes per store; the figures at 128k are a linear fit
through these, labelled as extrapolated."""
PLAN_TARGET_S, PLAN_TARGET_MB = 10.0, 1024.0
"""Targets at the largest size: one epoch's plan, or a resume, in < 10 s and < 1 GB."""
LOG_TARGET_MS = 1.0
"""Target: the logger's cost to the step's thread, per step, < 1 ms."""
SOURCE_SHARES = (0.7, 0.3)
"""The synthetic split's rows per source, in the preset's source order (an assumption: the card gives none)."""
ASPECTS = (
    {1.5: 0.35, 4 / 3: 0.2, 1.0: 0.1, 2 / 3: 0.15, 3 / 4: 0.1, 16 / 9: 0.1},  # photographs (LAION)
    {1.0: 0.5, 2 / 3: 0.15, 1.5: 0.15, 16 / 9: 0.1, 9 / 16: 0.1},  # Midjourney's common --ar choices
)
"""Image aspect ratios (width / height) and their shares per source; each drawn aspect is jittered."""


def scale_config(overrides: list[str] | None = None) -> Config:
    """The Terminus preset (``PRESET``) with ``overrides``."""
    return load_config(PRESET, overrides)


# --- part 1: the epoch plan --------------------------------------------------------------------------------


def synthetic_index(cfg: Config, rows: int, seed: int = 0) -> RowIndex:
    """A train-split index of ``rows`` rows: the preset's sources in ``SOURCE_SHARES``, each source's rows in
    its own shards of ``curate.rows_per_shard``, each row in the SDXL bucket nearest an aspect drawn from
    ``ASPECTS`` (log-normal jitter, sigma 0.05)."""
    rng = np.random.default_rng(seed)
    names = [s.name for s in cfg.curate.resolved_sources()]
    buckets = make_buckets(cfg.curate.buckets)
    log_aspects = np.array([b.log_aspect for b in buckets])
    shares = np.array(SOURCE_SHARES[:len(names)] + (0.0,) * max(0, len(names) - len(SOURCE_SHARES)))
    shares = shares / shares.sum() if shares.sum() > 0 else np.full(len(names), 1 / len(names))
    counts = np.floor(shares * rows).astype(np.int64)
    counts[0] += rows - counts.sum()
    per_shard = cfg.curate.rows_per_shard
    source, bucket, file_of, row_in_file, files = [], [], [], [], []
    for code, n in enumerate(counts.tolist()):
        mix = ASPECTS[min(code, len(ASPECTS) - 1)]
        drawn = rng.choice(np.log(list(mix)), size=n, p=np.array(list(mix.values())) / sum(mix.values()))
        drawn += rng.normal(0, 0.05, n)
        bucket.append(np.abs(drawn[:, None] - log_aspects[None, :]).argmin(axis=1))
        source.append(np.full(n, code))
        local = np.arange(n)
        file_of.append(len(files) + local // per_shard)
        row_in_file.append(local % per_shard)
        files += [f"synthetic/{names[code]}/part-{i:05d}.parquet" for i in range(-(-n // per_shard))]
    as32 = lambda parts: np.concatenate(parts).astype(np.int32)  # noqa: E731
    return RowIndex(files=tuple(files), file_of=as32(file_of), row_in_file=as32(row_in_file), bucket=as32(bucket),
                    source=as32(source), buckets=tuple(b.name for b in buckets), sources=tuple(names))


def _rss_mb() -> tuple[float, float]:
    """(current, high-water) resident set in MiB, from /proc (Linux)."""
    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line[:5]] = int(line.split()[1]) / 1024
    return values["VmRSS"], values["VmHWM"]


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark to the current RSS (``clear_refs`` 5); False where not
    allowed, and the growth is then measured against the process's earlier peak (a lower bound)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _measure(fn: Callable[[], object]) -> dict:
    """``fn`` run three times: timed alone; under tracemalloc (peak of Python's allocations); with the RSS
    high-water mark reset before it (growth over the RSS at the start)."""
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    del out
    gc.collect()
    tracemalloc.start()
    out = fn()
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del out
    gc.collect()
    reset = _reset_peak_rss()
    before, _ = _rss_mb()
    out = fn()
    _, peak = _rss_mb()
    del out
    return {"s": seconds, "tracemalloc_peak_mb": traced / 2**20, "rss_growth_mb": max(0.0, peak - before),
            "rss_peak_reset": reset}


def plan_at(cfg: Config, rows: int) -> dict:
    """One epoch's plan and a mid-epoch resume on a synthetic index of ``rows`` rows (see the module)."""
    index = synthetic_index(cfg, rows, seed=cfg.seed)
    mix = mixture(cfg, SimpleNamespace(sources=source_meta(cfg.curate), root="the synthetic index"), index)
    world, rank, epoch = cfg.train.num_workers, 0, 1
    data = {"index": index, "mode": "blocks", "mixture": mix}  # 770k 1 MP images stream: far over in_memory_mb

    def build():
        return EpochReader(data, cfg).plan(epoch, world)

    plan = build()
    batches = len(plan[rank])
    skip = batches // 2

    def resume():  # the loop after a restart: a new reader, the plan again, the consumed batches skipped
        reader = EpochReader(data, cfg)
        return reader.plan(epoch, world)[rank][skip:]

    remaining = len(resume())
    return {"rows": rows, "shards": len(index.files), "buckets_used": int(len(np.unique(index.bucket))),
            "micro_batches_per_rank": batches, "resume_at_batch": skip, "resumed_batches": remaining,
            "rows_planned": int(sum(len(ids) for p in plan for ids in p)),
            "build": _measure(build), "resume": _measure(resume)}


# --- part 2: MLflow logging --------------------------------------------------------------------------------


def step_metrics(cfg: Config, step: int, seen: dict[str, int]) -> dict[str, float]:
    """The loop's per-step metrics dict, its keys as ``loop.train_loop_per_worker`` logs them (on a GPU run:
    ``peak_gpu_allocated_mb`` too); values made up."""
    batch = cfg.train.effective_batch
    rng = (step * 2654435761) % 2**32 / 2**32
    return {"loss": 0.1 + 0.01 * rng, "lr": 8e-7, "grad_norm": 1.0 + rng, "images_per_s": 6.0 + rng,
            "samples_seen": float(step * batch), "epoch": 0.0, "data_wait": 0.01 * rng,
            "data.batch_hash": float(step * 7919 % 2**52), **mix_metrics(seen),
            **peak_memory(torch.device("cpu")), "peak_gpu_allocated_mb": 50_000.0 + rng}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on 127.0.0.1 (SQLite backend under ``root``, one worker), in its own process group,
    once ``/health`` answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job runner processes
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed with the server
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", (root / "artifacts").as_uri()],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    proc.log = log
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: "
                               f"{(root / 'server.log').read_text()[-1000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        if time.time() > deadline:
            stop_server(proc)
            raise TimeoutError(f"mlflow server not healthy after 180 s: {(root / 'server.log').read_text()[-1000:]}")
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its pid), SIGKILL after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.log.close()


def log_run(cfg: Config, uri: str, root: Path, steps: int, db: Path) -> dict:
    """``steps`` steps of the loop's metrics through a ``RunLogger`` on ``uri``; then one key's full history."""
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.tracking.tracking_uri = uri
    run_cfg.state_dir = str(root / "state")
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("terminus-scale", artifact_location=(root / "artifacts").as_uri())
    run_cfg.tracking.experiment = "terminus-scale"
    run_id = client.create_run(experiment).info.run_id
    logger = RunLogger(run_cfg, run_id)
    names = [s.name for s in cfg.curate.resolved_sources()]
    seen = dict.fromkeys(names, 0)
    per_epoch = max(1, round(steps / cfg.train.epochs)) if cfg.train.epochs else steps
    keys = sorted(step_metrics(cfg, 1, seen))
    calls = np.empty(steps)
    flushes = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        for i, name in enumerate(names):
            seen[name] += cfg.train.effective_batch * (7 if i == 0 else 3) // 10
        metrics = step_metrics(cfg, step, seen)  # the loop builds it either way: not the logger's cost
        t0 = time.perf_counter()
        if step % cfg.train.val_every == 0:
            logger.metrics({"val_loss": 0.1}, step)
        logger.metrics(metrics, step)
        if step % per_epoch == 0:
            logger.metrics({f"epoch_mix.{n}": 0.5 for n in names}, step)
        pending = len(logger._metrics)
        logger.maybe_flush()
        calls[step - 1] = dt = time.perf_counter() - t0
        if len(logger._metrics) < pending:
            flushes.append((step, dt))
    t0 = time.perf_counter()
    logger.flush()
    final_flush_s = time.perf_counter() - t0
    total_s = time.perf_counter() - start
    logger._stop_system_metrics()
    t0 = time.perf_counter()
    history = client.get_metric_history(run_id, "loss")
    history_s = time.perf_counter() - t0
    if len(history) != steps:
        raise RuntimeError(f"{uri}: the loss history has {len(history)} points after {steps} logged steps")
    return {"steps": steps, "keys_per_step": len(keys), "keys": keys, "metrics_logged": steps * len(keys),
            "per_step_ms": 1000 * float(calls.sum() + final_flush_s) / steps,
            "median_call_ms": 1000 * float(np.median(calls)), "max_call_ms": 1000 * float(calls.max()),
            "flushes": len(flushes), "final_flush_s": final_flush_s,
            "flush_s_total": float(sum(dt for _, dt in flushes)) + final_flush_s, "total_s": total_s,
            "db_mb": db.stat().st_size / 2**20, "history_points": len(history), "history_s": history_s,
            "cumulative_steps": [*range(1, steps + 1, max(1, steps // 200)), steps],
            "cumulative_s": [*(float(x) for x in np.cumsum(calls)[:: max(1, steps // 200)]),
                             float(calls.sum() + final_flush_s)]}


def logging_at(cfg: Config, steps: int, server: bool = True, workdir: str | None = None) -> dict:
    """``log_run`` into a SQLite store, and (``server``) into a local ``mlflow server``, each in a fresh
    temporary directory."""
    out = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp) / "sqlite"
        root.mkdir()
        out["sqlite"] = log_run(cfg, f"sqlite:///{root / 'mlflow.db'}", root, steps, root / "mlflow.db")
    if server:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            root = Path(tmp)
            proc, url = start_server(root)
            try:
                out["server"] = log_run(cfg, url, root, steps, root / "mlflow.db")
            finally:
                stop_server(proc)
    return out


def extrapolate(runs: list[dict], to: int = TERMINUS_STEPS) -> dict | None:
    """A least-squares line through the runs' (steps, figure) for the total time, the store's size and the
    history fetch, evaluated at ``to`` steps; None with fewer than two sizes or when the runs reach ``to``."""
    sizes = [r["steps"] for r in runs]
    if len(set(sizes)) < 2 or max(sizes) >= to:
        return None
    out = {"steps": to, "from_steps": sizes}
    for key in ("total_s", "db_mb", "history_s", "per_step_ms"):
        slope, intercept = np.polyfit(sizes, [r[key] for r in runs], 1)
        out[key] = float(slope * to + intercept)
        out[f"{key}_per_1k_steps"] = float(slope * 1000)
    return out


# --- the section, its figures, plots and results file ------------------------------------------------------


def benchmark_scale(cfg: Config, rows: tuple[int, ...] = ROWS, steps: tuple[int, ...] = STEPS, server: bool = True,
                    workdir: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Both parts; ``rows`` sizes the plan, ``steps`` the logging (a run per size and store; with two sizes or
    more below ``TERMINUS_STEPS``, their extrapolation to it). JSON-able."""
    plans = []
    for n in rows:
        log(f"scale: epoch plan at {n} rows (load {os.getloadavg()[0]:.1f})")
        plans.append(plan_at(cfg, n))
    runs: dict[str, list[dict]] = {}
    for n in sorted(steps):
        log(f"scale: MLflow logging, {n} steps (load {os.getloadavg()[0]:.1f})")
        for store, run in logging_at(cfg, n, server=server, workdir=workdir).items():
            runs.setdefault(store, []).append(run)
    logging = {store: {**rs[-1], "runs": [{k: v for k, v in r.items() if not k.startswith("cumulative")} for r in rs],
                       **({"extrapolated": x} if (x := extrapolate(rs)) else {})} for store, rs in runs.items()}
    return {"preset": cfg.name, "batch_size": cfg.train.batch_size, "world": cfg.train.num_workers,
            "grad_accum": cfg.train.grad_accum, "sources": [s.name for s in cfg.curate.resolved_sources()],
            "source_shares": list(SOURCE_SHARES), "log_flush_s": cfg.train.log_flush_s, "plans": plans,
            "logging": logging, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def scale_figures(d: dict) -> list[Figure]:
    f = lambda *a, **k: Figure("scale", *a, **k)  # noqa: E731
    out = []
    largest = max(p["rows"] for p in d["plans"])
    for p in d["plans"]:
        big = p["rows"] == largest
        for what, m in (("epoch plan", p["build"]), (f"resume at batch {p['resume_at_batch']}", p["resume"])):
            label = f"{what}, {p['rows']} rows ({p['micro_batches_per_rank']} micro-batches/rank)"
            out += [f(f"{label}: time", m["s"], "s", ("<", PLAN_TARGET_S) if big else None,
                      "Terminus: 770k rows" if big else ""),
                    f(f"{label}: tracemalloc peak", m["tracemalloc_peak_mb"], "MB",
                      ("<", PLAN_TARGET_MB) if big else None),
                    f(f"{label}: RSS growth", m["rss_growth_mb"], "MB", ("<", PLAN_TARGET_MB) if big else None)]
    for store, m in d["logging"].items():
        label = f"MLflow {store}, {m['steps']} steps x {m['keys_per_step']} keys"
        out += [f(f"{label}: step thread's cost per step (flushes included)", m["per_step_ms"], "ms",
                  ("<", LOG_TARGET_MS), f"flush every {d['log_flush_s']:g} s"),
                f(f"{label}: longest metrics + maybe_flush call", m["max_call_ms"], "ms"),
                f(f"{label}: final flush (the whole buffer)", m["final_flush_s"], "s",
                  anchor=f"{m['flushes']} live flush(es) before it"),
                f(f"{label}: store size", m["db_mb"], "MB"),
                f(f"{label}: get_metric_history('loss'), {m['history_points']} points", m["history_s"], "s",
                  anchor="what the UI's chart reads")]
        if "extrapolated" in m:
            x = m["extrapolated"]
            fit = f"EXTRAPOLATED to {x['steps']} steps (line through {x['from_steps']}, not measured)"
            out += [f(f"MLflow {store}: {fit}: step thread's cost per step", x["per_step_ms"], "ms",
                      ("<", LOG_TARGET_MS)),
                    f(f"MLflow {store}: {fit}: logging time in all", x["total_s"], "s",
                      anchor=f"slope {x['total_s_per_1k_steps']:.2f} s per 1k steps"),
                    f(f"MLflow {store}: {fit}: store size", x["db_mb"], "MB",
                      anchor=f"slope {x['db_mb_per_1k_steps']:.2f} MB per 1k steps"),
                    f(f"MLflow {store}: {fit}: get_metric_history('loss')", x["history_s"], "s",
                      anchor=f"slope {x['history_s_per_1k_steps']:.3f} s per 1k steps")]
    return out


def write_plots(d: dict, stem: Path) -> list[str]:
    """``<stem>_plan.png`` and ``<stem>_logging.png``; none (and a line saying so) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("scale: matplotlib is not installed in this environment: no plots written", file=sys.stderr)
        return []
    rows = [p["rows"] for p in d["plans"]]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for part in ("build", "resume"):
        ax_t.plot(rows, [p[part]["s"] for p in d["plans"]], "o-", label=part)
        ax_m.plot(rows, [p[part]["tracemalloc_peak_mb"] for p in d["plans"]], "o-", label=f"{part}: tracemalloc")
        ax_m.plot(rows, [p[part]["rss_growth_mb"] for p in d["plans"]], "s--", label=f"{part}: RSS growth")
    ax_t.axhline(PLAN_TARGET_S, color="red", lw=0.8, label="target")
    ax_m.axhline(PLAN_TARGET_MB, color="red", lw=0.8, label="target")
    for ax, ylabel in ((ax_t, "seconds"), (ax_m, "MB")):
        ax.set_xscale("log")
        ax.set_xlabel("index rows")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"epoch plan, {d['preset']}: batch {d['batch_size']}, world {d['world']}")
    fig.tight_layout()
    paths = [stem.with_name(stem.name + "_plan.png")]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for store, m in d["logging"].items():
        ax.plot(m["cumulative_steps"], m["cumulative_s"], label=f"{store} ({m['per_step_ms']:.3f} ms/step)")
    ax.set_xlabel("step")
    ax.set_ylabel("step thread's time in the logger, cumulative (s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(stem.with_name(stem.name + "_logging.png"))
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return [str(p) for p in paths]


def run_scale(cfg: Config, results_dir: Path = RESULTS, log: Callable[[str], None] = print,
              plots_dir: Path = PLOTS, **sizes) -> tuple[dict, Path]:
    """The section, kept as ``<results_dir>/scale_<hardware>_<date>.json`` with its ``.md`` (a day's second run:
    ``_2``), its plots in ``plots_dir`` under the same name. Returns (report, the JSON's path)."""
    report = {"meta": {**machine(), "config": cfg.name}, "sizes": {"scale": sizes}, "sections": {}}
    load, t0 = os.getloadavg(), time.perf_counter()
    try:
        data = benchmark_scale(cfg, log=log, **sizes)
    except Exception as err:  # recorded as an ERROR row, as run_benchmarks does
        data = {"error": f"{type(err).__name__}: {str(err).strip()[:500]}"}
    report["sections"]["scale"] = {**data, "wall_s": time.perf_counter() - t0,
                                   "load_before": [round(x, 2) for x in load],
                                   "load_after": [round(x, 2) for x in os.getloadavg()]}
    report["meta"].update(load_end=[round(x, 2) for x in os.getloadavg()], total_s=time.perf_counter() - t0)
    figs = (scale_figures(data) if "error" not in data
            else [Figure("scale", f"failed: {data['error'][:80]}", None)])
    report["figures"] = [f.as_dict() for f in figs]
    report["missed"] = [f"scale: {f['name']}" for f in report["figures"] if f["status"] in ("MISS", "ERROR")]
    report["hardware"] = hardware()
    stem = f"scale_{report['hardware']}_{report['meta']['date'][:10]}"
    path, n = results_dir / f"{stem}.json", 2
    while path.exists() or path.with_suffix(".md").exists():
        path, n = results_dir / f"{stem}_{n}.json", n + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    plots_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = write_plots(data, plots_dir / path.stem) if "error" not in data else []
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = render_markdown(report, path.name).replace("# make bench", "# make bench: scale", 1)
    path.with_suffix(".md").write_text(text)
    return report, path
