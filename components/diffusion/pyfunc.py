"""The registered model as an MLflow pyfunc: one row per request in, one base64 PNG per row out.

MLflow pickles this class by reference and ships ``components/diffusion/`` as the model's code
(``components.registry.model.log_pipeline_model``), so everything loading it needs is in this package:
the pipeline directory (an artifact) carries the ZT-SNR scheduler it was saved with, and the preset's
inference settings travel as the model's ``model_config``. Loading a pyfunc runs the code logged with
it: load models only from registries you trust.
"""

from __future__ import annotations

import base64

import mlflow.pyfunc
import pandas as pd

from components.diffusion.request import GenerationRequest, encode_png

PIPELINE_ARTIFACT = "pipeline"
INFERENCE_KEY = "inference"
"""``model_config[INFERENCE_KEY]``: the preset's ``inference`` section (the request defaults)."""


def _value(row: dict, key: str):
    """A row's value, None where pandas left a missing optional column as NaN."""
    value = row.get(key)
    return None if value is None or (isinstance(value, float) and value != value) else value


class TerminusPipelineModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from diffusers import DDIMScheduler

        from components.diffusion.pipelines import build_pipelines

        directory = context.artifacts[PIPELINE_ARTIFACT]
        scheduler = DDIMScheduler.from_pretrained(directory, subfolder="scheduler")
        self.pipelines = build_pipelines(directory, scheduler, (context.model_config or {}).get(INFERENCE_KEY, {}))

    def predict(self, context, model_input: pd.DataFrame, params=None):
        out = []
        for row in model_input.to_dict(orient="records"):
            ints = {k: int(_value(row, k)) for k in ("steps", "seed", "width", "height") if _value(row, k) is not None}
            floats = {k: float(_value(row, k)) for k in ("guidance_scale", "guidance_rescale")
                      if _value(row, k) is not None}
            req = GenerationRequest(prompt=row["prompt"], negative_prompt=_value(row, "negative_prompt"), **ints, **floats)
            out.append(base64.b64encode(encode_png(self.pipelines.generate(req)[0])).decode())
        return pd.DataFrame({"image_png_b64": out})
