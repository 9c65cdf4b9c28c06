"""Validation during training: a held-out loss at fixed timesteps and noise, and sample images
from fixed prompts and seeds with the ZT-SNR inference settings (trailing, CFG rescale 0.7)."""

from __future__ import annotations

import torch

from components.config import Config, RecurringError
from components.diffusion.loss import LossSpec, NoiseDraw, autocast, diffusion_loss
from components.diffusion.pipelines import build_pipelines
from components.diffusion.request import GenerationRequest
from components.diffusion.schedule import inference_scheduler, training_scheduler
from components.diffusion.sdxl import SDXLParts
from components.training.batches import rows_to_batch

VAL_NOISE_SEED = 1234


class Validator:
    def __init__(self, cfg: Config, val_rows: list[dict], device: torch.device):
        if not val_rows:
            raise RecurringError("the curated dataset has no validation rows: raise curate.holdout_fraction "
                                 "and curate again")
        self.cfg = cfg
        self.device = device
        by_bucket: dict[str, list[dict]] = {}
        for row in val_rows:
            by_bucket.setdefault(str(row["bucket"]), []).append(row)
        bs = cfg.train.batch_size
        # Every held-out row once, in bucket-pure batches of at most train.batch_size.
        self.batches = [
            rows_to_batch(rows[i : i + bs], device) for rows in by_bucket.values() for i in range(0, len(rows), bs)
        ]

    @torch.no_grad()
    def loss(self, parts: SDXLParts, unet: torch.nn.Module) -> float:
        """Mean min-SNR-weighted loss over every held-out batch at every fixed timestep."""
        spec = LossSpec(training_scheduler(self.cfg.diffusion), self.cfg.diffusion, self.cfg.train.precision)
        was_training = unet.training
        unet.eval()
        total, count = 0.0, 0
        for b_idx, batch in enumerate(self.batches):
            for t in self.cfg.train.val_timesteps:
                gen = torch.Generator().manual_seed(VAL_NOISE_SEED + 7919 * b_idx + t)
                timesteps = torch.full((len(batch.captions),), t, dtype=torch.long, device=self.device)
                loss = diffusion_loss(parts, unet, batch, spec, NoiseDraw(gen, timesteps=timesteps))
                total += loss.item()
                count += 1
        unet.train(was_training)
        return total / count

    @torch.no_grad()
    def images(self, parts: SDXLParts, unet: torch.nn.Module) -> dict:
        was_training = unet.training
        unet.eval()
        live = SDXLParts(**{**parts.as_dict(), "unet": unet})
        pipes = build_pipelines(live, inference_scheduler(self.cfg.diffusion), self.cfg.inference.model_dump(),
                                device=self.device, dtype=torch.float32)
        size = self.cfg.train.val_image_size
        out = {}
        # Under the training autocast: the frozen text encoders are stored in the compute dtype.
        with autocast(self.cfg.train.precision, self.device):
            for i, prompt in enumerate(self.cfg.train.val_prompts):
                req = GenerationRequest(prompt=prompt, width=size, height=size, steps=self.cfg.train.val_steps, seed=i)
                out[f"val_{i}"] = pipes.generate(req)[0]
        unet.train(was_training)
        return out
