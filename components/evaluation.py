"""Deterministic evaluation of a registered version: the numbers promotion is gated on.

- held-out v-prediction loss at fixed timesteps and noise (same Validator as training);
- ZT-SNR luminance probe (Lin et al. 2023 sec. 1: a ZT-SNR model can make very dark and very bright
  images; the flawed schedule pulls both toward mid-grey): mean luminance of dark- and
  bright-prompt samples and their range;
- NaN and blank (near-constant) images;
- a grid of the probe samples, logged as an image.
Results go to an MLflow run and onto the model version as ``eval.*`` tags, with ``eval.protocol``:
a hash of everything besides the weights that the numbers depend on, so promotion compares a
candidate's loss with the champion's only when both were measured the same way.
"""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
from PIL import Image

from components.config import Config
from components.dataset import CuratedManifest, val_rows
from components.diffusion.pipelines import build_pipelines, pick_device, variant_for
from components.diffusion.request import GenerationRequest
from components.diffusion.schedule import inference_scheduler
from components.diffusion.sdxl import load_parts
from components.registry.model import diffusion_from_pipeline_dir, fetch_model
from components.registry.promotion import EVAL_PREFIX
from components.registry.tracking import setup_tracking
from components.training.validation import VAL_NOISE_SEED, Validator

LUMA = np.array([0.2126, 0.7152, 0.0722])  # Rec. 709 luma weights on the sRGB values


def probe_images(cfg: Config, pipes, prompts: list[str]) -> list[np.ndarray]:
    """Float images (H, W, 3) in [0, 1], NaN kept (output_type='np' does not hide it)."""
    ev = cfg.evaluate
    out = []
    for prompt in prompts:
        for seed in ev.seeds:
            req = GenerationRequest(prompt, width=ev.image_size, height=ev.image_size, steps=ev.steps, seed=seed)
            out.append(np.asarray(pipes.generate(req, output_type="np")[0], dtype=np.float32))
    return out


def grid(images: list[np.ndarray], cols: int) -> Image.Image:
    tiles = [Image.fromarray((np.nan_to_num(a).clip(0, 1) * 255).astype(np.uint8)) for a in images]
    w, h = tiles[0].size
    rows = (len(tiles) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * w, rows * h))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, ((i % cols) * w, (i // cols) * h))
    return canvas


SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "zero_terminal_snr",
                   "prediction_type")
"""Taken from the saved pipeline (what the model was trained with); the loss weighting (min-SNR gamma,
terminal policy) stays the config's, so every version is scored with the same weights."""


def eval_protocol(cfg: Config, manifest: CuratedManifest) -> str:
    """Hash of the evaluation settings and held-out data (not the weights, not the tolerance)."""
    settings = {
        "dataset": manifest.digest, "val_timesteps": cfg.train.val_timesteps, "val_max_rows": cfg.train.val_max_rows,
        "batch_size": cfg.train.batch_size, "precision": cfg.train.precision.value, "noise_seed": VAL_NOISE_SEED,
        "min_snr_gamma": cfg.diffusion.min_snr_gamma, "terminal_policy": cfg.diffusion.terminal_policy.value,
        "guidance": [cfg.inference.guidance_scale, cfg.inference.guidance_rescale],
        "evaluate": cfg.evaluate.model_dump(mode="json", exclude={"tolerance"}),
    }
    return "p" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _mean_luminance(images: list[np.ndarray]) -> float:
    with warnings.catch_warnings():  # an all-NaN image has no luminance: NaN, counted by nan_images
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.mean([np.nanmean(a @ LUMA) for a in images]))


def evaluate_pipeline(cfg: Config, pipeline_dir: str, manifest: CuratedManifest) -> tuple[dict, Image.Image]:
    """Metrics and a probe grid for the diffusers directory ``pipeline_dir`` (deterministic: fixed
    timesteps, noise and seeds)."""
    device = pick_device()
    saved = diffusion_from_pipeline_dir(pipeline_dir)
    diffusion = cfg.diffusion.model_copy(update={k: getattr(saved, k) for k in SCHEDULE_FIELDS})
    scored = cfg.model_copy(update={"diffusion": diffusion})  # the model's schedule, the config's weighting
    # The weights the device is served (a CUDA replica reads the half variant), computed in fp32.
    model = cfg.model.model_copy(update={"variant": variant_for(pipeline_dir, device)[0], "revision": None})
    parts = load_parts(model, cfg.state_path("cache"), source=str(pipeline_dir))
    for module in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
        module.to(device).eval()
    val_loss = Validator(scored, val_rows(manifest, cfg.train.val_max_rows), device).loss(parts, parts.unet)
    pipes = build_pipelines(parts, inference_scheduler(diffusion), cfg.inference.model_dump(), device=device)
    dark = probe_images(cfg, pipes, cfg.evaluate.dark_prompts)
    bright = probe_images(cfg, pipes, cfg.evaluate.bright_prompts)
    everything = dark + bright
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanstd of an all-NaN image
        # Blank = no spatial variation in any channel: a solid colour is blank too, although its
        # values differ across channels (so the std of the whole (H, W, 3) array is not small).
        blank = sum(float(np.nanmax(np.nanstd(a, axis=(0, 1)))) < cfg.evaluate.blank_std for a in everything)
    metrics = {
        "val_loss": val_loss,
        "luminance_dark": _mean_luminance(dark),
        "luminance_bright": _mean_luminance(bright),
        "nan_images": float(sum(bool(np.isnan(a).any()) for a in everything)),
        "blank_images": float(blank),
    }
    metrics["luminance_range"] = metrics["luminance_bright"] - metrics["luminance_dark"]
    return metrics, grid(everything, cols=len(cfg.evaluate.seeds) * 2)


def evaluate_version(cfg: Config, model_uri: str, manifest: CuratedManifest) -> dict:
    """Evaluate the version ``model_uri`` names; record the run and the version's ``eval.*`` tags."""
    import mlflow


    experiment_id = setup_tracking(cfg)
    resolved = fetch_model(model_uri, cfg.state_path("cache", "models"))
    metrics, sample_grid = evaluate_pipeline(cfg, str(resolved.pipeline_dir), manifest)
    protocol = eval_protocol(cfg, manifest)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"eval-{resolved.name}-v{resolved.version}") as run:
        mlflow.set_tags({"eval.model": resolved.name, "eval.version": resolved.version,
                         "dataset_digest": manifest.digest, "eval.protocol": protocol})
        mlflow.log_params({f"evaluate.{k}": str(v)[:500] for k, v in cfg.evaluate.model_dump(mode="json").items()})
        mlflow.log_metrics(metrics)
        mlflow.log_image(sample_grid, artifact_file="probe_grid.png")
    client = mlflow.MlflowClient()
    tags = {**{k: f"{v:.6g}" for k, v in metrics.items()}, "run_id": run.info.run_id, "protocol": protocol,
            "dataset_digest": manifest.digest}
    for key, value in tags.items():
        client.set_model_version_tag(resolved.name, resolved.version, f"{EVAL_PREFIX}{key}", value)
    return {"model": resolved.name, "version": resolved.version, "run_id": run.info.run_id, "protocol": protocol,
            **metrics}
