"""The tiny model's SDXL wiring, saving for vanilla diffusers, and the one loader (dir, s3://, hub)."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from safetensors.torch import load_file

from components.config import Config, TinyModelConfig
from components.config.loading import load_config
from components.diffusion import single_file as sf
from components.diffusion.parts import ModelLoadError, SDXLParts
from components.diffusion.safetensors_stream import read_header
from components.diffusion.sdxl import exact_dtype, load_parts, save_pipeline
from components.diffusion.tiny import build_tiny
from tests.fixtures.processes import REPO


@pytest.fixture(scope="module")
def parts() -> SDXLParts:
    return build_tiny(TinyModelConfig())


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory) -> Path:
    return save_pipeline(parts, Config().diffusion, tmp_path_factory.mktemp("saved") / "pipe")


def assert_same_weights(a: SDXLParts, b: SDXLParts) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sd_a, sd_b = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sd_a.keys() == sd_b.keys(), name
        for key in sd_a:
            assert torch.equal(sd_a[key], sd_b[key]), f"{name}.{key}"
    for name in ("tokenizer", "tokenizer_2"):
        ids_a = getattr(a, name)(["a cat"], padding="max_length", return_tensors="pt").input_ids
        ids_b = getattr(b, name)(["a cat"], padding="max_length", return_tensors="pt").input_ids
        assert torch.equal(ids_a, ids_b)


@pytest.mark.parametrize("sizes", [{}, {"text_hidden_1": 16, "text_hidden_2": 48, "addition_time_embed_dim": 4}])
def test_tiny_model_is_wired_as_sdxl(sizes):
    cfg = TinyModelConfig(**sizes)
    parts = build_tiny(cfg)
    unet = parts.unet.config
    hidden_1 = parts.text_encoder.config.hidden_size
    hidden_2 = parts.text_encoder_2.config.hidden_size
    pooled = parts.text_encoder_2.config.projection_dim
    assert unet.cross_attention_dim == hidden_1 + hidden_2  # SDXL: 768 + 1280 = 2048
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == pooled + 6 * unet.addition_time_embed_dim
    assert parts.unet.add_embedding.linear_1.in_features == unet.projection_class_embeddings_input_dim
    assert 2 ** (len(parts.vae.config.block_out_channels) - 1) == 8  # VAE downsamples by 8, as SDXL's
    assert parts.vae.config.latent_channels == unet.in_channels == 4


def test_tiny_model_is_deterministic(parts):
    assert_same_weights(parts, build_tiny(TinyModelConfig()))


def test_saved_pipeline_loads_with_vanilla_diffusers(saved):
    files = [p.name for p in saved.rglob("*") if p.is_file()]
    assert any(name.endswith(".safetensors") for name in files)
    assert not any(name.endswith(".bin") for name in files)  # no pickles

    pipe = StableDiffusionXLPipeline.from_pretrained(str(saved))
    sched = pipe.scheduler
    assert isinstance(sched, DDIMScheduler)
    assert sched.config.timestep_spacing == "trailing"
    assert sched.config.prediction_type == "v_prediction"
    assert sched.config.rescale_betas_zero_snr is True
    assert sched.alphas_cumprod[-1].item() == 0.0
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a cat", height=64, width=64, num_inference_steps=2, guidance_scale=5.0, guidance_rescale=0.7,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_load_components_from_a_directory_round_trips(parts, saved, tmp_path):
    cfg = Config(state_dir=str(tmp_path))
    cfg.model.source = str(saved)
    loaded = load_parts(cfg.model, cfg.state_path("cache"))
    assert isinstance(loaded, SDXLParts)
    assert_same_weights(parts, loaded)
    assert loaded.unet.dtype == torch.float32


def test_weights_that_are_fp16_numbers_are_stored_in_fp16_and_load_back_equal(tmp_path):
    parts = build_tiny(TinyModelConfig())
    with torch.no_grad():
        for value in parts.text_encoder.parameters():
            value.copy_(value.half().float())
    assert exact_dtype(parts.text_encoder) == torch.float16 and exact_dtype(parts.unet) is None
    saved = save_pipeline(parts, Config().diffusion, tmp_path / "pipe")
    assert parts.text_encoder.dtype == torch.float32  # cast back after the write

    def dtypes(component: str) -> set[str]:
        return {e["dtype"] for f in (saved / component).glob("*.safetensors")
                for k, e in read_header(f)[1].items() if k != "__metadata__"} - {"I64"}
    assert dtypes("text_encoder") == {"F16"} and dtypes("unet") == {"F32"}
    cfg = Config(state_dir=str(tmp_path))
    cfg.model.source = str(saved)
    loaded = load_parts(cfg.model, cfg.state_path("cache"))
    assert loaded.text_encoder.dtype == torch.float32
    assert_same_weights(parts, loaded)


def test_load_components_tiny(parts):
    assert_same_weights(parts, load_parts(Config().model, Config().state_path("cache")))


def test_load_components_from_s3(parts, saved, s3_env, tmp_path):
    bucket = f"models-{uuid.uuid4().hex[:8]}"  # the moto server is shared by the whole session
    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket=bucket)
    for path in saved.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"tiny/v1/{path.relative_to(saved).as_posix()}")

    cfg = Config(state_dir=str(tmp_path / "state"))
    cfg.model.source = f"s3://{bucket}/tiny/v1"
    loaded = load_parts(cfg.model, cfg.state_path("cache"))
    assert_same_weights(parts, loaded)
    cached = tmp_path / "state" / "cache" / "s3" / bucket / "tiny" / "v1"
    assert (cached / "model_index.json").is_file()
    assert not list(cached.rglob("*.partial"))

    cfg.model.source = f"s3://{bucket}/absent"
    with pytest.raises(ModelLoadError, match=f"no objects under s3://{bucket}/absent"):
        load_parts(cfg.model, cfg.state_path("cache"))


def test_hub_id_offline_fails_in_one_line_without_network(monkeypatch, capfd, caplog, tmp_path):
    connections = []
    real_connect = socket.socket.connect

    def record(sock, address):
        connections.append(address)
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", record)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    cfg = Config(state_dir=str(tmp_path))
    cfg.model.source = "ptx0/terminus-xl-gamma-v1"
    capfd.readouterr()
    with pytest.raises(ModelLoadError) as info:
        load_parts(cfg.model, cfg.state_path("cache"))
    message = str(info.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message and "ptx0/terminus-xl-gamma-v1" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    err = capfd.readouterr().err
    assert "Traceback" not in err and "connect" not in err.lower()
    assert not [r for r in caplog.records if "connect" in r.getMessage().lower()]  # no hub attempt logged
    assert connections == []


@pytest.mark.parametrize("source", ["not-a-model", "./absent/dir"])
def test_bad_source_is_a_one_line_error(source, tmp_path):
    cfg = Config(state_dir=str(tmp_path))
    cfg.model.source = source
    with pytest.raises(ModelLoadError) as info:
        load_parts(cfg.model, cfg.state_path("cache"))
    assert "\n" not in str(info.value) and source in str(info.value)


def test_directory_without_a_pipeline_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = Config(state_dir=str(tmp_path))
    cfg.model.source = str(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="cannot load SDXL directory") as info:
        load_parts(cfg.model, cfg.state_path("cache"))
    assert "\n" not in str(info.value)


def test_saved_weights_are_sharded_and_every_reader_takes_the_shards(tmp_path):
    """Loaders hold one shard as stored beside the model in fp32 (``SHARD_SIZE``): the shards must be real
    files of bounded size, and the loader and the single-file export must read them all."""
    preset = load_config(REPO / "flows/configs/tiny.yaml")  # text encoders of SDXL's distinct widths' ratio
    parts = build_tiny(preset.model.tiny)
    saved = save_pipeline(parts, Config().diffusion, tmp_path / "whole")
    assert all(len(list((saved / c).glob("*.safetensors"))) == 1 for c in ("unet", "vae"))
    sharded = save_pipeline(parts, Config().diffusion, tmp_path / "sharded", max_shard_size="200KB")
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        shards = sorted((sharded / component).glob("*.safetensors"))
        assert len(shards) > 1, component
        assert (sharded / component / f"{shards[0].name.split('-')[0]}.safetensors.index.json").is_file()
        largest_tensor = max(t.numel() * t.element_size() for t in getattr(parts, component).state_dict().values())
        assert max(p.stat().st_size for p in shards) <= max(200_000, largest_tensor) + 100_000, component
    cfg = Config(state_dir=str(tmp_path))
    cfg.model.source = str(sharded)
    assert_same_weights(parts, load_parts(cfg.model, cfg.state_path("cache")))
    one, other = (sf.export_pipeline(d, tmp_path / f"{d.name}.safetensors", "fp16", title="t",
                                     date="2024-05-01T00:00:00Z", resolution=(64, 64), license="openrail++",
                                     metadata={}) for d in (saved, sharded))
    a, b = load_file(one), load_file(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
