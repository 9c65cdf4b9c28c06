"""Evaluation of registered versions on the held-out split: what it records and what it catches.
(The flow run in a fresh process reproducing these numbers: tests/integration/test_registry_promote.py.)"""

from __future__ import annotations

import json
import math

import mlflow
import pytest
import torch
from PIL import Image

from components.diffusion.sdxl import save_pipeline
from components.diffusion.tiny import build_tiny
from components.evaluation.prompts import load_prompt_set
from components.evaluation.run import eval_protocol, evaluate_pipeline, evaluate_version, held_out_images
from components.registry.model import ModelUriError
from components.registry.tracking import setup_tracking

pytestmark = pytest.mark.slow
METRICS = ("val_loss", "val_mse_t500_750", "val_mse_t750_1000", "luminance_dark", "luminance_bright",
           "luminance_range", "dark_spread", "bright_spread", "nan_images", "blank_images", "clip_score", "fid", "kid")
IMAGES = 2 + 6  # a dark and a bright probe image, six quality prompts


def test_evaluation_tags_the_version_and_logs_a_run_with_the_probe_grid(evaluated_registry, tmp_path):
    r = evaluated_registry
    setup_tracking(r.cfg)
    client = mlflow.MlflowClient()
    good = r.metrics["good"]
    tags = client.get_model_version(r.name, r.versions["good"]).tags
    for key in METRICS:
        assert float(tags[f"eval.{key}"]) == pytest.approx(good[key], rel=1e-5), key
    prompts = load_prompt_set(r.cfg.evaluate.prompts, r.cfg.evaluate.num_prompts)
    assert tags["eval.protocol"] == good["protocol"] == eval_protocol(r.cfg, r.manifest, prompts, r.cfg.diffusion)
    assert sorted(set(prompts.categories)) == ["bright", "dark", "objects", "people", "scenes", "text"]
    assert good["clip_score"] >= 0 and good["fid"] >= 0 and math.isfinite(good["kid"])
    assert tags["eval.dataset_digest"] == r.manifest.digest
    assert good["nan_images"] == 0 and good["blank_images"] == 0 and math.isfinite(good["val_loss"])
    assert 0.0 <= good["luminance_dark"] <= 1.0 and 0.0 <= good["luminance_bright"] <= 1.0

    run = client.get_run(tags["eval.run_id"])
    assert run.data.metrics["val_loss"] == pytest.approx(good["val_loss"])
    assert run.data.tags["eval.version"] == r.versions["good"]
    assert run.data.params["evaluate.image_size"] == "64"
    grid = Image.open(client.download_artifacts(run.info.run_id, "probe_grid.png", str(tmp_path)))
    assert grid.size == (2 * 64, 64)  # one seed: a dark and a bright probe side by side


def test_nan_weights_are_caught_and_perturbed_weights_score_worse(evaluated_registry):
    nan, worse, good = (evaluated_registry.metrics[k] for k in ("nan", "worse", "good"))
    assert nan["nan_images"] == IMAGES  # every probe and quality image
    assert math.isnan(nan["val_loss"])
    assert worse["nan_images"] == 0 and worse["blank_images"] == 0
    assert worse["val_loss"] > good["val_loss"] * 1.5


def test_a_solid_colour_model_counts_as_blank(evaluated_registry, tmp_path):
    """A VAE decoder whose last conv has zero weights paints every pixel its bias: a solid colour
    (different per channel, so only a per-channel spatial std sees it as blank)."""
    cfg = evaluated_registry.cfg
    parts = build_tiny(cfg.model.tiny)
    with torch.no_grad():
        parts.vae.decoder.conv_out.weight.zero_()
        parts.vae.decoder.conv_out.bias.copy_(torch.tensor([0.6, -0.2, 0.1]))
    directory = save_pipeline(parts, cfg.diffusion, tmp_path / "solid")
    prompts = load_prompt_set(cfg.evaluate.prompts, cfg.evaluate.num_prompts)
    real = held_out_images(evaluated_registry.manifest, cfg)
    metrics = evaluate_pipeline(cfg, str(directory), evaluated_registry.manifest, prompts, real).metrics
    assert (metrics["blank_images"], metrics["nan_images"]) == (IMAGES, 0)
    assert math.isfinite(metrics["val_loss"])


def test_unknown_version_is_a_one_line_error(evaluated_registry):
    r = evaluated_registry
    with pytest.raises(ModelUriError, match=f"models:/{r.name}/999: not found in the registry"):
        evaluate_version(r.cfg, f"models:/{r.name}/999", r.manifest)


def test_a_challenger_is_measured_beside_the_champion(evaluated_registry, tmp_path):
    """With @champion on the good version, evaluating the perturbed one runs both on the same prompts and
    seeds: a table of every metric for both, a side-by-side grid, and both versions re-tagged under one
    protocol (what the promotion gate compares)."""
    r = evaluated_registry
    setup_tracking(r.cfg)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(r.name, "champion", r.versions["good"])
    try:
        out = evaluate_version(r.cfg, f"models:/{r.name}/{r.versions['worse']}", r.manifest)
    finally:
        client.delete_registered_model_alias(r.name, "champion")
    assert out["champion"] == r.versions["good"]
    run = client.get_run(out["run_id"])
    assert run.data.tags["eval.champion"] == r.versions["good"]
    with open(client.download_artifacts(run.info.run_id, "comparison.json", str(tmp_path))) as fh:
        table = json.load(fh)
    rows = dict(zip(table["columns"], zip(*table["data"], strict=True), strict=True))
    champion = dict(zip(rows["metric"], rows["champion"], strict=True))
    candidate = dict(zip(rows["metric"], rows["candidate"], strict=True))
    assert champion["val_loss"] == pytest.approx(r.metrics["good"]["val_loss"], rel=1e-5)  # the same protocol
    assert candidate["val_loss"] > champion["val_loss"]
    grid = Image.open(client.download_artifacts(run.info.run_id, "side_by_side.png", str(tmp_path)))
    assert grid.size == (2 * 64, IMAGES * 64)  # a column per model, a row per image
    good_tags = client.get_model_version(r.name, r.versions["good"]).tags
    worse_tags = client.get_model_version(r.name, r.versions["worse"]).tags
    assert good_tags["eval.protocol"] == worse_tags["eval.protocol"] == out["protocol"]
    # The held-out loss paired row by row with the champion's, its interval, and the gate's verdict.
    assert worse_tags["eval.paired.reference"] == r.versions["good"]
    low, high = float(worse_tags["eval.paired.val_loss.low"]), float(worse_tags["eval.paired.val_loss.high"])
    assert 0 < low <= float(worse_tags["eval.paired.val_loss.change"]) <= high
    assert worse_tags["eval.samples.val_loss"] == "2" and worse_tags["eval.features.clip_score"] == "random"
    verdict = dict(zip(rows["metric"], rows["verdict"], strict=True))
    assert verdict["val_loss"] == "refuse" and run.data.tags["eval.verdict"] == "refuse"
    assert "eval.paired.reference" not in good_tags  # the reference itself carries no pairing
