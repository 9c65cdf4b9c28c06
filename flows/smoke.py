"""The demo's chain at SDXL's real size, on one machine: every stage measured for time, memory and disk.

    make smoke-sdxl                                          # the sdxl_cpu preset: SDXL base, random weights
    python flows/smoke.py --config flows/configs/sdxl_cpu.yaml [--set key=value ...] [--json OUT]
    python flows/smoke.py --config flows/configs/tiny.yaml --set train.method=lora   # the same chain, in minutes

Stages, each through the flow a user runs, on one local Ray cluster (as ``make demo``):
curate -> train (a LoRA through Ray Train on Ray Data; the adapter's base registered once) -> evaluate ->
promote -> serve (one image over the OpenAI endpoint) -> export (the base as one fp16 single file, the adapter
in kohya's layout) -> reload (the single file through vanilla diffusers' ``from_single_file``, every tensor
checked against the registered base) -> checkpoint (a full fine-tune's UNet and optimizer state written and
read back, locally and on an S3-compatible server on loopback: ``bench/checkpoint_size.py``; the S3 copy at
the tiny size, since moto's server assembles a multipart upload in memory and a 10 GB object does not fit).

For each stage: wall time; peak resident memory of this process's tree (every Ray process included), sampled
twice a second, and of its largest process; bytes added under ``state_dir``. Then where the weights lie
(every file over 64 MB, by place) and the checks. The memory plan's prediction for the training worker
(``flows/plan.py``) is printed beside the measured peak of the largest process during training.

Exit status: 0 when every check holds; 1 when a stage fails or a check does not hold. The time and memory
targets are reported (PASS or MISS) and do not change the exit status: they are measurements.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import requests

if __package__ in (None, ""):  # run as `python flows/smoke.py`: the repository's packages are importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows._common import REPO, banner, load, parser, run_flow, setup_logging  # noqa: E402

GB = 1e9
TARGET_TOTAL_S = 40 * 60
TARGET_STAGE_RSS = 20 * GB
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
    disk_added: int = 0
    result: dict = field(default_factory=dict)


class MemorySampler:
    """Peak RSS of a process tree (the sum over the root and all its descendants) and of its largest process,
    sampled every ``interval_s`` in a thread."""

    def __init__(self, root: int, interval_s: float = 0.5) -> None:
        self.root, self.interval_s = psutil.Process(root), interval_s
        self.peak_tree = self.peak_process = 0
        self.peak_name = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        tree = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss
                name = proc.name()
            except psutil.Error:  # gone between the listing and the read
                continue
            tree += rss
            if rss > self.peak_process:
                self.peak_process, self.peak_name = rss, name
        self.peak_tree = max(self.peak_tree, tree)

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

    def stage(self, name: str, text: str, work) -> dict:
        banner(f"{len(self.stages) + 1} {name}: {text}")
        before = tree_bytes(self.state)
        start = time.perf_counter()
        with MemorySampler(os.getpid()) as mem:
            result = work() or {}
        stage = Stage(name, round(time.perf_counter() - start, 1), mem.peak_tree, mem.peak_process, mem.peak_name,
                      tree_bytes(self.state) - before, result)
        self.stages.append(stage)
        print(f"  {name}: {stage.wall_s:.0f} s, peak RSS {stage.peak_tree_rss / GB:.1f} GB (largest process "
              f"{stage.peak_process_rss / GB:.1f} GB, {stage.peak_process}), disk +{stage.disk_added / GB:.2f} GB",
              file=sys.stderr, flush=True)
        return result

    def flow(self, script: str, *args: str) -> dict:
        return run_flow(script, *self.common, *args, env=self.env)

    def run(self) -> dict:
        self.stage("curate", "Ray Data into 256 px buckets", lambda: self.flow("curate.py"))
        trained = self.stage("train", "LoRA through Ray Train (the base registered first)", lambda: self.flow("train.py"))
        model, version = trained["model_name"], trained["version"]
        uri = f"models:/{model}/{version}"
        self.stage("evaluate", uri, lambda: self.flow("evaluate.py", "--model-uri", uri))
        self.stage("promote", f"{uri} to @champion", lambda: self.flow("promote.py", "--model", model, "--version", version))
        base_uri = self.base_of(model, version)
        self.stage("serve", f"{base_uri} with models:/{model}@champion, one image", lambda: self.serve(model, base_uri))
        exports = self.stage("export", f"{base_uri} as one fp16 file, {uri} in kohya's layout",
                             lambda: {"base": self.flow("export.py", "--model-uri", base_uri),
                                      "adapter": self.flow("export.py", "--model-uri", uri)})
        self.stage("reload", "the single file through vanilla diffusers, every tensor checked",
                   lambda: self.reload(exports["base"]["path"], base_uri))
        self.stage("checkpoint", "a full fine-tune's state written and read back, local and S3",
                   self.checkpoint)
        return {"model": model, "version": version, "base": base_uri}

    def serve(self, model: str, base_uri: str) -> dict:
        """The Serve app on the adapter's base; the request names the adapter (``model``: its @champion)."""
        from deploy.launch import start, stop

        size = self.cfg.serve.default_size
        out_png = self.cfg.state_path("smoke", f"{model}.png")
        out_png.parent.mkdir(parents=True, exist_ok=True)
        try:
            base = start(self.cfg, str(Path(self.args.config).resolve()),
                         [*self.args.overrides, f"serve.model_uri={base_uri}"], healthy_timeout_s=1800)
            t0 = time.perf_counter()
            resp = requests.post(f"{base}/v1/images/generations", timeout=1800, json={
                "model": f"{model}@champion", "prompt": PROMPT, "n": 1, "size": f"{size}x{size}", "response_format": "b64_json",
                "seed": 0, "steps": self.cfg.serve.default_steps})
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
        import mlflow

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
        out = self.cfg.state_path("smoke", "checkpoint.json")
        size = "full" if self.cfg.model.source == "sdxl-random" else "tiny"
        cmd = [sys.executable, "-m", "bench.checkpoint_size", "--size", size, "--optimizer", "adamw8bit",
               "--target", str(self.cfg.state_path("smoke", "checkpoint")), "--target", "s3://smoke/checkpoint",
               "--s3-endpoint-url", "moto", "--s3-size", "tiny", "--json", str(out)]
        subprocess.run(cmd, cwd=REPO, env=self.env, check=True)
        return json.loads(out.read_text())


