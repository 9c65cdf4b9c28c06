"""The models built offline, from a fixed seed: ``tiny`` (small, wired exactly as SDXL) and ``sdxl-random``
(SDXL base at its published size with seeded random weights: ``components.diffusion.sdxl_base``), and the
offline tokenizer both use (byte-level, its ids inside CLIP's 49408-entry vocabulary).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from components.config import TinyModelConfig
from components.diffusion.parts import SDXLParts
from components.diffusion.sdxl_base import COMPONENTS, build_component


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with no merges (one token per character), built offline.

    transformers 5's CLIPTokenizer takes the vocabulary and merges themselves (``vocab=``,
    ``merges=``); ``model_max_length=77`` as SDXL, without which padding to max length overflows.
    """
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def build_tiny(cfg: TinyModelConfig) -> SDXLParts:
    """SDXL wiring at toy size: two CLIP encoders whose hidden sizes sum to the UNet's
    cross_attention_dim; ``text_time`` added embedding of pooled_dim + 6 * time_embed_dim."""
    torch.manual_seed(cfg.seed)
    text_cfg = dict(
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=cfg.text_layers,
        vocab_size=1000, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
        hidden_act="gelu",
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=cfg.text_hidden_1, **text_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=cfg.text_hidden_2, projection_dim=cfg.text_hidden_2, **text_cfg)
    )
    unet = UNet2DConditionModel(
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=cfg.addition_time_embed_dim,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=cfg.text_hidden_2 + 6 * cfg.addition_time_embed_dim,
        cross_attention_dim=cfg.text_hidden_1 + cfg.text_hidden_2,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=cfg.vae_channels,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
    )
    return SDXLParts(unet, vae, text_encoder, text_encoder_2, tiny_tokenizer(), tiny_tokenizer())



def build_sdxl_random(seed: int) -> SDXLParts:
    """SDXL base at real size (3.5 B parameters, fp32) with seeded random weights and the offline tokenizer
    (its ids fit SDXL's 49408-entry vocabulary)."""
    modules = {name: build_component(name, seed) for name in COMPONENTS}
    return SDXLParts(**modules, tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer())
