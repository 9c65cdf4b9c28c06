"""An adapter run on a real local Ray cluster: ``flows/train.py --set train.method=lora`` trains a LoRA beside the
frozen tiny UNet, the checkpoints hold the adapter only, the registered version names its
base, loading it loads that base first, and its exports (diffusers format, kohya layout) reload with the same effect."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import ray
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from components.config import load_config
from components.dataset import read_manifest
from components.diffusion.adapters import AdapterSlots, read_adapter
from components.diffusion.pyfunc import predict_rows
from components.diffusion.sdxl import load_parts
from components.diffusion.sources import weights_sha256
from components.diffusion.tiny import build_tiny
from components.evaluation.run import _base_and_adapter, evaluate_version
from components.registry.adapter_versions import fetch_adapter
from components.registry.export import export_version
from components.registry.model import fetch_model
from components.registry.model import fetch_model as fetch
from components.registry.tracking import setup_tracking
from tests.fixtures.processes import REPO, subprocess_env
from tests.fixtures.registry import EVAL_SMALL
from tests.integration.test_train import history, small_cfg
from tests.unit.diffusion.test_adapters import unet_output

pytestmark = pytest.mark.slow


def test_a_lora_run_trains_only_the_adapter_and_registers_it_with_its_base(tmp_path, ray_local):
    cfg, overrides = small_cfg(tmp_path, "train.method=lora", "train.adapter.rank=4", "train.adapter.alpha=8",
                               "train.max_steps=2", "train.checkpoint_every=2", "train.run_name=lora",
                               "train.lr.max=0.01", "train.lr.min=0.001")
    # As a user runs it, on the session's cluster (RAY_ADDRESS), so no second Ray starts.
    cmd = [sys.executable, "flows/train.py", "--config", "flows/configs/tiny.yaml"]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=subprocess_env(RAY_ADDRESS=ray.get_runtime_context().gcs_address))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first["model_name"] == "terminus-tiny-lora" and first["version"] == "1"

    # The checkpoint: the adapter and its optimizer state, no UNet.
    ckpt = tmp_path / "ray" / "lora" / "checkpoint_00000002"
    files = {p.name for p in ckpt.iterdir()}
    assert "adapter.safetensors" in files and "unet.safetensors" not in files
    adapter = load_file(ckpt / "adapter.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(adapter)  # AdamW moments for the adapter's tensors only
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 4

    assert history(cfg, first["run_id"], "loss") == [1, 2]  # the recipe's MLflow run (resume: unit tests)
    trained = SimpleNamespace(**first)

    # This process's MLflow (tracking and registry) on the run's store, as the flows set it: an earlier test on
    # this worker may have left the registry URI on its own store.
    setup_tracking(cfg)
    client = mlflow.MlflowClient()
    tags = client.get_model_version("terminus-tiny-lora", trained.version).tags
    assert tags["adapter.method"] == "lora" and tags["adapter.rank"] == "4" and tags["adapter.alpha"] == "8"
    assert tags["base_model_uri"] == "models:/terminus-tiny-base/1"  # the tiny source, registered once
    assert [str(v.version) for v in client.search_model_versions("name = 'terminus-tiny-base'")] == ["1"]
    base = fetch_model(tags["base_model_uri"], tmp_path / "cache")
    assert tags["base_weights_sha256"] == weights_sha256(base.pipeline_dir)
    assert client.get_registered_model("terminus-tiny-lora").tags["terminus.kind"] == "adapter"
    run = client.get_run(trained.run_id)
    assert run.data.params["train.method"] == "lora"
    assert any(a.path.startswith("images") for a in client.list_artifacts(trained.run_id))  # validation images

    # The registered base is the tiny model itself; the trained LoRA changes what it predicts.
    fetched = fetch_adapter(f"models:/terminus-tiny-lora/{trained.version}", tmp_path / "cache")
    unet = load_parts(cfg.model, tmp_path / "cache", source=str(base.pipeline_dir)).unet
    before = unet_output(unet)
    assert torch.equal(before, unet_output(build_tiny(cfg.model.tiny).unet))
    slots = AdapterSlots(unet)
    slots.ensure(fetched.key, read_adapter(fetched.directory))
    with slots.running(fetched.key):
        after = unet_output(unet)
    assert (after - before).abs().max() > 1e-3

    # Loading the adapter version loads its base first (the pyfunc names it), and the adapter changes the images.
    row = pd.DataFrame({"prompt": ["a red square"], "steps": [2], "seed": [1], "width": [64], "height": [64]})
    loaded = mlflow.pyfunc.load_model(f"models:/terminus-tiny-lora/{trained.version}")
    adapted = loaded.predict(row)
    model = loaded.unwrap_python_model()
    assert torch.equal(model.pipelines.t2i.unet.conv_in.weight.float(), unet.conv_in.weight)  # the base's weights
    with model.slots.running(None):  # the same pipelines with the adapter off: the base the tag names
        plain = predict_rows(model.pipelines, row)
    assert adapted["image_png_b64"][0] != plain["image_png_b64"][0]

    # Evaluation runs on the base the adapter names, plus the adapter.
    target = _base_and_adapter(fetch(f"models:/terminus-tiny-lora/{trained.version}", cfg.state_path("cache", "models"),
                                     adapter_ok=True), cfg)
    assert weights_sha256(target["pipeline_dir"]) == tags["base_weights_sha256"]
    assert set(target["adapter"].state) == set(read_adapter(fetched.directory).state)

    # The diffusers-format file of the version: vanilla diffusers loads it and changes the UNet as the platform does.
    pipe = StableDiffusionXLPipeline.from_pretrained(str(base.pipeline_dir))
    pipe.load_lora_weights(str(fetched.directory))
    torch.testing.assert_close(unet_output(pipe.unet) - before, after - before, atol=1e-5, rtol=1e-4)

    # The kohya-layout single file: rank, alpha, base and modelspec in its header; diffusers' kohya converter loads it.
    result = export_version(cfg, f"models:/terminus-tiny-lora/{trained.version}", precision="fp32")
    with safe_open(result["path"], framework="pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert meta["terminus.base_model_uri"] == tags["base_model_uri"]
    assert meta["terminus.base_weights_sha256"] == tags["base_weights_sha256"]
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    version_tags = client.get_model_version("terminus-tiny-lora", trained.version).tags
    assert version_tags["single_file.fp32"] == result["artifact"]
    kohya = StableDiffusionXLPipeline.from_pretrained(str(base.pipeline_dir))
    kohya.load_lora_weights(load_file(result["path"]))
    torch.testing.assert_close(unet_output(kohya.unet) - before, after - before, atol=1e-5, rtol=1e-4)

    # Evaluation end to end on the adapter version: its base plus the adapter, measured and tagged as any version;
    # the same protocol on the bare base gives other figures (the adapter is in what was measured).
    ev_cfg = load_config(REPO / "flows/configs/tiny.yaml", [*overrides, *EVAL_SMALL])
    manifest = read_manifest(ev_cfg.train.data)
    adapted_eval = evaluate_version(ev_cfg, f"models:/terminus-tiny-lora/{trained.version}", manifest)
    base_eval = evaluate_version(ev_cfg, tags["base_model_uri"], manifest)
    assert adapted_eval["model"] == "terminus-tiny-lora" and adapted_eval["protocol"] == base_eval["protocol"]
    version_tags = client.get_model_version("terminus-tiny-lora", trained.version).tags
    assert version_tags["eval.protocol"] == adapted_eval["protocol"] and "eval.clip_score" in version_tags
    assert adapted_eval["val_loss"] != base_eval["val_loss"]
