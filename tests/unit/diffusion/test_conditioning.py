"""SDXL conditioning: time ids, two-encoder text embeddings (parity with diffusers), caption dropout."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from components.config import TinyModelConfig
from components.diffusion.conditioning import drop_captions, encode_text, time_ids, tokenize
from components.diffusion.tiny import build_tiny

PROMPTS = ["a photograph of an astronaut", "", "a cat on a sofa, 35mm, golden hour"]


@pytest.fixture(scope="module")
def parts():
    return build_tiny(TinyModelConfig())


@pytest.fixture(scope="module")
def pipe(parts):
    return StableDiffusionXLPipeline(scheduler=DDIMScheduler(), **parts.as_dict())


def test_time_ids_order(pipe):
    original = torch.tensor([[1024, 768], [300, 200]])
    crop = torch.tensor([[16, 32], [0, 8]])
    target = torch.tensor([[512, 384], [256, 192]])
    ids = time_ids(original, crop, target)
    assert ids.shape == (2, 6) and ids.dtype == torch.float32
    assert ids[0].tolist() == [1024, 768, 16, 32, 512, 384]  # orig h, w, crop top, left, target h, w
    # diffusers builds them from (h, w) tuples in the same order
    ref = pipe._get_add_time_ids(
        (300, 200), (0, 8), (256, 192), torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    assert torch.equal(ids[1:], ref)


@torch.no_grad()
def test_encode_text_is_penultimate_states_of_both_encoders(parts):
    embeds, pooled = encode_text(parts, PROMPTS, "cpu")
    hidden_1 = parts.text_encoder.config.hidden_size
    hidden_2 = parts.text_encoder_2.config.hidden_size
    assert embeds.shape == (3, 77, hidden_1 + hidden_2)
    assert pooled.shape == (3, parts.text_encoder_2.config.projection_dim)

    ids_1 = parts.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
    ids_2 = parts.tokenizer_2(PROMPTS, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    out_1 = parts.text_encoder(ids_1, output_hidden_states=True)
    out_2 = parts.text_encoder_2(ids_2, output_hidden_states=True)
    assert len(out_1.hidden_states) == parts.text_encoder.config.num_hidden_layers + 1
    assert torch.equal(embeds[..., :hidden_1], out_1.hidden_states[-2])
    assert torch.equal(embeds[..., hidden_1:], out_2.hidden_states[-2])
    assert not torch.equal(out_2.hidden_states[-2], out_2.hidden_states[-1])  # really the penultimate
    assert torch.equal(pooled, out_2.text_embeds)  # projected pooled output of encoder 2
    assert torch.equal(tokenize(parts.tokenizer, PROMPTS, "cpu"), ids_1)


@torch.no_grad()
def test_encode_text_parity_with_diffusers_encode_prompt(parts, pipe):
    embeds, pooled = encode_text(parts, PROMPTS, "cpu")
    ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(
        PROMPTS, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    assert torch.equal(embeds, ref_embeds)
    assert torch.equal(pooled, ref_pooled)


@torch.no_grad()
def test_dropped_caption_equals_the_cfg_unconditional_branch(parts, pipe):
    """SDXL's force_zeros_for_empty_prompt makes CFG's unconditional input all zeros; dropout matches."""
    assert pipe.config.force_zeros_for_empty_prompt
    _, negative, _, negative_pooled = pipe.encode_prompt(
        PROMPTS[:1], device=torch.device("cpu"), do_classifier_free_guidance=True
    )
    embeds, pooled = encode_text(parts, PROMPTS[:1], "cpu")
    dropped, dropped_pooled, keep = drop_captions(embeds, pooled, 1.0, torch.Generator().manual_seed(0))
    assert not keep.any()
    assert torch.equal(dropped, negative) and torch.equal(dropped_pooled, negative_pooled)


def test_caption_dropout_rate_and_exact_zeros():
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    embeds = torch.randn(n, 4, 3) + 5.0  # no accidental zeros
    pooled = torch.randn(n, 2) + 5.0
    out, out_pooled, keep = drop_captions(embeds, pooled, 0.1, gen)
    rate = 1.0 - keep.float().mean().item()
    assert abs(rate - 0.1) < 0.01  # binomial std at n = 20k is 0.002
    assert keep.dtype == torch.bool and keep.shape == (n,)
    assert torch.all(out[~keep] == 0) and torch.all(out_pooled[~keep] == 0)
    assert torch.equal(out[keep], embeds[keep]) and torch.equal(out_pooled[keep], pooled[keep])


@pytest.mark.parametrize(("p", "kept"), [(0.0, 64), (1.0, 0)])
def test_caption_dropout_extremes(p, kept):
    _, _, keep = drop_captions(torch.ones(64, 2, 2), torch.ones(64, 2), p, torch.Generator().manual_seed(1))
    assert int(keep.sum()) == kept


def test_caption_dropout_is_seeded():
    a = drop_captions(torch.ones(100, 1, 1), torch.ones(100, 1), 0.5, torch.Generator().manual_seed(3))[2]
    b = drop_captions(torch.ones(100, 1, 1), torch.ones(100, 1), 0.5, torch.Generator().manual_seed(3))[2]
    assert torch.equal(a, b)