def planned(cfg) -> tuple[int, int]:
    """(the memory plan's allocated peak for the preset's training step -- on a CPU there is no CUDA context
    and no caching allocator, so the allocated peak is the whole prediction --, the base's fp32 bytes)."""
    from components.training.memory.plan import count_params, plan_for, sdxl_models

    models = sdxl_models(cfg)
    return plan_for(cfg).allocated_peak, 4 * sum(count_params(m) for m in models.values())


def checks(chain: Chain, predicted: int, base_bytes: int, files: list[dict]) -> list[dict]:
    by_name = {s.name: s for s in chain.stages}
    total = sum(s.wall_s for s in chain.stages)
    reload = by_name["reload"].result
    adapter = by_name["export"].result["adapter"]
    train_peak = by_name["train"].peak_process_rss
    places: dict[str, int] = {}
    for f in files:
        places[f["place"]] = places.get(f["place"], 0) + f["bytes"]
    rows = [
        ("the whole run", f"{total / 60:.1f} min", f"< {TARGET_TOTAL_S / 60:.0f} min", total < TARGET_TOTAL_S, False),
        ("largest stage RSS (process tree)", f"{max(s.peak_tree_rss for s in chain.stages) / GB:.1f} GB",
         f"<= {TARGET_STAGE_RSS / GB:.0f} GB", all(s.peak_tree_rss <= TARGET_STAGE_RSS for s in chain.stages), False),
        ("training peak: plan vs measured (largest process)", f"{predicted / GB:.2f} vs {train_peak / GB:.2f} GB",
         f"within {PLAN_TOLERANCE:.0%}", abs(train_peak - predicted) <= PLAN_TOLERANCE * train_peak, False),
        ("single file reloaded: missing / unexpected keys", f"{reload['missing']} / {reload['unexpected']}", "0 / 0",
         reload["missing"] == 0 and reload["unexpected"] == 0, True),
        ("single file reloaded: tensors equal to the base's", f"{reload['equal']} of {reload['tensors']}", "all",
         reload["equal"] == reload["tensors"] > 0, True),
        ("adapter export (kohya) bytes", f"{adapter['bytes'] / 2**20:.1f} MiB", "no copy of the base",
         adapter["bytes"] < 0.05 * base_bytes, True),
        ("copies of the base in the registry (mlartifacts)", f"{places.get('mlartifacts', 0) / base_bytes:.2f}",
         "<= 1 (the base's fp32 files)", places.get("mlartifacts", 0) <= 1.02 * base_bytes, True),
        ("copies in the download cache", f"{places.get('cache', 0) / base_bytes:.2f}", "0 (read in place)",
         places.get("cache", 0) == 0, True),
        ("copies in exports/", f"{places.get('exports', 0) / base_bytes:.2f}", "<= 0.5 (the fp16 single file)",
         places.get("exports", 0) <= 0.51 * base_bytes, True),
    ]
    rows += [(f"checkpoint to {c['target']} ({c['size']} size): verified", f"{c['bytes'] / GB:.2f} GB, write {c['write_s']:.0f} s, "
              f"read {c['read_s']:.0f} s", "read back equal", bool(c["verified"]), True)
             for c in by_name["checkpoint"].result["targets"]]
    rows += [(f"checkpoint to {c['target']}: a killed write", "cut one refused, previous verified"
              if c["killed_write_refused"] and c["previous_after_kill_verified"] else
              f"cut refused {c['killed_write_refused']}, previous verified {c['previous_after_kill_verified']}",
              "cut one refused, previous verified", c["killed_write_refused"] and c["previous_after_kill_verified"],
              True) for c in by_name["checkpoint"].result["targets"]]
    return [{"check": c, "measured": m, "target": t, "status": ("PASS" if ok else ("FAIL" if hard else "MISS")),
             "fails_run": hard} for c, m, t, ok, hard in rows]


def table(stages: list[Stage], checked: list[dict], files: list[dict]) -> str:
    lines = [f"{'stage':<11}{'wall s':>8}{'peak RSS GB':>13}{'largest proc GB':>17}  {'process':<22}{'disk +GB':>9}"]
    lines += [f"{s.name:<11}{s.wall_s:>8.0f}{s.peak_tree_rss / GB:>13.1f}{s.peak_process_rss / GB:>17.1f}  "
              f"{s.peak_process[:21]:<22}{s.disk_added / GB:>9.2f}" for s in stages]
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
    import ray

    from components.cluster import ray_session

    predicted, base_bytes = planned(cfg)
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
    checked = checks(chain, predicted, base_bytes, files)
    report = {"preset": cfg.name, "started": started, "machine": machine(), **names,
              "stages": [asdict(s) for s in chain.stages], "total_s": round(sum(s.wall_s for s in chain.stages), 1),
              "planned_train_peak_bytes": predicted, "base_fp32_bytes": base_bytes,
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
    import platform

    import torch

    return {"cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total, "python": platform.python_version(),
            "torch": torch.__version__, "processor": platform.processor() or platform.machine()}


if __name__ == "__main__":
    main()
