"""Registered models: logging a pipeline as a pyfunc version, resolving ``models:/`` URIs, and a
local cache of downloaded versions.

A version is a pyfunc (``components/diffusion/pyfunc.py``) whose artifact is the diffusers pipeline
directory (safetensors).

``mlflow.pyfunc.load_model("models:/NAME@champion")`` gives a model that generates images; the
pipeline artifact (``artifacts/<logged directory name>``, path recorded in MLmodel) also loads with
vanilla diffusers. Loading a pyfunc runs
the code logged with it: load models only from registries you trust.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import yaml
from mlflow.models import ModelSignature
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
from mlflow.types import ColSpec, Schema

from components.config import Config, DiffusionConfig, InferenceConfig, PredictionType
from components.diffusion.pyfunc import ADAPTER_ARTIFACT, INFERENCE_KEY, PIPELINE_ARTIFACT, TerminusPipelineModel
from components.registry.tracking import setup_tracking, tracking_uri

MODEL_NAME_IN_RUN = "model"
COMPLETE = ".complete"
URI_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("string", "negative_prompt", required=False),
            ColSpec("long", "steps", required=False),
            ColSpec("double", "guidance_scale", required=False),
            ColSpec("double", "guidance_rescale", required=False),
            ColSpec("long", "seed", required=False),
            ColSpec("long", "width", required=False),
            ColSpec("long", "height", required=False),
        ]
    ),
    outputs=Schema([ColSpec("string", "image_png_b64")]),
)

PIP_REQUIREMENTS = [
    "torch", "diffusers>=0.42,<0.43", "transformers>=5,<6", "accelerate", "safetensors", "pillow",
    "pandas",
]


class ModelUriError(ValueError):
    pass


ADAPTER_METHOD_TAG = "adapter.method"
"""Set on every adapter version (``lora``, ``lokr``): what tells an adapter from a full model in the registry
(components/registry/adapter_versions.py writes it and the rest of the adapter's tags)."""
BASE_URI_TAG = "base_model_uri"
"""On an adapter version: the exact registered base version it was trained on (``models:/NAME/VERSION``)."""


class AdapterNotModel(ModelUriError):
    """A full model was needed and the URI names an adapter version."""


def diffusion_from_pipeline_dir(pipeline_dir: str | Path) -> DiffusionConfig:
    """The schedule a saved pipeline was trained with, read from its scheduler config."""
    sched = json.loads((Path(pipeline_dir) / "scheduler" / "scheduler_config.json").read_text())
    return DiffusionConfig(
        num_train_timesteps=sched["num_train_timesteps"],
        beta_start=sched["beta_start"],
        beta_end=sched["beta_end"],
        beta_schedule=sched["beta_schedule"],
        zero_terminal_snr=bool(sched.get("rescale_betas_zero_snr", False)),
        prediction_type=PredictionType(sched.get("prediction_type", "epsilon")),
    )


def log_pipeline_model(pipeline_dir: str | Path, registered_model: str | None,
                       inference: InferenceConfig) -> mlflow.models.model.ModelInfo:
    """Log the pipeline as a pyfunc in the active run, and register it as a new version if asked.

    The model's code is the diffusion package alone (``components/diffusion``, staged with the
    ``components`` package marker so its absolute imports resolve); ``inference`` (the preset's
    request defaults) travels as its ``model_config``.
    """
    return log_pyfunc(TerminusPipelineModel(), {PIPELINE_ARTIFACT: str(pipeline_dir)},
                      {INFERENCE_KEY: inference.model_dump(mode="json")}, registered_model)


def log_pyfunc(python_model, artifacts: dict[str, str], model_config: dict, registered_model: str | None,
               pip_requirements: list[str] | None = None) -> mlflow.models.model.ModelInfo:
    """Log ``python_model`` (a class of ``components/diffusion/pyfunc.py``) with ``artifacts`` in the active run,
    shipping the diffusion package as its code; register it as a new version of ``registered_model`` if given."""
    package = Path(__file__).resolve().parents[1]  # components/
    with tempfile.TemporaryDirectory() as stage:
        shipped = Path(stage) / "components"
        shutil.copytree(package / "diffusion", shipped / "diffusion",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (shipped / "__init__.py").write_text(
            '"""The diffusion package of the Terminus platform, as shipped with a model."""\n')
        with warnings.catch_warnings(), _quiet(logging.getLogger("mlflow.pyfunc"), "serialized using CloudPickle"):
            # An input example would run predict (a generation) while logging; the signature is given instead.
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            return _log_model(python_model, artifacts, model_config, shipped, pip_requirements, registered_model)


def _log_model(python_model, artifacts, model_config, shipped: Path, pip_requirements, registered_model):
    return mlflow.pyfunc.log_model(
        name=MODEL_NAME_IN_RUN,
        python_model=python_model,
        artifacts=artifacts,
        model_config=model_config,
        signature=SIGNATURE,
        code_paths=[str(shipped)],
        pip_requirements=pip_requirements or PIP_REQUIREMENTS,
        registered_model_name=registered_model,
    )


@contextmanager
def _quiet(logger: logging.Logger, fragment: str):
    """``logger``'s records containing ``fragment`` dropped for the block. The pickle MLflow warns about here is
    an instance of this platform's own stateless model class, written by the trainer; a registered version is
    loaded from the registry this platform writes, not from strangers."""
    def drop(record: logging.LogRecord) -> bool:
        return fragment not in record.getMessage()

    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    version: str
    pipeline_dir: Path
    """The version's artifact folder: a diffusers pipeline, or for an adapter version the adapter's folder."""
    adapter: bool = False

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    match = URI_RE.match(uri)
    if not match:
        raise ModelUriError(f"model URI must be models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}")
    return match["name"], match["alias"], match["version"]


def _model_version(uri: str):
    name, alias, version = parse_model_uri(uri)
    client = mlflow.MlflowClient()
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as err:
        raise ModelUriError(f"{uri}: not found in the registry ({err.error_code})") from None


def check_version(cfg: Config, uri: str) -> tuple[str, str]:
    """(name, version) of ``uri`` in the registry ``cfg`` names, or ``ModelUriError`` in one line. An
    embedded SQLite store that does not exist yet holds no version: refused without creating it (MLflow
    creates and migrates a new database, which takes seconds)."""
    parse_model_uri(uri)
    store = tracking_uri(cfg)
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).exists():
        raise ModelUriError(f"{uri}: not found in the registry (no MLflow store at {store} yet)")
    setup_tracking(cfg)
    return resolve_version(uri)


def resolve_version(uri: str) -> tuple[str, str]:
    """(name, version) that ``uri`` points at right now (an alias is looked up in the registry)."""
    mv = _model_version(uri)
    return mv.name, str(mv.version)


def fetch_model(uri: str, cache_root: str | Path, *, adapter_ok: bool = False) -> ResolvedModel:
    """The version ``uri`` names, as a local folder: read in place where the registry's artifact store is a
    folder on this machine (``local_artifacts``: a second copy of an SDXL version would be 7-14 GB more on
    the same disk), else downloaded into the cache (once per version). An adapter version is refused
    (``AdapterNotModel``) unless ``adapter_ok``: its folder holds an adapter, not a pipeline. Callers read the
    folder; none writes into it.

    ``<cache>/<name>/<version>/.complete`` holds the version's registry source: a cache shared by two
    registries (the embedded SQLite and a server both have a v3) re-downloads instead of serving the
    other's files. Concurrent callers each download into their own temporary directory and the
    first complete copy to be renamed into place wins.
    """
    mv = _model_version(uri)
    name, version, source = mv.name, str(mv.version), str(mv.source)
    tags = mv.tags or {}
    if ADAPTER_METHOD_TAG in tags and not adapter_ok:
        raise AdapterNotModel(f"{uri} is a {tags[ADAPTER_METHOD_TAG]} adapter of {tags.get(BASE_URI_TAG, 'a base')}, "
                              "not a full model: load it with its base (components/registry/adapter_versions.py), "
                              "or name the base")
    local = local_artifacts(name, version)
    if local is not None:
        return ResolvedModel(name, version, _pipeline_dir(local), ADAPTER_METHOD_TAG in tags)
    target = Path(cache_root) / name / version
    if not _cached(target, source):
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f"{version}.partial-", dir=target.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(partial))
            (partial / COMPLETE).write_text(source)
            try:
                partial.rename(target)
            except OSError:  # a stale copy, or a concurrent caller finished first
                if not _cached(target, source):
                    shutil.rmtree(target, ignore_errors=True)
                    partial.rename(target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return ResolvedModel(name, version, _pipeline_dir(target), ADAPTER_METHOD_TAG in tags)


def local_folder(uri: str) -> Path | None:
    """The folder an artifact URI names when it is on this machine (a ``file:`` URI or a plain path); None for
    a remote store (``s3://``, ``mlflow-artifacts:``, ...)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if "://" not in uri and not parsed.scheme:
        return Path(uri)
    return None


def local_artifacts(name: str, version: str) -> Path | None:
    """The folder of version ``version`` of ``name`` when the artifact store holding it is a local folder that
    this machine sees (``local_folder``: the embedded default, or a server with a local
    ``--default-artifact-root``); None for a remote store."""
    path = local_folder(ModelsArtifactRepository.get_underlying_uri(f"models:/{name}/{version}"))
    return path if path is not None and (path / "MLmodel").is_file() else None


def _cached(target: Path, source: str) -> bool:
    marker = target / COMPLETE
    return marker.is_file() and marker.read_text() == source


def _pipeline_dir(model_dir: Path) -> Path:
    """Where the pipeline artifact landed: MLflow keeps the logged directory's own name
    (``artifacts/<dirname>``), recorded in MLmodel under the artifact's key."""
    meta = yaml.safe_load((model_dir / "MLmodel").read_text())
    artifacts = meta["flavors"]["python_function"]["artifacts"]
    return model_dir / artifacts[PIPELINE_ARTIFACT if PIPELINE_ARTIFACT in artifacts else ADAPTER_ARTIFACT]["path"]


def shipped_inference(pipeline_dir: Path) -> InferenceConfig:
    """The inference settings a fetched version ships (its ``model_config``, the preset's ``inference``
    section when it was logged); the defaults where it ships none."""
    meta = yaml.safe_load((Path(pipeline_dir).parents[1] / "MLmodel").read_text())
    config = meta["flavors"]["python_function"].get("model_config") or {}
    return InferenceConfig.model_validate(config.get(INFERENCE_KEY) or {})


# --- lineage tags (components/registry/model_sources.py resolves and records them) -----------------

LINEAGE = "lineage."
"""Prefix of the lineage tags of a training run (and of the version it registers)."""
PINNED = LINEAGE + "pinned"
"""The model config (JSON) that loads exactly the weights the run started from: the workers, the export
and a resumed run all read this one, so an alias that moves or a hub branch that advances mid-run does
not change what the run is made of."""
