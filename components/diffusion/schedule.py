"""Diffusion math of the Terminus recipe: schedule, SNR, targets, min-SNR-gamma weights.

Small pure functions. Schedules come from diffusers' schedulers (never re-derived); what diffusers
does not provide (min-SNR weights with an explicit terminal-step policy) is written here, once.

Sources:
- Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed" (ZT-SNR rescale,
  Algorithm 1; trailing spacing, Table 2; CFG rescale, eq. 16).
- Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy" (min-SNR-gamma).
- Salimans & Ho 2022, "Progressive Distillation" (v-prediction: v = sqrt(ab) eps - sqrt(1-ab) x0).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from components.config import DiffusionConfig, PredictionType, TerminalPolicy


def scheduler_kwargs(cfg: DiffusionConfig) -> dict:
    """The scheduler config shared by training and inference (saved with every model)."""
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": cfg.beta_schedule,
        "rescale_betas_zero_snr": cfg.zero_terminal_snr,
        "prediction_type": cfg.prediction_type.value,
    }


def training_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """DDPM keeps alphabar_T exactly 0 under the rescale, so SNR_T == 0 (no clamping)."""
    return DDPMScheduler(**scheduler_kwargs(cfg), clip_sample=False)


def inference_scheduler(cfg: DiffusionConfig) -> DDIMScheduler:
    """ZT-SNR sampling as in Lin et al.: DDIM, trailing spacing (starts at t = T-1)."""
    return DDIMScheduler(
        **scheduler_kwargs(cfg),
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alphabar / (1 - alphabar), from the (rescaled) schedule. SNR_T is 0 under ZT-SNR."""
    ab = alphas_cumprod.double()
    return (ab / (1.0 - ab)).float()


def min_snr_weights(
    snr_t: torch.Tensor,
    gamma: float | None,
    prediction: PredictionType,
    terminal: TerminalPolicy,
) -> torch.Tensor:
    """Hang et al. 2023 loss weights for the per-sample MSE of the given prediction target.

    v-prediction: min(SNR, g) / (SNR + 1); epsilon: min(SNR, g) / SNR.
    Where SNR == 0 (only t = T-1 under ZT-SNR) the policy decides: ``paper`` gives 0 (v: 0/1;
    epsilon: the 0/0 limit is taken as 0, never NaN), ``terminus`` gives 1.0.
    ``gamma=None`` means no weighting (all ones).
    """
    # Normalise first: a plain string (e.g. ``scheduler.config.prediction_type``) is not ``is`` the
    # enum member, and an identity test would silently pick the epsilon branch and paper policy.
    prediction, terminal = PredictionType(prediction), TerminalPolicy(terminal)
    if gamma is None:
        return torch.ones_like(snr_t)
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction is PredictionType.V:
        weights = clipped / (snr_t + 1.0)
    else:
        weights = torch.where(snr_t > 0, clipped / snr_t.clamp(min=torch.finfo(snr_t.dtype).tiny), 0.0)
    if terminal is TerminalPolicy.TERMINUS:
        weights = torch.where(snr_t == 0, torch.ones_like(weights), weights)
    else:
        weights = torch.where(snr_t == 0, torch.zeros_like(weights), weights)
    return weights


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator | None, device=None):
    """Uniform over 0..T-1 inclusive, so the terminal step (SNR = 0 under ZT-SNR) is trained."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device="cpu").to(device)


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict: v (scheduler.get_velocity) or the noise itself."""
    if scheduler.config.prediction_type == PredictionType.V.value:
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE of each sample, the mean over C, H, W, in fp32. (B, C, H, W) -> (B,)."""
    return torch.mean((pred.float() - target.float()) ** 2, dim=tuple(range(1, pred.ndim)))


def loss_weights(timesteps: torch.Tensor, scheduler: DDPMScheduler, cfg: DiffusionConfig,
                 terminal: TerminalPolicy | None = None) -> torch.Tensor:
    """The min-SNR weight of each timestep (B,) under ``cfg``, or under another terminal policy."""
    snr_all = snr(scheduler.alphas_cumprod).to(timesteps.device)
    return min_snr_weights(snr_all[timesteps], cfg.min_snr_gamma, cfg.prediction_type,
                           cfg.terminal_policy if terminal is None else terminal)


def weighted_loss(per_sample: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler,
                  cfg: DiffusionConfig) -> torch.Tensor:
    """The training loss: each sample's error (B,) (``per_sample_mse``) times its timestep's min-SNR weight,
    averaged over the batch."""
    return torch.mean(per_sample * loss_weights(timesteps.to(per_sample.device), scheduler, cfg))
