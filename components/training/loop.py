"""The Ray Train worker loop: each epoch's planned bucket batches, min-SNR v-prediction steps, checkpoints.

Ray appears only at the edges (the split's blocks in the object store, report, checkpoint); the step
itself is ``components.diffusion.loss.diffusion_loss``. The data order is ``batches.epoch_plan``'s, the
same on every rank; rank 0 alone talks to MLflow (``RunLogger``), and logs with every step the rows
drawn so far per source (``samples_seen.<source>``, ``mix.<source>``: the realised mixture; at the end of each
whole epoch ``epoch_mix.<source>``, that epoch's share, and a log line) and a hash
of the rows of its own micro-batches (``data.batch_hash``: which rows a step saw, comparable across runs).

An adapter run (``train.method: lora | lokr``) trains through the same loop: the UNet is frozen and stored in the
compute dtype like the text encoders (the precision policy, components/diffusion/loss.py), peft's adapter is added
with fp32 master weights, and the optimizer, the gradient clipping, the EMA and the checkpoints see the adapter's
parameters only (``Trainee.trainable``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import resource
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
from diffusers.training_utils import EMAModel
from torch._dynamo.utils import counters

from components.config import Config, ModelConfig, Precision, RecurringError, TrainConfig
from components.dataset import read_manifest, val_rows
from components.diffusion.adapters import AdapterError, add_adapter, peft_config
from components.diffusion.conditioning import dropout_uses_zeros, encode_text
from components.diffusion.loss import (
    Batch,
    LossSpec,
    NoiseDraw,
    autocast,
    diffusion_loss,
    effective_precision,
    frozen_dtype,
)
from components.diffusion.parts import SDXLParts
from components.diffusion.schedule import training_scheduler
from components.diffusion.sdxl import attention_kind
from components.registry.model_sources import load_source_parts
from components.training.batches import (
    RowIndex,
    ShardRows,
    TableRows,
    epoch_plan,
    epoch_shares,
    rows_to_batch,
    source_counts,
)
from components.training.checkpointing import TrainState, load_checkpoint, save_checkpoint
from components.training.optim import build_lr_scheduler, build_optimizer
from components.training.parallel import Strategy
from components.training.prefetch import prefetched
from components.training.progress import Progress
from components.training.run_logger import RunLogger
from components.training.validation import Validator

log = logging.getLogger(__name__)


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """A noise stream per (rank, step, micro-batch): distinct across ranks, reproducible on resume."""
    return torch.Generator().manual_seed(hash((seed, rank, step, micro)) & 0x7FFF_FFFF_FFFF_FFFF)


class EpochReader:
    """One worker's view of the training data: the split's index, its rows (in memory or streamed from the
    shards) and each epoch's plan. ``data``: what ``driver.training_data`` prepared."""

    def __init__(self, data: dict, cfg: Config):
        self.index: RowIndex = data["index"]
        self.mode: str = data["mode"]
        self.mixture: dict = data["mixture"]  # epoch_plan's mixture arguments (driver.mixture)
        self.cfg = cfg
        if self.mode == "global":
            self.rows = table_rows(self.index, data["refs"], data["names"])
        else:
            per_shard = max(1, len(self.index) // max(1, len(self.index.files)))
            self.rows = ShardRows(self.index, cfg.curate.s3_endpoint_url,
                                  keep=-(-cfg.train.shuffle_window // per_shard) + 2)
        self._plans: dict[tuple[int, int], list[list[np.ndarray]]] = {}

    def plan(self, epoch: int, world: int) -> list[list[np.ndarray]]:
        """Every rank's micro-batches of ``epoch`` (cached: one epoch at a time)."""
        if (epoch, world) not in self._plans:
            self._plans = {(epoch, world): epoch_plan(
                self.index, seed=self.cfg.seed, epoch=epoch, world=world, batch_size=self.cfg.train.batch_size,
                mode=self.mode, window=self.cfg.train.shuffle_window, **self.mixture)}
        return self._plans[(epoch, world)]

    def batches(self, epoch: int, rank: int, world: int, skip_batches: int) -> Iterator[list[dict]]:
        """Row lists of this rank's micro-batches of ``epoch`` from position ``skip_batches`` (a resume)."""
        for ids in self.plan(epoch, world)[rank][skip_batches:]:
            yield self.rows.take(ids)

    def prepared(self, epoch: int, rank: int, world: int, skip_batches: int) -> Iterator[tuple[list[dict], Batch]]:
        """``(rows, batch)`` of the same micro-batches, in the same order, taken, decoded and collated on CPU
        ``train.prefetch_batches`` ahead of the step (``components/training/prefetch.py``)."""
        planned = self.plan(epoch, world)[rank][skip_batches:]

        def prepare(ids: np.ndarray) -> tuple[list[dict], Batch]:
            rows = self.rows.take(ids)
            return rows, rows_to_batch(rows, "cpu")

        for _, prepared in prefetched(iter(planned), prepare, self.cfg.train.prefetch_batches,
                                      self.cfg.train.prefetch_threads):
            yield prepared


def table_rows(index: RowIndex, refs: list, names: list[str]) -> TableRows:
    """The in-memory split (Ray's object store; zero-copy on the node) and where each index row lies in it.
    Rows are matched to the index by shard (Ray's ``path`` column) and position within the shard, and the
    match is checked against the index's buckets, so the plan's row ids name the rows they were planned as."""
    table = pa.concat_tables(ray.get(refs))
    paths = table["path"].to_pylist()
    shard = {name: i for i, name in enumerate(names)}
    offsets = np.concatenate([[0], np.cumsum(np.bincount(index.file_of, minlength=len(names)))])
    seen = np.zeros(len(names), dtype=np.int64)
    pos = np.full(len(index), -1, dtype=np.int64)
    for row, path in enumerate(paths):
        f = shard[next(n for n in (path, *_suffixes(path)) if n in shard)]
        pos[offsets[f] + seen[f]] = row
        seen[f] += 1
    buckets = np.asarray(index.buckets, dtype=object)[index.bucket]
    if (pos < 0).any() or list(np.asarray(table["bucket"].to_pylist(), dtype=object)[pos]) != list(buckets):
        raise RecurringError("the training split in memory does not match its shards' index: curate again")
    return TableRows(table, pos)


def _suffixes(path: str) -> list[str]:
    """``a/b/train/part-1.parquet`` -> ``b/train/part-1.parquet``, ``train/part-1.parquet``, ...: Ray names a
    file by its full path, ``_SUCCESS`` relative to the dataset."""
    parts = path.split("/")
    return ["/".join(parts[i:]) for i in range(1, len(parts))]


def batch_hash(rows: list[dict], into: Any | None = None):
    """A SHA-256 over the rows' content hashes and sources, in order (``into``: add to a running hash)."""
    digest = into if into is not None else hashlib.sha256()
    for r in rows:
        digest.update(f"{r['sha256']}|{r['source']}\n".encode())
    return digest


def as_metric(digest) -> float:
    """The first 52 bits of a hash as a float (exact in a double, as MLflow stores metrics)."""
    return float(int(digest.hexdigest()[:13], 16))


def mix_metrics(samples: dict[str, int]) -> dict[str, float]:
    """The realised mixture: rows drawn per source so far (all ranks) and each source's share of them."""
    total = sum(samples.values()) or 1
    out = {f"samples_seen.{name}": float(n) for name, n in samples.items()}
    out.update({f"mix.{name}": n / total for name, n in samples.items()})
    return out


def total_steps(cfg: Config, train_rows: int) -> int:
    if cfg.train.epochs is None:
        return cfg.train.max_steps
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.train.num_workers
    return max(1, math.ceil(cfg.train.epochs * train_rows / per_step))


ADAPTER_NAME = "default"
"""peft's name for the adapter an adapter run trains (peft's own default name)."""


@dataclass
class Trainee:
    """Everything a worker trains and checkpoints. ``unet`` owns the parameters; ``model`` is what the
    step calls (``unet`` itself, or its DDP/FSDP wrapping); ``trainable`` the parameters that train: all of the
    UNet's, or the adapter's (``adapter`` is then its peft name)."""

    parts: SDXLParts
    unet: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: Any
    strategy: Strategy
    scaler: torch.amp.GradScaler
    state: TrainState
    trainable: list[torch.nn.Parameter]
    adapter: str | None = None


def adapter_peft_config(train: TrainConfig):
    """The peft config ``train.adapter`` describes for ``train.method``."""
    a = train.adapter
    return peft_config(train.method.value, a.rank, a.alpha, a.dropout, a.target_modules, a.decompose_factor)


def prepare_unet(unet: torch.nn.Module, train: TrainConfig, device: torch.device) -> list[torch.nn.Parameter]:
    """Place the UNet for training and return the parameters that train. Full: every weight, fp32 on ``device``.
    Adapter: the UNet frozen in ``frozen_dtype`` (bf16 under the recipe), then peft's adapter added in fp32 (its
    master weights; autocast computes in the compute dtype, as for a full fine-tune)."""
    if not train.is_adapter:
        unet.to(device)
        return list(unet.parameters())
    unet.to(device, frozen_dtype(train.precision))
    try:
        trainable = add_adapter(unet, adapter_peft_config(train), ADAPTER_NAME)
    except (AdapterError, ValueError) as err:  # e.g. a target module that does not exist
        raise RecurringError(f"train.adapter: {str(err).splitlines()[0][:300]}") from None
    for param in trainable:
        param.data = param.data.float()
    return trainable


def build_trainee(cfg: Config, device: torch.device, world: int, steps: int,
                  model: ModelConfig | None = None) -> Trainee:
    """The SDXL parts of ``model`` (the run's pinned source; default ``cfg.model``) placed by the precision
    policy (components/diffusion/loss.py), the UNet wrapped for its parallel strategy, then its optimizer,
    LR schedule and EMA."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    parts = load_source_parts(cfg, model)
    parts.vae.requires_grad_(False).eval().to(device)  # fp32: SDXL's VAE overflows in fp16
    for encoder in (parts.text_encoder, parts.text_encoder_2):
        encoder.requires_grad_(False).eval().to(device, frozen_dtype(cfg.train.precision))
    unet = parts.unet
    trainable = prepare_unet(unet, cfg.train, device)
    unet.train()
    if cfg.train.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    strategy = Strategy(cfg.train.parallel, world)
    model = strategy.wrap(unet, device)  # before the optimizer: FSDP replaces parameters by shards
    if not cfg.train.is_adapter:
        trainable = list(unet.parameters())  # FSDP's shards, where it sharded
    if cfg.train.compile:
        # In place (nn.Module.compile): the module keeps its type, its parameters and DDP's no_sync.
        model.compile(backend=cfg.train.compile_backend)
    optimizer = build_optimizer(trainable, cfg.train, device)
    ema = None
    if cfg.train.ema_decay is not None:
        ema = EMAModel(trainable, decay=cfg.train.ema_decay)
        ema.to("cpu" if cfg.train.ema_on_cpu else device)
    scaler = torch.amp.GradScaler(enabled=cfg.train.precision is Precision.FP16 and device.type == "cuda")
    return Trainee(parts, unet, model, optimizer, build_lr_scheduler(optimizer, cfg.train.lr, steps), ema,
                   strategy, scaler, TrainState(), trainable, ADAPTER_NAME if cfg.train.is_adapter else None)


def optimizer_step(t: Trainee, clip_grad_norm: float) -> float:
    """Unscale, clip, step, schedule, EMA; returns the gradient norm before clipping."""
    t.scaler.unscale_(t.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(t.trainable, clip_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.lr_scheduler.step()
    if t.ema is not None:
        t.ema.step(t.trainable)
    return float(grad_norm)


def loss_spec(cfg: Config, t: Trainee, device: torch.device) -> LossSpec:
    """The training loss's settings: the ZT-SNR training schedule, the precision, caption dropout and what a
    dropped caption becomes (zeros, or the empty prompt's encoding: ``dropout_uses_zeros``). Sets the parts'
    empty-prompt convention to it, so validation images take the unconditional branch training teaches."""
    zeros = dropout_uses_zeros(cfg.train.caption_dropout_mode, t.parts.force_zeros_for_empty_prompt)
    t.parts.force_zeros_for_empty_prompt = zeros
    empty = None
    if not zeros:
        with torch.no_grad(), autocast(cfg.train.precision, device):
            empty = encode_text(t.parts, [""], device)
    return LossSpec(training_scheduler(cfg.diffusion), cfg.diffusion, cfg.train.precision, cfg.train.caption_dropout,
                    empty)


def micro_step(t: Trainee, batch: Batch, spec: LossSpec, draw: NoiseDraw, accum: int, sync: bool) -> float:
    """One micro-batch of a step: the loss, backward at 1/``accum`` through the precision's gradient scaler,
    the gradient all-reduce only when ``sync`` (the last micro-batch of the step). Returns the loss."""
    with t.strategy.accumulating(t.model, sync=sync):
        loss = diffusion_loss(t.parts, t.model, batch, spec, draw)
        t.scaler.scale(loss / accum).backward()
    return loss.item()


def train_step(t: Trainee, batches: list[Batch], spec: LossSpec, draws: list[NoiseDraw],
               clip_grad_norm: float) -> tuple[float, float]:
    """One optimizer step over ``batches`` as its micro-batches (``micro_step`` each, with its noise draw), then
    ``optimizer_step``: the step the worker loop takes, for callers that hold the batches. Returns the mean
    loss and the gradient norm before clipping."""
    losses = [micro_step(t, batch, spec, draw, len(batches), sync=i == len(batches) - 1)
              for i, (batch, draw) in enumerate(zip(batches, draws, strict=True))]
    return sum(losses) / len(losses), optimizer_step(t, clip_grad_norm)


def graph_breaks() -> int:
    """Graph breaks torch.compile has met in this process so far (0: every compiled call is one graph)."""
    return sum(counters["graph_break"].values())


def hardware(device: torch.device) -> dict[str, str]:
    """``hardware.*`` tags of rank 0's machine (the model card's hardware section)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return {"hardware.cpu": cpu, "hardware.cpu_count": str(os.cpu_count() or 0), "hardware.gpu": gpu,
            "hardware.accelerator": device.type}


def peak_memory(device: torch.device) -> dict[str, float]:
    """Rank 0's peak memory so far, in MiB (the ``_mb`` metrics): the process's resident set (``ru_maxrss``)
    and, on CUDA, the most PyTorch's allocator held (``max_memory_allocated``)."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB
    if device.type == "cuda":
        peak["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def with_precision_used(cfg: Config, device: torch.device) -> Config:
    """``cfg`` with ``train.precision`` as a run on ``device`` uses it (``effective_precision``: bf16 only where
    the device computes it natively). The training loop and the benchmarks' steps both go through it."""
    precision = effective_precision(cfg.train.precision, device)
    if precision is cfg.train.precision:
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": precision})})


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = Config.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    used = with_precision_used(cfg, device)
    if used.train.precision is not cfg.train.precision and rank == 0:
        log.warning("train.precision=%s: %s does not compute it natively, training in %s "
                    "(the recipe's bf16 is for the GPU run)", cfg.train.precision.value, device,
                    used.train.precision.value)
    cfg = used
    steps = total_steps(cfg, loop_config["train_rows"])
    model = ModelConfig.model_validate(loop_config["model"]) if "model" in loop_config else cfg.model
    t = build_trainee(cfg, device, world, steps, model)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            t.state = load_checkpoint(Path(ckpt_dir), t.unet, t.optimizer, t.lr_scheduler, t.ema, t.strategy,
                                      adapter=t.adapter)
        log.info("rank %d resumed at step %d (epoch %d, batch %d)", rank, t.state.step, t.state.epoch,
                 t.state.batches_in_epoch)

    spec = loss_spec(cfg, t, device)
    logger = progress = None
    if rank == 0:
        logger = RunLogger(cfg, loop_config["mlflow_run_id"])
        logger.set_tags({"precision.configured": loop_config["config"]["train"]["precision"],
                         "precision.effective": cfg.train.precision.value, "device": str(device),
                         "cpu.capability": torch.backends.cpu.get_cpu_capability(),
                         "attention": attention_kind(t.unet), **hardware(device)})
        progress = Progress(steps, t.state.step, cfg.train.log_every, cfg.train.log_every_s)
    reader = EpochReader(loop_config["data"], cfg)
    validator = None
    if rank == 0 or t.strategy.sharded:  # sharded weights: every rank takes part in each forward
        # The held-out split is small (val_max_rows): read it directly rather than through Ray Data.
        held_out = val_rows(read_manifest(cfg.train.data, cfg.curate.s3_endpoint_url), cfg.train.val_max_rows)
        validator = Validator(cfg, held_out, device)

    state, accum = t.state, cfg.train.grad_accum
    micro, loss_sum, data_s, t0 = 0, 0.0, 0.0, time.perf_counter()
    seen_hash = hashlib.sha256()
    breaks_logged = False
    while state.step < steps:
        plan = reader.plan(state.epoch, world)
        if not plan[rank]:
            raise RecurringError(
                f"worker {rank} got no full batch of {cfg.train.batch_size} from any bucket: "
                "lower train.batch_size or curate more images"
            )
        batches = reader.prepared(state.epoch, rank, world, state.batches_in_epoch)
        while True:
            fetch = time.perf_counter()
            position = state.batches_in_epoch
            prepared = next(batches, None)
            if prepared is None:
                break
            rows, batch = prepared
            batch = batch.to(device)
            data_s += time.perf_counter() - fetch  # waiting for the prefetched batch (all of its work at depth 0)
            batch_hash(rows, seen_hash)
            for name, n in source_counts(reader.index, (p[position] for p in plan)).items():  # every rank's
                state.source_samples[name] = state.source_samples.get(name, 0) + n
            draw = NoiseDraw(step_generator(cfg.seed, rank, state.step, micro))
            loss_sum += micro_step(t, batch, spec, draw, accum, sync=micro == accum - 1)
            state.batches_in_epoch += 1
            micro += 1
            if micro < accum:
                continue
            grad_norm = optimizer_step(t, cfg.train.clip_grad_norm)
            state.step += 1
            state.samples_seen += cfg.train.effective_batch
            elapsed = time.perf_counter() - t0
            metrics = {
                "loss": loss_sum / accum, "lr": t.lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "images_per_s": cfg.train.effective_batch / max(elapsed, 1e-9), "samples_seen": state.samples_seen,
                "epoch": state.epoch, "data_wait": data_s / max(elapsed, 1e-9), "data.batch_hash": as_metric(seen_hash),
                **mix_metrics(state.source_samples), **peak_memory(device),
            }
            seen_hash = hashlib.sha256()
            if cfg.train.compile and not breaks_logged:  # this process's first step compiled forward and backward
                breaks_logged = True
                metrics["compile_graph_breaks"] = graph_breaks()
                if rank == 0:
                    log.info("torch.compile (%s): %d graph break(s)", cfg.train.compile_backend,
                             metrics["compile_graph_breaks"])
            if progress is not None:
                progress.add_times(data_s, elapsed)
            micro, loss_sum, data_s = 0, 0.0, 0.0
            at_checkpoint = state.step % cfg.train.checkpoint_every == 0 or state.step == steps
            val_loss = None
            if validator is not None and (at_checkpoint or state.step % cfg.train.val_every == 0):
                val_loss = _validate(validator, t, logger)
            if logger is not None:
                logger.metrics(metrics, state.step)
                progress.report(state.step, state.epoch, metrics)
                if not at_checkpoint:
                    logger.maybe_flush()  # live metrics; a checkpoint flushes before it is reported
            if at_checkpoint:
                _checkpoint(t, logger, {"step": state.step, "loss": metrics["loss"], "val_loss": val_loss})
            t0 = time.perf_counter()  # images/s excludes validation and checkpointing
            if state.step >= steps:
                break
        batches.close()  # stops the prefetch threads of an epoch left early
        if logger is not None and state.batches_in_epoch == len(plan[rank]):  # whole: every rank's plan was drawn
            shares = epoch_shares(reader.index, [ids for p in plan for ids in p])
            log.info("epoch %d done: realised mix %s", state.epoch, {k: round(v, 4) for k, v in shares.items()})
            logger.metrics({f"epoch_mix.{name}": v for name, v in shares.items()}, state.step)
        if state.step >= steps:
            break
        state.epoch += 1
        state.batches_in_epoch = 0
    if logger:
        logger.close()


def _validate(validator: Validator, t: Trainee, logger: RunLogger | None) -> float:
    """Held-out loss at fixed timesteps and noise, and the fixed-prompt sample images; rank 0
    (``logger``) records them. Under FSDP every rank runs this in lockstep."""
    losses = validator.losses(t.parts, t.unet)
    val_loss = losses["val_loss"]
    if t.state.best_val_loss is None or val_loss < t.state.best_val_loss:
        t.state.best_val_loss = val_loss
    images = validator.images(t.parts, t.unet)
    if logger is not None:
        logger.metrics(losses, t.state.step)
        for key, image in images.items():
            logger.image(image, key, t.state.step)
    return val_loss


def _checkpoint(t: Trainee, logger: RunLogger | None, report: dict) -> None:
    """Report a checkpoint (rank 0 writes it); every rank reaches ``report``, a barrier.

    Every checkpoint carries val_loss (validation runs at each one), which Ray's
    CheckpointConfig ranks checkpoints by.
    """
    name = f"checkpoint_{t.state.step:08d}"
    full = {}
    if t.strategy.sharded:  # gathering the full state is collective: every rank joins
        full = {"unet_state": t.strategy.model_state(t.unet),
                "optimizer_state": t.strategy.optimizer_state(t.unet, t.optimizer)}
    if logger is None:
        ray.train.report({k: v for k, v in report.items() if k != "val_loss"}, checkpoint=None,
                         checkpoint_dir_name=name)
        return
    logger.flush()  # before the checkpoint exists: a resume from it never finds a gap in MLflow
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), t.unet, t.optimizer, t.lr_scheduler, t.state, t.ema, adapter=t.adapter, **full)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    logger.checkpoint(name, t.state.step, report)
