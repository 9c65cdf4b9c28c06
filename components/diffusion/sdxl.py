"""One loader for every SDXL-layout model the platform touches.

Sources: ``tiny`` (built offline from a fixed seed, wired exactly as SDXL), a local diffusers
directory, a Hugging Face hub id, or an ``s3://`` prefix fetched into a local cache
(``components.storage.fetch_prefix``).
Saved models are plain diffusers directories in safetensors whose scheduler carries the ZT-SNR
trailing v-prediction settings, so vanilla ``StableDiffusionXLPipeline.from_pretrained`` is correct.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from components.config import DiffusionConfig, ModelConfig, RecurringError, TinyModelConfig
from components.diffusion.schedule import inference_scheduler
from components.storage import fetch_prefix, is_s3


class ModelLoadError(RecurringError):
    pass


@dataclass
class SDXLParts:
    """The SDXL parts, as ``StableDiffusionXLPipeline`` names them."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    force_zeros_for_empty_prompt: bool = True
    """The pipeline's convention for an empty prompt (SDXL: zeros); training's caption dropout follows it
    (``train.caption_dropout_mode``), and a saved pipeline records it (``model_index.json``)."""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# --- the tiny offline model ---------------------------------------------------------------------


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


# --- loading ------------------------------------------------------------------------------------


def resolve_source(source: str, cache_dir: str | Path) -> str:
    """A local directory for s3:// sources (downloaded into ``cache_dir/s3``); anything else as is."""
    if is_s3(source):
        try:
            return str(fetch_prefix(source, Path(cache_dir) / "s3"))
        except (FileNotFoundError, ValueError) as err:
            raise ModelLoadError(f"model source {source}: {err}") from None
    return source


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import) or at import time.

    Offline, a hub id is looked up in the local cache only (``local_files_only``), so loading fails
    at once with one line instead of a connection attempt and a logged warning.
    """
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return now or bool(constants.HF_HUB_OFFLINE)


def load_parts(model: ModelConfig, cache_dir: str | Path, source: str | None = None) -> SDXLParts:
    """The SDXL parts of ``source`` (default ``model.source``), in fp32 (the precision policy casts
    later). ``cache_dir`` holds downloads of s3:// sources."""
    source = source or model.source
    if source == "tiny":
        return build_tiny(model.tiny)
    location = resolve_source(source, cache_dir)
    is_local = Path(location).is_dir()
    if not is_local and ("/" not in location or location.startswith((".", "/"))):
        raise ModelLoadError(f"model source {source!r} is neither 'tiny', a directory, a hub id nor s3://")
    offline = not is_local and hub_offline()
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            location, revision=model.revision, variant=model.variant, use_safetensors=True,
            dtype=torch.float32, local_files_only=offline,
        )
    except (OSError, ValueError) as err:
        if offline:
            raise ModelLoadError(
                f"model source {location!r} is a hub id, not in the local Hugging Face cache, and "
                "HF_HUB_OFFLINE is set: run where the hub is reachable with HF_HUB_OFFLINE unset, "
                "or use a local directory or an s3:// prefix"
            ) from None
        where = "directory" if is_local else "hub id (is the hub reachable?)"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot load SDXL {where} {location!r}: {first}") from None
    return SDXLParts(
        pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
        bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
    )


def save_pipeline(parts: SDXLParts, diffusion: DiffusionConfig, directory: str | Path) -> Path:
    """A plain diffusers directory in safetensors with the ZT-SNR trailing v-prediction scheduler."""
    pipe = StableDiffusionXLPipeline(scheduler=inference_scheduler(diffusion), **parts.as_dict())
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)
