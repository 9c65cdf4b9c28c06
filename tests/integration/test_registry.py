"""What every registered version carries: lineage from the trainer's export (training run, dataset
digest, base model, config hash, git commit, checkpoint), evaluation metrics, and the pyfunc signature."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import mlflow
import pytest

from components.registry.model import SIGNATURE
from components.registry.tracking import git_commit, setup_tracking
from tests.fixtures.processes import REPO, subprocess_env

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


LOAD_ISOLATED = r"""
import json, sys
# No code of this repository: drop the editable install's finder and every path into the checkout.
repo = sys.argv[2]
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path = [p for p in sys.path if p and (not p.startswith(repo) or p.startswith(sys.prefix))]
sys.path_importer_cache.clear()
try:
    import components
    sys.exit("components importable before the model is loaded: " + str(components.__path__))
except ImportError:
    pass
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame([{"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 1}]))
import components
shipped = sorted(m for m in sys.modules if m == "components" or m.startswith("components."))
print(json.dumps({"png": len(out["image_png_b64"][0]), "modules": shipped, "path": list(components.__path__)}))
"""


def test_a_registered_model_loads_with_its_shipped_code_alone(registered_model, tmp_path):
    """The pyfunc's code is the diffusion package alone, and that is enough to generate in a process
    that has no other code of this platform."""
    r = registered_model
    # ``models:/`` resolves in the registry, which an earlier test may have moved
    mlflow.set_registry_uri(r.tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{r.name}/{r.version}",
                                                dst_path=str(tmp_path / "model"), tracking_uri=r.tracking_uri)
    shipped = sorted(p.relative_to(tmp_path / "model" / "code").as_posix()
                     for p in (tmp_path / "model" / "code").rglob("*.py"))
    assert shipped and all(p == "components/__init__.py" or p.startswith("components/diffusion/") for p in shipped)
    proc = subprocess.run([sys.executable, "-c", LOAD_ISOLATED, local, str(REPO)], capture_output=True, text=True,
                          cwd=tmp_path, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["png"] > 100
    assert all(m == "components" or m.startswith("components.diffusion") for m in out["modules"]), out["modules"]
    assert all(p.startswith(str(tmp_path)) for p in out["path"])  # the copy shipped with the model
