"""Training on a real local Ray cluster: the run, its MLflow record, faults, resume, job submission."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import mlflow
import psutil
import pytest
import ray
import requests
from ray.util.state import list_tasks
from safetensors.torch import load_file

from components.config import load_config
from components.dataset import read_manifest
from components.diffusion.tiny import build_tiny
from components.training.batches import ShardRows, epoch_plan, epoch_shares, read_index, source_counts
from components.training.driver import RUN_NAME_TAG, mixture, run_training
from components.training.loop import as_metric, batch_hash
from tests.fixtures.processes import REPO, free_port, subprocess_env, wait_for_port
from tests.synthetic import write_synthetic_curated

pytestmark = pytest.mark.slow

SMALL = [
    "train.batch_size=2", "train.val_image_size=64", "train.val_steps=2", "train.val_timesteps=[500,999]",
    "train.val_prompts=['a cat']", "train.lr.warmup_steps=1",
    "train.log_flush_s=0",  # live: every step reaches MLflow at once, so a restart recomputes logged steps
]


def small_cfg(tmp_path: Path, *extra: str, sources: dict[str, float] | None = None):
    """The tiny preset at test size, every state location under ``tmp_path``. The MLflow store is named
    explicitly: left to default, a run in this process would follow an MLFLOW_TRACKING_URI that an earlier
    test's ``mlflow.set_tracking_uri`` exported, while a flow run as a subprocess (whose environment drops
    it) uses the state directory's store; a resumed run then logged into another store than its first part
    (seen in test_faults_checkpoint.py, which runs both)."""
    data = write_synthetic_curated(tmp_path / "data", n_train=12, n_val=2, size=(64, 64), sources=sources)
    overrides = [
        f"state_dir={tmp_path / 'state'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'state'}/mlflow.db",
        f"train.data={data}", f"train.storage_path={tmp_path / 'ray'}", *SMALL, *extra,
    ]
    return load_config(REPO / "flows/configs/tiny.yaml", overrides), overrides


def history(cfg, run_id: str, key: str) -> list[int]:
    mlflow.set_tracking_uri(f"sqlite:///{cfg.state_dir}/mlflow.db")
    return sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def values(cfg, run_id: str, key: str) -> dict[int, float]:
    """step -> value of a metric's history (each step once, which ``history`` checks)."""
    mlflow.set_tracking_uri(f"sqlite:///{cfg.state_dir}/mlflow.db")
    return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run_id, key)}


def planned_source_counts(cfg, steps: int, world: int, mode: str = "global") -> dict[str, int]:
    """Rows drawn per source over ``steps`` steps of every rank, from the epoch plans alone."""
    manifest = read_manifest(cfg.train.data)
    index = read_index(manifest.paths("train"))
    mix = mixture(cfg, manifest, index)
    counts, micro, epoch = Counter(), steps * cfg.train.grad_accum, 0
    while micro > 0:
        plans = epoch_plan(index, seed=cfg.seed, epoch=epoch, world=world, batch_size=cfg.train.batch_size,
                           mode=mode, window=cfg.train.shuffle_window, **mix)
        take = min(micro, len(plans[0]))
        for plan in plans:
            counts.update(source_counts(index, plan[:take]))
        micro, epoch = micro - take, epoch + 1
    return dict(counts)


def planned_batch_hashes(cfg, steps: int, rank: int = 0, world: int = 1, mode: str = "global") -> dict[int, float]:
    """step -> ``data.batch_hash`` of rank ``rank``'s micro-batches in an uninterrupted run, from the epoch
    plan alone (``batches.epoch_plan`` on the split's index, rows read from the shards)."""
    manifest = read_manifest(cfg.train.data)
    index = read_index(manifest.paths("train"))
    mix = mixture(cfg, manifest, index)
    rows, out, epoch, accum = ShardRows(index, None, keep=len(index.files)), {}, 0, cfg.train.grad_accum
    pending: list = []
    while len(out) < steps:
        plan = epoch_plan(index, seed=cfg.seed, epoch=epoch, world=world, batch_size=cfg.train.batch_size,
                          mode=mode, window=cfg.train.shuffle_window, **mix)[rank]
        for ids in plan:
            pending.append(rows.take(ids))
            if len(pending) == accum:
                digest = None
                for batch in pending:
                    digest = batch_hash(batch, digest)
                out[len(out) + 1] = as_metric(digest)
                pending = []
                if len(out) == steps:
                    break
        epoch += 1
    return out


