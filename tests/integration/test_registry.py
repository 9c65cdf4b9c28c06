"""What every registered version carries: lineage from the trainer's export (training run, dataset
digest, base model, config hash, git commit, checkpoint), evaluation metrics, and the pyfunc signature."""

from __future__ import annotations

import re

import mlflow
import pytest

from components.registry.model import SIGNATURE
from components.registry.tracking import git_commit, setup_tracking

pytestmark = pytest.mark.slow

LINEAGE = ("run_id", "dataset_digest", "base_model", "config_hash", "git_commit", "checkpoint")
EVAL = ("val_loss", "luminance_dark", "luminance_bright", "luminance_range", "nan_images", "blank_images",
        "protocol", "dataset_digest", "run_id")


def test_every_version_carries_lineage_and_evaluated_ones_their_metrics(evaluated_registry):
    r = evaluated_registry
    setup_tracking(r.cfg)
    client = mlflow.MlflowClient()
    assert git_commit() != "unknown"  # we run in a checkout, so export recorded a real commit
    for label, version in r.versions.items():
        mv = client.get_model_version(r.name, version)
        tags = mv.tags
        assert all(tags.get(k) for k in LINEAGE), (label, tags)
        run = client.get_run(tags["run_id"])
        # The version points back at the training run that produced it, and both agree on lineage.
        assert mv.run_id == tags["run_id"] == r.runs[label]
        assert run.data.tags["terminus.run_name"] == label
        for key in ("dataset_digest", "base_model", "config_hash", "git_commit"):
            assert tags[key] == run.data.tags[key], (label, key)
        assert tags["dataset_digest"] == r.manifest.digest == run.inputs.dataset_inputs[0].dataset.digest
        assert tags["base_model"] == "tiny" and re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"])
        expected_cfg = r.cfg.model_copy(deep=True)
        expected_cfg.train.run_name = label
        assert tags["config_hash"] == expected_cfg.digest()
        assert tags["checkpoint"].endswith(f"ckpt/{label}") and "final_step" in tags
        assert run.data.tags["registered_version"] == version
        if label == "fresh":
            assert not any(k.startswith("eval.") for k in tags)
        else:
            assert all(tags.get(f"eval.{k}") for k in EVAL), (label, tags)
            assert tags["eval.dataset_digest"] == r.manifest.digest


def test_the_pyfunc_declares_the_generation_signature(evaluated_registry):
    r = evaluated_registry
    setup_tracking(r.cfg)
    info = mlflow.models.get_model_info(f"models:/{r.name}/{r.versions['good']}")
    assert info.signature == SIGNATURE
    assert info.signature.inputs.input_names() == [
        "prompt", "negative_prompt", "steps", "guidance_scale", "guidance_rescale", "seed", "width", "height"]
    assert info.signature.outputs.input_names() == ["image_png_b64"]
    assert "python_function" in info.flavors
