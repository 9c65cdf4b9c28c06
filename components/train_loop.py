"""The Ray Train worker loop: stream bucketed batches, min-SNR v-prediction steps, checkpoints.

Ray appears only at the edges (dataset shard, report, checkpoint); the step itself is
``components.step.diffusion_loss``. Rank 0 alone talks to MLflow (``RunLogger``).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from components.checkpointing import TrainState, load_checkpoint, save_checkpoint
from components.config import Config, Precision
from components.curated import read_manifest
from components.diffusion import training_scheduler
from components.evaluation import val_rows
from components.models import load_components
from components.optim import build_lr_scheduler, build_optimizer
from components.parallel import Strategy
from components.run_logger import RunLogger
from components.step import diffusion_loss, frozen_dtype
from components.train_data import bucket_batches, iter_rows, rows_to_batch, skip
from components.validation import Validator

log = logging.getLogger(__name__)


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """A noise stream per (rank, step, micro-batch): distinct across ranks, reproducible on resume."""
    return torch.Generator().manual_seed(hash((seed, rank, step, micro)) & 0x7FFF_FFFF_FFFF_FFFF)


def epoch_batches(shard, cfg: Config, epoch: int, skip_batches: int):
    """Micro-batch row lists of one epoch, bucket-pure, deterministic for (seed, epoch)."""
    raw = shard.iter_batches(
        batch_size=64, batch_format="numpy", local_shuffle_buffer_size=256,
        local_shuffle_seed=cfg.seed * 1000 + epoch,
    )
    batches = bucket_batches(iter_rows(raw), cfg.train.batch_size)
    return skip(batches, skip_batches)


def total_steps(cfg: Config, train_rows: int) -> int:
    if cfg.train.epochs is None:
        return cfg.train.max_steps
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.train.num_workers
    return max(1, math.ceil(cfg.train.epochs * train_rows / per_step))


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = Config.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    parts = load_components(cfg)
    parts.vae.requires_grad_(False).eval().to(device)  # fp32: SDXL's VAE overflows in fp16
    for encoder in (parts.text_encoder, parts.text_encoder_2):
        encoder.requires_grad_(False).eval().to(device, frozen_dtype(cfg.train.precision))
    unet = parts.unet.to(device)
    unet.train()
    if cfg.train.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    strategy = Strategy(cfg.train.parallel, world)
    model = strategy.wrap(unet)  # before the optimizer: FSDP replaces parameters by shards
    optimizer = build_optimizer(unet.parameters(), cfg.train, device)
    steps = total_steps(cfg, loop_config["train_rows"])
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train.lr, steps)
    ema = None
    if cfg.train.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=cfg.train.ema_decay)
        ema.to("cpu" if cfg.train.ema_on_cpu else device)

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_checkpoint(Path(ckpt_dir), unet, optimizer, lr_scheduler, ema, strategy)
        log.info("rank %d resumed at step %d (epoch %d, batch %d)", rank, state.step, state.epoch, state.batches_in_epoch)

    scheduler = training_scheduler(cfg.diffusion)
    scaler = torch.amp.GradScaler(enabled=cfg.train.precision is Precision.FP16 and device.type == "cuda")
    logger = RunLogger(cfg, loop_config["mlflow_run_id"]) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    validator = None
    if rank == 0 or strategy.sharded:  # sharded weights: every rank takes part in each forward
        # The held-out split is small (val_max_rows): read it directly rather than through Ray Data.
        held_out = val_rows(read_manifest(cfg.train.data), cfg.train.val_max_rows)
        validator = Validator(cfg, held_out, device)

    accum = cfg.train.grad_accum
    micro, loss_sum, t0 = 0, 0.0, time.perf_counter()
    while state.step < steps:
        produced = False
        for rows in epoch_batches(shard, cfg, state.epoch, state.batches_in_epoch):
            produced = True
            batch = rows_to_batch(rows, device)
            gen = step_generator(cfg.seed, rank, state.step, micro)
            with strategy.accumulating(model, sync=micro == accum - 1):
                loss = diffusion_loss(parts, model, batch, scheduler, cfg.diffusion, cfg.train.precision,
                                      cfg.train.caption_dropout, gen)
                scaler.scale(loss / accum).backward()
            loss_sum += loss.item()
            state.batches_in_epoch += 1
            micro += 1
            if micro < accum:
                continue
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.train.clip_grad_norm)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
            if ema is not None:
                ema.step(unet.parameters())
            state.step += 1
            state.samples_seen += cfg.train.effective_batch
            elapsed = time.perf_counter() - t0
            metrics = {
                "loss": loss_sum / accum, "lr": lr_scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                "images_per_s": cfg.train.effective_batch / max(elapsed, 1e-9), "samples_seen": state.samples_seen,
                "epoch": state.epoch,
            }
            micro, loss_sum = 0, 0.0
            if logger:
                logger.metrics(metrics, state.step)
            at_checkpoint = state.step % cfg.train.checkpoint_every == 0 or state.step == steps
            val_loss = None
            if validator is not None and (at_checkpoint or state.step % cfg.train.val_every == 0):
                val_loss = _validate(validator, parts, unet, state, logger)
            if at_checkpoint:
                _checkpoint(unet, optimizer, lr_scheduler, ema, state, logger, metrics, val_loss, strategy)
            t0 = time.perf_counter()  # images/s excludes validation and checkpointing
            if state.step >= steps:
                break
        if state.step >= steps:
            break
        if not produced and state.batches_in_epoch == 0:
            raise RuntimeError(
                f"worker {rank} got no full batch of {cfg.train.batch_size} from any bucket: "
                "lower train.batch_size or curate more images"
            )
        state.epoch += 1
        state.batches_in_epoch = 0
    if logger:
        logger.close()


def _validate(validator, parts, unet, state: TrainState, logger) -> float:
    """Held-out loss at fixed timesteps and noise, and the fixed-prompt sample images; rank 0
    (``logger``) records them. Under FSDP every rank runs this in lockstep."""
    val_loss = validator.loss(parts, unet)
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss = val_loss
    images = validator.images(parts, unet)
    if logger is not None:
        logger.metrics({"val_loss": val_loss}, state.step)
        for key, image in images.items():
            logger.image(image, key, state.step)
    return val_loss


def _checkpoint(unet, optimizer, lr_scheduler, ema, state, logger, metrics, val_loss, strategy) -> None:
    """Report a checkpoint (rank 0 writes it); every rank reaches ``report``, a barrier.

    Every checkpoint carries val_loss (validation runs at each one), which Ray's
    CheckpointConfig ranks checkpoints by.
    """
    report = {"step": state.step, "loss": metrics["loss"]}
    name = f"checkpoint_{state.step:08d}"
    full = {}
    if strategy.sharded:  # gathering the full state is collective: every rank joins
        full = {"unet_state": strategy.model_state(unet), "optimizer_state": strategy.optimizer_state(unet, optimizer)}
    if logger is None:
        ray.train.report(report, checkpoint=None, checkpoint_dir_name=name)
        return
    report["val_loss"] = val_loss
    logger.flush()  # before the checkpoint exists: a resume from it never finds a gap in MLflow
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), unet, optimizer, lr_scheduler, state, ema, **full)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    logger.checkpoint(name, state.step, report)
