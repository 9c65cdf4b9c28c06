"""The tiny model's text path carries the prompt: different prompts, different conditioning."""

from __future__ import annotations

import torch

from components.config import Config
from components.diffusion.conditioning import encode_text
from components.diffusion.tiny import build_tiny


def test_tokenizer_encodes_every_character_between_bos_and_eos():
    tok = build_tiny(Config().model.tiny).tokenizer
    ids = tok("a cat").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == len("a cat") + 1  # one token per character, the space folded into "a</w>"
    assert tok.unk_token_id not in ids[1:-1]
    assert tok("a dog").input_ids != ids


def test_different_prompts_give_different_conditioning():
    parts = build_tiny(Config().model.tiny)
    embeds, pooled = encode_text(parts, ["a black cat at night", "white snow at noon"], "cpu")
    assert not torch.allclose(embeds[0], embeds[1])
    assert not torch.allclose(pooled[0], pooled[1])
    # the pooled output is taken at the end-of-text token, not at a padding position
    ids = parts.tokenizer_2(["a black cat at night"], padding="max_length", max_length=77,
                            return_tensors="pt").input_ids
    out = parts.text_encoder_2(ids, output_hidden_states=True)
    eos_at = int((ids[0] == parts.tokenizer_2.eos_token_id).nonzero()[0])
    expected = parts.text_encoder_2.text_projection(out.last_hidden_state[0, eos_at])
    assert torch.allclose(out.text_embeds[0], expected, atol=1e-5)