def _kill_one_worker_after(path: Path, killed: list, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        time.sleep(0.2)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []) and proc.pid != os.getpid():
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(proc.pid)
            return


@pytest.mark.cluster
def test_two_ddp_workers_survive_a_killed_worker_and_the_run_is_fully_tracked(tmp_path, ray_local):
    """One run with 2 DDP workers, one of them SIGKILLed after the first checkpoint: the run
    finishes from its checkpoint with the exact step count, and MLflow holds one run with the
    config, the dataset, every step once, validation images as a series, every checkpoint and a
    registered version carrying its lineage."""
    steps = 6
    cfg, _ = small_cfg(tmp_path, f"train.max_steps={steps}", "train.checkpoint_every=2", "train.num_workers=2",
                       "train.max_failures=2", "train.run_name=faulty",
                       "train.export_memory_gb=0.5",  # the export as a Ray task reserving memory, as on a cluster
                       "train.mixture={laion: 2}",  # over the curated repeats: laion 1 -> 2, mj stays 0.5
                       sources={"laion": 1.0, "mj": 0.5})
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_one_worker_after, args=(tmp_path / "ray" / "faulty" / "checkpoint_00000002", killed)
    )
    killer.start()
    result = run_training(cfg)
    killer.join()
    assert killed, "no training worker was found to kill"

    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    assert [r.info.run_id for r in runs] == [result.run_id]  # exactly one run for the training run
    run = client.get_run(result.run_id)
    assert run.data.params["diffusion.prediction_type"] == "v_prediction"
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.tags[RUN_NAME_TAG] == "faulty"
    assert run.inputs.dataset_inputs[0].dataset.digest

    assert history(cfg, result.run_id, "loss") == list(range(1, steps + 1))  # no gap, no duplicate
    for key in ("lr", "grad_norm", "images_per_s", "samples_seen"):
        assert history(cfg, result.run_id, key) == list(range(1, steps + 1)), key
    assert history(cfg, result.run_id, "val_loss") == [2, 4, 6]
    for bucket in ("val_mse_t500_750", "val_mse_t750_1000"):  # the held-out MSE per timestep bucket, a series
        assert history(cfg, result.run_id, bucket) == [2, 4, 6], bucket
    assert run.data.metrics["samples_seen"] == steps * 2 * 2  # batch 2 x 2 workers x steps: nothing twice
    # The realised mixture: rows drawn per source by both ranks, as the epoch plans decide them
    # (laion's 6 rows twice, 3 of mj's 6 each epoch), through the kill and the restart; rank 0's batches are
    # the uninterrupted run's.
    drawn = planned_source_counts(cfg, steps, world=2)
    assert drawn["laion"] > 2 * drawn["mj"] > 0 and sum(drawn.values()) == steps * 2 * 2
    for name, n in drawn.items():
        assert run.data.metrics[f"samples_seen.{name}"] == n, name
        assert run.data.metrics[f"mix.{name}"] == pytest.approx(n / (steps * 2 * 2)), name
    assert values(cfg, result.run_id, "data.batch_hash") == planned_batch_hashes(cfg, steps, rank=0, world=2)
    # Each whole epoch logs the share it realised (every rank's batches): epoch 0's is its plan's.
    manifest = read_manifest(cfg.train.data)
    index = read_index(manifest.paths("train"))
    epoch0 = epoch_plan(index, seed=cfg.seed, epoch=0, world=2, batch_size=cfg.train.batch_size,
                        window=cfg.train.shuffle_window, **mixture(cfg, manifest, index))
    logged = values(cfg, result.run_id, "epoch_mix.laion")
    assert logged and logged[min(logged)] == pytest.approx(
        epoch_shares(index, [ids for p in epoch0 for ids in p])["laion"])

    records = sorted(a.path for a in client.list_artifacts(result.run_id, "checkpoints"))
    assert records == [f"checkpoints/checkpoint_0000000{s}.json" for s in (2, 4, 6)]
    record = json.loads(Path(client.download_artifacts(result.run_id, records[-1], str(tmp_path))).read_text())
    assert record["step"] == 6 and record["uri"].endswith("faulty/checkpoint_00000006")
    images = [a.path for a in client.list_artifacts(result.run_id, "images")]
    for s in (2, 4, 6):  # a step series per prompt
        assert any(p.startswith(f"images/val_0+step+{s}+") for p in images), images

    version = client.get_model_version(cfg.tracking.registered_model, result.version)
    for tag in ("run_id", "dataset_digest", "base_model", "config_hash", "git_commit"):
        assert version.tags[tag], tag
    assert version.tags["run_id"] == result.run_id
    deadline = time.time() + 30
    while True:  # the state API reports task events with a delay
        exports = list_tasks(address=ray.get_runtime_context().gcs_address, detail=True,
                             filters=[("func_or_class_name", "=", "export_and_register")])
        if [t.state for t in exports] == ["FINISHED"] or time.time() > deadline:
            break
        time.sleep(0.5)
    assert [t.state for t in exports] == ["FINISHED"]  # a Ray task that reserved memory, not the driver
    assert exports[0].required_resources.get("memory") == 0.5 * 2**30


