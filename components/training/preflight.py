"""Checks that run before any cluster starts: each mistake that would otherwise surface inside a Ray
worker minutes later (and be retried) fails here, in under a second, with one line that says how to fix
it. Every check raises ``PreflightError``; the flows turn it into exit status 2.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from components.config import Config, ConfigError, OptimizerName
from components.dataset import SUCCESS
from components.storage import Store, is_s3, join


class PreflightError(ConfigError):
    pass


def check_dataset(root: str, endpoint_url: str | None, key: str = "train.data") -> None:
    """The curated dataset at ``root`` exists, and its curation finished (two different messages)."""
    if not is_s3(root) and not Path(root).exists():
        raise PreflightError(f"{key} {root} does not exist: run flows/curate.py first, or point {key} at a "
                             "curated dataset")
    if Store(endpoint_url).read_if_exists(join(root, SUCCESS)) is None:
        raise PreflightError(f"{key} {root} has no {SUCCESS}: curation did not finish there; rerun flows/curate.py "
                             "into it")


def local_cluster() -> bool:
    """True when the flow starts its own Ray on this machine (no RAY_ADDRESS names a cluster)."""
    return not os.environ.get("RAY_ADDRESS")


def check_device(cfg: Config) -> None:
    """The optimizer and the workers' resources suit the machine the run will have."""
    t = cfg.train
    import torch

    if t.optimizer is OptimizerName.ADAMW_8BIT:
        if not t.use_gpu:
            raise PreflightError("train.optimizer=adamw8bit needs CUDA workers (bitsandbytes): set train.use_gpu=true "
                                 "on a GPU cluster, or train.optimizer=adamw")
        if local_cluster() and importlib.util.find_spec("bitsandbytes") is None:
            raise PreflightError("train.optimizer=adamw8bit needs the bitsandbytes package: pip install -e '.[gpu]', "
                                 "or set train.optimizer=adamw")
    if local_cluster():
        if t.use_gpu and torch.cuda.device_count() < t.num_workers:
            raise PreflightError(f"train.use_gpu=true with {t.num_workers} worker(s), but this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s) and no RAY_ADDRESS names a cluster: "
                                 "set train.use_gpu=false or run on a GPU cluster")
        cpus = os.cpu_count() or 1
        if t.num_workers * t.cpus_per_worker > cpus:
            raise PreflightError(f"train.num_workers x train.cpus_per_worker = {t.num_workers * t.cpus_per_worker:g} "
                                 f"CPUs, more than this machine's {cpus}: lower them, or set RAY_ADDRESS to a cluster")


def check_model_source(cfg: Config) -> None:
    """A hub id that cannot be reached: HF_HUB_OFFLINE is set and the id is not in the local cache."""
    source = cfg.model.source
    if source == "tiny" or is_s3(source):
        return
    if source.startswith(("/", "./", "../", "~")):
        if not Path(source).expanduser().is_dir():
            raise PreflightError(f"model.source {source} is not a directory")
        return
    if "/" not in source:
        raise PreflightError(f"model.source {source!r} is neither 'tiny', a directory, a hub id (org/name) nor s3://")
    from components.diffusion.sdxl import hub_offline

    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "model_index.json", revision=cfg.model.revision)
        if not isinstance(cached, str):
            raise PreflightError(f"model.source {source} is a hub id, HF_HUB_OFFLINE is set and it is not in the local "
                                 "Hugging Face cache: unset HF_HUB_OFFLINE where the hub is reachable, or use a "
                                 "local directory or s3:// prefix")


def check_training(cfg: Config) -> None:
    """Everything ``flows/train.py`` can know before Ray starts."""
    check_device(cfg)
    check_model_source(cfg)
    check_dataset(cfg.train.data, cfg.curate.s3_endpoint_url)
