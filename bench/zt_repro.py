"""A small reproduction of Lin et al. 2023's central claim: with the default (non-zero terminal SNR)
schedule a model cannot generate images much darker or brighter than average; ZT-SNR fixes it.

"Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al. 2023, sec. 3): at t = T
SDXL's schedule still keeps sqrt(alphabar_T) = 0.068 of the signal, so training teaches the model to
read the overall brightness (the latent's low frequencies) from its input, while sampling starts from
pure noise that carries none. Samples then regress to medium brightness.

Setup (docs/recipe.md, last section): a toy set of 256x256 images that differ mainly in overall brightness
(half near black, half near white, generated here), so 4 x 32 x 32 latents. The mean of 4096 unit
Gaussians has std 1/64, small next to the data's brightness spread times 0.068, so a leak is
visible; with 4 x 8 x 8 latents it would be masked.

Two arms train the same tiny UNet (``build_tiny``) from the same initial weights, on the same
batches, noise and timesteps (one generator seed), through the platform's own
``components.diffusion.loss.diffusion_loss`` (min-SNR gamma 5 in both):
  (a) ``zt_v``: ZT-SNR schedule + v-prediction, sampled with ``components.diffusion.schedule.inference_scheduler``
      (DDIM, trailing spacing, starts at t = 999);
  (b) ``default_eps``: SDXL's default schedule + epsilon, sampled with DDIM as SD configures it
      (leading spacing, ``steps_offset=1``, starts at t = 961 for 25 steps); also sampled with
      trailing spacing (``default_eps_trailing``) to separate the sampler's share from training's.
Both arms sample from the same initial noise. Brightness = mean pixel value in [0, 1] of the
decoded sample; the figure of merit is its std across samples next to the data's.

The tiny VAE is randomly initialised, and a random VAE's GroupNorms discard most of the brightness
(a black and a white image differ in latent channel means by a small fraction of the posterior noise).
So before the experiment the VAE is fitted as a deterministic autoencoder on the toy data
at 64x64 (it is fully convolutional; brightness is a local property, so the fit transfers to 256x256,
which ``data.recon_brightness_std`` checks) and its ``scaling_factor`` is set to 1 / std of the data
latents, as Rombach et al. 2022 (sec. 4.3.2 / appendix G) chose SD's 0.18215.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from components.config import (
    DiffusionConfig,
    LRConfig,
    OptimizerName,
    Precision,
    PredictionType,
    TinyModelConfig,
    TrainConfig,
)
from components.diffusion.loss import Batch, LossSpec, NoiseDraw, diffusion_loss
from components.diffusion.parts import SDXLParts
from components.diffusion.schedule import inference_scheduler, scheduler_kwargs, training_scheduler
from components.diffusion.tiny import build_tiny
from components.evaluation.probe import luminance
from components.training.optim import build_lr_scheduler, build_optimizer

ARMS = {
    "zt_v": DiffusionConfig(zero_terminal_snr=True, prediction_type=PredictionType.V),
    "default_eps": DiffusionConfig(zero_terminal_snr=False, prediction_type=PredictionType.EPSILON),
}


def make_dataset(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 3, size, size) in [-1, 1] and their mean brightness (n,) in [0, 1].

    Even indices near black (level 0.03-0.20), odd near white (0.80-0.97); each with a faint
    sinusoidal texture (amplitude 0.04) and colour tint (+-0.03) so they are not all identical.
    """
    gen = torch.Generator().manual_seed(seed)
    dark = torch.arange(n) % 2 == 0
    level = torch.where(dark, 0.03 + 0.17 * torch.rand(n, generator=gen), 0.80 + 0.17 * torch.rand(n, generator=gen))
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")  # (S, S)
    freq_x, freq_y = 1 + 3 * torch.rand(n, generator=gen), 1 + 3 * torch.rand(n, generator=gen)
    phase = 2 * math.pi * torch.rand(n, generator=gen)
    wave = torch.sin(2 * math.pi * (freq_x[:, None, None] * xx + freq_y[:, None, None] * yy) + phase[:, None, None])
    tint = 0.03 * (2 * torch.rand(n, 3, generator=gen) - 1)
    images = (level[:, None, None, None] + 0.04 * wave[:, None] + tint[:, :, None, None]).clamp(0, 1)  # (n,3,S,S)
    return images * 2 - 1, images.mean(dim=(1, 2, 3))


