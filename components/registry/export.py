"""A registered version as one single-file checkpoint for ComfyUI, A1111 and Forge.

``export_version`` fetches the version's diffusers folder, writes it in the original SDXL layout with
the schedule markers and ModelSpec metadata (``components.diffusion.single_file``), and records the file
in the registry: logged as an artifact of the training run that produced the version
(``single_file/<name>.safetensors``) and named by version tags (``single_file.<precision>`` = its
artifact URI, with its sha256 and size), so the file a UI user downloads is traceable to the version.

The metadata says what the file is (title, date, resolution, v-prediction, license, usage hint) and
where it came from: ``terminus.*`` keys with the registered model, version, training run, base model,
dataset digest, config hash and git commit.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import mlflow

from components.config import Config
from components.diffusion.kohya import export_kohya, metadata
from components.diffusion.single_file import export_pipeline, read_keys, read_metadata
from components.registry.adapter_versions import BASE_SHA_TAG, fetch_adapter
from components.registry.model import (
    ADAPTER_METHOD_TAG,
    BASE_URI_TAG,
    _model_version,
    fetch_model,
    local_folder,
    shipped_inference,
)
from components.registry.tracking import setup_tracking

SINGLE_FILE_ARTIFACTS = "single_file"
LICENSE = "openrail++"
"""SDXL base's license (CreativeML Open RAIL++-M); a fine-tune of it carries the same terms."""


