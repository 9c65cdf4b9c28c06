"""The MLflow model: a pyfunc whose artifact is the diffusers pipeline directory (safetensors).

``mlflow.pyfunc.load_model("models:/NAME@champion")`` gives a model that generates images; the
pipeline artifact (``artifacts/<logged directory name>``, path recorded in MLmodel) also loads with
vanilla diffusers. Loading a pyfunc runs
the code logged with it: load models only from registries you trust.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from components.config import DiffusionConfig, InferenceConfig, PredictionType

PIPELINE_ARTIFACT = "pipeline"
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
    "pydantic>=2", "pyyaml", "pandas", "boto3",
]


class ModelUriError(ValueError):
    pass


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


def encode_png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class TerminusPipelineModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: one row per request -> one base64 PNG per row."""

    def load_context(self, context):
        from components.pipelines import build_pipelines

        directory = context.artifacts[PIPELINE_ARTIFACT]
        self.pipelines = build_pipelines(directory, diffusion_from_pipeline_dir(directory), InferenceConfig())

    def predict(self, context, model_input: pd.DataFrame, params=None):
        from components.pipelines import GenerationRequest

        d = InferenceConfig()
        out = []
        for row in model_input.to_dict(orient="records"):
            def get(key, default, row=row):
                value = row.get(key)
                return default if value is None or (isinstance(value, float) and value != value) else value

            req = GenerationRequest(
                prompt=row["prompt"], negative_prompt=get("negative_prompt", None),
                steps=int(get("steps", d.steps)), guidance_scale=float(get("guidance_scale", d.guidance_scale)),
                guidance_rescale=float(get("guidance_rescale", d.guidance_rescale)),
                seed=None if get("seed", None) is None else int(row["seed"]),
                width=int(get("width", d.width)), height=int(get("height", d.height)),
            )
            out.append(encode_png(self.pipelines.generate(req)[0]))
        return pd.DataFrame({"image_png_b64": out})


def log_pipeline_model(pipeline_dir: str | Path, registered_model: str | None) -> mlflow.models.model.ModelInfo:
    """Log the pipeline as a pyfunc in the active run, and register it as a new version if asked."""
    components_dir = Path(__file__).resolve().parent
    return mlflow.pyfunc.log_model(
        name=MODEL_NAME_IN_RUN,
        python_model=TerminusPipelineModel(),
        artifacts={PIPELINE_ARTIFACT: str(pipeline_dir)},
        signature=SIGNATURE,
        code_paths=[str(components_dir)],
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=registered_model,
    )


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    version: str
    pipeline_dir: Path

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


def resolve_version(uri: str) -> tuple[str, str]:
    """(name, version) that ``uri`` points at right now (an alias is looked up in the registry)."""
    mv = _model_version(uri)
    return mv.name, str(mv.version)


def fetch_model(uri: str, cache_root: str | Path) -> ResolvedModel:
    """Download the pipeline of the version ``uri`` names into the cache (once per version).

    ``<cache>/<name>/<version>/.complete`` holds the version's registry source: a cache shared by two
    registries (the embedded SQLite and a server both have a v3) re-downloads instead of serving the
    other's files. Concurrent callers each download into their own temporary directory and the
    first complete copy to be renamed into place wins.
    """
    mv = _model_version(uri)
    name, version, source = mv.name, str(mv.version), str(mv.source)
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
    return ResolvedModel(name, version, _pipeline_dir(target))


def _cached(target: Path, source: str) -> bool:
    marker = target / COMPLETE
    return marker.is_file() and marker.read_text() == source


def _pipeline_dir(model_dir: Path) -> Path:
    """Where the pipeline artifact landed: MLflow keeps the logged directory's own name
    (``artifacts/<dirname>``), recorded in MLmodel under the artifact's key."""
    import yaml

    meta = yaml.safe_load((model_dir / "MLmodel").read_text())
    return model_dir / meta["flavors"]["python_function"]["artifacts"][PIPELINE_ARTIFACT]["path"]
