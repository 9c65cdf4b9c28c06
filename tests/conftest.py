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

from components.environment import snapshot

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a flow run as its own process, as a user's shell would have it.

    ``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI into this process, so a child would
    otherwise inherit the store of whichever test set it last.
    """
    env = {k: v for k, v in snapshot().items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                                                           "RAY_ADDRESS")}
    env.update(extra)
    return env


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


def wait_for_mlflow(url: str, proc: subprocess.Popen, timeout: float, log_tail) -> None:
    """Until ``url``/health answers 200; a clear error (with the server's log tail) if it dies or stalls."""
    import requests

    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: {log_tail()}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"mlflow server not healthy after {timeout} s: {log_tail()}")
        time.sleep(0.3)


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
    env = dict(snapshot(), AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
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


# --- registry, evaluation and promotion (issue 6) ----------------------------------------------

EVAL_SMALL = [
    "evaluate.image_size=64", "evaluate.steps=2", "evaluate.seeds=[0]",
    "evaluate.dark_prompts=['a black cat in a dark room at night']",
    "evaluate.bright_prompts=['a white snowy field under a bright overcast sky']",
    "train.val_timesteps=[500,999]", "train.batch_size=2",
]
"""Evaluation at test size: 64 px, 2 steps, one dark and one bright probe image, 2 held-out rows x 2 timesteps."""


def unet_checkpoint(cfg, directory: Path, mutate=None):
    """A training checkpoint as ``trainer.export_and_register`` reads it (``unet.safetensors`` + the
    COMPLETE marker), holding the tiny model's UNet after ``mutate(unet)``. Duck-types the two members
    of ``ray.train.Checkpoint`` that export uses (``path``, ``as_directory``)."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    from components.checkpointing import COMPLETE
    from components.models import build_tiny

    unet = build_tiny(cfg.model.tiny).unet
    if mutate is not None:
        with torch.no_grad():
            mutate(unet)
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, directory / "unet.safetensors")
    (directory / COMPLETE).write_text("ok\n")
    return SimpleNamespace(path=str(directory), as_directory=lambda: nullcontext(str(directory)))


def register_trained(cfg, manifest, run_name: str, checkpoint, metrics: dict) -> tuple[str, str]:
    """(run id, version) through the trainer's own driver code: the training run (params, lineage
    tags, dataset input) and export + registration with lineage tags on the version."""
    from components.trainer import export_and_register, open_run

    cfg = cfg.model_copy(deep=True)
    cfg.train.run_name = run_name
    run_id = open_run(cfg, manifest)
    return run_id, export_and_register(cfg, run_id, checkpoint, metrics, manifest)


def _nan_weights(unet) -> None:
    for p in unet.parameters():
        p.fill_(float("nan"))


def _perturbed_weights(unet) -> None:
    import torch

    gen = torch.Generator().manual_seed(7)
    for p in unet.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.fixture(scope="session")
def evaluated_registry(tmp_path_factory):
    """A SQLite MLflow with versions of one model registered through the trainer's export path:
    ``good`` (the tiny model), ``nan`` (every UNet weight NaN, as a diverged run exports), ``worse``
    (UNet weights perturbed) -- each evaluated for real by ``evaluate_version`` -- and ``fresh``
    (registered, never evaluated). No alias is set. The tracking URI lives in ``cfg`` and
    ``overrides`` (for flows run as subprocesses), not in this process's environment."""
    from types import SimpleNamespace

    from components.config import load_config
    from components.curated import read_manifest
    from components.evaluation import evaluate_version
    from tests.synthetic import write_synthetic_curated

    root = tmp_path_factory.mktemp("evaluated")
    data = write_synthetic_curated(root / "data", n_train=2, n_val=2, size=(64, 64))
    overrides = [
        f"state_dir={root / 'state'}", f"train.data={data}", f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
        "tracking.registered_model=terminus-eval", *EVAL_SMALL,
    ]
    cfg = load_config(REPO / "flows/configs/tiny.yaml", overrides)
    manifest = read_manifest(str(data))
    mutations = {"good": None, "nan": _nan_weights, "worse": _perturbed_weights, "fresh": None}
    versions, runs, metrics = {}, {}, {}
    for i, (label, mutate) in enumerate(mutations.items()):
        ckpt = unet_checkpoint(cfg, root / "ckpt" / label, mutate)
        runs[label], versions[label] = register_trained(cfg, manifest, label, ckpt, {"step": 4 + i, "val_loss": 0.1})
        if label != "fresh":
            metrics[label] = evaluate_version(cfg, f"models:/{cfg.tracking.registered_model}/{versions[label]}",
                                              manifest)
    return SimpleNamespace(cfg=cfg, overrides=overrides, name=cfg.tracking.registered_model, versions=versions,
                           runs=runs, metrics=metrics, manifest=manifest, root=root)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with ``start_new_session=True`` and every process in its group
    (``mlflow server`` runs uvicorn and a job runner as children): SIGTERM, then SIGKILL."""
    import signal

    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + grace
        while time.time() < deadline:
            proc.poll()  # reap the leader, so only live members keep the group
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real ``mlflow server`` on loopback: SQLite backend store, artifacts proxied to a bucket on the
    moto S3 server (``--artifacts-destination s3://...``; the server reaches it with boto3, clients need
    only MLFLOW_TRACKING_URI). Started as its own process group and stopped by that group's id."""
    from types import SimpleNamespace

    import boto3

    root = tmp_path_factory.mktemp("mlflow-server")
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    bucket = "mlflow"
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    env = {k: v for k, v in snapshot().items() if not k.startswith("MLFLOW_")}
    # No GenAI job runner: seven huey consumer processes the registry does not use.
    env.update(creds, MLFLOW_S3_ENDPOINT_URL=s3_server, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", f"s3://{bucket}/mlartifacts"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
    )
    try:
        wait_for_mlflow(url, proc, 180, lambda: (root / "server.log").read_text()[-2000:])
        yield SimpleNamespace(url=url, bucket=bucket, s3_endpoint=s3_server, pid=proc.pid, log=root / "server.log")
    finally:
        _stop_group(proc)
        log.close()
