"""One training micro-step of the Terminus recipe, independent of Ray.

Precision policy (stated once, here):
- UNet: fp32 master weights, forward/backward under bf16 autocast (``Precision.BF16``), fp16 autocast
  with a grad scaler only where asked, or plain fp32.
- VAE: always encodes in fp32 -- SDXL's VAE overflows in fp16.
- Text encoders: frozen, stored in the compute dtype (bf16/fp16; fp32 under FP32) and run without
  gradients (``frozen_dtype``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from components.conditioning import drop_captions, encode_text, time_ids
from components.config import DiffusionConfig, Precision
from components.diffusion import sample_timesteps, training_target, weighted_loss
from components.models import Components


def autocast(precision: Precision, device: torch.device):
    if precision is Precision.FP32:
        return nullcontext()
    dtype = torch.bfloat16 if precision is Precision.BF16 else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def frozen_dtype(precision: Precision) -> torch.dtype:
    return {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(precision, torch.float32)


@dataclass
class Batch:
    """A batch from one aspect bucket; sizes are (B, 2) each.

    Raw input: pixels (B, 3, H, W) in [-1, 1]. Cached input (curation's latent cache):
    latent_dist (B, 2C, H/8, W/8) posterior mean and log-variance, prompt_embeds (B, 77, D1 + D2),
    pooled_embeds (B, P2); then pixels is None and the frozen encoders are not run.
    """

    pixels: torch.Tensor | None
    captions: list[str]
    original_size: torch.Tensor
    crop_top_left: torch.Tensor
    target_size: torch.Tensor
    latent_dist: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    pooled_embeds: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return (self.pixels if self.pixels is not None else self.latent_dist).device


@torch.no_grad()
def encode_latents(parts: Components, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """VAE posterior sample times the scaling factor, in fp32. (B,3,H,W) -> (B,4,H/8,W/8).

    One image at a time (slicing): the fp32 SDXL VAE on a 1 MP batch of 24 alone peaks at ~65 GB
    (components/memory_plan.py), one image at ~2.7 GB; the latents are identical either way.
    """
    parts.vae.enable_slicing()
    dist = parts.vae.encode(pixels.float()).latent_dist
    return dist.sample(generator) * parts.vae.config.scaling_factor


def diffusion_loss(
    parts: Components,
    unet: torch.nn.Module,
    batch: Batch,
    scheduler,
    cfg: DiffusionConfig,
    precision: Precision,
    caption_dropout: float,
    generator: torch.Generator,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The min-SNR weighted loss of ``unet`` on ``batch`` (a scalar). ``unet`` may be DDP-wrapped.

    Fixed ``timesteps``/``noise`` make it deterministic (validation); otherwise both are drawn
    from ``generator`` (one stream per rank).
    """
    device = batch.device
    if batch.latent_dist is not None:  # a posterior sample drawn here, as encode_latents would
        latents = DiagonalGaussianDistribution(batch.latent_dist).sample(generator) * parts.vae.config.scaling_factor
        embeds, pooled = batch.prompt_embeds, batch.pooled_embeds
    else:
        latents = encode_latents(parts, batch.pixels, generator)
        with autocast(precision, device):
            embeds, pooled = encode_text(parts, batch.captions, device)
    embeds, pooled = embeds.float(), pooled.float()
    if caption_dropout > 0:
        embeds, pooled, _ = drop_captions(embeds, pooled, caption_dropout, generator)
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator).to(device)
    if timesteps is None:
        timesteps = sample_timesteps(latents.shape[0], cfg.num_train_timesteps, generator, device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    added = {"text_embeds": pooled, "time_ids": time_ids(batch.original_size, batch.crop_top_left, batch.target_size).to(device)}
    with autocast(precision, device):
        pred = unet(noisy, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    target = training_target(scheduler, latents, noise, timesteps)
    return weighted_loss(pred, target, timesteps, scheduler, cfg)
