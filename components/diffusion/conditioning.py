"""SDXL conditioning: text from both encoders, micro-conditioning time ids, caption dropout.

SDXL (Podell et al. 2023, sec. 2.2; diffusers ``StableDiffusionXLPipeline.encode_prompt``):
- cross-attention input: penultimate hidden states of encoder 1 and encoder 2, concatenated on
  the feature axis (768 + 1280 = 2048 for SDXL);
- added embedding: pooled, projected output of encoder 2, plus 6 time ids.
- time ids: original (pre-resize) size (h, w), crop top-left (top, left), target size (h, w).
"""

from __future__ import annotations

import torch

from components.diffusion.parts import SDXLParts


def tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


@torch.no_grad()
def encode_text(parts: SDXLParts, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns prompt_embeds (B, 77, D1 + D2) and pooled_embeds (B, P2)."""
    out_1 = parts.text_encoder(tokenize(parts.tokenizer, prompts, device), output_hidden_states=True)
    out_2 = parts.text_encoder_2(tokenize(parts.tokenizer_2, prompts, device), output_hidden_states=True)
    embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)  # (B, 77, D1+D2)
    return embeds, out_2.text_embeds  # text_embeds: (B, P2), the projected pooled output


def drop_captions(
    embeds: torch.Tensor, pooled: torch.Tensor, p: float, generator: torch.Generator,
    empty: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """With probability p a sample's caption is dropped: its conditioning becomes all zeros, or, given
    ``empty`` (the encoded empty prompt: (1, 77, D) and (1, P)), that encoding.

    Zeros are SDXL's empty-prompt conditioning when the pipeline's ``force_zeros_for_empty_prompt`` is
    True (SDXL's own config): CFG's unconditional branch is then zeros, and dropout trains exactly that
    branch. A base model trained with the encoded empty prompt instead (the trainers of the Terminus
    era) keeps ``empty``. Returns (embeds, pooled, keep mask (B,)).
    """
    keep = torch.rand(embeds.shape[0], generator=generator) >= p  # (B,)
    mask = keep.to(embeds.device, embeds.dtype)
    if empty is None:
        return embeds * mask[:, None, None], pooled * mask[:, None], keep
    empty_embeds, empty_pooled = (e.to(embeds.device, embeds.dtype) for e in empty)
    embeds = embeds * mask[:, None, None] + empty_embeds * (1 - mask)[:, None, None]
    pooled = pooled * mask[:, None] + empty_pooled * (1 - mask)[:, None]
    return embeds, pooled, keep


def dropout_uses_zeros(mode: str, base_zeros: bool) -> bool:
    """Whether a dropped caption becomes zeros (else the encoded empty prompt): ``zeros`` or
    ``empty_prompt`` as configured, ``auto`` as the base model's ``force_zeros_for_empty_prompt`` says."""
    if mode == "auto":
        return base_zeros
    return mode == "zeros"


def time_ids(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor
) -> torch.Tensor:
    """(B, 6) = [orig_h, orig_w, crop_top, crop_left, target_h, target_w]; each input is (B, 2)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()
