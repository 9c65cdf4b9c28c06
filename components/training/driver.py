"""Driver side of a training run: one MLflow run, a Ray Train TorchTrainer, then the export.

Resume is by name: the same ``train.run_name`` reuses the Ray Train storage (Ray V2 restarts from
the latest checkpoint) and the same MLflow run (found by its ``terminus.run_name`` tag).

Lineage: before training, the model source is resolved once (``components.registry.model_sources.source_lineage``:
a hub id to its commit, ``models:/NAME@ALIAS`` to a version) and recorded on the run as ``lineage.*``
tags with a content hash of the weights; the workers and the export load that pinned source, and a
resumed run reads it back from the run instead of resolving again.

An adapter run (``train.method: lora | lokr``) trains on a registered base version and names it: the pinned
source, or the source registered first when it is not a registered version (``pin_adapter_base``). The run
records ``adapter.base_model_uri`` and ``adapter.base_weights_sha256``; the workers load that version; the export
writes the adapter in diffusers' layout and registers it under its own model name, tagged with its base
(components/registry/adapter_versions.py).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import ray
import ray.data
import ray.train
from ray.train import TrainingFailedError
from ray.train.torch import TorchTrainer

from components.config import Config, ModelConfig, RecurringError, find_cause
from components.dataset import CuratedManifest, read_manifest
from components.diffusion.adapters import save_adapter
from components.diffusion.conditioning import dropout_uses_zeros
from components.diffusion.sdxl import save_pipeline, save_variant
from components.diffusion.sdxl_base import COMPONENTS, weight_files
from components.host_memory import release_memory
from components.registry.adapter_versions import (
    WEIGHTS_TAG,
    log_adapter,
    register_base,
    version_weights_sha256,
    write_adapter_folder,
)
from components.registry.model import LINEAGE, PINNED, fetch_model, log_pipeline_model
from components.registry.model_sources import load_source_parts, source_lineage, weights_sha256
from components.registry.tracking import flatten, git_commit, mlflow_dataset, setup_tracking, tracking_uri
from components.storage import arrow_filesystem, filesystem_path
from components.training.batches import read_index
from components.training.checkpointing import load_adapter_weights, load_unet_weights
from components.training.entry import train_loop_per_worker

log = logging.getLogger(__name__)
RUN_NAME_TAG = "terminus.run_name"


@dataclass
class TrainingResult:
    run_id: str
    run_name: str
    model_name: str
    version: str
    checkpoint: str
    val_loss: float | None


def resolve_paths(cfg: Config) -> Config:
    """Absolute paths and a run name, so every Ray worker sees the same locations."""
    cfg = cfg.model_copy(deep=True)
    cfg.state_dir = str(cfg.state_path())
    cfg.tracking.tracking_uri = tracking_uri(cfg)
    if not cfg.train.storage_path.startswith("s3://"):
        cfg.train.storage_path = str(Path(cfg.train.storage_path).expanduser().resolve())
    if not cfg.train.data.startswith("s3://"):
        cfg.train.data = str(Path(cfg.train.data).expanduser().resolve())
    if cfg.train.run_name is None:
        cfg.train.run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


def open_run(cfg: Config, manifest: CuratedManifest) -> str:
    """The MLflow run of this training run: found by name (resume) or created with its params."""
    experiment_id = setup_tracking(cfg)
    found = mlflow.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.train.run_name}'", output_format="list"
    )
    client = mlflow.MlflowClient()
    if found:
        log.info("continuing MLflow run %s", found[0].info.run_id)
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    with mlflow.start_run(experiment_id=experiment_id, run_name=cfg.train.run_name) as run:
        params = flatten(cfg.model_dump(mode="json"))
        items = list(params.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        mlflow.log_params({f"data.rows.{split}": str(n) for split, n in manifest.rows.items()})
        mlflow.set_tags({
            RUN_NAME_TAG: cfg.train.run_name, "git_commit": git_commit(), "config_hash": cfg.digest(),
            "base_model": cfg.model.source, "dataset_digest": manifest.digest, **software_versions(),
        })
        mlflow.log_input(mlflow_dataset(manifest), context="training")
    # RUNNING while Ray trains (the workers log into it; MLflow's system-metrics monitor stops
    # at a finished run); the export marks it FINISHED, a failure FAILED.
    client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def mixture(cfg: Config, manifest: CuratedManifest, index) -> dict:
    """The epoch plan's mixture arguments (``batches.epoch_plan``): ``{"repeats": ...}`` (draws per image by
    source) or, where the dataset's sources were curated with a ``weight``, ``{"weights": ..., "samples": ...,
    "replace": ...}``; the curated values, then ``train.mixture`` over them, in the same terms."""
    recorded = manifest.sources or {}
    weighted = any(info.get("weight") is not None for info in recorded.values())
    given = cfg.train.mixture or {}
    unknown = sorted(set(given) - set(index.sources))
    if unknown:
        raise RecurringError(f"train.mixture names source(s) {unknown} that {manifest.root} does not have "
                             f"(its sources: {list(index.sources)})")
    if not weighted:
        if cfg.train.epoch_samples is not None:
            raise RecurringError(f"train.epoch_samples is for a weighted mixture; {manifest.root} mixes its sources "
                                 "by repeats (an epoch is sum(repeats x rows)): unset it")
        repeats = {name: float(info.get("repeats", 1.0)) for name, info in recorded.items()}
        repeats.update(given)
        return {"repeats": {name: repeats.get(name, 1.0) for name in index.sources}}
    weights = {name: float(info.get("weight") or 0.0) for name, info in recorded.items()}
    weights.update(given)
    empty = sorted(name for name, w in weights.items() if w > 0 and name not in index.sources)
    if empty:
        raise RecurringError(f"source(s) {empty} have a weight but no train rows in {manifest.root}: give them "
                             "weight 0 in train.mixture or curate them again")
    weights = {name: weights.get(name, 0.0) for name in index.sources}
    if not sum(weights.values()) > 0:
        raise RecurringError(f"the mixture's weights {weights} sum to 0: give a source a weight above 0")
    return {"weights": weights, "samples": cfg.train.epoch_samples, "replace": cfg.train.mixture_replacement}


def epoch_rows(mix: dict, index) -> int:
    """Rows one epoch draws under ``mix`` (``mixture``'s), before bucket batching drops its leftovers."""
    if "weights" in mix:
        return len(index) if mix["samples"] is None else int(mix["samples"])
    return sum(int(round(mix["repeats"][name] * int((index.source == code).sum())))
               for code, name in enumerate(index.sources))


def training_data(cfg: Config, manifest: CuratedManifest) -> dict:
    """What every worker needs to read the train split in each epoch's order (``loop.EpochReader``): the
    split's index (bucket and source of every row), the mixture, and either the split itself, read once into
    Ray's object store (``train.in_memory_mb``; each epoch then a global shuffle of it), or nothing more (the
    workers stream their shards, in each epoch's shard order)."""
    paths = manifest.paths("train")
    index = read_index(paths, manifest.endpoint_url)
    mix = mixture(cfg, manifest, index)
    data = {"index": index, "mixture": mix, "epoch_rows": epoch_rows(mix, index), "mode": "blocks"}
    size = (manifest.nbytes or {}).get("train")
    if size is not None and size <= cfg.train.in_memory_mb * 2**20:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # each shard's rows in order (checked by the workers)
        ctx.enable_progress_bars = False
        ds = ray.data.read_parquet(paths, filesystem=arrow_filesystem(manifest.root, manifest.endpoint_url),
                                   include_paths=True).materialize()  # read once; every epoch reads it from there
        data.update(mode="global", refs=ds.to_arrow_refs(), names=manifest.files["train"])
    log.info("training data: %d rows in %d shards, %s order; %d rows per epoch, mixture %s",
             len(index), len(paths), data["mode"], data["epoch_rows"], mix)
    return data


def software_versions() -> dict[str, str]:
    """``software.*`` tags: the versions of what trained the model (the model card's software section)."""
    tags = {"software.python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers", "ray", "mlflow"):
        try:
            tags[f"software.{package}"] = version(package)
        except PackageNotFoundError:
            tags[f"software.{package}"] = "not installed"
    return tags


def pin_source(cfg: Config, run_id: str) -> ModelConfig:
    """The pinned model source of the run: read from its ``lineage.pinned`` tag (a resumed run), else
    resolved now and recorded with the rest of the lineage."""
    client = mlflow.MlflowClient()
    recorded = client.get_run(run_id).data.tags.get(PINNED)
    if recorded:
        return ModelConfig.model_validate_json(recorded)
    pinned, tags = source_lineage(cfg)
    setup_tracking(cfg)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    log.info("model source %s pinned as %s (weights sha256 %s)", cfg.model.source, pinned.source,
             tags.get("lineage.weights_sha256", "")[:12])
    return pinned


ADAPTER_BASE_TAG = "adapter.base_model_uri"
ADAPTER_BASE_SHA_TAG = "adapter.base_weights_sha256"


def pin_adapter_base(cfg: Config, run_id: str, model: ModelConfig) -> ModelConfig:
    """The registered base an adapter run trains on, as the model config every worker loads: read back from the
    run (a resumed run), else resolved now (``register_base``: the pinned registered version, or the source
    registered once) and recorded on the run with its content hash."""
    client = mlflow.MlflowClient()
    tags = client.get_run(run_id).data.tags
    if tags.get(ADAPTER_BASE_TAG):
        return model.model_copy(update={"source": tags[ADAPTER_BASE_TAG], "revision": None, "variant": None})
    lineage = {k: v for k, v in tags.items() if k.startswith("lineage.")}
    name, version = register_base(cfg, model, lineage)
    uri = f"models:/{name}/{version}"
    digest = version_weights_sha256(name, version, cfg.state_path("cache", "models"))
    setup_tracking(cfg)
    client.set_tag(run_id, ADAPTER_BASE_TAG, uri)
    client.set_tag(run_id, ADAPTER_BASE_SHA_TAG, digest)
    log.info("%s adapter of %s (weights sha256 %s)", cfg.train.method.value, uri, digest[:12])
    return model.model_copy(update={"source": uri, "revision": None, "variant": None})


def trainer(cfg: Config, manifest: CuratedManifest, run_id: str, model: ModelConfig | None = None):
    """The TorchTrainer of this run (a new one per attempt; the same name resumes)."""
    data = training_data(cfg, manifest)
    storage = cfg.train.storage_path
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"), "mlflow_run_id": run_id, "train_rows": data["epoch_rows"],
            "data": data, "model": (model or cfg.model).model_dump(mode="json"),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name,
            # With a filesystem given, Ray Train takes the path as that filesystem names it (bucket/key for S3).
            storage_path=filesystem_path(storage),
            storage_filesystem=arrow_filesystem(storage),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.num_to_keep, checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            # Restarts are decided in ``fit``: an error that recurs on every attempt is not retried.
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )


