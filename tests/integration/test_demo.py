"""The whole chain, as `make demo` runs it: curate -> train -> evaluate -> promote -> serve -> call."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest
from PIL import Image

from tests.fixtures.processes import REPO, free_port, subprocess_env

pytestmark = pytest.mark.slow


def test_demo_chain_end_to_end(tmp_path):
    state = tmp_path / "state"
    overrides = [
        f"state_dir={state}", f"curate.output={state}/datasets/demo", f"train.data={state}/datasets/demo",
        f"train.storage_path={state}/ray_results", "train.max_steps=6", "train.checkpoint_every=3",
        "train.val_image_size=64", "train.val_steps=2", "evaluate.image_size=64", "evaluate.steps=2",
        "evaluate.seeds=[0]", "serve.default_size=128", "serve.default_steps=2", f"serve.port={free_port()}",
    ]
    cmd = [sys.executable, "flows/demo.py", "--config", "flows/configs/tiny.yaml"]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]

    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(last) == {"model", "version", "alias", "image", "endpoint"}
    assert last["alias"] == "champion" and last["endpoint"].startswith("http://127.0.0.1:")
    with Image.open(last["image"]) as im:
        assert im.size == (128, 128) and im.format == "PNG"
    for stage in ("1/5 curate", "2/5 train", "3/5 evaluate", "4/5 promote", "5/5 serve"):
        assert stage in proc.stderr  # a banner per stage

    store = f"sqlite:///{state}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)  # not this process's globals
    champion = client.get_model_version_by_alias(last["model"], "champion")
    assert str(champion.version) == last["version"]
    run_id = champion.tags["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert float(champion.tags["eval.val_loss"]) > 0
