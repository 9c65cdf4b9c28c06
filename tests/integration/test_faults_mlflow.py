"""Fault: the MLflow tracking server stops during training and starts again (docs/reliability.md).

Promise: training goes on; the metrics, images and checkpoint records buffered meanwhile are
written at the first flush after the server is back (a checkpoint, or the end of training); the
run's history has every step exactly once. The server must answer when the run starts (the driver
opens the MLflow run), when a worker (re)starts (it reads how far the history goes) and at the end
(export and registration); an outage in between is tolerated.

A real ``mlflow server`` (SQLite backend, artifacts proxied to a local folder) on loopback, in its
own process group; the outage is a SIGKILL of that group, the recovery a new server on the same
port and the same SQLite file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from components.config import load_config
from components.environment import snapshot
from components.registry.tracking import setup_tracking
from components.training.driver import run_training
from components.training.run_logger import PROBE_TIMEOUT_S, RunLogger, server_reachable
from tests.fixtures.processes import REPO, free_port, wait_for_mlflow
from tests.integration.test_train import small_cfg


class MlflowServer:
    """``mlflow server`` that a test can kill (the whole process group) and start again in place."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 180.0) -> None:
        env = {k: v for k, v in snapshot().items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner processes: faster, lighter
        log = (self.root / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True,
        )
        log.close()
        wait_for_mlflow(self.url, self.proc, timeout, self.log_tail)

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn worker
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None

    def log_tail(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")[-2000:]


@pytest.fixture
def mlflow_outage_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow", free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


@pytest.mark.slow
def test_training_goes_on_through_a_tracking_server_outage(tmp_path, ray_local, mlflow_outage_server, capfd):
    server = mlflow_outage_server
    steps = 6
    cfg, _ = small_cfg(tmp_path, f"train.max_steps={steps}", "train.checkpoint_every=2", "train.run_name=outage",
                       f"tracking.tracking_uri={server.url}")
    run_dir = tmp_path / "ray" / "outage"
    spill_dir = tmp_path / "state" / "unsent_metrics"
    events: dict[str, float] = {}
    errors: list[BaseException] = []

    def outage() -> None:
        try:
            _wait_for(lambda: (run_dir / "checkpoint_00000002").exists(), 300, "checkpoint 2 never appeared")
            server.kill()
            events["down"] = time.time()
            # The first live flush after the kill found the server down and kept its metrics on disk:
            # start it again.
            _wait_for(lambda: any(spill_dir.glob("*.jsonl")), 300, "no flush noticed the outage")
            events["spilled"] = time.time()  # seen (file times run on a coarser clock than time.time())
            server.start()
            events["up"] = time.time()
        except BaseException as err:  # reported by the test thread below
            errors.append(err)

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    result = run_training(cfg)
    thread.join(timeout=300)
    assert not errors, errors
    assert events.keys() == {"down", "spilled", "up"}
    err = capfd.readouterr().err
    assert "MLflow unreachable, keeping" in err  # the outage was seen by training, which went on

    client = mlflow.MlflowClient(server.url)
    loss = client.get_metric_history(result.run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, steps + 1))  # every step exactly once
    at = {m.step: m.timestamp / 1000 for m in loss}
    # A flush failed while the server was down, and training went on past it without waiting for it.
    assert events["down"] < events["spilled"] < events["up"]
    assert any(events["spilled"] <= t <= events["up"] for t in at.values()), (events, at)
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "val_loss")) == [2, 4, 6]
    records = sorted(a.path for a in client.list_artifacts(result.run_id, "checkpoints"))
    assert records == [f"checkpoints/checkpoint_0000000{s}.json" for s in (2, 4, 6)]
    images = [a.path for a in client.list_artifacts(result.run_id, "images")]
    assert any(p.startswith("images/val_0+step+4+") for p in images), images  # buffered, then sent
    assert not any(spill_dir.glob("*.jsonl"))  # nothing left unsent
    assert client.get_model_version(cfg.tracking.registered_model, result.version).run_id == result.run_id


def test_a_dead_server_costs_one_quick_probe():
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    assert not server_reachable(dead)
    assert time.perf_counter() - start < PROBE_TIMEOUT_S + 10  # one probe, not MLflow's minutes of retries
    assert server_reachable("sqlite:///nowhere/mlflow.db")  # not a server: nothing to probe


def test_metrics_a_dead_worker_could_not_send_are_sent_once(tmp_path):
    """A worker died during an outage after spilling steps 3-4 (step 2 had been sent). The next
    logger of the run re-queues what MLflow lacks; the resumed worker recomputes step 4, whose new
    value replaces the unsent one; the history ends with each step once and the spill is gone."""
    cfg = load_config(REPO / "flows/configs/tiny.yaml", [f"state_dir={tmp_path}",
                                                         f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    with mlflow.start_run(experiment_id=setup_tracking(cfg)) as run:
        for step in (1, 2):
            mlflow.log_metric("loss", 1.0, step=step)
    spill = tmp_path / "unsent_metrics" / f"{run.info.run_id}.jsonl"
    spill.parent.mkdir(parents=True)
    spill.write_text("".join(
        f'{{"key": "loss", "value": {v}, "step": {s}, "timestamp": 0}}\n' for s, v in ((2, 1.0), (3, 3.0), (4, 4.0))))

    logger = RunLogger(cfg, run.info.run_id)
    assert logger.logged_through == 2
    logger.metrics({"loss": 40.0}, 4)  # the resumed worker (checkpoint at 3) recomputes step 4
    logger.metrics({"loss": 5.0}, 5)
    logger.close()
    history = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")}
    steps = sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss"))
    assert steps == [1, 2, 3, 4, 5]
    assert history[3] == 3.0 and history[4] == 40.0
    assert not spill.exists()
