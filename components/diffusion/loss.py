"""The training loss of the Terminus recipe on one batch, independent of Ray.

Precision policy (stated once, here):
- Which precision runs: the configured one where the device computes it natively
  (``effective_precision``). The recipe's bf16 is an instruction for the GPU run: a CUDA device with
  bf16, or a CPU with AVX512-BF16 or AMX, runs it; elsewhere (an AVX2-only CPU emulates bf16 about ten
  times slower than fp32) the run uses fp32 and says so. fp16 runs on CUDA only.
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
from diffusers import DDPMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from components.config import DiffusionConfig, Precision
from components.diffusion.conditioning import drop_captions, encode_text, time_ids
from components.diffusion.parts import SDXLParts
from components.diffusion.schedule import per_sample_mse, sample_timesteps, training_target, weighted_loss


def autocast(precision: Precision, device: torch.device):
    if precision is Precision.FP32:
        return nullcontext()
    dtype = torch.bfloat16 if precision is Precision.BF16 else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: CUDA with bf16, or a CPU with AVX512-BF16 or AMX
    whose kernels PyTorch actually dispatches to (``ATEN_CPU_CAPABILITY=avx2`` runs AVX2 kernels, which
    emulate bf16, on any CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        if not torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")):
            return False
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu, torch >= 2.3
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def effective_precision(precision: Precision, device: torch.device) -> Precision:
    """The precision a run uses on ``device`` for the configured ``precision`` (see the module docstring)."""
    if precision is Precision.BF16 and not native_bf16(device):
        return Precision.FP32
    if precision is Precision.FP16 and device.type != "cuda":
        return Precision.FP32
    return precision


def frozen_dtype(precision: Precision) -> torch.dtype:
    return {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(precision, torch.float32)


@dataclass
class Batch:
    """A batch from one aspect bucket; sizes are (B, 2) each.

    Raw input: pixels (B, 3, H, W), uint8 in 0..255 as decoded (the loaders' form: scaled on the step's
    device by ``unit_range``) or float in [-1, 1]. Cached input (curation's latent cache):
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

    def to(self, device: torch.device | str) -> Batch:
        """This batch with its tensors on ``device`` (itself when they are there already)."""
        device = torch.device(device)
        if self.device == device:
            return self
        moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in vars(self).items()}
        return Batch(**moved)


def unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (0..255) -> float32 in [-1, 1]; float pixels are taken as in [-1, 1] already."""
    if pixels.dtype == torch.uint8:
        return pixels.float().div_(127.5).sub_(1.0)
    return pixels


@torch.no_grad()
def encode_latents(parts: SDXLParts, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """VAE posterior sample times the scaling factor, in fp32. (B,3,H,W) -> (B,4,H/8,W/8).

    One image at a time (slicing): the fp32 SDXL VAE on a 1 MP batch of 24 alone peaks at ~65 GB
    (components/training/memory/plan.py), one image at ~2.7 GB; the latents are identical either way.
    """
    parts.vae.enable_slicing()
    dist = parts.vae.encode(unit_range(pixels).float()).latent_dist
    return dist.sample(generator) * parts.vae.config.scaling_factor


def sample_latents(latent_dist: torch.Tensor, generator: torch.Generator | None, scaling_factor: float) -> torch.Tensor:
    """A posterior sample from cached posterior parameters, times the VAE scaling factor: what
    ``encode_latents`` gives from pixels. latent_dist: (B, 2C, h, w) mean then log-variance -> (B, C, h, w)."""
    return DiagonalGaussianDistribution(latent_dist).sample(generator) * scaling_factor


@dataclass(frozen=True)
class LossSpec:
    """What stays fixed for a run: the training schedule, the recipe's loss settings, the precision, and
    how a dropped caption is fed: all-zero embeddings (``empty is None``), or ``empty``, the encoded empty
    prompt (embeds (1, 77, D), pooled (1, P)), with the dropped samples' time ids zeroed."""

    scheduler: DDPMScheduler
    diffusion: DiffusionConfig
    precision: Precision = Precision.FP32
    caption_dropout: float = 0.0
    empty: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class NoiseDraw:
    """Where one call's randomness comes from: a generator (one stream per rank and micro-batch), or,
    for a deterministic loss (validation), fixed ``timesteps`` (B,) and/or ``noise`` (B, C, h, w)."""

    generator: torch.Generator
    timesteps: torch.Tensor | None = None
    noise: torch.Tensor | None = None


def diffusion_loss(parts: SDXLParts, unet: torch.nn.Module, batch: Batch, spec: LossSpec,
                   draw: NoiseDraw) -> torch.Tensor:
    """The min-SNR weighted loss of ``unet`` on ``batch`` (a scalar). ``unet`` may be DDP-wrapped."""
    mse, timesteps = prediction_error(parts, unet, batch, spec, draw)
    return weighted_loss(mse, timesteps, spec.scheduler, spec.diffusion)


def prediction_error(parts: SDXLParts, unet: torch.nn.Module, batch: Batch, spec: LossSpec,
                     draw: NoiseDraw) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample MSE (B,) between the UNet's prediction and its target, and the timesteps (B,)."""
    device, gen = batch.device, draw.generator
    if batch.latent_dist is not None:  # the latent cache: a posterior sample drawn here
        latents = sample_latents(batch.latent_dist, gen, parts.vae.config.scaling_factor)
        embeds, pooled = batch.prompt_embeds, batch.pooled_embeds
    else:
        latents = encode_latents(parts, batch.pixels, gen)
        with autocast(spec.precision, device):
            embeds, pooled = encode_text(parts, batch.captions, device)
    embeds, pooled = embeds.float(), pooled.float()
    ids = time_ids(batch.original_size, batch.crop_top_left, batch.target_size).to(device)  # (B, 6)
    if spec.caption_dropout > 0:
        empty = None if spec.empty is None else (spec.empty[0].float(), spec.empty[1].float())
        embeds, pooled, keep = drop_captions(embeds, pooled, spec.caption_dropout, gen, empty)
        if empty is not None:  # the empty-prompt convention zeroes the dropped samples' time ids too
            ids = ids * keep.to(device, ids.dtype)[:, None]
    noise = draw.noise if draw.noise is not None else torch.randn(latents.shape, generator=gen).to(device)
    timesteps = draw.timesteps
    if timesteps is None:
        timesteps = sample_timesteps(latents.shape[0], spec.diffusion.num_train_timesteps, gen, device)
    noisy = spec.scheduler.add_noise(latents, noise, timesteps)
    added = {"text_embeds": pooled, "time_ids": ids}
    with autocast(spec.precision, device):
        pred = unet(noisy, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    target = training_target(spec.scheduler, latents, noise, timesteps)
    return per_sample_mse(pred, target), timesteps
