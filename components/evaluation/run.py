"""Deterministic evaluation of a registered version, side by side with the champion.

For each model (the candidate, and the version that holds ``@champion`` when it is another one):
- held-out loss: ``val_loss`` (the selection metric, ``train.select_metric``) and the plain v-MSE per
  timestep bucket, at fixed timesteps and noise (the same Validator as training);
- the ZT-SNR dynamic-range probe (``probe.py``): dark and bright luminance, their spreads and range;
- quality on the versioned prompt set: CLIP score, and FID and KID against the held-out images;
- NaN and blank images.
Both models run the same prompts and seeds, so every judged metric is paired: the held-out loss row by row
(same noise and timesteps), the CLIP score image by image, and the set statistics -- FID, KID, the probe's
spreads and range -- on the same resampled prompts, seeds and held-out images for both. The candidate's
change against the reference comes with a seeded bootstrap interval (``paired.py``). Each metric records how
many samples it was computed on
(``eval.samples.<metric>``) and, for the feature-model metrics, which weights computed it
(``eval.features.<metric>``: ``random`` for the tiny offline models).

The reference is the version holding ``evaluate.reference_alias`` (the champion). One MLflow run records the
candidate's metrics, a table of every metric for both with the paired interval and the gate's verdict
(``comparison.json``, ``mlflow.log_table``) and a side-by-side grid; each model's figures also go onto its
registered version as ``eval.*`` tags (the convention promotion reads), with ``eval.protocol``: a hash of
everything besides the weights that the numbers depend on -- the model's own prediction type and schedule
included -- so promotion compares a candidate with the reference only when both were measured the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import mlflow
import numpy as np
from PIL import Image

from components.config import Config, DiffusionConfig
from components.dataset import CuratedManifest, decode_image, val_rows
from components.diffusion.adapters import fuse
from components.diffusion.pipelines import build_pipelines, pick_device, variant_for
from components.diffusion.request import GenerationRequest
from components.diffusion.schedule import inference_scheduler
from components.diffusion.sdxl import load_parts
from components.evaluation.distances import frechet_distance, mmd_from_kernels, polynomial_kernel
from components.evaluation.paired import SetStatistic, paired_change, paired_set_change
from components.evaluation.probe import grid, image_checks, luminance, probe_stats
from components.evaluation.prompts import PromptSet, load_prompt_set
from components.evaluation.quality import (
    as_uint8_batch,
    clip_location,
    clip_scores,
    distribution_distance,
    feature_file,
    fid_weights_id,
)
from components.registry.adapter_versions import base_of, fetch_adapter
from components.registry.model import ModelUriError, ResolvedModel, diffusion_from_pipeline_dir, fetch_model
from components.registry.promotion import EVAL_PREFIX, FEATURES_PREFIX, PAIRED_PREFIX, SAMPLES_PREFIX, judge
from components.registry.tracking import setup_tracking
from components.training.validation import VAL_NOISE_SEED, Validator, selection_weights

log = logging.getLogger(__name__)

SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "zero_terminal_snr",
                   "prediction_type")
"""Taken from the saved pipeline (what the model was trained with); the loss weighting (min-SNR gamma,
terminal policy, the selection metric) stays the config's, so every version is scored with the same weights."""
SIDE_BY_SIDE = 8  # quality prompts shown in the comparison grid, after the probe images


@dataclass
class Evaluation:
    metrics: dict[str, float]
    probe: list[np.ndarray] = field(repr=False)  # float (H, W, 3) images: dark, then bright
    quality: list[np.ndarray] = field(repr=False)  # one per prompt of the set, first seed
    rows: list[float] = field(default_factory=list, repr=False)
    """Each held-out row's val_loss, in the Validator's fixed order (pairs with another model's)."""
    clip_rows: list[float] = field(default_factory=list, repr=False)
    """Each quality image's CLIP score, in prompt order (pairs with another model's image of that prompt)."""
    samples: dict[str, int] = field(default_factory=dict)
    features: dict[str, str] = field(default_factory=dict)
    """Metric -> the weights of the feature model that computed it."""
    sets: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """What the set statistics resample: ``real`` and ``fake`` feature vectors (the held-out images, the
    quality images in prompt order), ``dark`` and ``bright`` per-image luminance (prompt-major, then seed)."""
    diffusion: DiffusionConfig | None = None
    """The config's diffusion settings with the model's own prediction type and noise schedule (its saved
    scheduler): what the held-out loss was computed under."""

    @property
    def schedule(self) -> dict:
        return self.diffusion.model_dump(mode="json", include=set(SCHEDULE_FIELDS)) if self.diffusion else {}