def recurring_cause(err: BaseException) -> RecurringError | None:
    """The ``RecurringError`` a worker raised, out of Ray Train's wrappers (``WorkerGroupError`` keeps
    each rank's exception; Ray's task errors keep theirs as ``cause``)."""
    return find_cause(err, lambda e: isinstance(e, RecurringError))


class TrainingFailed(RuntimeError):
    """Training failed on every attempt ``train.max_failures`` allowed; the message is the last cause."""


LOST = (ray.exceptions.ActorDiedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
        ray.exceptions.WorkerCrashedError)
"""What a lost node or worker raises in the tasks and actors that were on it."""


def lost_to_the_cluster(err: BaseException) -> bool:
    """Whether a lost node or worker explains ``err``: one of ``LOST`` among its causes, or a cause Ray could
    not deserialize whose text says an actor or worker died (Ray keeps only the text then)."""
    def match(e: BaseException) -> bool:
        return isinstance(e, LOST) or (isinstance(e, ray.exceptions.UnserializableException) and "died" in str(e))

    return find_cause(err, match) is not None


def fit(cfg: Config, manifest: CuratedManifest, run_id: str, model: ModelConfig | None = None):
    """Run the trainer; after a failure that may not recur (a lost worker, a killed node) start it again
    under the same name, which resumes from the latest checkpoint, up to ``train.max_failures`` times.
    That covers an attempt's preparation too: reading the split into the object store can meet a node
    that died a moment ago and that the cluster has not noticed yet. A ``RecurringError`` (bad data, a
    model or an optimizer that cannot work) is raised at once, as is any other error before training."""
    for attempt in range(cfg.train.max_failures + 1):
        try:
            return trainer(cfg, manifest, run_id, model).fit()
        except TrainingFailedError as err:
            cause = recurring_cause(err)
            if cause is not None:
                raise cause from None
            failure = err
        except Exception as err:  # outside Ray Train's run: only a lost node is worth another attempt
            if not lost_to_the_cluster(err):
                raise
            failure = err
        first = (str(failure).strip().splitlines() or [type(failure).__name__])[-1][:300]
        if attempt == cfg.train.max_failures:
            raise TrainingFailed(f"training failed after {attempt + 1} attempt(s): {first}") from failure
        log.warning("training attempt %d of %d failed (%s); resuming from the latest checkpoint",
                    attempt + 1, cfg.train.max_failures + 1, first)
    raise AssertionError("unreachable")