def brightness(pixels: torch.Tensor) -> torch.Tensor:
    """Mean pixel value in [0, 1] of images in [-1, 1]: (n, 3, H, W) -> (n,)."""
    return ((pixels.clamp(-1, 1) + 1) / 2).mean(dim=(1, 2, 3))


def fit_autoencoder(vae, pixels: torch.Tensor, steps: int, seed: int, resolution: int = 64) -> None:
    """Make the random tiny VAE a deterministic autoencoder of the toy data (in place).

    The posterior's log-variance is pinned to -20 (std 4.5e-5; ``quant_conv``'s variance half
    zeroed), so ``diffusion_loss``'s posterior sample is the mean; then encoder and decoder are
    fitted with plain MSE on the images area-downsampled to ``resolution``.
    """
    latent = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[latent:].zero_()
        vae.quant_conv.bias[latent:].fill_(-20.0)
    small = F.interpolate(pixels, size=(resolution, resolution), mode="area")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in vae.parameters()], lr=1e-3)
    vae.train()
    for _ in range(steps):
        x = small[torch.randint(0, len(small), (8,), generator=gen)]
        z = vae.encode(x).latent_dist.mean  # only the mean path: the pinned variance gets no gradient
        loss = F.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_mean(vae, pixels: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Unscaled posterior means, (n, 3, S, S) -> (n, 4, S/8, S/8)."""
    return torch.cat([vae.encode(pixels[i:i + chunk]).latent_dist.mean for i in range(0, len(pixels), chunk)])


@torch.no_grad()
def decode(vae, latents: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Scaled latents (n, 4, h, w) -> pixels (n, 3, 8h, 8w) in [-1, 1]."""
    z = latents / vae.config.scaling_factor
    return torch.cat([vae.decode(z[i:i + chunk]).sample for i in range(0, len(z), chunk)]).clamp(-1, 1)


def sd_default_sampler(cfg: DiffusionConfig) -> DDIMScheduler:
    """DDIM as Stable Diffusion ships it (SD 1.x/2.x scheduler_config.json): leading spacing,
    steps_offset 1, no alpha-to-one, no clipping -- the sampler Lin et al. call flawed (Table 2)."""
    return DDIMScheduler(**scheduler_kwargs(cfg), clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def train_arm(
    parts: SDXLParts, cfg: DiffusionConfig, pixels: torch.Tensor, steps: int, batch: int, lr: float, seed: int
) -> tuple[torch.nn.Module, list[float]]:
    """Trains a copy of ``parts.unet`` with ``diffusion_loss``; returns it and the loss history."""
    unet = copy.deepcopy(parts.unet).train().requires_grad_(True)
    arm = replace(parts, unet=unet)
    train = TrainConfig(
        optimizer=OptimizerName.ADAMW, weight_decay=0.0,
        lr=LRConfig(max=lr, min=lr / 10, warmup_steps=max(1, steps // 20)),
    )
    optimizer = build_optimizer(unet.parameters(), train, "cpu")
    lr_schedule = build_lr_scheduler(optimizer, train.lr, steps)
    spec = LossSpec(training_scheduler(cfg), cfg, Precision.FP32)
    size = pixels.shape[-1]
    sizes = torch.tensor([[size, size]] * batch)  # no resize, no crop: (B, 2)
    data_gen = torch.Generator().manual_seed(seed)
    loss_gen = torch.Generator().manual_seed(seed + 1)  # noise, timesteps: identical across arms
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(pixels), (batch,), generator=data_gen)
        step_batch = Batch(pixels[idx], [""] * batch, sizes, torch.zeros(batch, 2), sizes)
        loss = diffusion_loss(arm, unet, step_batch, spec, NoiseDraw(loss_gen))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
    return unet.eval().requires_grad_(False), losses


@torch.no_grad()
def sample_latents(parts: SDXLParts, unet, scheduler, n: int, size: int, steps: int, seed: int) -> torch.Tensor:
    """``n`` unconditional samples through diffusers' SDXL pipeline, as scaled latents (n, 4, h, w).

    No CFG (the model never saw a caption), so ``guidance_scale=1``; sample i starts from the noise
    of ``Generator().manual_seed(seed + i)`` whatever the arm.
    """
    pipe = StableDiffusionXLPipeline(scheduler=scheduler, **replace(parts, unet=unet).as_dict())
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    out = pipe(
        prompt="", num_images_per_prompt=n, height=size, width=size, num_inference_steps=steps,
        guidance_scale=1.0, generator=gens, output_type="latent",
    )
    return out.images


def spread(values: torch.Tensor, data_std: float) -> dict:
    return {
        "brightness_mean": round(values.mean().item(), 4),
        "brightness_std": round(values.std().item(), 4),
        "spread_ratio": round(values.std().item() / data_std, 3),
        "frac_dark": round((values < 0.3).float().mean().item(), 3),
        "frac_bright": round((values > 0.7).float().mean().item(), 3),
        "min": round(values.min().item(), 4),
        "max": round(values.max().item(), 4),
    }


def probe_reach(pixels: torch.Tensor) -> dict:
    """The evaluation probe's own statistics (components/evaluation/probe.py) on unconditional samples:
    the spread of the per-image Rec. 709 luminance (how far apart the samples reach) and its extremes.
    pixels: (n, 3, H, W) in [-1, 1]."""
    images = ((pixels.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()  # (n, H, W, 3) in [0, 1]
    lum = luminance(list(images))
    return {"luminance_spread": round(float(lum.std()), 4), "luminance_min": round(float(lum.min()), 4),
            "luminance_max": round(float(lum.max()), 4)}


def run_repro(
    steps: int = 120,
    batch: int = 8,
    n_data: int = 64,
    n_samples: int = 32,
    sample_steps: int = 25,
    image_size: int = 256,
    vae_fit_steps: int = 60,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict:
    """Runs both arms and returns the figures (a JSON-able dict). Defaults: ~3 min on 2 free cores."""
    start = time.perf_counter()
    pixels, data_brightness = make_dataset(n_data, image_size, seed)
    parts = build_tiny(TinyModelConfig(seed=seed))
    fit_autoencoder(parts.vae, pixels, vae_fit_steps, seed, resolution=min(64, image_size))
    latents = encode_mean(parts.vae, pixels)  # (n, 4, S/8, S/8), unscaled
    scaling = 1.0 / latents.std().item()
    parts.vae.register_to_config(scaling_factor=scaling)
    parts.text_encoder.requires_grad_(False)
    parts.text_encoder_2.requires_grad_(False)
    scaled = latents * scaling
    data_std = data_brightness.std().item()
    recon = brightness(decode(parts.vae, scaled))
    result = {
        "settings": {
            "steps": steps, "batch": batch, "n_data": n_data, "n_samples": n_samples,
            "sample_steps": sample_steps, "image_size": image_size, "latent_shape": list(scaled.shape[1:]),
            "vae_fit_steps": vae_fit_steps, "lr": lr, "seed": seed, "min_snr_gamma": 5.0,
            "precision": "fp32", "torch_threads": torch.get_num_threads(),
        },
        "data": {
            **spread(data_brightness, data_std),
            "recon_brightness_std": round(recon.std().item(), 4),
            "recon_abs_error": round((recon - data_brightness).abs().mean().item(), 4),
            "latent_mean_std": round(scaled.mean(dim=(1, 2, 3)).std().item(), 4),
            "noise_latent_mean_std": round(1 / math.sqrt(scaled[0].numel()), 4),
            "vae_scaling_factor": round(scaling, 4),
        },
        "arms": {},
    }
    samplers = {
        "zt_v": lambda cfg: inference_scheduler(cfg),
        "default_eps": sd_default_sampler,
        "default_eps_trailing": lambda cfg: inference_scheduler(cfg),
    }
    for name, cfg in ARMS.items():
        t0 = time.perf_counter()
        unet, losses = train_arm(parts, cfg, pixels, steps, batch, lr, seed)
        train_s = time.perf_counter() - t0
        tail = losses[-max(1, len(losses) // 10):]
        for label in [k for k in samplers if k.startswith(name)]:
            t1 = time.perf_counter()
            sampler = samplers[label](cfg)
            z = sample_latents(parts, unet, sampler, n_samples, image_size, sample_steps, seed + 10_000)
            pixels_out = decode(parts.vae, z)
            values = brightness(pixels_out)
            sampler.set_timesteps(sample_steps)
            result["arms"][label] = {
                **spread(values, data_std),
                "probe": probe_reach(pixels_out),
                "latent_mean_std": round(z.mean(dim=(1, 2, 3)).std().item(), 4),
                "first_timestep": int(sampler.timesteps[0]),
                "final_loss": round(sum(tail) / len(tail), 4),
                "train_s": round(train_s, 1),
                "sample_s": round(time.perf_counter() - t1, 1),
            }
    result["total_s"] = round(time.perf_counter() - start, 1)
    return result


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run_repro(*[int(a) for a in sys.argv[1:2]]), indent=2))
