"""``make bench``'s report: run the seven CPU benchmark sections, put each figure next to its target and
anchor (docs/benchmarks.md, docs/recipe.md), print a table, and keep the run as a results file.

Sections and where they live: curation (``bench.curation``), training, input and caching
(``bench.training``), serving (``bench.serving``), multiplex (``bench.multiplex``: adapters many per replica
against a replica per adapter), zt_repro (``bench.zt_repro``).
``SIZES`` sizes them to the run-time budget docs/benchmarks.md states. A missed target
is a measurement, reported as MISS with its number; a section that fails is reported as ERROR and the others
still run.

Each run is written to ``bench/results/<theme>_<hardware>_<yyyy-mm-dd>.json`` with its rendered ``.md`` beside
it (``write_report``): theme ``bench`` for a run of every section, ``bench-<section>-...`` for an ``--only`` run;
hardware from ``hardware()``. ``python -m bench.report --render-docs`` regenerates the results table of
docs/benchmarks.md (between ``DOC_BEGIN`` and ``DOC_END``) from the newest ``bench_*.json`` there;
``--render-md FILE.json`` (re)writes the ``.md`` beside a results file.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.process import PINNED_MALLOC
from bench.training import benchmark_caching, benchmark_input, benchmark_training, torch_threads
from components.config import Config

SECTIONS = ("curation", "training", "input", "caching", "serving", "multiplex", "zt_repro")


# --- sections -------------------------------------------------------------------------


def bench_registry(cfg: Config, root: Path) -> Config:
    """``cfg`` pointed at a fresh SQLite registry under ``root`` whose ``@champion`` is the preset's
    model as training exports it, so the serving benchmark needs no earlier training run."""
    import mlflow

    from components.diffusion.sdxl import load_parts, save_pipeline
    from components.registry.model import log_pipeline_model
    from components.registry.tracking import setup_tracking

    bench = cfg.model_copy(deep=True)
    bench.tracking.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    bench.tracking.experiment = bench.tracking.registered_model = "terminus-bench"
    bench.serve.model_uri = "models:/terminus-bench@champion"
    client = mlflow.MlflowClient(tracking_uri=bench.tracking.tracking_uri)  # artifacts under root too
    client.create_experiment(bench.tracking.experiment, artifact_location=(root / "artifacts").as_uri())
    experiment = setup_tracking(bench)
    pipeline_dir = save_pipeline(load_parts(cfg.model, cfg.state_path("cache")), cfg.diffusion, root / "pipeline")
    with mlflow.start_run(experiment_id=experiment):
        info = log_pipeline_model(pipeline_dir, bench.tracking.registered_model, bench.inference)
    mlflow.MlflowClient().set_registered_model_alias(
        bench.tracking.registered_model, "champion", str(info.registered_model_version))
    return bench


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _curation(cfg: Config, workdir: str | None, **sizes) -> dict:
    from bench.curation import benchmark_curation

    return benchmark_curation(workdir=workdir, **sizes)  # the Terminus filters, 1 MP buckets


def _serving(cfg: Config, workdir: str | None, **sizes) -> dict:
    from bench.serving import benchmark_serving

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        start = time.perf_counter()
        bench = bench_registry(cfg, Path(tmp))
        registry_s = time.perf_counter() - start
        return {**benchmark_serving(bench, port=free_port(), **sizes), "registry_setup_s": registry_s}


def _multiplex(cfg: Config, workdir: str | None, **sizes) -> dict:
    from bench.multiplex import benchmark_multiplex

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        bench = bench_registry(cfg, Path(tmp))
        return benchmark_multiplex(bench, Path(tmp), port=free_port(), **sizes)


def _zt_repro(cfg: Config, workdir: str | None, threads: int | None = None, **sizes) -> dict:
    from bench.zt_repro import run_repro

    with torch_threads(threads or torch.get_num_threads()):
        return run_repro(**sizes)


RUNNERS: dict[str, Callable[..., dict]] = {
    "curation": _curation,
    "training": lambda cfg, workdir, **kw: benchmark_training(cfg, workdir=workdir, **kw),
    "input": lambda cfg, workdir, **kw: benchmark_input(cfg, workdir=workdir, **kw),
    "caching": lambda cfg, workdir, **kw: benchmark_caching(cfg, workdir=workdir, **kw),
    "serving": _serving,
    "multiplex": _multiplex,
    "zt_repro": _zt_repro,
}
NEEDS_RAY = {"curation", "training", "serving", "multiplex"}
SIZES: dict[str, dict] = {
    "curation": {"n_images": 256},  # the pipeline is timed warm; its first run (start-up) is reported apart
    "training": {},  # benchmark_training's defaults: 3 warm-up + 12 timed steps
    "input": {},  # benchmark_input's defaults: 128 batches (a share of 4 s, not 1 s), the step 10x the CPU's pace
    "caching": {},  # benchmark_caching's defaults: 16 rows, 2 warm-up + 8 timed steps per arm
    "serving": {"requests": 24},  # benchmark_serving's defaults otherwise: concurrency 8, 64 px, 4 steps
    "multiplex": {"requests": 16},  # benchmark_multiplex's defaults else: 2 adapters, concurrency 4, 64 px, 4 steps
    "zt_repro": {"threads": 1},
}
"""Sized for the whole run to fit the run-time budget docs/benchmarks.md states. The ZT-SNR reproduction keeps
its own defaults (120 steps: with fewer the tiny model does not learn the effect). One torch thread for it: on
cores that other work already keeps busy, more threads make a training step slower, not faster."""


def cpu_precision() -> dict:
    """Which kernels torch runs on this CPU (``ATEN_CPU_CAPABILITY``: AVX2, AVX512, ...), and whether it computes
    bf16 in hardware; where it does not, the training rows run fp32 (components/diffusion/loss.py) and say so."""
    from components.diffusion.loss import native_bf16

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "bf16_native": native_bf16(torch.device("cpu"))}


def machine() -> dict:
    import diffusers
    import ray

    from components.registry.tracking import git_commit

    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor() or "unknown")
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "cpu": cpu,
            **cpu_precision(), "cores": os.cpu_count(), "load_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "diffusers": diffusers.__version__, "git_commit": git_commit(),
            "malloc": {k: os.environ.get(k) for k in PINNED_MALLOC}}


def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as fh:
            return fh.readlines()
    except OSError:
        return []


def run_benchmarks(cfg: Config, sections: list[str] | tuple[str, ...] = SECTIONS, sizes: dict | None = None,
                   workdir: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Run ``sections`` in order (one Ray session for those that need it); a section that fails is
    recorded with its error and the others still run. Returns the report (JSON-able)."""
    from components.cluster import ray_session

    unknown = [s for s in sections if s not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown benchmark section(s) {unknown}: choose from {', '.join(SECTIONS)}")
    sizes = {name: {**SIZES[name], **(sizes or {}).get(name, {})} for name in sections}
    report = {"meta": {**machine(), "config": cfg.name}, "sizes": sizes, "sections": {}}
    start = time.perf_counter()
    uses_ray = [i for i, name in enumerate(sections) if name in NEEDS_RAY]
    with contextlib.ExitStack() as ray_scope:  # one Ray from the first section that needs it to the last
        for i, name in enumerate(sections):
            if uses_ray and i == uses_ray[0]:
                # Serve as flows/serve.py runs it: the local Ray's processes with its latency settings
                ray_scope.enter_context(ray_session(serve_latency=True))
            log(f"benchmark {name} {sizes[name]} (load {os.getloadavg()[0]:.1f})")
            load, t0 = os.getloadavg(), time.perf_counter()
            try:
                data = RUNNERS[name](cfg, workdir, **sizes[name])
            except Exception as err:  # recorded and shown in the table; the other sections still run
                data = {"error": f"{type(err).__name__}: {str(err).strip()[:500]}", "traceback": traceback.format_exc()}
                log(f"benchmark {name} failed: {data['error']}")
            report["sections"][name] = {**data, "wall_s": time.perf_counter() - t0,
                                        "load_before": [round(x, 2) for x in load],
                                        "load_after": [round(x, 2) for x in os.getloadavg()]}
            if uses_ray and i == uses_ray[-1]:
                ray_scope.close()
    report["meta"].update(load_end=[round(x, 2) for x in os.getloadavg()], total_s=time.perf_counter() - start)
    report["figures"] = [f.as_dict() for f in figures(report["sections"])]
    report["missed"] = [f"{f['section']}: {f['name']}" for f in report["figures"] if f["status"] in ("MISS", "ERROR")]
    return report


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
"""Where every benchmark run is kept: ``<theme>_<hardware>_<yyyy-mm-dd>.json`` and the ``.md`` rendered from it."""
DOC = REPO / "docs" / "benchmarks.md"
DOC_BEGIN, DOC_END = "<!-- results:begin -->", "<!-- results:end -->"
"""The markers around docs/benchmarks.md's results table, which ``render_docs`` writes and nobody edits."""


def hardware() -> str:
    """The results file's hardware name: the first GPU's model where torch sees one (``h100``, ``a100``,
    ``rtx4090``: its name's words up to the first with a digit, vendor words dropped; ``h100x8`` for eight),
    else ``cpu<N>core`` with N the machine's CPU count (``cpu2core``)."""
    import re

    if torch.cuda.is_available():
        words = [w for w in re.split(r"[\s_-]+", torch.cuda.get_device_name(0).lower())
                 if w and w not in ("nvidia", "geforce", "tesla", "amd", "radeon")]
        model = ""
        for word in words:
            model += re.sub(r"[^a-z0-9]", "", word)
            if any(c.isdigit() for c in word):
                break
        count = torch.cuda.device_count()
        return (model or "gpu") + (f"x{count}" if count > 1 else "")
    return f"cpu{os.cpu_count()}core"


def results_path(report: dict, results_dir: Path = RESULTS) -> Path:
    """``<results_dir>/bench_<hardware>_<yyyy-mm-dd>.json`` for a run of every section (``bench-<section>-...``
    for fewer), the date the run started; ``_2``, ``_3`` ... after it when that day already has one."""
    sections = list(report["sections"])
    theme = "bench" if set(sections) == set(SECTIONS) else "-".join(["bench", *sections])
    stem = f"{theme}_{report.get('hardware') or hardware()}_{report['meta']['date'][:10]}"
    path, n = results_dir / f"{stem}.json", 2
    while path.exists() or path.with_suffix(".md").exists():
        path, n = results_dir / f"{stem}_{n}.json", n + 1
    return path


def write_report(cfg: Config, report: dict, results_dir: Path = RESULTS) -> Path:
    """Keep ``report`` as a results file (``results_path``) with its rendered ``.md`` beside it, and for a run
    of every section into ``RESULTS`` regenerate docs/benchmarks.md's table (``render_docs``); returns the
    JSON's path."""
    report.setdefault("hardware", hardware())
    path = results_path(report, results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    path.with_suffix(".md").write_text(render_markdown(report, path.name))
    if results_dir == RESULTS and path.name.startswith("bench_") and DOC.exists():
        DOC.write_text(render_docs())
    return path


# --- figures and the table ------------------------------------------------------------------------

_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}


@dataclass
class Figure:
    """One measured figure; ``target`` (op, bound) in the figure's unit, as docs/benchmarks.md lists it.

    A ``claim`` is the paper's expectation rather than a project target: HOLDS / NOT SEEN.
    """

    section: str
    name: str
    value: float | None
    unit: str = ""
    target: tuple[str, float] | None = None
    anchor: str = ""
    claim: bool = False

    @property
    def status(self) -> str:
        if self.value is None:
            return "ERROR"
        if self.target is None:
            return "-"
        ok = _OPS[self.target[0]](self.value, self.target[1])
        if self.claim:
            return "HOLDS" if ok else "NOT SEEN"
        return "PASS" if ok else "MISS"

    def as_dict(self) -> dict:
        return {**asdict(self), "status": self.status}


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def figures(sections: dict[str, dict]) -> list[Figure]:
    """The table's rows, from ``run_benchmarks``' sections (those present; errors as ERROR rows)."""
    out: list[Figure] = []
    for name, data in sections.items():
        if "error" in data:
            out.append(Figure(name, f"failed: {data['error'][:80]}", None))
            continue
        out += _FIGURES[name](data)
    return out


def _curation_figures(d: dict) -> list[Figure]:
    f = lambda *a, **k: Figure("curation", *a, **k)  # noqa: E731
    return [
        f(f"single-process PIL loop ({d['n_images']} x {d['size']} JPEG)", d["loop_images_per_s"], "img/s"),
        f(f"Ray Data pipeline ({d['workers']} workers, second run in the session)", d["pipeline_images_per_s"],
          "img/s"),
        f(f"first run in a new cluster ({d['first_run_images']} images: worker start-up, imports)",
          d["first_run_s"], "s"),
        f("pipeline / loop", d["speedup"], "x", (">=", 1.8), f"ideal {d['cpus']:.0f}x on {d['cpus']} CPUs"),
        *_curation_cpu(d),
        f("same dataset written (digests equal)", float(d["same_output"]), "", (">=", 1.0), "1 = identical"),
    ]


def _curation_cpu(d: dict) -> list[Figure]:
    """Where the pipeline's time went (``bench.curation.cpu_breakdown``): speed-up = cores x busy / CPU ratio."""
    cpu = d.get("cpu")
    if not cpu:  # a cluster this process did not start: its processes cannot be measured from here
        return []
    f = lambda *a, **k: Figure("curation", *a, **k)  # noqa: E731
    return [
        f(f"  of which: the cores the pipeline's processes kept busy (CPU s / wall x {cpu['cores']})",
          100 * cpu["cores_busy"], "%", anchor="ideal 100 %"),
        f("  of which: the pipeline's CPU for the same work / the loop's", cpu["cpu_vs_loop"], "x", anchor="ideal 1x"),
        f(f"    the task workers ({d['workers']} busiest processes) / the loop's CPU", cpu["workers_cpu_vs_loop"], "x"),
        f("    Ray's own processes and the driver / the loop's CPU", 100 * cpu["others_cpu_vs_loop"], "%"),
    ]


def _training_figures(d: dict) -> list[Figure]:
    f = lambda *a, **k: Figure("training", *a, **k)  # noqa: E731
    return [
        f(f"plain PyTorch loop (own process, batch {d['batch_size']}, {d['image_side']}px, "
          f"{d['plain_threads']} thread, {d['precision_used']})",
          d["plain_s_per_step"], "s/step"),
        f("Ray Train step (TorchTrainer, 1 worker, Ray Data shard)", d["ray_s_per_step"], "s/step"),
        f("Ray Train overhead per step", 100 * d["overhead"], "%", ("<=", 5.0), "plain loop, same steps"),
        f("Ray Train overhead per step (medians)", 100 * d["overhead_median"], "%"),
        f("noise: plain loop after / before the Ray run", 100 * d["plain_drift"], "%", anchor="same work: ideally 0"),
        f("Ray Data: the worker's wait for its next batch", 100 * d["ray"]["fetch_s"] / d["ray_s_per_step"], "%",
          anchor="share of the Ray step"),
        f("Ray Train start-up + tear-down (once per run)", d["ray_startup_s"], "s"),
    ] + ([f("new pass over the shard (once per epoch)", d["ray_epoch_start_s"], "s",
            anchor="Terminus: 1 per ~32k micro-batches")] if d["ray_epoch_start_s"] is not None else [])


def _caching_figures(d: dict) -> list[Figure]:
    f = lambda *a, **k: Figure("caching", *a, **k)  # noqa: E731
    return [
        f(f"encode on the fly (VAE + text, batch {d['batch_size']}, {d['image_side']}px, "
          f"{d['precision_used']})", d["pixels_s_per_step"], "s/step"),
        f(f"cached latents + embeddings ({d['cache_dtype']})", d["cached_s_per_step"], "s/step"),
        f("speed-up (on the fly / cached)", d["speedup"], "x", (">=", 3.0),
          "ceiling: on-the-fly step / UNet-only step (docs/benchmarks.md)"),
        f("  of which: the on-the-fly step's share that the cache removes (1 - cached / on the fly)",
          100 * (1 - d["cached_s_per_step"] / d["pixels_s_per_step"]), "%",
          anchor="3x needs >= 66.7 %; SDXL at 1024 px, by FLOPs: about 20 %, so <= 1.25x"),
        f("cache encoding, once per image", d["cache_encode_s_per_image"], "s/img"),
    ]


def _input_figures(d: dict) -> list[Figure]:
    f = lambda *a, **k: Figure("input", *a, **k)  # noqa: E731
    shape = f"batch {d['batch_size']} at {d['image_side']}px"
    pre, none = d["prefetch"], d["no_prefetch"]
    return [
        f(f"real step on a decoded batch ({shape}, {d['precision_used']})", d["step_s"], "s/step"),
        f(f"emulated step, {d['speedup']:g}x faster (a GPU's pace)", _ms(d["emulated_step_s"]), "ms"),
        f("taking and decoding one batch", _ms(d["decode_batch_s"]), "ms"),
        f(f"data wait share, prefetch {pre['depth']} x {d['prefetch_threads']} threads", 100 * pre["wait_share"], "%",
          ("<", 2.0)),
        f("data wait share, no prefetch (decode on the step's thread)", 100 * none["wait_share"], "%"),
        f("first batch of an epoch, prefetching (nothing to overlap)", _ms(pre["first_wait_s"]), "ms"),
    ]


BREAKDOWN = {
    "client_and_proxy_s": "client + HTTP proxy (latency - ingress)",
    "ingress_to_model_hop_s": "ingress -> model hop and back, parse, render (ingress - model)",
    "model_queue_and_thread_s": "model's batch queue + worker thread (model - work)",
}
"""Row names of the serving overhead's breakdown (``bench.serving._paired``)."""


def _serving_figures(d: dict) -> list[Figure]:
    f = lambda *a, **k: Figure("serving", *a, **k)  # noqa: E731
    direct, serial, lone = d["direct"], d["serial_unbatched"], d["serial_batched"]
    shape = f"{d['size']}px, {d['steps']} steps"
    return [
        f(f"direct call of the replica's work p50 ({shape}, PNG; mean of before and after Serve)",
          _ms(direct["p50_s"]), "ms"),
        *([f("direct call p50 drift, after / before Serve", 100 * d["direct_drift"], "%")]
          if "direct_drift" in d else []),
        f("direct call p99", _ms(direct["p99_s"]), "ms"),
        f("Serve HTTP p50 (one request at a time, unbatched)", _ms(serial["p50_s"]), "ms"),
        f("Serve HTTP p99 (one request at a time, unbatched)", _ms(serial["p99_s"]), "ms"),
        f("Serve overhead per request (p50 - direct p50)", _ms(d["serve_overhead_p50_s"]), "ms", ("<=", 5.0),
          "Ray PR 55900: ~2.2 ms p50"),
        *([f("Serve overhead, paired per request (latency - the replica's own work, median)",
             _ms(d["serve_overhead_paired_s"]), "ms", ("<=", 5.0), "immune to load drift between the two sides")]
          if "serve_overhead_paired_s" in d else []),
        *[f(f"  of which {BREAKDOWN.get(part, part)}", _ms(seconds), "ms")
          for part, seconds in d.get("overhead_breakdown_s", {}).items()],
        *([f("the replica's own work p50 (vs the direct call above)", _ms(d["replica_work_p50_s"]), "ms")]
          if "replica_work_p50_s" in d else []),
        *([f("GET /healthz p50 (client, proxy, ingress; no model call)", _ms(d["healthz"]["p50_s"]), "ms")]
          if "healthz" in d else []),
        f(f"lone request on the batched deployment p50 (waits up to {_ms(d['batch_wait_timeout_s']):g} ms)",
          _ms(lone["p50_s"]), "ms"),
        f(f"unbatched throughput, concurrency {d['concurrency']}", d["unbatched"]["throughput_rps"], "req/s"),
        f(f"batched throughput (max_batch_size {d['batched']['max_batch_size']}, mean "
          f"{d['batched']['mean_batch_size']:.1f})", d["batched"]["throughput_rps"], "req/s"),
        f("batched / unbatched throughput", d["batching_speedup"], "x"),
    ]


def _multiplex_figures(d: dict) -> list[Figure]:
    f = lambda *a, **k: Figure("multiplex", *a, **k)  # noqa: E731
    m, o = d["multiplexed"], d["dedicated"]
    n = d["adapters"]
    return [
        f(f"multiplexed: {n} LoRAs (rank {d['rank']}) on 1 replica, alternating, p50", _ms(m["p50_s"]), "ms"),
        f("multiplexed p99", _ms(m["p99_s"]), "ms"),
        f(f"dedicated: 1 replica per adapter ({n} replicas), p50", _ms(o["p50_s"]), "ms"),
        f("dedicated p99", _ms(o["p99_s"]), "ms"),
        f(f"multiplexed throughput, concurrency {d['concurrency']}", m["throughput_rps"], "req/s"),
        f("dedicated throughput", o["throughput_rps"], "req/s"),
        f("multiplexed / dedicated latency p50", d["latency_ratio_p50"], "x"),
        f("replica peak RSS: multiplexed (1 replica)", m["memory"]["peak_rss_bytes"] / 2**20, "MiB"),
        f(f"replica peak RSS: dedicated (sum of {n})", o["memory"]["peak_rss_bytes"] / 2**20, "MiB"),
        f("multiplexed / dedicated memory", d["memory_ratio"], "x", ("<", 1.0), "one base in memory instead of n"),
        f("failed requests", float(d["errors"]), "", ("<=", 0.0)),
    ]


def _zt_figures(d: dict) -> list[Figure]:
    f = lambda *a, **k: Figure("zt_repro", *a, **k)  # noqa: E731
    arms, latent = d["arms"], "x".join(map(str, d["settings"]["latent_shape"]))
    zt, default = arms["zt_v"]["spread_ratio"], arms["default_eps"]["spread_ratio"]
    return [
        f(f"data brightness std ({latent} latents)", d["data"]["brightness_std"], ""),
        f("ZT-SNR + v-pred: sample / data brightness std", zt, "x", anchor="paper: reaches the data's range"),
        f("default + eps (leading DDIM): sample / data std", default, "x", anchor="paper: stays mid-grey"),
        f("default + eps (trailing): sample / data std", arms["default_eps_trailing"]["spread_ratio"], "x"),
        f("ZT spread / default spread", zt / default if default else None, "x", (">", 1.0),
          "Lin et al. 2023, sec. 3", claim=True),
    ]


_FIGURES = {"curation": _curation_figures, "training": _training_figures, "caching": _caching_figures,
            "serving": _serving_figures, "multiplex": _multiplex_figures, "zt_repro": _zt_figures,
            "input": _input_figures}


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    text = f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return f"{text} {unit}".strip()


def table(report: dict) -> str:
    """Plain-text table: figure, measured, target, anchor, status; a header with machine and load."""
    m = report["meta"]
    head = (f"CPU benchmarks {m['date']} on {m['host']} ({m['cpu']}, {m['cores']} cores); load average "
            f"(1/5/15 min) {m['load_start']} at start, {m.get('load_end')} at end; {m.get('total_s', 0):.0f} s")
    precision = _precision_line(m, report["sections"])
    rows = [("section", "figure", "measured", "target", "anchor", "status")]
    for fig in report["figures"]:
        target = f"{fig['target'][0]} {fig['target'][1]:g} {fig['unit']}".strip() if fig["target"] else "-"
        rows.append((fig["section"], fig["name"], _fmt(fig["value"], fig["unit"]), target, fig["anchor"] or "-",
                     fig["status"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    loads = "; ".join(f"{k} {v['load_before'][0]:.1f}->{v['load_after'][0]:.1f} ({v['wall_s']:.0f} s)"
                      for k, v in report["sections"].items())
    return "\n".join([head, *precision, f"per section: load (1 min) before->after (wall): {loads}", "", *lines])


def _precision_line(meta: dict, sections: dict[str, dict]) -> list[str]:
    """``torch CPU kernels AVX512, bf16 in hardware: yes; training, input, caching computed in bf16 (configured
    bf16)``, from the report's meta and the sections that trained (none: no line)."""
    used = {name: (d["precision_used"], d["precision"]) for name, d in sections.items() if "precision_used" in d}
    if "cpu_capability" not in meta and not used:
        return []
    parts = []
    if "cpu_capability" in meta:
        parts.append(f"torch CPU kernels {meta['cpu_capability']}, bf16 in hardware: "
                     f"{'yes' if meta['bf16_native'] else 'no (emulated: bf16 runs as fp32)'}")
    for pair in sorted(set(used.values())):
        names = ", ".join(name for name, p in used.items() if p == pair)
        parts.append(f"{names} computed in {pair[0]} (configured {pair[1]})")
    return ["; ".join(parts)]


# --- results files and the docs' table ------------------------------------------------------------------------


def _target(fig: dict) -> str:
    if not fig.get("target"):
        return "-"
    op, bound = fig["target"]
    return f"{op} {bound:g} {fig.get('unit', '')}".strip()


def _status(fig: dict) -> str:
    if fig.get("status"):
        return fig["status"]
    target = tuple(fig["target"]) if fig.get("target") else None
    return Figure(fig["section"], fig["name"], fig.get("value"), fig.get("unit", ""), target,
                  fig.get("anchor", ""), fig.get("claim", False)).status


def _cell(text: str) -> str:
    return (text or "-").replace("|", "\\|")


def _rows(figs: list[dict], with_section: bool = True) -> list[str]:
    head = ["section", "figure", "measured", "target", "anchor", "status"][0 if with_section else 1:]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fig in figs:
        cells = [fig["section"]] if with_section else []
        cells += [fig["name"].strip(), _fmt(fig.get("value"), fig.get("unit", "")), _target(fig),
                  fig.get("anchor") or "-", _status(fig)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def run_line(report: dict) -> str:
    """``2026-11-30T20:03+0000 on cpu2core (2 cores), commit 75e5d71, 459 s``: when, where and what a results
    file measured (a field it lacks reads ``not recorded``)."""
    m = report.get("meta", {})
    commit = (m.get("git_commit") or "not recorded")[:12]
    total = f"{m['total_s']:.0f} s" if m.get("total_s") is not None else "total time not recorded"
    cpu = ", ".join(str(x) for x in (m.get("cpu"), f"{m['cores']} cores" if m.get("cores") else None) if x)
    return (f"{m.get('date') or 'date not recorded'} on {report.get('hardware') or 'unknown hardware'}"
            f"{f' ({cpu})' if cpu else ''}, commit {commit}, {total}")


def render_markdown(report: dict, name: str = "") -> str:
    """The ``.md`` beside a results file: the run's line, its source where it was not written by a run, the
    machine's load, every figure next to its target and anchor, and the run's notes."""
    m = report.get("meta", {})
    lines = [f"# make bench, {(m.get('date') or '')[:10]}", "",
             f"`make bench` ({m.get('config') or 'tiny'} preset) {run_line(report)}."
             + (f" The JSON beside this file (`{name}`) holds the report." if name else "")]
    if report.get("source"):
        lines += ["", f"Source: {report['source']}."]
    load = m.get("load") or (f"load average (1/5/15 min) {m['load_start']} at start, {m.get('load_end')} at end"
                             if m.get("load_start") else "")
    if load:
        lines += ["", f"Machine load: {load}."]
    precision = _precision_line(m, report.get("sections", {}))
    if precision:
        lines += ["", *precision]
    lines += ["", *_rows(report.get("figures", []))]
    if report.get("sections"):
        loads = "; ".join(f"{k} {v['load_before'][0]:.1f} -> {v['load_after'][0]:.1f} ({v['wall_s']:.0f} s)"
                          for k, v in report["sections"].items() if "load_before" in v)
        if loads:
            lines += ["", f"Per section, 1-minute load before -> after (wall): {loads}."]
    if report.get("notes"):
        lines += ["", "Notes:", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


def _started(path: Path) -> tuple[str, str]:
    try:
        date = json.loads(path.read_text()).get("meta", {}).get("date") or ""
    except (OSError, ValueError):
        date = ""
    parts = path.stem.split("_")
    return (date or (parts[2] if len(parts) > 2 else ""), path.name)


def newest_results(results_dir: Path = RESULTS) -> Path | None:
    """The newest full run in ``results_dir`` (``bench_*.json``, by the date it started, then by name)."""
    runs = sorted(results_dir.glob("bench_*.json"), key=_started)
    return runs[-1] if runs else None


def docs_table(path: Path) -> str:
    """The block docs/benchmarks.md shows between its markers: which results file, when, on what, at which
    commit, then each figure that has a target or an anchor (the full table is in the ``.md`` beside it)."""
    report = json.loads(path.read_text())
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    figs = [f for f in report.get("figures", []) if f.get("target") or f.get("anchor")]
    lines = [f"From `{rel}` (every figure: `{rel.with_suffix('.md')}`): {run_line(report)}."]
    if report.get("source"):
        lines += ["", f"Source: {report['source']}."]
    return "\n".join([*lines, "", *_rows(figs)])


def render_docs(doc: Path = DOC, results_dir: Path = RESULTS) -> str:
    """``doc``'s text with the block between ``DOC_BEGIN`` and ``DOC_END`` made from ``newest_results``."""
    text = doc.read_text()
    if text.count(DOC_BEGIN) != 1 or text.count(DOC_END) != 1 or text.index(DOC_BEGIN) > text.index(DOC_END):
        raise ValueError(f"{doc}: needs one {DOC_BEGIN} line, then one {DOC_END} line")
    newest = newest_results(results_dir)
    block = docs_table(newest) if newest else f"No full run in `{results_dir}` yet."
    head, rest = text.split(DOC_BEGIN)
    return f"{head}{DOC_BEGIN}\n{block}\n{DOC_END}{rest.split(DOC_END, 1)[1]}"


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--render-docs", action="store_true",
                   help="rewrite docs/benchmarks.md's results table from the newest bench/results/bench_*.json")
    p.add_argument("--render-md", metavar="FILE.json", nargs="+", default=[],
                   help="(re)write the .md beside each results file")
    args = p.parse_args(argv)
    if not (args.render_docs or args.render_md):
        p.error("nothing to do: give --render-docs or --render-md (make bench runs the benchmarks)")
    for name in args.render_md:
        path = Path(name)
        path.with_suffix(".md").write_text(render_markdown(json.loads(path.read_text()), path.name))
        print(path.with_suffix(".md"))
    if args.render_docs:
        DOC.write_text(render_docs())
        print(DOC)


if __name__ == "__main__":
    main()
