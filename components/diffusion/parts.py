"""The parts of an SDXL-layout model, and the error a model that cannot load raises."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from components.config import RecurringError


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