def test_fsdp_workers_train_checkpoint_and_resume(tmp_path, ray_local):
    """Two FSDP2 workers (sharded weights, gradients and optimizer states): full checkpoints are
    gathered from the shards, and a run continued by name loads them back into the shards."""
    cfg, _ = small_cfg(tmp_path, "train.max_steps=2", "train.checkpoint_every=2", "train.num_workers=2",
                       "train.parallel=fsdp", "train.run_name=sharded")
    first = run_training(cfg)
    longer = cfg.model_copy(deep=True)
    longer.train.max_steps = 4
    second = run_training(longer)
    assert second.run_id == first.run_id
    assert history(cfg, second.run_id, "loss") == [1, 2, 3, 4]
    assert second.checkpoint.endswith("checkpoint_00000004") or second.val_loss is not None
    ckpt = tmp_path / "ray" / "sharded" / "checkpoint_00000004"
    weights = load_file(ckpt / "unet.safetensors")  # full tensors, not shards
    reference = build_tiny(cfg.model.tiny).unet.state_dict()
    assert weights.keys() == reference.keys()
    assert all(weights[k].shape == reference[k].shape for k in reference)


def _live_history(store: str, run_name: str, deadline: float) -> tuple[list[int], str | None]:
    """The loss steps MLflow holds for the run named ``run_name`` while it runs (polled)."""
    client = mlflow.MlflowClient(tracking_uri=store)
    while time.time() < deadline:
        try:
            runs = client.search_runs([client.get_experiment_by_name("terminus-tiny").experiment_id],
                                      filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
        except Exception:  # the store is being created by the flow
            runs = []
        if runs:
            steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
            if steps:
                return sorted(steps), runs[0].info.status
        time.sleep(0.3)
    return [], None


def _start_head(env: dict) -> tuple[subprocess.Popen, int]:
    """``ray start --head --block`` on loopback with free ports; (process, dashboard port)."""
    gcs_port, dash_port, agent_port = free_port(), free_port(), free_port()
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
         f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--num-cpus=2",
         "--disable-usage-stats",
         # another local cluster (the test session's) may hold the agent's default port 52365
         f"--dashboard-agent-listen-port={agent_port}", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    wait_for_port(dash_port, timeout=120, proc=head)
    return head, dash_port


def _stop_head(head: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop the head's whole process group (``SIGKILL``: a crash, every Ray process of it gone at once)."""
    try:
        os.killpg(head.pid, sig)
        head.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def _submit(env: dict, dash_port: int, sets: list[str], wait: bool = True) -> subprocess.CompletedProcess:
    submit_env = dict(env, RAY_AUTH_MODE="token", RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dash_port}")
    args = [x for o in sets for x in ("--set", o)]
    for _ in range(15):  # the dashboard answers before its job agent is ready
        job = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", *([] if wait else ["--no-wait"]),
             "--working-dir", ".", "--runtime-env", "deploy/job_runtime_env.yaml", "--", "python", "flows/train.py",
             "--config", "flows/configs/tiny.yaml", *args],
            cwd=REPO, env=submit_env, capture_output=True, text=True, timeout=600,
        )
        if "No available agent" not in job.stdout + job.stderr:
            return job
        time.sleep(2)
    return job


