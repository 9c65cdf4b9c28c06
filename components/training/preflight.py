"""Checks that run before any cluster starts: each mistake that would otherwise surface inside a Ray
worker minutes later (and be retried) fails here, in under a second, with one line that says how to fix
it. Every check raises ``PreflightError``; the flows turn it into exit status 2.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from components.config import Config, ConfigError, OptimizerName
from components.dataset import SUCCESS
from components.diffusion.source_kinds import hub_offline, source_kind
from components.registry.tracking import check_tracking
from components.storage import StorageError, Store, is_s3, join


class PreflightError(ConfigError):
    pass


def check_dataset(root: str, endpoint_url: str | None, key: str = "train.data") -> None:
    """The curated dataset at ``root`` exists, and its curation finished (two different messages)."""
    if not is_s3(root) and not Path(root).exists():
        raise PreflightError(f"{key} {root} does not exist: run flows/curate.py first, or point {key} at a "
                             "curated dataset")
    try:
        marker = Store(endpoint_url).read_if_exists(join(root, SUCCESS))
    except StorageError as err:  # no credentials, no such bucket, the endpoint down: nothing can be read
        raise PreflightError(f"{key} {root}: {err}") from None
    if marker is None:
        raise PreflightError(f"{key} {root} has no {SUCCESS}: curation did not finish there; rerun flows/curate.py "
                             "into it")


def local_cluster() -> bool:
    """True when the flow starts its own Ray on this machine (no RAY_ADDRESS names a cluster)."""
    return not os.environ.get("RAY_ADDRESS")


def check_device(cfg: Config) -> None:
    """The optimizer and the workers' resources suit the machine the run will have."""
    t = cfg.train
    if t.optimizer is OptimizerName.ADAMW_8BIT:
        if not t.use_gpu:
            raise PreflightError("train.optimizer=adamw8bit needs CUDA workers (bitsandbytes): set train.use_gpu=true "
                                 "on a GPU cluster, or train.optimizer=adamw")
        if local_cluster() and importlib.util.find_spec("bitsandbytes") is None:
            raise PreflightError("train.optimizer=adamw8bit needs the bitsandbytes package: pip install -e '.[gpu]', "
                                 "or set train.optimizer=adamw")
    if local_cluster():
        if t.use_gpu:
            import torch  # on first use: the flows refuse bad input before torch or diffusers load

        if t.use_gpu and torch.cuda.device_count() < t.num_workers:
            raise PreflightError(f"train.use_gpu=true with {t.num_workers} worker(s), but this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s) and no RAY_ADDRESS names a cluster: "
                                 "set train.use_gpu=false or run on a GPU cluster")
        cpus = os.cpu_count() or 1
        if t.num_workers * t.cpus_per_worker > cpus:
            raise PreflightError(f"train.num_workers x train.cpus_per_worker = {t.num_workers * t.cpus_per_worker:g} "
                                 f"CPUs, more than this machine's {cpus}: lower them, or set RAY_ADDRESS to a cluster")


def check_model_source(cfg: Config) -> None:
    """The model source can be read before any worker tries: a directory exists; a single-file checkpoint
    is an SDXL checkpoint whose schedule markers agree with the preset, with component configs to read it
    by; a registered version exists in the registry; a hub id is in the local cache when HF_HUB_OFFLINE
    is set. (An s3:// or http(s) source is checked when it is fetched.)"""
    source = cfg.model.source
    kind = source_kind(source)
    if kind in ("tiny", "sdxl_random", "s3"):
        return
    if kind == "registered":
        from components.registry.model import ModelUriError, check_version

        try:
            check_version(cfg, source)
        except ModelUriError as err:
            raise PreflightError(f"model.source {err}") from None
        return
    if kind == "url":
        raise PreflightError(f"model.source {source}: a URL must name a single-file .safetensors checkpoint")
    if kind == "single_file":
        if not source.startswith(("s3://", "http://", "https://")):
            path = Path(source).expanduser()
            if not path.is_file():
                raise PreflightError(f"model.source {source} is not a file")
            check_single_file(path)
            # diffusers on first use: the flows refuse bad input before torch or diffusers load
            from components.diffusion.parts import ModelLoadError
            from components.diffusion.sdxl import check_markers

            try:
                check_markers(path, cfg.diffusion)
            except ModelLoadError as err:
                raise PreflightError(f"model.source {err}") from None
        check_single_file_config(cfg.model.single_file_config)
        return
    if kind == "directory":
        if not Path(source).expanduser().is_dir():
            raise PreflightError(f"model.source {source} is not a directory")
        return
    if "/" not in source:
        raise PreflightError(f"model.source {source!r} is neither 'tiny', 'sdxl-random', a directory, a hub id "
                             "(org/name), a "
                             ".safetensors file, s3:// nor models:/")
    if hub_offline():
        cached = try_to_load_from_cache(source, "model_index.json", revision=cfg.model.revision)
        if not isinstance(cached, str):
            raise PreflightError(f"model.source {source} is a hub id, HF_HUB_OFFLINE is set and it is not in the local "
                                 "Hugging Face cache: unset HF_HUB_OFFLINE where the hub is reachable, or use a "
                                 "local directory or s3:// prefix")


SDXL_SINGLE_FILE_KEYS = ("model.diffusion_model.input_blocks.0.0.weight",
                         "conditioner.embedders.1.model.ln_final.weight", "first_stage_model.decoder.conv_out.weight")
"""Keys every SDXL base-layout checkpoint has (A1111 and diffusers detect SDXL by the OpenCLIP one)."""


def check_single_file(path: Path) -> None:
    from components.diffusion.single_file import read_keys  # torch on first use (as check_model_source)

    try:
        keys = read_keys(path)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise PreflightError(f"model.source {path} is not a safetensors file ({type(err).__name__})") from None
    missing = [k for k in SDXL_SINGLE_FILE_KEYS if k not in keys]
    if missing:
        raise PreflightError(f"model.source {path} is not an SDXL checkpoint in the original layout (no {missing[0]})")


def check_single_file_config(config: str | None) -> None:
    """The configs a single file is read with: a local diffusers folder, or (None: SDXL base's) a hub id
    that is cached when HF_HUB_OFFLINE is set."""
    if config is not None and config.startswith(("/", "./", "../", "~")):
        if not (Path(config).expanduser() / "model_index.json").is_file():
            raise PreflightError(f"model.single_file_config {config} is not a diffusers folder (no model_index.json)")
        return
    if hub_offline():
        repo = config or "stabilityai/stable-diffusion-xl-base-1.0"
        if not isinstance(try_to_load_from_cache(repo, "model_index.json"), str):
            raise PreflightError(f"a single-file model.source is read with the configs of {repo}, which is not in the "
                                 "local Hugging Face cache and HF_HUB_OFFLINE is set: set model.single_file_config "
                                 "to a local diffusers folder")


def check_training(cfg: Config) -> None:
    """Everything ``flows/train.py`` can know before Ray starts; a tracking server that does not answer
    first (the other checks may need it, and it is the cause to fix first)."""
    check_tracking(cfg)
    check_device(cfg)
    check_model_source(cfg)
    check_dataset(cfg.train.data, cfg.curate.s3_endpoint_url)