def eval_protocol(cfg: Config, manifest: CuratedManifest, prompts: PromptSet, diffusion: DiffusionConfig) -> str:
    """Hash of what the numbers mean besides the weights: the model's ``schedule`` (prediction type, ZT-SNR,
    betas), the evaluation settings (resolution, steps, seeds, feature models), the held-out data's digest,
    the timesteps and their weights, and the prompt set (not the gate)."""
    weights = selection_weights(cfg.train.val_timesteps, cfg.train.select_metric, diffusion)
    settings = {
        "schedule": diffusion.model_dump(mode="json", include=set(SCHEDULE_FIELDS)),
        "selection_weights": {str(t): round(w, 8) for t, w in weights.items()},
        "dataset": manifest.digest, "val_timesteps": cfg.train.val_timesteps, "val_max_rows": cfg.train.val_max_rows,
        "select_metric": cfg.train.select_metric, "batch_size": cfg.train.batch_size,
        "precision": cfg.train.precision.value, "noise_seed": VAL_NOISE_SEED,
        "min_snr_gamma": cfg.diffusion.min_snr_gamma, "terminal_policy": cfg.diffusion.terminal_policy.value,
        "guidance": [cfg.inference.guidance_scale, cfg.inference.guidance_rescale],
        "prompts": prompts.version, "prompt_count": len(prompts.prompts),
        "evaluate": cfg.evaluate.model_dump(mode="json", exclude={
            "gate", "compare_champion", "prompts", "informational", "min_samples", "bootstrap_resamples",
            "set_resamples",
            "confidence", "reference_alias"}),
    }
    return "p" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


GENERATE_BATCH = 8
"""Images per pipeline call. Each image has its own seeded generator, so a batch draws the same images as
one call per image (to float rounding), many times faster on a CPU (8 tiny-model images: 3 s against 47 s)."""


