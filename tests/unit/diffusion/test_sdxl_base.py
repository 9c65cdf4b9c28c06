"""SDXL base at its published size: the configs' parameter counts and the seeded build."""

from __future__ import annotations

import torch

from components.config import ModelConfig
from components.diffusion import sdxl_base
from components.diffusion.sdxl_base import build_component, empty_component, seeded_init
from components.diffusion.source_kinds import SDXL_RANDOM, source_kind
from components.diffusion.tiny import tiny_tokenizer


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_configs_give_sdxl_base_parameter_counts():
    assert count(empty_component("unet")) == sdxl_base.SDXL_UNET_PARAMS == 2_567_463_684
    assert count(empty_component("text_encoder")) == 123_060_480
    assert count(empty_component("text_encoder_2")) == 694_659_840
    assert count(empty_component("vae")) == 83_653_863


def test_the_seeded_build_is_the_same_on_any_thread_count_and_differs_by_seed():
    one = seeded_init(empty_component("text_encoder"), 7, threads=1).state_dict()
    two = seeded_init(empty_component("text_encoder"), 7, threads=2).state_dict()
    other = seeded_init(empty_component("text_encoder"), 8, threads=2).state_dict()
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    weight = "encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(one[weight], other[weight])
    assert all(not v.is_meta for v in one.values())


def test_the_built_text_encoder_is_finite_with_default_scales_and_real_buffers():
    encoder = build_component("text_encoder", 0)
    weight = encoder.encoder.layers[0].mlp.fc1.weight
    assert abs(weight.std().item() - 1 / (3 * 768) ** 0.5) < 1e-3  # PyTorch's default uniform(+-1/sqrt(fan_in))
    assert torch.equal(encoder.embeddings.position_ids, torch.arange(77)[None])
    ids = tiny_tokenizer()(["a photograph"], padding="max_length", return_tensors="pt").input_ids
    assert int(ids.max()) < sdxl_base.SDXL_TEXT_ENCODER_CONFIG["vocab_size"]
    with torch.no_grad():
        out = encoder(ids).last_hidden_state
    assert out.shape == (1, 77, 768) and torch.isfinite(out).all()


def test_sdxl_random_is_a_source_of_its_own():
    assert source_kind(SDXL_RANDOM) == "sdxl_random"
    assert ModelConfig(source=SDXL_RANDOM, seed=3).seed == 3


def test_every_built_value_is_an_fp16_number_held_in_fp32():
    encoder = build_component("text_encoder", 0)
    for name, value in encoder.state_dict().items():
        if value.is_floating_point():
            assert value.dtype == torch.float32
            assert torch.equal(value.half().float(), value), name
