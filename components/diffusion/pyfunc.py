"""The registered model as an MLflow pyfunc: one row per request in, one base64 PNG per row out.

MLflow pickles this class by reference and ships ``components/diffusion/`` as the model's code
(``components.registry.model.log_pipeline_model``), so everything loading it needs is in this package:
the pipeline directory (an artifact) carries the ZT-SNR scheduler it was saved with, and the preset's
inference settings travel as the model's ``model_config``. Loading a pyfunc runs the code logged with
it: load models only from registries you trust.

An adapter version is a ``TerminusAdapterModel``: its artifact is the adapter folder (diffusers' LoRA layout), and
its ``model_config`` names the exact base version (``base_model_uri``). Loading it loads that base first, from the
registry the process is pointed at (``MLFLOW_TRACKING_URI``), then attaches the adapter.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import pandas as pd
import yaml

from components.diffusion.request import GenerationRequest, encode_png

PIPELINE_ARTIFACT = "pipeline"
ADAPTER_ARTIFACT = "adapter"
INFERENCE_KEY = "inference"
"""``model_config[INFERENCE_KEY]``: the preset's ``inference`` section (the request defaults)."""
BASE_KEY = "base_model_uri"
"""``model_config[BASE_KEY]`` of an adapter version: ``models:/NAME/VERSION`` of its base."""


def _value(row: dict, key: str):
    """A row's value, None where pandas left a missing optional column as NaN."""
    value = row.get(key)
    return None if value is None or (isinstance(value, float) and value != value) else value


class TerminusPipelineModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        # torch and diffusers load with the model: registry/model.py imports this module to log versions without them
        from diffusers import DDIMScheduler

        from components.diffusion.pipelines import build_pipelines

        directory = context.artifacts[PIPELINE_ARTIFACT]
        scheduler = DDIMScheduler.from_pretrained(directory, subfolder="scheduler")
        self.pipelines = build_pipelines(directory, scheduler, (context.model_config or {}).get(INFERENCE_KEY, {}))

    def predict(self, context, model_input: pd.DataFrame, params=None):
        return predict_rows(self.pipelines, model_input)


def predict_rows(pipelines, model_input: pd.DataFrame) -> pd.DataFrame:
    """One request per row (the registered signature), one base64 PNG per row."""
    out = []
    for row in model_input.to_dict(orient="records"):
        ints = {k: int(_value(row, k)) for k in ("steps", "seed", "width", "height") if _value(row, k) is not None}
        floats = {k: float(_value(row, k)) for k in ("guidance_scale", "guidance_rescale")
                  if _value(row, k) is not None}
        req = GenerationRequest(prompt=row["prompt"], negative_prompt=_value(row, "negative_prompt"), **ints, **floats)
        out.append(base64.b64encode(encode_png(pipelines.generate(req)[0])).decode())
    return pd.DataFrame({"image_png_b64": out})


def base_pipeline_dir(model_dir: str | Path) -> Path:
    """The pipeline folder inside a downloaded model version (MLflow keeps the logged folder's own name)."""
    meta = yaml.safe_load((Path(model_dir) / "MLmodel").read_text())
    return Path(model_dir) / meta["flavors"]["python_function"]["artifacts"][PIPELINE_ARTIFACT]["path"]


class TerminusAdapterModel(mlflow.pyfunc.PythonModel):
    """An adapter version: its base version (downloaded from the registry), then the adapter attached to it."""

    def load_context(self, context):
        from diffusers import DDIMScheduler  # with the model, as in TerminusPipelineModel.load_context

        from components.diffusion.adapters import AdapterSlots, read_adapter
        from components.diffusion.pipelines import build_pipelines

        config = context.model_config or {}
        base_uri = config.get(BASE_KEY)
        if not base_uri:
            raise ValueError(f"adapter model without model_config[{BASE_KEY!r}]: its base is unknown")
        # Removed with this object (or at exit): the pipelines hold the base's weights in memory once built.
        self._base_dir = tempfile.TemporaryDirectory(prefix="terminus-base-")
        base = base_pipeline_dir(
            mlflow.artifacts.download_artifacts(artifact_uri=base_uri, dst_path=self._base_dir.name))
        scheduler = DDIMScheduler.from_pretrained(str(base), subfolder="scheduler")
        self.pipelines = build_pipelines(base, scheduler, config.get(INFERENCE_KEY, {}))
        self.slots = AdapterSlots(self.pipelines.t2i.unet)
        self.slots.ensure("adapter", read_adapter(context.artifacts[ADAPTER_ARTIFACT]))

    def predict(self, context, model_input: pd.DataFrame, params=None):
        with self.slots.running("adapter"):
            return predict_rows(self.pipelines, model_input)
