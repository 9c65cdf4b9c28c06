"""Adapters in the registry: each version names the exact base version it was trained on, and loads with it.

An adapter version is registered under a model of its own (``train.adapter.registered_model``, default
``<tracking.registered_model>-<method>``) as a pyfunc whose artifact is the adapter folder in diffusers' layout
(``components/diffusion/pyfunc.py`` ``TerminusAdapterModel``). Its tags:

- ``adapter.method`` (``lora`` / ``lokr``), ``adapter.rank``, ``adapter.alpha``, ``adapter.target_modules``;
- ``base_model_uri``: ``models:/NAME/VERSION`` of the base, never an alias (an alias moves, the adapter does not);
- ``base_weights_sha256``: the content hash of that base version's weights (``weights_sha256`` of its folder:
  sha256 over each fp32 weight file's path and sha256), so a server can tell whether the base it holds is the one
  the adapter was trained on even when the same weights are registered twice;
- ``base_model_name`` / ``base_model_version``.

The registered model itself is tagged ``terminus.kind = adapter`` and ``terminus.base_model = <base name>``, which
is how ``/v1/models`` finds the adapters. Every full version gets a ``weights_sha256`` tag the first time its hash is
needed (computed from its files once, then read from the registry).

A run whose ``model.source`` is not a registered version (``tiny``, a folder, a hub id) registers that source first
(``register_base``), once: the version is found again by the source's own content hash
(``lineage.weights_sha256``), so every adapter of the same source names the same base version.

Promotion and rollback are the registry's aliases, the same code as for full models
(``components/registry/promotion.py``); evaluation loads base plus adapter (``components/evaluation/run.py``).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow

from components.config import Config, InferenceConfig, ModelConfig
from components.diffusion.adapters import ADAPTER_FILE, AdapterWeights, rank_alpha, read_adapter
from components.diffusion.pyfunc import ADAPTER_ARTIFACT, BASE_KEY, INFERENCE_KEY, TerminusAdapterModel
from components.diffusion.sdxl import save_pipeline, save_variant
from components.host_memory import release_memory
from components.registry.model import (
    ADAPTER_METHOD_TAG,
    BASE_URI_TAG,
    LINEAGE,
    PINNED,
    ModelUriError,
    _model_version,
    fetch_model,
    log_pipeline_model,
    log_pyfunc,
    parse_model_uri,
)
from components.registry.model_sources import load_source_parts, source_kind, weights_sha256
from components.registry.tracking import setup_tracking

log = logging.getLogger(__name__)

WEIGHTS_TAG = "weights_sha256"
"""On a full version: the content hash of its own fp32 weights (components.diffusion.sources.weights_sha256)."""
BASE_SHA_TAG = "base_weights_sha256"
KIND_TAG = "terminus.kind"
BASE_NAME_TAG = "terminus.base_model"
ROLE_TAG = "terminus.role"
"""``base`` on a version registered only so that adapters can name it (``register_base``)."""
ADAPTER_INFO = "adapter.json"
"""Next to the adapter file: what it is and what it was trained on (the registry's tags, readable offline)."""
UNET_CONFIG = "unet_config.json"
"""Next to the adapter file: the base UNet's config, which names the modules in the kohya layout
(components/diffusion/kohya.py) without fetching the base's weights."""


class NotAnAdapter(ModelUriError):
    """An adapter was asked for and the URI names a full model."""


@dataclass(frozen=True)
class AdapterVersion:
    """A fetched adapter version: its folder, and the base it names."""

    name: str
    version: str
    directory: Path
    method: str
    base_uri: str
    base_sha256: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def key(self) -> str:
        """A name for this version as an attached adapter (peft adapter names may not contain dots)."""
        return f"{self.name}--v{self.version}".replace(".", "_")

    def weights(self) -> AdapterWeights:
        return read_adapter(self.directory)

    def unet_config(self) -> dict:
        return json.loads((self.directory / UNET_CONFIG).read_text())


def is_adapter(tags: dict | None) -> bool:
    return ADAPTER_METHOD_TAG in (tags or {})


def fetch_adapter(uri: str, cache_root: str | Path) -> AdapterVersion:
    """Download the adapter version ``uri`` names (an alias is resolved now) into the cache of versions."""
    mv = _model_version(uri)
    tags = mv.tags or {}
    if not is_adapter(tags):
        raise NotAnAdapter(f"{uri} is a full model, not an adapter")
    resolved = fetch_model(f"models:/{mv.name}/{mv.version}", cache_root, adapter_ok=True)
    missing = [t for t in (BASE_URI_TAG, BASE_SHA_TAG) if not tags.get(t)]
    if missing:
        raise ModelUriError(f"adapter {mv.name} v{mv.version} has no {', '.join(missing)} tag: its base is unknown")
    return AdapterVersion(mv.name, str(mv.version), resolved.pipeline_dir, tags[ADAPTER_METHOD_TAG],
                          tags[BASE_URI_TAG], tags[BASE_SHA_TAG])


def version_weights_sha256(name: str, version: str, cache_root: str | Path) -> str:
    """The content hash of a full version's weights: its ``weights_sha256`` tag, else computed from its files
    (fetched into the cache) and recorded as that tag, so it is computed once per version."""
    client = mlflow.MlflowClient()
    tags = client.get_model_version(name, version).tags or {}
    if tags.get(WEIGHTS_TAG):
        return tags[WEIGHTS_TAG]
    digest = weights_sha256(fetch_model(f"models:/{name}/{version}", cache_root).pipeline_dir)
    try:
        client.set_model_version_tag(name, version, WEIGHTS_TAG, digest)
    except mlflow.exceptions.MlflowException as err:  # a read-only registry: computed again next time
        log.warning("could not tag %s v%s with its weights hash: %s", name, version, err.error_code)
    return digest


def register_base(cfg: Config, model: ModelConfig, lineage: dict[str, str]) -> tuple[str, str]:
    """(name, version) of the registered base an adapter run trains on.

    ``model`` (the run's pinned source) names a registered full version: that one. Otherwise the source is
    registered under ``cfg.base_model_name`` -- exported exactly as training exports a model (fp32 and the
    ``train.export_variant`` weights) into a staging folder that is removed once logged, from a run of its
    own -- unless a version of that name already holds
    the same source (its ``lineage.weights_sha256`` tag equals ``lineage``'s).
    """
    setup_tracking(cfg)
    if source_kind(model.source) == "registered":
        mv = _model_version(model.source)
        if is_adapter(mv.tags):
            raise ModelUriError(f"model.source {model.source} is an adapter: an adapter trains on a full model "
                                f"(its base is {mv.tags.get(BASE_URI_TAG)})")
        return mv.name, str(mv.version)
    source_hash = lineage.get(LINEAGE + "weights_sha256", "")
    name = cfg.base_model_name
    client = mlflow.MlflowClient()
    if source_hash:
        try:
            found = client.search_model_versions(
                f"name = '{name}' and tags.`{LINEAGE}weights_sha256` = '{source_hash}'")
        except mlflow.exceptions.MlflowException:
            found = []
        if found:
            version = str(min(int(v.version) for v in found))
            log.info("base of the adapter: %s v%s (already registered: %s)", name, version, model.source)
            return name, version
    directory = cfg.state_path("exports", "bases", (source_hash or cfg.digest())[:16])
    try:
        save_pipeline(load_source_parts(cfg, model), cfg.diffusion, directory)
        if cfg.train.export_variant:
            save_variant(directory, cfg.train.export_variant)
        digest = weights_sha256(directory)
        experiment = setup_tracking(cfg)
        with mlflow.start_run(experiment_id=experiment,
                              run_name=f"register-base-{(source_hash or 'source')[:12]}") as run:
            mlflow.set_tags({ROLE_TAG: "base", "base_model": model.source})
            version = str(log_pipeline_model(directory, name, cfg.inference).registered_model_version)
    finally:  # a staging folder: the registry holds the base's one copy from here on
        shutil.rmtree(directory, ignore_errors=True)
        release_memory()  # the source's models, built or loaded and dropped: the run's workers need the memory
    tags = {ROLE_TAG: "base", "base_model": model.source, "run_id": run.info.run_id,
            WEIGHTS_TAG: digest, "weight_variant": cfg.train.export_variant or "",
            **{k: v for k, v in lineage.items() if k != PINNED}}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    log.info("registered the source %s as %s v%s, the base adapters of it name", model.source, name, version)
    return name, version


def write_adapter_folder(directory: Path, weights: AdapterWeights, base_uri: str, base_sha256: str,
                         unet_config: dict) -> Path:
    """``adapter.json`` and ``unet_config.json`` beside the adapter file (written by
    ``components.diffusion.adapters.save_adapter``)."""
    rank, alpha = rank_alpha(weights.config)
    info = {"method": weights.method, "rank": rank, "alpha": alpha, BASE_URI_TAG: base_uri, BASE_SHA_TAG: base_sha256,
            "target_modules": sorted(weights.config.target_modules), "file": ADAPTER_FILE}
    (directory / ADAPTER_INFO).write_text(json.dumps(info, indent=2))
    (directory / UNET_CONFIG).write_text(json.dumps(dict(unet_config), indent=2, default=list))
    return directory


def log_adapter(directory: Path, registered_model: str, inference: InferenceConfig, base_uri: str,
                base_sha256: str) -> str:
    """Log the adapter folder as a ``TerminusAdapterModel`` in the active run, register it as a new version of
    ``registered_model`` and tag it (the version's and the registered model's tags, module docstring)."""
    weights = read_adapter(directory)
    rank, alpha = rank_alpha(weights.config)
    info = log_pyfunc(TerminusAdapterModel(), {ADAPTER_ARTIFACT: str(directory)},
                      {INFERENCE_KEY: inference.model_dump(mode="json"), BASE_KEY: base_uri}, registered_model)
    version = str(info.registered_model_version)
    base_name, _, base_version = parse_model_uri(base_uri)
    client = mlflow.MlflowClient()
    tags = {ADAPTER_METHOD_TAG: weights.method, "adapter.rank": str(rank), "adapter.alpha": f"{alpha:g}",
            "adapter.target_modules": ",".join(sorted(weights.config.target_modules)), BASE_URI_TAG: base_uri,
            BASE_SHA_TAG: base_sha256, "base_model_name": base_name, "base_model_version": str(base_version),
            "adapter.bytes": str((directory / ADAPTER_FILE).stat().st_size)}
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, version, key, value)
    client.set_registered_model_tag(registered_model, KIND_TAG, "adapter")
    client.set_registered_model_tag(registered_model, BASE_NAME_TAG, base_name)
    return version


