"""Every model source (``model.source``), resolved and loaded in one place: registered versions and every other kind.

A registered version (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) is the registry's: it is pinned to its
version number and fetched into the local cache of versions, where it is the diffusers directory it was logged
as. Every other kind (the offline builds, a directory, a hub id, an ``s3://`` prefix, a single file) is described
and loaded by ``components.diffusion.sources`` and ``components.diffusion.sdxl``, called once from here. The
layering (docs/architecture.md) keeps MLflow out of components/diffusion, so this is the lowest module that sees
both: the training driver, its workers, an adapter run's base registration and the latent cache go through it.

``source_lineage`` pins a source and names what it is made of (the run's ``lineage.*`` tags);
``load_source_parts`` loads a source, pinned or not, as ``SDXLParts``.
"""

from __future__ import annotations

from components.config import Config, ModelConfig
from components.diffusion.parts import SDXLParts
from components.diffusion.sdxl import load_parts
from components.diffusion.source_kinds import source_kind
from components.diffusion.sources import describe_source, weights_sha256
from components.registry.model import LINEAGE, _model_version, fetch_model
from components.registry.tracking import setup_tracking

__all__ = ["load_source_parts", "local_model", "source_kind", "source_lineage", "weights_sha256"]
"""``source_kind`` (every kind, ``registered`` included) and ``weights_sha256`` (the content hash of a pipeline
directory's weights) are the diffusion layer's, named here so that the modules above resolve sources through
this one module."""


def local_model(cfg: Config, model: ModelConfig | None = None) -> ModelConfig:
    """``model`` (default ``cfg.model``) as the diffusion layer reads it: a registered version fetched into the
    local cache of versions and named by that directory (its fp32 weights: no revision, no variant); every
    other source as it is."""
    model = model or cfg.model
    if source_kind(model.source) != "registered":
        return model
    setup_tracking(cfg)
    resolved = fetch_model(model.source, cfg.state_path("cache", "models"))
    return model.model_copy(update={"source": str(resolved.pipeline_dir), "revision": None, "variant": None})


def load_source_parts(cfg: Config, model: ModelConfig | None = None) -> SDXLParts:
    """The SDXL parts of ``model`` (default ``cfg.model``) in fp32, whatever its kind (``local_model``, then
    ``components.diffusion.sdxl.load_parts``)."""
    return load_parts(local_model(cfg, model), cfg.state_path("cache"), diffusion=cfg.diffusion)


def source_lineage(cfg: Config, model: ModelConfig | None = None) -> tuple[ModelConfig, dict[str, str]]:
    """(pinned model config, lineage tags) of ``model`` (default ``cfg.model``): the source as given, its kind,
    the revision it resolved to (a hub commit hash; a registered version's number), a content hash of its
    weights, and for ``models:/`` the parent model, version and the run that trained it. A source that is not
    registered is described once, by ``components.diffusion.sources.describe_source``."""
    model = model or cfg.model
    if source_kind(model.source) == "registered":
        setup_tracking(cfg)
        mv = _model_version(model.source)
        pinned = model.model_copy(update={"source": f"models:/{mv.name}/{mv.version}", "revision": None,
                                          "variant": None})
        resolved = fetch_model(pinned.source, cfg.state_path("cache", "models"))
        tags = {"kind": "registered", "revision": str(mv.version), "location": pinned.source,
                "weights_sha256": weights_sha256(resolved.pipeline_dir), "parent_model": mv.name,
                "parent_version": str(mv.version), "parent_run_id": mv.run_id or "",
                "parent_base_model": (mv.tags or {}).get("base_model", "")}
    else:
        info = describe_source(model, cfg.state_path("cache"))
        pinned = info.pinned or model
        tags = {"kind": info.kind, "revision": info.revision or "", "location": info.location,
                "weights_sha256": info.weights_sha256, **{k: str(v) for k, v in info.extra.items()}}
    tags = {"source": model.source, **tags, "pinned": pinned.model_dump_json()}
    return pinned, {LINEAGE + k: v for k, v in tags.items()}
