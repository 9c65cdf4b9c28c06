"""Security: a planted credential appears nowhere in MLflow, the logs or the reports (docs/reliability.md).

A fake AWS key pair and a Hugging Face token are put in the environment, and the key pair again in
a config override a user could plausibly write (an S3 endpoint URL with ``user:password@``). Then the
curate flow and a short training flow run (in this process, so their stdout and stderr, Ray workers'
lines included, are captured), and every byte they left behind -- the MLflow SQLite store (params,
tags, metrics), every artifact, the curated dataset with its report, the export and the Ray Train
storage -- is searched for the secrets.
"""

from __future__ import annotations

import json
import runpy
import sys

import mlflow
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.processes import REPO
from tests.integration.test_train import SMALL

FAKE_KEY_ID = "AKIAQ7FAKEKEY0000042"  # AKIA + 16 characters: the shape of an AWS access key id
FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYFAKESECRET"
FAKE_HF = "hf_" + "Q7fakeTOKENnotREALatALL0000000042"
SECRETS = (FAKE_KEY_ID, FAKE_SECRET, FAKE_HF)


def _flow(monkeypatch, capfd, script: str, sets: list[str]) -> tuple[dict, str]:
    monkeypatch.syspath_prepend(str(REPO / "flows"))
    monkeypatch.setattr(sys, "argv", [script, "--config", str(REPO / "flows/configs/tiny.yaml"),
                                      *[x for s in sets for x in ("--set", s)]])
    runpy.run_path(str(REPO / "flows" / script), run_name="__main__")
    out, err = capfd.readouterr()
    return json.loads(out.strip().splitlines()[-1]), out + err


@pytest.mark.slow
def test_planted_credentials_never_leak(ray_local, monkeypatch, capfd, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("HF_TOKEN", FAKE_HF)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(0, 160, size=(96, 96, 3), dtype=np.uint8)).save(photos / f"p{i:02d}.jpg")
    state, data = tmp_path / "state", tmp_path / "curated"
    common = [f"state_dir={state}", f"tracking.tracking_uri=sqlite:///{state}/mlflow.db",
              f"curate.s3_endpoint_url=http://{FAKE_KEY_ID}:{FAKE_SECRET}@127.0.0.1:9"]  # the plausible paste
    capfd.readouterr()
    curated, logs = _flow(monkeypatch, capfd, "curate.py", [
        *common, f"curate.source={photos}", f"curate.output={data}", "curate.buckets.area=4096",
        "curate.buckets.min_side=64", "curate.buckets.max_side=128", "curate.holdout_fraction=0.2"])
    trained, train_logs = _flow(monkeypatch, capfd, "train.py", [
        *common, *SMALL, f"train.data={data}", f"train.storage_path={tmp_path / 'ray'}", "train.max_steps=2",
        "train.checkpoint_every=2", "train.run_name=planted"])
    logs += train_logs
    assert curated["kept"] == 12 and trained["version"]

    # The override did reach what is logged, redacted: this test would see a leak.
    client = mlflow.MlflowClient(f"sqlite:///{state}/mlflow.db")
    for run_id in (curated["mlflow_run_id"], trained["run_id"]):
        params = client.get_run(run_id).data.params
        assert params["curate.s3_endpoint_url"] == "http://<redacted>@127.0.0.1:9"
        assert not any(s in v for s in SECRETS for v in params.values())

    assert "==== train:" in logs and "(RayTrainWorker" in logs  # the capture holds the workers' lines too
    leaks = [s for s in SECRETS if s in logs]
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.parent != photos]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "report.json" for p in files)
    for path in files:
        blob = path.read_bytes()
        leaks += [f"{path.relative_to(tmp_path)}: {s[:4]}..." for s in SECRETS if s.encode() in blob]
    assert not leaks, leaks
