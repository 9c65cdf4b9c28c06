"""The demo's chain at SDXL's real size, on one machine: every stage measured for time, memory and disk.

    make smoke-sdxl                                          # the sdxl_cpu preset: SDXL base, random weights
    python flows/smoke.py --config flows/configs/sdxl_cpu.yaml [--set key=value ...] [--json OUT]
    python flows/smoke.py --config flows/configs/tiny.yaml --set train.method=lora   # the same chain, in minutes

Stages, each through the flow a user runs, on one local Ray cluster (as ``make demo``):
checkpoint (first, while the disk holds nothing else: a full fine-tune's UNet and optimizer state written
and read back, locally and on an S3-compatible server on loopback -- ``bench/checkpoint_size.py``; the S3
copy is the largest block of the full-size UNet whose checkpoint fits 3 GB (its mid block), since moto's
server assembles a multipart upload in memory and a 10 GB object does not fit; the local copy is removed
once read back) -> curate -> train (a LoRA through Ray Train on Ray Data; the adapter's base registered
once) -> evaluate -> promote -> serve (one image over the OpenAI endpoint) -> export (the base as one fp16
single file, the adapter in kohya's layout) -> reload (the single file through vanilla diffusers'
``from_single_file``, every tensor checked against the registered base).

Before any of it, the free space under ``state_dir`` is checked against what the run needs (``disk_needed``:
three copies of the base at its stored precision, the most the disk holds at once, while MLflow logs the
base) -- too little is a one-line error, exit 2. For each stage: wall time; peak resident memory of this
process's tree (every Ray process included), sampled twice a second, and of its largest process, each also
as memory no file backs (anonymous + shared: what a read-only mapped weights file adds to RSS is page cache
the kernel can drop, and is left out there); bytes
added under ``state_dir``, and the peak of the bytes used on its filesystem over the start. Then where the weights lie
(every file over 64 MB, by place) and the checks. The memory plan's prediction for the training worker
(``flows/plan.py``) is printed beside the measured peak of the largest process during training.

Exit status: 0 when every check holds; 1 when a stage fails or a check does not hold. The time and memory
targets are reported (PASS or MISS) and do not change the exit status: they are measurements.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import requests

from flows._common import REPO, banner, fail, load, parser, run_flow, setup_logging

GB = 1e9
TARGET_TOTAL_S = 40 * 60
TARGET_STAGE_RSS = 20 * GB
TARGET_DISK_PEAK = 24 * GB
DISK_MARGIN = 2 * GB
PLAN_TOLERANCE = 0.20
LARGE_FILE = 64 * 2**20
PROMPT = "a photograph of an astronaut, high detail"


@dataclass
class Stage:
    name: str
    wall_s: float = 0.0
    peak_tree_rss: int = 0
    peak_process_rss: int = 0
    peak_process: str = ""
    peak_tree_anon: int = 0
    peak_process_anon: int = 0
    """The same peaks of memory no file backs (anonymous + shared memory: ``resident_anon``)."""
    disk_added: int = 0
    peak_disk_used: int = 0
    """The most bytes used on ``state_dir``'s filesystem during the stage, over the run's start."""
    result: dict = field(default_factory=dict)


def resident_anon(proc: psutil.Process) -> int:
    """Resident bytes of ``proc`` that no file backs: anonymous memory plus shared memory (``RssAnon`` +
    ``RssShmem``, Ray's object store included), what the kernel cannot drop under pressure. A file mapped
    read-only (safetensors weights being cast) counts in RSS as page cache the kernel reclaims; not here.
    Where ``/proc`` has no such lines, the RSS."""
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssShmem")))
        return sum(int(v.split()[0]) * 1024 for v in fields.values()) if len(fields) == 2 else proc.memory_info().rss
    except (OSError, ValueError):
        return proc.memory_info().rss


class MemorySampler:
    """Peak RSS of a process tree (the sum over the root and all its descendants) and of its largest process,
    the same peaks of memory no file backs (``resident_anon``), and peak bytes used on the filesystem of
    ``disk`` over ``disk_base``, sampled every ``interval_s`` in a thread."""

    def __init__(self, root: int, disk: Path, disk_base: int, interval_s: float = 0.5) -> None:
        self.root, self.interval_s = psutil.Process(root), interval_s
        self.disk, self.disk_base = disk, disk_base
        self.peak_tree = self.peak_process = self.peak_disk = self.peak_tree_anon = self.peak_process_anon = 0
        self.peak_name = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        tree = tree_anon = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                rss, anon = proc.memory_info().rss, resident_anon(proc)
                name = proc.name()
            except psutil.Error:  # gone between the listing and the read
                continue
            tree, tree_anon = tree + rss, tree_anon + anon
            if rss > self.peak_process:
                self.peak_process, self.peak_name = rss, name
            self.peak_process_anon = max(self.peak_process_anon, anon)
        self.peak_tree = max(self.peak_tree, tree)
        self.peak_tree_anon = max(self.peak_tree_anon, tree_anon)
        self.peak_disk = max(self.peak_disk, disk_used(self.disk) - self.disk_base)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _files(root: Path) -> dict[tuple[int, int], list[Path]]:
    """The regular files under ``root`` by inode: hard links to one file are one entry (stored once)."""
    found: dict[tuple[int, int], list[Path]] = {}
    for p in sorted(root.rglob("*")) if root.exists() else []:
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            found.setdefault((st.st_dev, st.st_ino), []).append(p)
    return found


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def disk_used(path: Path) -> int:
    """Bytes used on the filesystem of ``path`` (its nearest existing folder)."""
    return shutil.disk_usage(_existing(path)).used


def tree_bytes(root: Path) -> int:
    return sum(paths[0].stat().st_size for paths in _files(root).values())


def large_files(root: Path) -> list[dict]:
    """Every file over ``LARGE_FILE`` under ``root``, once however many hard links it has: its place (the first
    folder under root of its first path), path, size and the other names it has (``links``)."""
    rows = []
    for paths in _files(root).values():
        size = paths[0].stat().st_size
        if size > LARGE_FILE:
            rel = [str(p.relative_to(root)) for p in paths]
            rows.append({"place": Path(rel[0]).parts[0], "path": rel[0], "bytes": size, "links": rel[1:]})
    return sorted(rows, key=lambda r: r["path"])


class Chain:
    def __init__(self, cfg, args, env: dict[str, str]) -> None:
        self.cfg, self.args, self.env = cfg, args, env
        self.common = ["--config", args.config, *[x for o in args.overrides for x in ("--set", o)]]
        self.state = cfg.state_path()
        self.stages: list[Stage] = []
        self.disk_base = disk_used(self.state)

    def stage(self, name: str, text: str, work) -> dict:
        banner(f"{len(self.stages) + 1} {name}: {text}")
        before = tree_bytes(self.state)
        start = time.perf_counter()
        with MemorySampler(os.getpid(), self.state, self.disk_base) as mem:
            result = work() or {}
        stage = Stage(name, round(time.perf_counter() - start, 1), mem.peak_tree, mem.peak_process, mem.peak_name,
                      mem.peak_tree_anon, mem.peak_process_anon, tree_bytes(self.state) - before, mem.peak_disk, result)
        self.stages.append(stage)
        print(f"  {name}: {stage.wall_s:.0f} s, peak RSS {stage.peak_tree_rss / GB:.1f} GB (largest process "
              f"{stage.peak_process_rss / GB:.1f} GB, {stage.peak_process}; not file-backed "
              f"{stage.peak_tree_anon / GB:.1f} / {stage.peak_process_anon / GB:.1f} GB), "
              f"disk +{stage.disk_added / GB:.2f} GB "
              f"(peak +{stage.peak_disk_used / GB:.2f} GB)", file=sys.stderr, flush=True)
        return result

    def flow(self, script: str, *args: str) -> dict:
        return run_flow(script, *self.common, *args, env=self.env)

    def run(self) -> dict:
        self.stage("checkpoint", "a full fine-tune's state written and read back, local and S3, then removed",
                   self.checkpoint)
        self.stage("curate", "Ray Data into 256 px buckets", lambda: self.flow("curate.py"))
        trained = self.stage("train", "LoRA through Ray Train (the base registered first)",
                             lambda: self.flow("train.py"))
        model, version = trained["model_name"], trained["version"]
        uri = f"models:/{model}/{version}"
        self.stage("evaluate", uri, lambda: self.flow("evaluate.py", "--model-uri", uri))
        self.stage("promote", f"{uri} to @champion",
                   lambda: self.flow("promote.py", "--model", model, "--version", version))
        base_uri = self.base_of(model, version)
        self.stage("serve", f"{base_uri} with models:/{model}@champion, one image", lambda: self.serve(model, base_uri))
        exports = self.stage("export", f"{base_uri} as one fp16 file, {uri} in kohya's layout",
                             lambda: {"base": self.flow("export.py", "--model-uri", base_uri),
                                      "adapter": self.flow("export.py", "--model-uri", uri)})
        self.stage("reload", "the single file through vanilla diffusers, every tensor checked",
                   lambda: self.reload(exports["base"]["path"], base_uri))
        return {"model": model, "version": version, "base": base_uri}

    def serve(self, model: str, base_uri: str) -> dict:
        """The Serve app on the adapter's base; the request names the adapter (``model``: its @champion)."""
        from deploy.launch import start, stop  # on first use: --help and the disk check load no Ray, MLflow or torch

        size = self.cfg.serve.default_size
        out_png = self.cfg.state_path("smoke", f"{model}.png")
        out_png.parent.mkdir(parents=True, exist_ok=True)
        try:
            base = start(self.cfg, str(Path(self.args.config).resolve()),
                         [*self.args.overrides, f"serve.model_uri={base_uri}"], healthy_timeout_s=1800)
            t0 = time.perf_counter()
            resp = requests.post(f"{base}/v1/images/generations", timeout=1800, json={
                "model": f"{model}@champion", "prompt": PROMPT, "n": 1, "size": f"{size}x{size}",
                "response_format": "b64_json", "seed": 0, "steps": self.cfg.serve.default_steps})
            seconds = time.perf_counter() - t0
            if resp.status_code != 200:
                raise RuntimeError(f"the endpoint answered {resp.status_code}: {resp.text[:300]}")
            out_png.write_bytes(base64.b64decode(resp.json()["data"][0]["b64_json"]))
        finally:
            stop()
        body = resp.json()
        return {"image": str(out_png), "request_s": round(seconds, 1), "size": size,
                "steps": self.cfg.serve.default_steps, "model": body.get("model"),
                "model_version": body.get("model_version"), "base_model": body.get("base_model")}

    def base_of(self, model: str, version: str) -> str:
        import mlflow  # on first use: --help and the disk check load no Ray, MLflow or torch

        from components.registry.tracking import setup_tracking

        setup_tracking(self.cfg)
        return mlflow.MlflowClient().get_model_version(model, version).tags["base_model_uri"]

    def reload(self, path: str, base_uri: str) -> dict:
        out = self.cfg.state_path("smoke", "reload.json")
        cmd = [sys.executable, "-m", "bench.single_file_check", "--config", self.args.config,
               *[x for o in self.args.overrides for x in ("--set", o)], "--file", path, "--model-uri", base_uri,
               "--json", str(out)]
        subprocess.run(cmd, cwd=REPO, env=self.env, check=True)
        return json.loads(out.read_text())

    def checkpoint(self) -> dict:
        """``bench/checkpoint_size.py`` into ``smoke/checkpoint`` and S3; the local copy removed once read back
        (the figures are the result; the files are the size of a full fine-tune's state)."""
        out = self.cfg.state_path("smoke", "checkpoint.json")
        target = self.cfg.state_path("smoke", "checkpoint")
        full = self.cfg.model.source == "sdxl-random"
        cmd = [sys.executable, "-m", "bench.checkpoint_size", "--size", "full" if full else "tiny",
               "--optimizer", "adamw8bit", "--target", str(target), "--target", "s3://smoke/checkpoint",
               "--s3-endpoint-url", "moto", "--s3-size", "block" if full else "tiny", "--json", str(out)]
        try:
            subprocess.run(cmd, cwd=REPO, env=self.env, check=True)
        finally:
            shutil.rmtree(target, ignore_errors=True)
        return json.loads(out.read_text())


def planned(cfg) -> tuple[int, int]:
    """(the memory plan's allocated peak for the preset's training step -- on a CPU there is no CUDA context
    and no caching allocator, so the allocated peak is the whole prediction --, the base's parameters)."""
    # on first use: --help and the disk check load no Ray, MLflow or torch
    from components.training.memory.plan import count_params, plan_for, sdxl_models

    models = sdxl_models(cfg)
    return plan_for(cfg).allocated_peak, sum(count_params(m) for m in models.values())


def stored_bytes(cfg, params: int) -> int:
    """The base's bytes as the registry stores it: ``sdxl-random``'s values are fp16 numbers, stored in fp16
    (``components.diffusion.sdxl.save_pipeline``); the tiny model's are fp32."""
    # on first use: --help and the disk check load no Ray, MLflow or torch
    from components.diffusion.sdxl_base import VALUES_DTYPE
    from components.diffusion.source_kinds import SDXL_RANDOM

    return params * (VALUES_DTYPE.itemsize if cfg.model.source == SDXL_RANDOM else 4)


def disk_needed(base_stored: int) -> int:
    """Free bytes the run needs under ``state_dir``: three copies of the base (the staged export, MLflow's
    local copy of the model and the registry's) are on disk together while the base is logged; every other
    stage holds less (the checkpoint, a full fine-tune's fp32 UNet and 8-bit AdamW state, comes first and
    is removed)."""
    return 3 * base_stored + DISK_MARGIN


def checks(chain: Chain, predicted: int, base_params: int, base_bytes: int, files: list[dict]) -> list[dict]:
    by_name = {s.name: s for s in chain.stages}
    total = sum(s.wall_s for s in chain.stages)
    reload = by_name["reload"].result
    adapter = by_name["export"].result["adapter"]
    train_peak = by_name["train"].peak_process_rss
    train_anon = by_name["train"].peak_process_anon
    disk_peak = max(s.peak_disk_used for s in chain.stages)
    places: dict[str, int] = {}
    for f in files:
        places[f["place"]] = places.get(f["place"], 0) + f["bytes"]
    rows = [
        ("the whole run", f"{total / 60:.1f} min", f"< {TARGET_TOTAL_S / 60:.0f} min", total < TARGET_TOTAL_S, False),
        ("largest stage RSS (process tree)", f"{max(s.peak_tree_rss for s in chain.stages) / GB:.1f} GB",
         f"<= {TARGET_STAGE_RSS / GB:.0f} GB", all(s.peak_tree_rss <= TARGET_STAGE_RSS for s in chain.stages), False),
        ("largest stage memory no file backs (anon + shmem, process tree)",
         f"{max(s.peak_tree_anon for s in chain.stages) / GB:.1f} GB", f"<= {TARGET_STAGE_RSS / GB:.0f} GB",
         all(s.peak_tree_anon <= TARGET_STAGE_RSS for s in chain.stages), False),
        ("peak disk used over the start", f"{disk_peak / GB:.1f} GB (planned {disk_needed(base_bytes) / GB:.1f})",
         f"<= {TARGET_DISK_PEAK / GB:.0f} GB", disk_peak <= TARGET_DISK_PEAK, False),
        ("training peak: plan vs measured (largest process)", f"{predicted / GB:.2f} vs {train_peak / GB:.2f} GB",
         f"within {PLAN_TOLERANCE:.0%}", abs(train_peak - predicted) <= PLAN_TOLERANCE * train_peak, False),
        ("training peak: plan vs measured (largest process, anon + shmem)",
         f"{predicted / GB:.2f} vs {train_anon / GB:.2f} GB", f"within {PLAN_TOLERANCE:.0%}",
         abs(train_anon - predicted) <= PLAN_TOLERANCE * train_anon, False),
        ("single file reloaded: missing / unexpected keys", f"{reload['missing']} / {reload['unexpected']}", "0 / 0",
         reload["missing"] == 0 and reload["unexpected"] == 0, True),
        ("single file reloaded: tensors equal to the base's", f"{reload['equal']} of {reload['tensors']}", "all",
         reload["equal"] == reload["tensors"] > 0, True),
        ("adapter export (kohya) bytes", f"{adapter['bytes'] / 2**20:.1f} MiB", "no copy of the base",
         adapter["bytes"] < 0.05 * base_bytes, True),
        ("copies of the base in the registry (mlartifacts)", f"{places.get('mlartifacts', 0) / base_bytes:.2f}",
         "<= 1 (the base's files)", places.get("mlartifacts", 0) <= 1.02 * base_bytes, True),
        ("copies in the download cache", f"{places.get('cache', 0) / base_bytes:.2f}", "0 (read in place)",
         places.get("cache", 0) == 0, True),
        ("fp16 copies in exports/", f"{places.get('exports', 0) / (2 * base_params):.2f}", "<= 1 (the single file)",
         places.get("exports", 0) <= 1.02 * 2 * base_params, True),
    ]
    rows += [(f"checkpoint to {c['target']} ({c['size']} size): verified",
              f"{c['bytes'] / GB:.2f} GB, write {c['write_s']:.0f} s, read {c['read_s']:.0f} s", "read back equal",
              bool(c["verified"]), True)
             for c in by_name["checkpoint"].result["targets"]]
    rows += [(f"checkpoint to {c['target']}: a killed write", "cut one refused, previous verified"
              if c["killed_write_refused"] and c["previous_after_kill_verified"] else
              f"cut refused {c['killed_write_refused']}, previous verified {c['previous_after_kill_verified']}",
              "cut one refused, previous verified", c["killed_write_refused"] and c["previous_after_kill_verified"],
              True) for c in by_name["checkpoint"].result["targets"]]
    return [{"check": c, "measured": m, "target": t, "status": ("PASS" if ok else ("FAIL" if hard else "MISS")),
             "fails_run": hard} for c, m, t, ok, hard in rows]


def table(stages: list[Stage], checked: list[dict], files: list[dict]) -> str:
    lines = [f"{'stage':<11}{'wall s':>8}{'peak RSS GB':>13}{'largest proc GB':>17}  {'process':<22}"
             f"{'anon+shm GB':>13}{'largest':>9}{'disk +GB':>9}{'disk peak GB':>14}"]
    lines += [f"{s.name:<11}{s.wall_s:>8.0f}{s.peak_tree_rss / GB:>13.1f}{s.peak_process_rss / GB:>17.1f}  "
              f"{s.peak_process[:21]:<22}{s.peak_tree_anon / GB:>13.1f}{s.peak_process_anon / GB:>9.1f}"
              f"{s.disk_added / GB:>9.2f}{s.peak_disk_used / GB:>14.2f}" for s in stages]
    lines.append(f"{'total':<11}{sum(s.wall_s for s in stages):>8.0f}")
    lines.append("\nweights on disk (files over 64 MB):")
    lines += [f"  {f['bytes'] / GB:7.2f} GB  {f['path']}" + (f"  (also {', '.join(f['links'])}: a hard link)"
                                                          if f["links"] else "") for f in files]
    lines.append("\nchecks:")
    lines += [f"  {c['status']:<5} {c['check']}: {c['measured']} (target {c['target']})" for c in checked]
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--json", help="where to write the results (default: <state>/smoke/<preset>.json)")
    args = p.parse_args()
    cfg = load(args)
    setup_logging()
    import ray  # on first use: --help and the disk check load no Ray, MLflow or torch

    from components.cluster import ray_session

    predicted, base_params = planned(cfg)
    base_bytes = stored_bytes(cfg, base_params)
    state = cfg.state_path()
    free = shutil.disk_usage(_existing(state)).free
    if free < disk_needed(base_bytes):
        fail(f"the smoke needs {disk_needed(base_bytes) / GB:.1f} GB free under {state} and "
             f"{free / GB:.1f} GB are: free some, or set state_dir to a larger disk")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with ray_session(serve_latency=True):
        chain = Chain(cfg, args, dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address))
        try:
            names = chain.run()
            failed = None
        except (SystemExit, subprocess.CalledProcessError, RuntimeError, requests.RequestException) as err:
            names, failed = {}, f"{type(err).__name__}: {err}"
    files = large_files(chain.state)
    if failed:
        print(table(chain.stages, [], files), file=sys.stderr)
        print(f"smoke failed in stage {len(chain.stages) + 1}: {failed}", file=sys.stderr)
        raise SystemExit(1)
    checked = checks(chain, predicted, base_params, base_bytes, files)
    report = {"preset": cfg.name, "started": started, "machine": machine(), **names,
              "stages": [asdict(s) for s in chain.stages], "total_s": round(sum(s.wall_s for s in chain.stages), 1),
              "planned_train_peak_bytes": predicted, "base_params": base_params,
              "base_stored_bytes": base_bytes, "disk_needed_bytes": disk_needed(base_bytes),
              "files": files, "checks": checked}
    out = Path(args.json) if args.json else cfg.state_path("smoke", f"{cfg.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(table(chain.stages, checked, files), file=sys.stderr)
    print(json.dumps({"json": str(out), "total_s": report["total_s"],
                      "failed": [c["check"] for c in checked if c["status"] == "FAIL"]}))
    if any(c["status"] == "FAIL" for c in checked):
        raise SystemExit(1)


def machine() -> dict:
    import torch  # on first use: --help and the disk check load no Ray, MLflow or torch

    return {"cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total, "python": platform.python_version(),
            "torch": torch.__version__, "processor": platform.processor() or platform.machine()}


if __name__ == "__main__":
    main()
