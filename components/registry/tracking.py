"""MLflow wiring: where tracking goes, and the experiment every flow logs into.

Embedded default: SQLite at ``<state_dir>/mlflow.db`` with artifacts under ``<state_dir>/mlartifacts``.
A server (``mlflow server``) is used when ``tracking.tracking_uri`` or ``MLFLOW_TRACKING_URI`` says so;
S3 artifact stores are configured by MLflow's usual variables (``MLFLOW_S3_ENDPOINT_URL``, AWS_*).
Nothing here runs at import.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import pyarrow as pa
import requests

from components.config import Config, ConfigError
from components.dataset import SCHEMA, CuratedManifest
from components.redact import Redactor

_SET_HERE: set[str] = set()
"""URIs this process gave ``mlflow.set_tracking_uri``, which also exports MLFLOW_TRACKING_URI:
that export is not the user's choice and must not override the next config's state directory."""


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and env not in _SET_HERE:
        return env
    db = cfg.state_path("mlflow.db")
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


class TrackingUnavailable(ConfigError):
    """The configured MLflow server does not answer: a missing service, reported before any work starts."""


def check_tracking(cfg: Config, timeout_s: float = 5.0) -> None:
    """Refuse in one line when the tracking store is an MLflow server that does not answer its health check
    (``GET /health``) within ``timeout_s``; a local store (SQLite, files) needs no check. Without it the MLflow
    client retries for minutes before the first error."""
    uri = tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return
    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
    except requests.RequestException as err:
        raise TrackingUnavailable(
            f"MLflow at {uri} does not answer ({type(err).__name__}): start the server, or point "
            "tracking.tracking_uri (or MLFLOW_TRACKING_URI) at one that runs") from None
    if response.status_code >= 500:
        raise TrackingUnavailable(f"MLflow at {uri} answers its health check with {response.status_code}: "
                                  "the server is not ready; try again when it is")


def setup_tracking(cfg: Config) -> str:
    """Point MLflow at the configured store and make sure the experiment exists. Returns its id."""
    import mlflow  # mlflow on first use: the Serve ingress (deploy/app.py) imports this module and never logs

    uri = tracking_uri(cfg)
    if uri != os.environ.get("MLFLOW_TRACKING_URI"):  # the user's own variable stays the user's choice
        _SET_HERE.add(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    existing = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if existing is not None:
        return existing.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:"):
        artifact_location = cfg.state_path("mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:  # created by a racing process
        return mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id


def git_commit() -> str:
    """The commit of the code that runs (``unknown`` outside a checkout, e.g. a Ray job's working dir)."""
    if os.environ.get("TERMINUS_GIT_COMMIT"):
        return os.environ["TERMINUS_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(tree: dict, prefix: str = "", redactor: Redactor | None = None) -> dict[str, str]:
    """Nested config -> MLflow params (``train.lr.max`` = ...), every value passed through ``redact``."""
    redactor = redactor or Redactor()
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + ".", redactor))
        else:
            flat[name] = redactor(str(value))[:6000]
    return flat


def mlflow_dataset(manifest: CuratedManifest, name: str | None = None):
    """The curated dataset as an MLflow dataset (source = ROOT, digest = the curation digest), for
    ``mlflow.log_input(mlflow_dataset(read_manifest(root)), context="training")`` so a run records
    exactly which curated data it used."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source  # mlflow on first use (see setup_tracking)
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, DataType, Schema

    kinds = {pa.binary(): DataType.binary, pa.string(): DataType.string, pa.int32(): DataType.integer,
             pa.bool_(): DataType.boolean}
    schema = Schema([ColSpec(kinds[field.type], field.name) for field in SCHEMA])
    with warnings.catch_warnings():  # a local path matches two equivalent "local" source classes
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(manifest.root)
    label = name or manifest.root.rstrip("/").rsplit("/", 1)[-1]
    return MetaDataset(source, name=label, digest=manifest.digest, schema=schema)


def source_dataset(name: str, location: str, kind: str, digest: str):
    """A curation source as an MLflow dataset (named by the source, its location as the dataset source;
    ``hf://datasets/o/n`` as the dataset's Hub page), for the curation run's ``source`` inputs."""
    from mlflow.data.code_dataset_source import CodeDatasetSource  # mlflow on first use (see setup_tracking)
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    if location.startswith("hf://"):
        source = HTTPDatasetSource(f"https://huggingface.co/{location[len('hf://'):]}")
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(Redactor()(location))
        except Exception:  # a location MLflow has no source class for
            source = CodeDatasetSource(tags={"location": Redactor()(location), "kind": kind})
    return MetaDataset(source, name=name, digest=digest)