@pytest.mark.cluster
def test_a_job_that_dies_with_its_cluster_resumes_on_a_new_one(tmp_path):
    """README's submission, token auth on. The job's state paths derive from the absolute state_dir (never
    Ray's temporary copy of the working directory). Its metrics reach MLflow while it runs, before any
    checkpoint exists. The whole cluster -- the job's driver with it -- is SIGKILLed after checkpoint 10,
    with a later step already logged live (30 steps: the tiny step is fast, the window to kill in must not be). On a
    new cluster, the same run_name resumes from that checkpoint and the same MLflow run, recomputes steps MLflow
    already holds, and ends with every step once."""
    data = write_synthetic_curated(tmp_path / "data", n_train=12, n_val=2, size=(64, 64))
    state = tmp_path / "state"
    base = [f"state_dir={state}", f"train.data={data}", *SMALL, "train.checkpoint_every=10", "train.max_steps=30",
            "train.run_name=jobrun"]
    env = subprocess_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    store = f"sqlite:///{state}/mlflow.db"
    marker = state / "ray_results" / "jobrun" / "checkpoint_00000010"
    head, dash_port = _start_head(env)
    try:
        job = _submit(env, dash_port, base, wait=False)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-2000:]
        anonymous = requests.get(f"http://127.0.0.1:{dash_port}/api/jobs/", timeout=30)
        assert anonymous.status_code == 401  # token authentication stays on
        live, status = _live_history(store, "jobrun", time.time() + 300)
        assert live and status == "RUNNING", (live, status)  # the loss curve shows while the run goes ...
        assert not marker.exists() or max(live) < 10  # ... before its first checkpoint
        deadline = time.time() + 300
        logged: list[int] = []
        while (not (marker / "COMPLETE").exists() or max(logged, default=0) < 11) and time.time() < deadline:
            time.sleep(0.2)  # a step past the checkpoint reaches MLflow live: the rerun must not log it twice
            logged = _live_history(store, "jobrun", time.time() + 60)[0]
        assert max(logged) < 30, "the job ended before the cluster could be killed"
    finally:
        _stop_head(head, signal.SIGKILL)
    assert (marker / "COMPLETE").is_file() and max(logged) >= 11

    head, dash_port = _start_head(env)  # a new cluster: Ray's session and working-dir copies are gone
    try:
        job = _submit(env, dash_port, base)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-2000:]
        assert "succeeded" in job.stdout + job.stderr
    finally:
        _stop_head(head)
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)  # not this process's globals
    (run,) = client.search_runs([client.get_experiment_by_name("terminus-tiny").experiment_id],
                                filter_string=f"tags.`{RUN_NAME_TAG}` = 'jobrun'")
    for key in ("loss", "lr"):  # resumed at step 10 of the first cluster's checkpoint: no gap, nothing twice
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(1, 31)), key
    assert run.data.tags["checkpoint.latest"] == str(state / "ray_results" / "jobrun" / "checkpoint_00000030")
    assert len(client.get_registered_model("terminus-tiny").latest_versions) == 1