def iso_date(timestamp_ms: int) -> str:
    return dt.datetime.fromtimestamp(timestamp_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def usage_hint(guidance_rescale: float) -> str:
    return (f"v-prediction, zero-terminal SNR: sample with trailing timestep spacing (the first step at the last "
            f"timestep) and CFG rescale {guidance_rescale:g}")


def export_version(cfg: Config, uri: str, out: str | Path | None = None, precision: str = "fp16",
                   title: str | None = None, log: bool = True) -> dict:
    """Export the version ``uri`` names (an alias is resolved first) to ``out`` (default
    ``<state>/exports/single_file/<name>-v<version>-<precision>.safetensors``); returns what was written."""
    setup_tracking(cfg)
    mv = _model_version(uri)
    if ADAPTER_METHOD_TAG in (mv.tags or {}):
        return export_adapter_version(cfg, mv, out, precision, title, log)
    name, version = mv.name, str(mv.version)
    resolved = fetch_model(f"models:/{name}/{version}", cfg.state_path("cache", "models"))
    inference = shipped_inference(resolved.pipeline_dir)
    tags = mv.tags or {}
    out = Path(out) if out else cfg.state_path("exports", "single_file", f"{name}-v{version}-{precision}.safetensors")
    title = title or f"{name} v{version}"
    description = (f"SDXL fine-tuned by the Terminus platform as {name} version {version}: v-prediction with a "
                   f"zero-terminal-SNR schedule, from {tags.get('base_model', 'an unrecorded base model')}.")
    provenance = {
        "terminus.model": name, "terminus.version": version, "terminus.run_id": mv.run_id or "",
        **{f"terminus.{k}": tags[k] for k in ("base_model", "dataset_digest", "config_hash", "git_commit",
                                                "lineage.parent_version", "lineage.weights_sha256") if tags.get(k)},
        "terminus.precision": precision,
    }
    path = export_pipeline(
        resolved.pipeline_dir, out, precision, title=title, date=iso_date(mv.creation_timestamp),
        resolution=(inference.width, inference.height), metadata=provenance, description=description,
        license=LICENSE, usage_hint=usage_hint(inference.guidance_rescale),
        tags="sdxl,v-prediction,zero-terminal-snr,terminus",
    )
    return _record(mv, path, precision, log)


def _record(mv, path: Path, precision: str, log: bool) -> dict:
    """What was written, logged with the version's run and named by its ``single_file.*`` tags when ``log``."""
    name, version = mv.name, str(mv.version)
    meta = read_metadata(path)
    result = {"model": name, "version": version, "path": str(path), "precision": precision,
              "hash_sha256": meta["modelspec.hash_sha256"], "bytes": path.stat().st_size,
              "keys": len(read_keys(path)), "artifact": None}
    if log and mv.run_id:
        client = mlflow.MlflowClient()
        client.log_artifact(mv.run_id, str(path), artifact_path=SINGLE_FILE_ARTIFACTS)
        result["shared_with_artifact"] = share_with_artifact(path, client.get_run(mv.run_id).info.artifact_uri)
        result["artifact"] = f"runs:/{mv.run_id}/{SINGLE_FILE_ARTIFACTS}/{path.name}"
        for key, value in {f"single_file.{precision}": result["artifact"],
                           f"single_file.{precision}.sha256": result["hash_sha256"],
                           f"single_file.{precision}.bytes": str(result["bytes"])}.items():
            client.set_model_version_tag(name, version, key, value)
    return result


def share_with_artifact(path: Path, artifact_uri: str) -> bool:
    """Make ``path`` and the copy just logged under ``artifact_uri`` one file on disk (a hard link), when the
    run's artifacts are a local folder on the same file system: a 7 GB SDXL export is then stored once, under
    both names. False (two copies) for a remote store or another file system."""
    root = local_folder(artifact_uri)
    logged = root / SINGLE_FILE_ARTIFACTS / path.name if root is not None else None
    if logged is None or not logged.is_file() or logged.stat().st_size != path.stat().st_size:
        return False
    if os.path.samefile(logged, path):
        return True
    staged = path.with_name(f".{path.name}.link")
    try:
        os.link(logged, staged)
    except OSError:  # another file system, or one without hard links
        return False
    os.replace(staged, path)
    return True


def export_adapter_version(cfg: Config, mv, out: str | Path | None, precision: str, title: str | None,
                           log: bool) -> dict:
    """An adapter version as one kohya-layout ``.safetensors`` (components/diffusion/kohya.py) that ComfyUI, A1111
    and Forge load on the base it names: sd-scripts' ``ss_*`` keys (rank, alpha, network module, base model),
    ModelSpec's ``modelspec.*`` keys and the ``terminus.*`` provenance with the base's URI and content hash. Its
    diffusers-format file is the version's artifact itself (``pytorch_lora_weights.safetensors``)."""
    name, version = mv.name, str(mv.version)
    tags = mv.tags or {}
    adapter = fetch_adapter(f"models:/{name}/{version}", cfg.state_path("cache", "models"))
    weights = adapter.weights()
    base_uri = tags[BASE_URI_TAG]
    base_dir = fetch_model(base_uri, cfg.state_path("cache", "models")).pipeline_dir
    inference = shipped_inference(base_dir)
    out = Path(out) if out else cfg.state_path("exports", "single_file", f"{name}-v{version}-{precision}.safetensors")
    title = title or f"{name} v{version}"
    provenance = {
        "terminus.model": name, "terminus.version": version, "terminus.run_id": mv.run_id or "",
        "terminus.base_model_uri": base_uri, "terminus.base_weights_sha256": tags.get(BASE_SHA_TAG, ""),
        "terminus.adapter_method": adapter.method, "terminus.precision": precision,
        **{f"terminus.{k}": tags[k] for k in ("dataset_digest", "config_hash", "git_commit") if tags.get(k)},
    }
    meta = metadata(
        weights, title=title, date=iso_date(mv.creation_timestamp), resolution=(inference.width, inference.height),
        prediction_type="v_prediction", base_name=base_uri, provenance=provenance,
        description=(f"A {adapter.method} adapter of {base_uri}, trained by the Terminus platform as {name} version "
                     f"{version}: load it on that base (v-prediction, zero-terminal SNR)."),
        license=LICENSE, usage_hint=usage_hint(inference.guidance_rescale),
        tags=f"sdxl,{adapter.method},v-prediction,zero-terminal-snr,terminus",
    )
    path = export_kohya(weights, adapter.unet_config(), out, meta, precision)
    return _record(mv, path, precision, log)
