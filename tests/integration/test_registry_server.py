"""Against a real MLflow tracking server (SQLite backend, artifacts in an S3-compatible store):
register through the trainer's export, evaluate, promote, and load ``models:/NAME@champion`` in a
fresh process -- as a pyfunc that returns a PNG of the requested size, and as a plain diffusers
directory with the ZT-SNR trailing v-prediction scheduler. The client is configured only by
MLFLOW_TRACKING_URI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import boto3
import mlflow
import pytest

from components.config import load_config
from components.dataset import read_manifest
from components.environment import snapshot
from components.evaluation.run import evaluate_version
from components.registry.promotion import promote
from tests.fixtures.processes import REPO
from tests.fixtures.registry import EVAL_SMALL, register_trained, unet_checkpoint
from tests.synthetic import write_synthetic_curated

pytestmark = pytest.mark.slow

LOAD_CHAMPION = r"""
import base64, glob, io, json, os, sys
import mlflow, pandas as pd, torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

uri = sys.argv[1]
model = mlflow.pyfunc.load_model(uri)
row = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 96, "seed": 3, "guidance_rescale": 0.7}
png = base64.b64decode(model.predict(pd.DataFrame([row]))["image_png_b64"][0])
image = Image.open(io.BytesIO(png))

local = mlflow.artifacts.download_artifacts(uri)
(pipeline_dir,) = [os.path.dirname(p) for p in glob.glob(f"{local}/artifacts/*/model_index.json")]
pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_dir, use_safetensors=True)
vanilla = pipe("a red apple", num_inference_steps=2, width=64, height=64, guidance_rescale=0.7,
               generator=torch.Generator().manual_seed(0)).images[0]
print(json.dumps({
    "format": image.format, "size": image.size, "vanilla_size": vanilla.size,
    "components_from": sys.modules["components"].__file__,
    "scheduler_class": type(pipe.scheduler).__name__, "scheduler": dict(pipe.scheduler.config),
    "terminal_alphabar": float(pipe.scheduler.alphas_cumprod[-1]),
    "weights": sorted(os.path.relpath(p, pipeline_dir) for p in glob.glob(f"{pipeline_dir}/*/*")
                      if p.endswith((".safetensors", ".bin", ".pt", ".ckpt"))),
}, default=str))
"""


@pytest.fixture
def server_only_env(mlflow_server, monkeypatch):
    """Only MLFLOW_TRACKING_URI says where tracking goes: no other MLflow or AWS setting in the client."""
    for key in [k for k in snapshot() if k.startswith(("MLFLOW_", "AWS_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    yield mlflow_server
    mlflow.set_tracking_uri(None)  # do not leave this process pointed at a server that is about to stop
    mlflow.set_registry_uri(None)
    # MLflow 3's set_registry_uri(None) leaves the MLFLOW_REGISTRY_URI it exported before; the variable was
    # deleted above if it existed, and monkeypatch brings that value back.
    os.environ.pop("MLFLOW_REGISTRY_URI", None)


def test_register_evaluate_promote_and_load_the_champion_through_a_server(server_only_env, tmp_path):
    server = server_only_env
    data = write_synthetic_curated(tmp_path / "data", n_train=2, n_val=2, size=(64, 64))
    state = tmp_path / "state"
    cfg = load_config(REPO / "flows/configs/tiny.yaml", [
        f"state_dir={state}", f"train.data={data}", "tracking.registered_model=terminus-server", *EVAL_SMALL,
    ])
    assert cfg.tracking.tracking_uri is None
    manifest = read_manifest(str(data))
    name = cfg.tracking.registered_model

    run_id, version = register_trained(cfg, manifest, "server-run", unet_checkpoint(cfg, tmp_path / "ckpt"),
                                       {"step": 3, "val_loss": 0.2})
    metrics = evaluate_version(cfg, f"models:/{name}/{version}", manifest)
    result = promote(name, version, evaluate=cfg.evaluate)
    assert (result.version, result.previous) == (version, None)

    # Everything went to the server (registry, runs) and its S3 store, nothing to the embedded default.
    assert mlflow.get_tracking_uri() == server.url
    assert not (state / "mlflow.db").exists()
    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, version)
    assert mv.run_id == run_id and mv.aliases == ["champion"]
    assert mv.tags["run_id"] == run_id and mv.tags["dataset_digest"] == manifest.digest
    assert float(mv.tags["eval.val_loss"]) == pytest.approx(metrics["val_loss"], rel=1e-5)
    assert client.get_run(metrics["run_id"]).data.metrics["nan_images"] == 0
    s3 = boto3.client("s3", endpoint_url=server.s3_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=server.bucket)
            for o in page.get("Contents", [])]
    assert any(k.startswith("mlartifacts/") and k.endswith("unet/diffusion_pytorch_model.safetensors") for k in keys)
    assert any(k.endswith("probe_grid.png") for k in keys)

    # A fresh process, outside the repository, with nothing but the tracking URI.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path)), "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": server.url}
    proc = subprocess.run([sys.executable, "-c", LOAD_CHAMPION, f"models:/{name}@champion"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["format"] == "PNG" and out["size"] == [64, 96]  # PIL: (width, height)
    assert out["vanilla_size"] == [64, 64]
    assert not out["components_from"].startswith(str(REPO))  # the code logged with the model, not this checkout
    assert out["scheduler_class"] == "DDIMScheduler"
    sched = out["scheduler"]
    assert (sched["timestep_spacing"], sched["prediction_type"], sched["rescale_betas_zero_snr"]) == (
        "trailing", "v_prediction", True)
    assert out["terminal_alphabar"] == 0.0  # zero terminal SNR
    assert out["weights"] and all(w.endswith(".safetensors") for w in out["weights"]), out["weights"]