def select_checkpoint(cfg: Config, result):
    """(checkpoint, metrics): lowest val_loss among those kept, or the last one."""
    if cfg.train.select == "last" or not result.best_checkpoints:
        return result.checkpoint, result.metrics
    return min(result.best_checkpoints, key=lambda cm: cm[1].get("val_loss", float("inf")))


def directory_bytes(directory: Path, variant: str | None) -> int:
    return sum(p.stat().st_size for p in weight_files(directory, variant))


def export_and_register(cfg: Config, run_id: str, checkpoint, metrics: dict, manifest: CuratedManifest,
                        model: ModelConfig | None = None) -> str:
    """Checkpoint -> diffusers directory (fp32 and the ``train.export_variant`` weights) -> pyfunc model in
    the run -> new registered version, tagged with its lineage, parameter counts, sizes and its own weights'
    content hash. An adapter run goes to ``export_adapter``.

    Host memory: the base pipeline in fp32 once; the checkpoint's UNet is copied into it tensor by tensor and
    the variant is cast file to file (``memory/plan.py`` ``export_peak``). The staged directory is removed
    once the registry holds its copy, so a version is stored once."""
    if cfg.train.is_adapter:
        return export_adapter(cfg, run_id, checkpoint, metrics, manifest)
    parts = load_source_parts(cfg, model)
    # The exported pipeline's unconditional branch is the one caption dropout trained.
    parts.force_zeros_for_empty_prompt = dropout_uses_zeros(cfg.train.caption_dropout_mode,
                                                            parts.force_zeros_for_empty_prompt)
    with checkpoint.as_directory() as ckpt_dir:
        load_unet_weights(Path(ckpt_dir), parts.unet, use_ema=cfg.train.ema_decay is not None)
    # Staged here, then copied into the run's artifacts by the registry: the staging copy goes once logged.
    export_dir = cfg.state_path("exports", cfg.train.run_name, f"step_{int(metrics.get('step', 0)):08d}")
    variant = cfg.train.export_variant
    try:
        save_pipeline(parts, cfg.diffusion, export_dir)
        sizes = {f"params.{name}": str(sum(p.numel() for p in getattr(parts, name).parameters()))
                 for name in COMPONENTS}
        del parts  # the fp32 models are on disk now; the half variant is read back from there
        release_memory()
        sizes["size.fp32_bytes"] = str(directory_bytes(export_dir, None))
        sizes[WEIGHTS_TAG] = weights_sha256(export_dir)  # what an adapter of this version names as its base
        if variant:
            save_variant(export_dir, variant)
            sizes[f"size.{variant}_bytes"] = str(directory_bytes(export_dir, variant))
        setup_tracking(cfg)
        with mlflow.start_run(run_id=run_id):
            final = {f"final_{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            mlflow.log_metrics(final)
            info = log_pipeline_model(export_dir, cfg.tracking.registered_model, cfg.inference)
            version = str(info.registered_model_version)
            mlflow.set_tag("registered_version", version)
    finally:
        shutil.rmtree(export_dir, ignore_errors=True)
    client = mlflow.MlflowClient()
    lineage = {k: v for k, v in client.get_run(run_id).data.tags.items() if k.startswith(LINEAGE) and k != PINNED}
    tags = {
        "run_id": run_id, "dataset_digest": manifest.digest, "base_model": cfg.model.source,
        "config_hash": cfg.digest(), "git_commit": git_commit(), "checkpoint": checkpoint.path,
        "weight_variant": variant or "", **sizes, **lineage, **{k: str(v) for k, v in final.items()},
    }
    for key, value in tags.items():
        client.set_model_version_tag(cfg.tracking.registered_model, version, key, value)
    return version


def export_adapter(cfg: Config, run_id: str, checkpoint, metrics: dict, manifest: CuratedManifest) -> str:
    """An adapter run's checkpoint -> the adapter in diffusers' layout (``pytorch_lora_weights.safetensors``, the
    peft config in its header, the EMA's weights where ``train.ema_decay`` is set), beside ``adapter.json`` and the
    base UNet's config -> a ``TerminusAdapterModel`` version of ``cfg.adapter_model_name`` tagged with its base.
    Reads no model weights: the checkpoint holds the adapter and the run names the base."""
    setup_tracking(cfg)
    client = mlflow.MlflowClient()
    run_tags = client.get_run(run_id).data.tags
    base_uri, base_sha = run_tags[ADAPTER_BASE_TAG], run_tags[ADAPTER_BASE_SHA_TAG]
    with checkpoint.as_directory() as ckpt_dir:
        weights = load_adapter_weights(Path(ckpt_dir), use_ema=cfg.train.ema_decay is not None)
    export_dir = cfg.state_path("exports", cfg.train.run_name, f"step_{int(metrics.get('step', 0)):08d}")
    save_adapter(export_dir, weights.state, weights.config)
    base_dir = fetch_model(base_uri, cfg.state_path("cache", "models")).pipeline_dir
    unet_config = json.loads((base_dir / "unet" / "config.json").read_text())
    write_adapter_folder(export_dir, weights, base_uri, base_sha, unet_config)
    name = cfg.adapter_model_name
    with mlflow.start_run(run_id=run_id):
        final = {f"final_{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        mlflow.log_metrics(final)
        version = log_adapter(export_dir, name, cfg.inference, base_uri, base_sha)
        mlflow.set_tag("registered_version", version)
        mlflow.set_tag("registered_model", name)
    lineage = {k: v for k, v in run_tags.items() if k.startswith(LINEAGE) and k != PINNED}
    tags = {
        "run_id": run_id, "dataset_digest": manifest.digest, "base_model": cfg.model.source,
        "config_hash": cfg.digest(), "git_commit": git_commit(), "checkpoint": checkpoint.path,
        "params.adapter": str(sum(t.numel() for t in weights.state.values())), **lineage,
        **{k: str(v) for k, v in final.items()},
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return version


def export(cfg: Config, run_id: str, checkpoint, metrics: dict, manifest: CuratedManifest,
           model: ModelConfig | None = None) -> str:
    """``export_and_register`` where the memory is. With ``train.export_memory_gb`` set (a cluster: the
    memory plan states the figure) it is a Ray task reserving that memory, so it runs on a worker and never
    on the head node; unset (one machine, where the driver is as good a place as any) it runs here,
    without starting a worker process just for it."""
    if not cfg.train.export_memory_gb:
        return export_and_register(cfg, run_id, checkpoint, metrics, manifest, model)
    task = ray.remote(export_and_register).options(
        num_cpus=1, num_gpus=0, memory=int(cfg.train.export_memory_gb * 2**30))
    return ray.get(task.remote(cfg, run_id, checkpoint, metrics, manifest, model))


def run_training(cfg: Config) -> TrainingResult:
    cfg = resolve_paths(cfg)
    manifest = read_manifest(cfg.train.data, cfg.curate.s3_endpoint_url)
    run_id = open_run(cfg, manifest)
    try:
        model = pin_source(cfg, run_id)
        if cfg.train.is_adapter:
            model = pin_adapter_base(cfg, run_id, model)
        result = fit(cfg, manifest, run_id, model)
    except BaseException:
        mlflow.MlflowClient().set_terminated(run_id, status="FAILED")
        raise
    checkpoint, metrics = select_checkpoint(cfg, result)
    version = export(cfg, run_id, checkpoint, metrics, manifest, model)
    name = cfg.adapter_model_name if cfg.train.is_adapter else cfg.tracking.registered_model
    return TrainingResult(run_id, cfg.train.run_name, name, version, checkpoint.path, metrics.get("val_loss"))