def _generate(cfg: Config, pipes, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
    """Float images (H, W, 3) in [0, 1], NaN kept (output_type='np' does not hide it), prompt-major."""
    ev = cfg.evaluate
    reqs = [GenerationRequest(p, width=ev.image_size, height=ev.image_size, steps=ev.steps, seed=s)
            for p in prompts for s in seeds]
    out = []
    for start in range(0, len(reqs), GENERATE_BATCH):
        out += [np.asarray(images[0], np.float32)
                for images in pipes.generate_group(reqs[start:start + GENERATE_BATCH], output_type="np")]
    return out


def held_out_images(manifest: CuratedManifest, cfg: Config) -> list[np.ndarray]:
    """The held-out rows' images as uint8 (H, W, 3): the reference distribution of FID and KID."""
    out = []
    for row in val_rows(manifest, cfg.train.val_max_rows):
        pixels = decode_image(row["image"])  # (3, H, W) in [-1, 1]
        out.append(((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8))
    return out


def evaluate_pipeline(cfg: Config, pipeline_dir: str, manifest: CuratedManifest, prompts: PromptSet,
                      real: list[np.ndarray], adapter=None) -> Evaluation:
    """Every metric of the diffusers directory ``pipeline_dir`` (deterministic: fixed timesteps, noise,
    prompts and seeds); with ``adapter`` (``AdapterWeights``), of that base plus the adapter, merged into its UNet
    (peft's merge, as serving computes it)."""
    device = pick_device()
    saved = diffusion_from_pipeline_dir(pipeline_dir)
    diffusion = cfg.diffusion.model_copy(update={k: getattr(saved, k) for k in SCHEDULE_FIELDS})
    scored = cfg.model_copy(update={"diffusion": diffusion})  # the model's schedule, the config's weighting
    # The weights the device is served (a CUDA replica reads the half variant), computed in fp32.
    model = cfg.model.model_copy(update={"variant": variant_for(pipeline_dir, device)[0], "revision": None})
    parts = load_parts(model, cfg.state_path("cache"), source=str(pipeline_dir))
    if adapter is not None:
        fuse(parts.unet, adapter)
    for module in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
        module.to(device).eval()
    held_out = val_rows(manifest, cfg.train.val_max_rows)
    log.info("evaluating %s on %s: held-out loss on %d rows", pipeline_dir, device, len(held_out))
    metrics, rows = Validator(scored, held_out, device).row_losses(parts, parts.unet)
    pipes = build_pipelines(parts, inference_scheduler(diffusion), cfg.inference.model_dump(), device=device)
    ev = cfg.evaluate
    log.info("generating %d probe images (dark and bright prompts) and %d quality images, %d steps each",
             len(ev.seeds) * (len(ev.dark_prompts) + len(ev.bright_prompts)), len(prompts.prompts), cfg.inference.steps)
    dark, bright = _generate(cfg, pipes, ev.dark_prompts, ev.seeds), _generate(cfg, pipes, ev.bright_prompts, ev.seeds)
    quality = _generate(cfg, pipes, prompts.prompts, ev.seeds[:1])
    log.info("scoring: CLIP score, FID and KID against %d held-out images, the probe's luminance", len(real))
    metrics.update(probe_stats(dark, bright))
    metrics.update(image_checks(dark + bright + quality, ev.blank_std))
    fake = as_uint8_batch(quality)
    clip = {}
    metrics["clip_score"], clip_rows = clip_scores(fake, prompts.prompts,
                                                   clip_location(ev.clip_model, cfg.state_path("cache")), clip)
    side = ev.image_size
    fid_features, fid_weights = (feature_file(name, cfg.state_path("cache", "features"))
                                 for name in (ev.fid_features, ev.fid_weights))
    distances, vectors = distribution_distance(as_uint8_batch(real, side), fake, fid_features, fid_weights,
                                               ev.kid_subset_size)
    metrics.update(distances)
    sets = {**vectors, "dark": luminance(dark), "bright": luminance(bright)}
    distance = min(len(real), len(fake))
    samples = {"val_loss": len(rows), "clip_score": len(fake), "fid": distance, "kid": distance,
               "dark_spread": len(dark), "bright_spread": len(bright), "luminance_range": min(len(dark), len(bright))}
    fid_id = fid_weights_id(fid_features, fid_weights)
    features = {"clip_score": clip["weights_id"], "fid": fid_id, "kid": fid_id}
    return Evaluation(metrics, dark + bright, quality, rows, clip_rows, samples, features, sets, diffusion)


def side_by_side(candidate: Evaluation, champion: Evaluation | None) -> Image.Image:
    """Probe images, then the first quality images: a column for the candidate, one for the champion."""
    left = candidate.probe + candidate.quality[:SIDE_BY_SIDE]
    if champion is None:
        return grid(left, cols=4)
    right = champion.probe + champion.quality[:SIDE_BY_SIDE]
    return grid([image for pair in zip(left, right, strict=True) for image in pair], cols=2)


def comparison_table(candidate: dict[str, float], champion: dict[str, float] | None,
                     verdicts: list | None = None) -> dict[str, list]:
    """Every metric of both models, column-wise (``mlflow.log_table``), with each judged metric's paired
    interval, tolerance and verdict (``promotion.judge``)."""
    names = sorted(candidate)
    table = {"metric": names, "candidate": [candidate[n] for n in names]}
    if champion is not None:
        table["champion"] = [champion.get(n, float("nan")) for n in names]
        table["candidate_minus_champion"] = [candidate[n] - champion.get(n, float("nan")) for n in names]
    judged = {v.metric: v for v in verdicts or []}
    if judged:
        nan = float("nan")
        table["change"] = [judged[n].change if n in judged else nan for n in names]
        table["interval_low"] = [judged[n].low if n in judged else nan for n in names]
        table["interval_high"] = [judged[n].high if n in judged else nan for n in names]
        table["tolerance"] = [judged[n].tolerance if n in judged else nan for n in names]
        table["verdict"] = [judged[n].verdict if n in judged else "" for n in names]
        table["reason"] = [judged[n].reason if n in judged else "" for n in names]
    return table


def schedule_words(diffusion: DiffusionConfig) -> str:
    return f"{diffusion.prediction_type.value}, " + ("zero-terminal-SNR" if diffusion.zero_terminal_snr else
                                                       f"{diffusion.beta_schedule} betas without zero terminal SNR")


def version_tags(ev: Evaluation, protocol: str) -> dict[str, str]:
    """The ``eval.*`` tags (prefix stripped) of one model's evaluation: its figures, their sample counts and
    feature models, its schedule and the protocol."""
    tags = {k: f"{v:.6g}" for k, v in ev.metrics.items()}
    tags.update({f"{SAMPLES_PREFIX}{k}": str(n) for k, n in ev.samples.items()})
    tags.update({f"{FEATURES_PREFIX}{k}": w for k, w in ev.features.items()})
    tags.update({"protocol": protocol, "schedule": schedule_words(ev.diffusion)})
    return tags


def set_statistics(candidate: Evaluation, reference: Evaluation,
                   metrics: set[str]) -> dict[str, tuple[SetStatistic, tuple[int, ...]]]:
    """The set statistics among ``metrics`` whose samples pair, each as ``paired_set_change``'s statistic and
    sample-set sizes: FID and KID over (generated, held-out) indices with the reference's held-out features
    (the same images through the same extractor), the spreads over their group's indices, the range over
    (dark, bright) indices. KID is the unbiased kernel distance of the full sets (``distances.py``)."""
    mine, theirs = candidate.sets, reference.sets
    out: dict[str, tuple[SetStatistic, tuple[int, ...]]] = {}
    pairs = all(k in mine and k in theirs and len(mine[k]) == len(theirs[k]) for k in ("real", "fake"))
    if pairs and metrics & {"fid", "kid"}:
        real, a, b = theirs["real"], mine["fake"], theirs["fake"]
        sizes = (len(a), len(real))
        if "fid" in metrics:
            out["fid"] = (lambda f, r: (frechet_distance(real[r], a[f]), frechet_distance(real[r], b[f])), sizes)
        if "kid" in metrics:
            k_rr, k_aa, k_bb = polynomial_kernel(real, real), polynomial_kernel(a, a), polynomial_kernel(b, b)
            k_ra, k_rb = polynomial_kernel(real, a), polynomial_kernel(real, b)
            out["kid"] = (lambda f, r: (mmd_from_kernels(k_rr[np.ix_(r, r)], k_aa[np.ix_(f, f)], k_ra[np.ix_(r, f)]),
                                        mmd_from_kernels(k_rr[np.ix_(r, r)], k_bb[np.ix_(f, f)], k_rb[np.ix_(r, f)])),
                          sizes)
    groups = all(k in mine and k in theirs and len(mine[k]) == len(theirs[k]) > 0 for k in ("dark", "bright"))
    if groups:
        (md, mb), (td, tb) = (mine["dark"], mine["bright"]), (theirs["dark"], theirs["bright"])
        spreads = {"dark_spread": (md, td), "bright_spread": (mb, tb)}
        for metric, (x, y) in spreads.items():
            if metric in metrics:
                out[metric] = ((lambda i, x=x, y=y: (float(np.std(x[i])), float(np.std(y[i])))), (len(x),))
        if "luminance_range" in metrics:
            out["luminance_range"] = ((lambda d, b: (float(mb[b].mean() - md[d].mean()),
                                                     float(tb[b].mean() - td[d].mean()))), (len(md), len(mb)))
    return out


def paired_tags(candidate: Evaluation, reference: Evaluation, reference_version: str, cfg: Config) -> dict[str, str]:
    """``paired.*`` tags: the candidate's held-out loss against the reference's row by row, its CLIP score image
    by image (same prompts and seeds), and the set statistics the gate judges or reports (``evaluate.gate``,
    ``evaluate.informational``) on the same resampled sets (``set_statistics``), each with its seeded bootstrap interval
    (``evaluate.bootstrap_resamples`` for means, ``evaluate.set_resamples`` for sets, ``evaluate.confidence``).
    No held-out loss pair when the two were not computed under the same schedule (their rows do not pair); no
    interval where a figure is not finite or the reference's is not positive."""
    ev = cfg.evaluate
    judged = set(ev.gate) | set(ev.informational)
    tags = {f"{PAIRED_PREFIX}reference": reference_version}
    pairs = {"clip_score": (candidate.clip_rows, reference.clip_rows)}
    if candidate.schedule == reference.schedule:
        pairs["val_loss"] = (candidate.rows, reference.rows)
    changes = {}
    for metric, (mine, theirs) in pairs.items():
        if not mine or len(mine) != len(theirs):
            continue
        try:
            changes[metric] = paired_change(mine, theirs, ev.bootstrap_resamples, ev.confidence, seed=cfg.seed)
        except ValueError as err:  # a non-finite row, or a mean at or below 0: no relative change to judge
            log.warning("no paired interval for %s: %s", metric, err)
    for metric, (statistic, sizes) in set_statistics(candidate, reference, judged).items():
        try:
            changes[metric] = paired_set_change(statistic, sizes, ev.set_resamples, ev.confidence, seed=cfg.seed)
        except ValueError as err:
            log.warning("no paired interval for %s: %s", metric, err)
    for metric, change in changes.items():
        tags.update({f"{PAIRED_PREFIX}{metric}.{k}": f"{v:.6g}" for k, v in change.as_dict().items()})
    return tags


def _champion_of(resolved: ResolvedModel, cfg: Config) -> ResolvedModel | None:
    if not cfg.evaluate.compare_champion:
        return None
    try:
        champ = fetch_model(f"models:/{resolved.name}@{cfg.evaluate.reference_alias}",
                            cfg.state_path("cache", "models"),
                            adapter_ok=True)
    except ModelUriError:
        return None  # no champion yet: the first version
    return None if champ.version == resolved.version else champ


def _base_and_adapter(resolved: ResolvedModel, cfg: Config) -> dict:
    """What ``evaluate_pipeline`` evaluates for a version: its pipeline, or for an adapter version the base it
    names (fetched first) and the adapter."""
    if not resolved.adapter:
        return {"pipeline_dir": str(resolved.pipeline_dir)}

    adapter = fetch_adapter(resolved.uri, cfg.state_path("cache", "models"))
    return {"pipeline_dir": str(base_of(adapter, cfg.state_path("cache", "models"))), "adapter": adapter.weights()}


def _tag(name: str, version: str, tags: dict[str, str]) -> None:
    """Replace the version's ``eval.*`` tags with ``tags`` (a stale paired interval must not outlive a
    re-evaluation)."""

    client = mlflow.MlflowClient()
    for key in client.get_model_version(name, version).tags:
        if key.startswith(EVAL_PREFIX) and key[len(EVAL_PREFIX):] not in tags:
            client.delete_model_version_tag(name, version, key)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, f"{EVAL_PREFIX}{key}", value)


def evaluate_version(cfg: Config, model_uri: str, manifest: CuratedManifest) -> dict:
    """Evaluate the version ``model_uri`` names, and the champion beside it; record the run, the table,
    the grid and both versions' ``eval.*`` tags. Returns the candidate's figures."""

    experiment_id = setup_tracking(cfg)
    resolved = fetch_model(model_uri, cfg.state_path("cache", "models"), adapter_ok=True)
    champion = _champion_of(resolved, cfg)
    prompts = load_prompt_set(cfg.evaluate.prompts, cfg.evaluate.num_prompts)
    real = held_out_images(manifest, cfg)
    candidate = evaluate_pipeline(cfg, manifest=manifest, prompts=prompts, real=real,
                                  **_base_and_adapter(resolved, cfg))
    theirs = (evaluate_pipeline(cfg, manifest=manifest, prompts=prompts, real=real, **_base_and_adapter(champion, cfg))
              if champion else None)
    protocol = eval_protocol(cfg, manifest, prompts, candidate.diffusion)
    mine = version_tags(candidate, protocol)
    if theirs is not None:
        ref_tags = version_tags(theirs, eval_protocol(cfg, manifest, prompts, theirs.diffusion))
        mine.update(paired_tags(candidate, theirs, champion.version, cfg))
    weights = selection_weights(cfg.train.val_timesteps, cfg.train.select_metric, candidate.diffusion)
    verdicts = judge(mine, ref_tags if theirs else None, champion.version if champion else None, cfg.evaluate)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"eval-{resolved.name}-v{resolved.version}") as run:
        mlflow.set_tags({"eval.model": resolved.name, "eval.version": resolved.version,
                         "dataset_digest": manifest.digest,
                         "eval.protocol": protocol, "eval.prompts": prompts.version,
                         "eval.champion": champion.version if champion else "none",
                         "eval.verdict": "refuse" if any(v.refused for v in verdicts) else "pass"})
        mlflow.log_params({f"evaluate.{k}": str(v)[:500] for k, v in cfg.evaluate.model_dump(mode="json").items()})
        mlflow.log_param("selection_weights", json.dumps({str(t): round(w, 4) for t, w in weights.items()}))
        mlflow.log_metrics(candidate.metrics)
        mlflow.log_table(comparison_table(candidate.metrics, theirs.metrics if theirs else None, verdicts),
                         artifact_file="comparison.json")
        mlflow.log_image(side_by_side(candidate, theirs), artifact_file="side_by_side.png")
        mlflow.log_image(grid(candidate.probe, cols=len(cfg.evaluate.seeds) * 2), artifact_file="probe_grid.png")
    extra = {"run_id": run.info.run_id, "dataset_digest": manifest.digest}
    _tag(resolved.name, resolved.version, {**mine, **extra})
    if champion is not None:  # re-measured beside the candidate: promotion compares like with like
        _tag(champion.name, champion.version, {**ref_tags, **extra})
    return {"model": resolved.name, "version": resolved.version, "run_id": run.info.run_id, "protocol": protocol,
            "champion": champion.version if champion else None, **candidate.metrics,
            "verdicts": [{"metric": v.metric, "verdict": v.verdict, "change": v.change, "low": v.low, "high": v.high,
                          "reason": v.reason} for v in verdicts]}