def adapter_models() -> list[str]:
    """Names of the registered models that hold adapters."""
    client = mlflow.MlflowClient()
    return sorted(m.name for m in client.search_registered_models(filter_string=f"tags.`{KIND_TAG}` = 'adapter'"))


def base_of(adapter: AdapterVersion, cache_root: str | Path) -> Path:
    """The pipeline folder of the adapter's base version, fetched into the cache."""
    return fetch_model(adapter.base_uri, cache_root).pipeline_dir


def listed_adapters(base_sha256: str | None = None) -> list[dict]:
    """What ``/v1/models`` shows of the adapters: one entry per alias of every adapter model (``NAME@ALIAS``, the
    id a request names), or its newest version where it has no alias; each with its version, method, base, and
    whether it runs on the base whose content hash is ``base_sha256``."""
    client = mlflow.MlflowClient()
    out = []
    for name in adapter_models():
        model = client.get_registered_model(name)
        aliases = dict(model.aliases or {})
        if not aliases:
            newest = max((int(v.version) for v in client.search_model_versions(f"name = '{name}'")), default=None)
            if newest is None:
                continue
            pointers = {f"{name}/{newest}": str(newest)}
        else:
            pointers = {f"{name}@{alias}": str(version) for alias, version in sorted(aliases.items())}
        for model_id, version in pointers.items():
            tags = client.get_model_version(name, version).tags or {}
            entry = {"id": model_id, "version": version, "method": tags.get(ADAPTER_METHOD_TAG),
                     "base_model_uri": tags.get(BASE_URI_TAG), "created": int(model.creation_timestamp / 1000)}
            if base_sha256 is not None:
                entry["compatible"] = tags.get(BASE_SHA_TAG) == base_sha256
            out.append(entry)
    return out
