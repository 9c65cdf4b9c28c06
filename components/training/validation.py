"""Validation during training: a held-out loss at fixed timesteps and noise, and sample images
from fixed prompts and seeds with the ZT-SNR inference settings (trailing, CFG rescale 0.7).

The held-out loss is measured per timestep (plain v-MSE over every held-out row at each of
``train.val_timesteps``) and reported per bucket of ``VAL_BUCKETS``; ``val_loss``, which ranks
checkpoints and gates promotion, combines them with ``selection_weights`` (``train.select_metric``).
Under the recipe's own ``terminus`` weights t = 999 (weight 1.0, where the target is -x0 and the MSE is
large) would carry about 41 % of the figure and rank checkpoints by how they predict from pure noise; the
default, ``bucket_mse``, gives each bucket a quarter and no timestep more than 1/8 (docs/recipe.md)."""

from __future__ import annotations

import torch

from components.config import Config, RecurringError, TerminalPolicy
from components.diffusion.loss import LossSpec, NoiseDraw, autocast, prediction_error
from components.diffusion.parts import SDXLParts
from components.diffusion.pipelines import build_pipelines
from components.diffusion.request import GenerationRequest
from components.diffusion.schedule import inference_scheduler, loss_weights, training_scheduler
from components.training.batches import rows_to_batch

VAL_NOISE_SEED = 1234
VAL_BUCKETS = ((0, 250), (250, 500), (500, 750), (750, 1000))
"""Timestep buckets of the validation report: [lo, hi)."""


def bucket_of(t: int) -> tuple[int, int]:
    return next(b for b in VAL_BUCKETS if b[0] <= t < b[1])


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"val_mse_t{bucket[0]:03d}_{bucket[1]:03d}"


def selection_weights(timesteps: list[int], metric: str, diffusion) -> dict[int, float]:
    """The coefficient of each timestep's MSE in ``val_loss`` (they sum to 1).

    ``bucket_mse``: each bucket that holds validation timesteps weighs the same, split evenly among them;
    ``paper`` / ``recipe``: proportional to the min-SNR weights under the ``paper`` or the configured
    terminal policy (training_scheduler's rescaled SNR).
    """
    if metric == "bucket_mse":
        buckets: dict[tuple[int, int], list[int]] = {}
        for t in timesteps:
            buckets.setdefault(bucket_of(t), []).append(t)
        return {t: 1.0 / (len(buckets) * len(ts)) for ts in buckets.values() for t in ts}
    terminal = TerminalPolicy.PAPER if metric == "paper" else None
    raw = loss_weights(torch.tensor(timesteps), training_scheduler(diffusion), diffusion, terminal)
    total = float(raw.sum())
    return {t: float(w) / total for t, w in zip(timesteps, raw, strict=True)}


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
    def row_losses(self, parts: SDXLParts, unet: torch.nn.Module) -> tuple[dict[str, float], list[float]]:
        """(``losses``' figures, each held-out row's own ``val_loss``: its MSE at every fixed timestep, combined
        with ``selection_weights``). The rows come in a fixed order with fixed noise, so two models' lists
        pair row by row; the figures' ``val_loss`` is the rows' mean."""
        spec = LossSpec(training_scheduler(self.cfg.diffusion), self.cfg.diffusion, self.cfg.train.precision)
        was_training = unet.training
        unet.eval()
        per_row: dict[int, list[float]] = {t: [] for t in self.cfg.train.val_timesteps}
        for b_idx, batch in enumerate(self.batches):
            for t in self.cfg.train.val_timesteps:
                gen = torch.Generator().manual_seed(VAL_NOISE_SEED + 7919 * b_idx + t)
                timesteps = torch.full((len(batch.captions),), t, dtype=torch.long, device=self.device)
                mse, _ = prediction_error(parts, unet, batch, spec, NoiseDraw(gen, timesteps=timesteps))
                per_row[t] += [float(v) for v in mse.float().cpu()]
        unet.train(was_training)
        rows = len(next(iter(per_row.values())))
        weights = selection_weights(self.cfg.train.val_timesteps, self.cfg.train.select_metric, self.cfg.diffusion)
        row_loss = [sum(weights[t] * per_row[t][i] for t in per_row) for i in range(rows)]
        per_t = {t: sum(values) / rows for t, values in per_row.items()}  # mean MSE of each timestep
        out = {"val_loss": sum(row_loss) / rows}
        for bucket in VAL_BUCKETS:
            inside = [mse for t, mse in per_t.items() if bucket_of(t) == bucket]
            if inside:
                out[bucket_name(bucket)] = sum(inside) / len(inside)
        return out, row_loss

    def losses(self, parts: SDXLParts, unet: torch.nn.Module) -> dict[str, float]:
        """``val_loss`` (the selection metric) and the plain v-MSE of each timestep bucket, over every
        held-out row at every fixed timestep, with fixed noise."""
        return self.row_losses(parts, unet)[0]

    def loss(self, parts: SDXLParts, unet: torch.nn.Module) -> float:
        return self.losses(parts, unet)["val_loss"]

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
