"""MLflow wiring: where tracking goes, and the experiment every flow logs into.

Embedded default: SQLite at ``<state_dir>/mlflow.db`` with artifacts under ``<state_dir>/mlartifacts``.
A server (``mlflow server``) is used when ``tracking.tracking_uri`` or ``MLFLOW_TRACKING_URI`` says so;
S3 artifact stores are configured by MLflow's usual variables (``MLFLOW_S3_ENDPOINT_URL``, AWS_*).
Nothing here runs at import.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from components.config import Config

SECRET_PATTERNS = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids (long-term and temporary)
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face tokens
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),  # Authorization header values
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),  # user:password@ in a URL
    re.compile(r"(?i)(secret|token|password|passwd|api_key|apikey)[^=:\s]*\s*[=:]\s*\S+"),
]
SECRET_ENV = re.compile(r"(?i)(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY)")
"""Environment variables whose values are secrets wherever they turn up (AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, MLFLOW_TRACKING_PASSWORD, HF_TOKEN, RAY_AUTH_TOKEN, ...), with or without a pattern."""


def state_path(cfg: Config, *parts: str) -> Path:
    root = Path(os.environ.get("TERMINUS_STATE_DIR", cfg.state_dir)).expanduser().resolve()
    return root.joinpath(*parts)


_SET_HERE: set[str] = set()
"""URIs this process gave ``mlflow.set_tracking_uri``, which also exports MLFLOW_TRACKING_URI:
that export is not the user's choice and must not override the next config's state directory."""


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and env not in _SET_HERE:
        return env
    db = state_path(cfg, "mlflow.db")
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def setup_tracking(cfg: Config) -> str:
    """Point MLflow at the configured store and make sure the experiment exists. Returns its id."""
    import mlflow

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
        artifact_location = state_path(cfg, "mlartifacts").as_uri()
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


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params (``train.lr.max`` = ...), every value passed through ``redact``."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = redact(str(value))[:6000]
    return flat


def _secret_env_values() -> list[str]:
    """Values of secret-named environment variables, longest first (8+ characters, so that a short
    value such as ``1`` or ``true`` never blanks ordinary text)."""
    values = {v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with credentials replaced by ``<redacted>``: the values of secret-named environment
    variables, then AWS key ids, tokens, ``key=value`` secrets and URL passwords by pattern.
    Applied to everything this platform writes to MLflow params, tags and reports."""
    for value in _secret_env_values():
        text = text.replace(value, "<redacted>")
    for pattern in SECRET_PATTERNS:
        text = pattern.sub("<redacted>", text)
    return text


def redact_tree(obj):
    """``redact`` applied to every string in a JSON-like tree (a report), keeping its structure."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_tree(v) for v in obj]
    return obj
