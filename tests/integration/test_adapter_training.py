"""An adapter run on a real local Ray cluster: the recipe's loop trains a LoRA beside the frozen tiny UNet, the
checkpoints hold the adapter only, the run resumes by name, and the registered version names its base."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from components.training.driver import run_training
from tests.integration.test_train import history, small_cfg

pytestmark = pytest.mark.slow


def unet_output(unet) -> torch.Tensor:
    """The UNet's prediction on fixed inputs of the tiny model's shapes."""
    cfg = unet.config
    gen = torch.Generator().manual_seed(3)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    text = torch.randn(2, 77, cfg.cross_attention_dim, generator=gen)
    added = {"text_embeds": torch.randn(2, pooled, generator=gen), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        return unet(sample, torch.tensor([999, 400]), encoder_hidden_states=text, added_cond_kwargs=added).sample


def test_a_lora_run_trains_only_the_adapter_resumes_and_registers_it_with_its_base(tmp_path, ray_local):
    from components.diffusion.adapters import AdapterSlots, read_adapter
    from components.diffusion.sdxl import build_tiny, load_parts, weights_sha256
    from components.registry.adapters import fetch_adapter
    from components.registry.model import fetch_model

    cfg, _ = small_cfg(tmp_path, "train.method=lora", "train.adapter.rank=4", "train.adapter.alpha=8",
                       "train.max_steps=2", "train.checkpoint_every=2", "train.run_name=lora", "train.lr.max=0.01",
                       "train.lr.min=0.001")
    first = run_training(cfg)
    assert first.model_name == "terminus-tiny-lora" and first.version == "1"

    # The checkpoint: the adapter and its optimizer state, no UNet.
    ckpt = tmp_path / "ray" / "lora" / "checkpoint_00000002"
    files = {p.name for p in ckpt.iterdir()}
    assert "adapter.safetensors" in files and "unet.safetensors" not in files
    adapter = load_file(ckpt / "adapter.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(adapter)  # AdamW moments for the adapter's tensors only
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 4

    # Resume by name: the same MLflow run, steps 3-4 after the checkpoint, the same base version.
    longer = cfg.model_copy(deep=True)
    longer.train.max_steps = 4
    second = run_training(longer)
    assert second.run_id == first.run_id and second.version == "2"
    assert history(cfg, second.run_id, "loss") == [1, 2, 3, 4]

    client = mlflow.MlflowClient()
    tags = client.get_model_version("terminus-tiny-lora", second.version).tags
    assert tags["adapter.method"] == "lora" and tags["adapter.rank"] == "4" and tags["adapter.alpha"] == "8"
    assert tags["base_model_uri"] == "models:/terminus-tiny-base/1"  # the tiny source, registered once
    assert [str(v.version) for v in client.search_model_versions("name = 'terminus-tiny-base'")] == ["1"]
    base = fetch_model(tags["base_model_uri"], tmp_path / "cache")
    assert tags["base_weights_sha256"] == weights_sha256(base.pipeline_dir)
    assert client.get_registered_model("terminus-tiny-lora").tags["terminus.kind"] == "adapter"
    run = client.get_run(second.run_id)
    assert run.data.params["train.method"] == "lora"
    assert any(a.path.startswith("images") for a in client.list_artifacts(second.run_id))  # validation images

    # The registered base is the tiny model itself; the trained LoRA changes what it predicts.
    fetched = fetch_adapter(f"models:/terminus-tiny-lora/{second.version}", tmp_path / "cache")
    unet = load_parts(cfg.model, tmp_path / "cache", source=str(base.pipeline_dir)).unet
    before = unet_output(unet)
    assert torch.equal(before, unet_output(build_tiny(cfg.model.tiny).unet))
    slots = AdapterSlots(unet)
    slots.ensure(fetched.key, read_adapter(fetched.directory))
    with slots.running(fetched.key):
        after = unet_output(unet)
    assert (after - before).abs().max() > 1e-3
