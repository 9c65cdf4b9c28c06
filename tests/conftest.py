"""Shared fixtures: a local Ray for the session, a tiny config under a temporary state dir,
and a real S3-compatible server (moto) on loopback. Every process started here is stopped by its id."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (2 CPUs), shut down at the end."""
    import ray

    from components.cluster import ray_session

    with ray_session(num_cpus=4):
        yield ray


@pytest.fixture
def tiny_cfg(tmp_path):
    """The tiny preset with every output under a fresh temporary state directory."""
    from components.config import load_config

    state = tmp_path / "state"
    return load_config(
        REPO / "flows/configs/tiny.yaml",
        [
            f"state_dir={state}",
            f"curate.output={state}/datasets/demo",
            f"train.data={state}/datasets/demo",
            f"train.storage_path={state}/ray_results",
        ],
    )


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on loopback. Yields the endpoint URL; credentials are dummies."""
    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Environment that points boto3 (and MLflow's S3 client) at the loopback server."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server)
    return s3_server


@pytest.fixture(scope="session")
def registered_model(tmp_path_factory):
    """A tiny pipeline registered once per session as version 1 @champion in a temporary SQLite MLflow.

    The tracking URI goes into the returned config (``tracking.tracking_uri``), not into the process
    environment, so other tests keep their own stores. ``overrides`` rebuild the same config
    (e.g. for ``deploy.app.build_app``).
    """
    from types import SimpleNamespace

    import mlflow

    from components.config import load_config
    from components.models import build_tiny, save_pipeline
    from components.registry import log_pipeline_model
    from components.tracking import setup_tracking

    state = tmp_path_factory.mktemp("registry")
    overrides = [f"state_dir={state}", f"tracking.tracking_uri=sqlite:///{state}/mlflow.db"]
    cfg = load_config(REPO / "flows/configs/tiny.yaml", overrides)
    experiment = setup_tracking(cfg)
    pipeline_dir = save_pipeline(build_tiny(cfg.model.tiny), cfg.diffusion, state / "pipeline")
    with mlflow.start_run(experiment_id=experiment):
        info = log_pipeline_model(pipeline_dir, cfg.tracking.registered_model)
    version = str(info.registered_model_version)
    mlflow.MlflowClient().set_registered_model_alias(cfg.tracking.registered_model, "champion", version)
    return SimpleNamespace(
        cfg=cfg, overrides=overrides, name=cfg.tracking.registered_model, version=version,
        pipeline_dir=pipeline_dir, experiment_id=experiment, tracking_uri=cfg.tracking.tracking_uri,
    )
