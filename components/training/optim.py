"""Optimizers and the learning-rate schedule of the Terminus recipe.

The card (Terminus XL Gamma v2) gives a cosine schedule between 8e-7 and 4e-7; the optimizer is a
choice of the preset. Three are offered:

- ``adamw``: ``torch.optim.AdamW``; with ``train.fused_optimizer`` its fused kernel (one launch for all
  parameters instead of one per tensor) on every device torch has one for, CPU included.
- ``adamw8bit``: bitsandbytes' ``AdamW8bit`` (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
  Quantization"): the two AdamW moments in 8 bits, about 6 bytes per parameter less than fp32 AdamW,
  which is what lets a full SDXL fine-tune fit one 80 GB card (docs/recipe.md: ~41 GB -> ~26 GB).
  CUDA only.
- ``adafactor``: transformers' ``Adafactor`` (Shazeer & Stern 2018) with a fixed, externally
  scheduled learning rate (``relative_step=False``, ``scale_parameter=False``), so the cosine
  schedule below is the learning rate actually applied.

The schedule is linear warmup then cosine from ``lr.max`` down to a floor ``lr.min`` (not 0:
diffusers' ``get_cosine_schedule_with_warmup`` decays to 0, which is not the card's schedule).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from components.config import LRConfig, OptimizerName, RecurringError, TrainConfig


class OptimizerUnavailable(RecurringError):
    """The configured optimizer cannot run here (no CUDA, or its package is not installed)."""


def build_optimizer(params: Iterable, cfg: TrainConfig, device: torch.device | str) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``params`` at the peak learning rate ``cfg.lr.max``.

    The LR scheduler from ``build_lr_scheduler`` scales it from there.
    """
    device = torch.device(device)
    params = list(params)
    name = OptimizerName(cfg.optimizer)
    if name is OptimizerName.ADAMW:
        if cfg.fused_optimizer:
            try:
                return torch.optim.AdamW(params, lr=cfg.lr.max, weight_decay=cfg.weight_decay, fused=True)
            except RuntimeError:  # no fused kernel for this device or dtype
                pass
        return torch.optim.AdamW(params, lr=cfg.lr.max, weight_decay=cfg.weight_decay)
    if name is OptimizerName.ADAMW_8BIT:
        if device.type != "cuda":
            raise OptimizerUnavailable(
                f"optimizer adamw8bit needs a CUDA device (bitsandbytes), got {device.type}: "
                "set train.optimizer=adamw (or adafactor) on this machine"
            )
        try:
            import bitsandbytes as bnb  # optional: the gpu extra
        except ImportError:
            raise OptimizerUnavailable(
                "optimizer adamw8bit needs the bitsandbytes package: pip install bitsandbytes, "
                "or set train.optimizer=adamw"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr.max, weight_decay=cfg.weight_decay)
    if name is OptimizerName.ADAFACTOR:
        from transformers.optimization import Adafactor  # transformers loads only for Adafactor

        return Adafactor(
            params, lr=cfg.lr.max, relative_step=False, scale_parameter=False, warmup_init=False,
            weight_decay=cfg.weight_decay,
        )
    raise OptimizerUnavailable(f"unknown optimizer {name!r}")  # unreachable while the enum has three


class WarmupCosine:
    """LR multiplier (of ``lr.max``) for optimizer step ``step`` (0-based).

    - warmup, steps 0 .. W-1: linear, ``(step + 1) / (W + 1)`` -- never 0, so no step is wasted;
    - step W: 1.0 (``lr.max``);
    - steps W .. total-1: cosine from 1.0 to ``min/max``, reached at the last step, total-1
      (Loshchilov & Hutter 2017, SGDR, without restarts); constant ``min/max`` after that.

    With ``restart_every`` (SGDR's warm restarts, period in optimizer steps) the cosine runs from 1.0 to
    the floor over each period after warmup and starts again at 1.0; the floor is reached at the last
    step of each period.

    A callable object rather than a closure so ``LambdaLR.state_dict`` can save it.
    """

    def __init__(self, warmup_steps: int, total_steps: int, floor: float, restart_every: int | None = None):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.floor = floor
        self.restart_every = restart_every

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        since = step - self.warmup_steps
        if self.restart_every:
            progress = (since % self.restart_every) / max(1, self.restart_every - 1)
        else:
            progress = min(1.0, since / max(1, self.total_steps - 1 - self.warmup_steps))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, lr: LRConfig, total_steps: int) -> LambdaLR:
    """Warmup then cosine from ``lr.max`` to ``lr.min`` over ``total_steps`` optimizer steps (or over every
    ``lr.restart_every`` steps under ``lr.schedule: cosine_restarts``).

    Call ``scheduler.step()`` once after each ``optimizer.step()``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 < lr.min <= lr.max:
        raise ValueError(f"need 0 < lr.min <= lr.max, got min={lr.min} max={lr.max}")
    if lr.warmup_steps < 0:
        raise ValueError(f"lr.warmup_steps must be >= 0, got {lr.warmup_steps}")
    for group in optimizer.param_groups:
        group["lr"] = lr.max  # LambdaLR scales each group's initial lr
    restart = lr.restart_every if lr.schedule == "cosine_restarts" else None
    return LambdaLR(optimizer, WarmupCosine(lr.warmup_steps, total_steps, lr.min / lr.max, restart))
