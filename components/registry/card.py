"""A registered version as a Hugging Face Hub model repository: diffusers weights, the single-file
checkpoint, validation images and a model card whose every section is filled from MLflow.

The card is a function of what MLflow holds about the version (``collect`` reads it, ``render`` writes
it): the version's tags (lineage, parameter counts, sizes, evaluation), its training run (the config
as params, the metric histories, hardware and software tags, start and end time, the validation
images), the curation run that made its dataset (found by the dataset digest: counts kept and dropped
by reason, filters, buckets) and its evaluation run (protocol settings, the probe grid). Every number
in the card is one of those figures or arithmetic on them (wall time from the run's start and end);
sizes measured while publishing (the single file) are recorded on the version first, then read back.

The folder is laid out as a Hub model repository: the diffusers folder at the root (``model_index.json``,
``unet/`` ...), the single-file checkpoint next to it, ``images/`` and ``README.md`` with the Hub's YAML
metadata block. ``push_folder`` uploads it with ``huggingface_hub`` (``HfApi.create_repo`` and
``upload_folder``); docs/interchange.md says how the push is tested.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import re
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import yaml
from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id

from components.config import Config
from components.registry.card_uses import (
    KIND_NAMES,
    objective,
    risks_section,
    source_rows,
    summary,
    uses_section,
)
from components.registry.export import export_version
from components.registry.model import LINEAGE, _model_version, fetch_model, shipped_inference
from components.registry.tracking import setup_tracking

PLACEHOLDER = "More Information Needed"
"""What the Hub's card template leaves in an empty field; a card written here never contains it."""
PLACEHOLDERS = re.compile(r"More Information Needed|\[optional\]|\{\{|\bTODO\b|\bTBD\b|\bFIXME\b", re.I)
"""Any mark of a field left unfilled (the Hub template's, a Jinja slot, a note to self); ``render`` refuses them."""
TAGS = ["text-to-image", "stable-diffusion-xl", "stable-diffusion-xl-diffusers", "diffusers", "v-prediction",
        "zero-terminal-snr", "terminus"]
IMAGES = "images"


class CardError(ValueError):
    """A version whose card cannot be filled (not trained by the platform, never evaluated)."""


# --- formatting (the card test formats MLflow's figures with the same functions) --------------------


def fmt_int(value) -> str:
    return f"{int(round(float(value))):,}"


def fmt_float(value) -> str:
    return f"{float(value):.4g}"


def fmt_bytes(value) -> str:
    return f"{int(value):,} bytes"


def fmt_mb(value) -> str:
    """A ``*_mb`` metric of the training loop, which counts in units of 2**20 bytes."""
    return f"{float(value):,.0f} MiB"


def fmt_seconds(value) -> str:
    return f"{float(value):,.1f} s"


def fmt_hours(value) -> str:
    return f"{float(value):.4f}"


def fmt_time(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- what MLflow holds about a version ------------------------------------------------------------


@dataclass
class Facts:
    name: str
    version: str
    version_tags: dict
    run: object
    params: dict
    run_tags: dict
    metrics: dict
    history: dict = field(default_factory=dict)
    curation: object | None = None
    curation_report: dict | None = None
    evaluation: object | None = None
    images: list[tuple[str, int, str]] = field(default_factory=list)  # (key, step, artifact path)
    inference: dict = field(default_factory=dict)
    lineage_root: dict = field(default_factory=dict)  # lineage tags of the model the lineage starts from
    base_model: str | None = None  # the Hub id the card's metadata names; None: none (card_base_model)
    base_model_note: str = ""

    @property
    def wall_s(self) -> float:
        return (self.run.info.end_time - self.run.info.start_time) / 1000


def curation_run(client, experiment_id: str, digest: str):
    """The latest curation run that produced the dataset ``digest`` (``components/curation/lineage.py``
    tags it ``dataset.digest``), or None when it was curated outside this tracking store."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`dataset.digest` = '{digest}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def lineage_root(client, tags: dict, depth: int = 0) -> dict:
    """The lineage tags of the model a version (or run) started from at the very beginning: its own, or, when
    it continued a registered version, that version's root, recursively. A parent the store does not hold
    ends the walk at the child's tags (kind ``registered``)."""
    if tags.get(LINEAGE + "kind") == "registered" and depth < 16:
        try:
            parent = client.get_model_version(tags[LINEAGE + "parent_model"], tags[LINEAGE + "parent_version"])
        except (KeyError, mlflow.exceptions.MlflowException):
            return tags
        return lineage_root(client, dict(parent.tags or {}), depth + 1)
    return tags


def card_base_model(configured: str | None, root: dict) -> tuple[str | None, str]:
    """(the card's ``base_model``, a sentence for the card where it needs one). The Hub's model-card metadata
    takes ``base_model`` only as the id of a model on the Hub (huggingface_hub's ``ModelCardData``), so it is
    the Hub id the lineage starts from; a root that is not on the Hub (the random builds, a folder, s3://, a
    single file) gives none, unless ``publish.base_model`` names the Hub model that root is a copy of.
    ``CardError`` when ``publish.base_model`` is not a Hub id, or names another model than a Hub root."""
    kind, source = root.get(LINEAGE + "kind"), root.get(LINEAGE + "source") or ""
    if configured is not None:
        try:
            validate_repo_id(configured)
        except HFValidationError:
            raise CardError(f"publish.base_model {configured!r} is not a Hub model id (org/name): the Hub's "
                            "base_model names a model on the Hub; unset it to name none") from None
    if kind == "hub":
        if configured not in (None, source):
            raise CardError(f"publish.base_model {configured!r} is not the Hub model this version was trained "
                            f"from ({source!r}, its lineage): unset publish.base_model")
        return source, ""
    where = f"`{source}` ({KIND_NAMES.get(kind, kind or 'unrecorded')})"
    if configured is not None:
        return configured, (f"The lineage of this model starts from {where}, which `publish.base_model` names "
                            f"as a copy of `{configured}`; the card's `base_model` is that statement.")
    return None, (f"The lineage of this model reaches no Hub model: it starts from {where}, so the card's "
                  "metadata names no `base_model`.")


def collect(cfg: Config, uri: str) -> Facts:
    """Everything the card says, read from MLflow (``CardError`` when a section could not be filled)."""
    setup_tracking(cfg)
    client = mlflow.MlflowClient()
    mv = _model_version(uri)
    tags = dict(mv.tags or {})
    if not tags.get("run_id"):
        raise CardError(f"models:/{mv.name}/{mv.version} has no training run: the card is filled from the run "
                        "that trained it (versions registered by flows/train.py have one)")
    if not tags.get("eval.protocol"):
        raise CardError(f"models:/{mv.name}/{mv.version} was never evaluated: run flows/evaluate.py --model-uri "
                        f"models:/{mv.name}/{mv.version} first (the card reports its results)")
    run = client.get_run(tags["run_id"])
    if run.info.end_time is None:
        raise CardError(f"training run {run.info.run_id} has not finished: its wall time is not known yet")
    history = {"images_per_s": [m.value for m in client.get_metric_history(run.info.run_id, "images_per_s")]}
    facts = Facts(mv.name, str(mv.version), tags, run, dict(run.data.params), dict(run.data.tags),
                  dict(run.data.metrics), history)
    facts.curation = curation_run(client, run.info.experiment_id, tags["dataset_digest"])
    if facts.curation is not None:
        local = mlflow.artifacts.download_artifacts(run_id=facts.curation.info.run_id,
                                                    artifact_path="curation/report.json")
        facts.curation_report = json.loads(Path(local).read_text())
    facts.evaluation = client.get_run(tags["eval.run_id"]) if tags.get("eval.run_id") else None
    for artifact in client.list_artifacts(run.info.run_id, IMAGES):
        if m := re.fullmatch(rf"{IMAGES}/(?P<key>.+?)\+step\+(?P<step>\d+)\+.*\.png", artifact.path):
            facts.images.append((m["key"], int(m["step"]), artifact.path))
    facts.inference = {k.removeprefix("inference."): v for k, v in facts.params.items() if k.startswith("inference.")}
    facts.lineage_root = lineage_root(client, tags)
    facts.base_model, facts.base_model_note = card_base_model(cfg.publish.base_model, facts.lineage_root)
    return facts


# --- the card -------------------------------------------------------------------------------------


def _table(rows: list[tuple[str, str]]) -> str:
    clean = [(label, str(value).replace("|", "\\|").replace("\n", " ")) for label, value in rows]
    return "\n".join(["| | |", "|---|---|", *[f"| {label} | {value} |" for label, value in clean]])


def _list_param(value: str | None) -> list:
    try:
        out = ast.literal_eval(value) if value else []
    except (ValueError, SyntaxError):
        return [value]
    return out if isinstance(out, list) else [out]


def model_rows(f: Facts, cfg: Config) -> list[tuple[str, str]]:
    t, p = f.version_tags, f.params
    lineage = t.get(LINEAGE + "source") or t.get("base_model", "")
    rows = [
        ("Developed by", cfg.publish.author or "the Terminus platform"),
        ("Model type", "Stable Diffusion XL (latent diffusion, UNet with two CLIP text encoders)"),
        ("UNet parameters", fmt_int(t["params.unet"])),
        ("Text encoder 1 parameters", fmt_int(t["params.text_encoder"])),
        ("Text encoder 2 parameters", fmt_int(t["params.text_encoder_2"])),
        ("VAE parameters", fmt_int(t["params.vae"])),
        ("Objective", f"{p['diffusion.prediction_type']}, zero-terminal SNR {p['diffusion.zero_terminal_snr']}"),
        ("Fine-tuned from", f"`{lineage}` ({t.get(LINEAGE + 'kind', 'unrecorded')})"),
    ]
    if t.get(LINEAGE + "revision"):
        rows.append(("Source revision", f"`{t[LINEAGE + 'revision']}`"))
    if t.get(LINEAGE + "parent_version"):
        rows.append(("Parent version", f"models:/{t[LINEAGE + 'parent_model']}/{t[LINEAGE + 'parent_version']}"))
    rows += [
        ("Source weights sha256", f"`{t.get(LINEAGE + 'weights_sha256', 'unrecorded')}`"),
        ("License", cfg.publish.license),
        ("Registered as", f"models:/{f.name}/{f.version}"),
        ("Training run", f"`{f.run.info.run_id}`"),
        ("Code", f"git `{t.get('git_commit')}`, config `{t.get('config_hash')}`"),
    ]
    return rows


def file_rows(f: Facts, single_file: str, precision: str) -> list[tuple[str, str]]:
    t = f.version_tags
    rows = [("diffusers weights, fp32 (`*/…safetensors`)", fmt_bytes(t["size.fp32_bytes"]))]
    variant = t.get("weight_variant")
    if variant and t.get(f"size.{variant}_bytes"):
        rows.append((f"diffusers weights, `variant=\"{variant}\"`", fmt_bytes(t[f"size.{variant}_bytes"])))
    rows.append((f"single file `{single_file}` ({precision})", fmt_bytes(t[f"single_file.{precision}.bytes"])))
    rows.append(("single file sha256 (ModelSpec)", f"`{t[f'single_file.{precision}.sha256']}`"))
    return rows


def curated_sources(cp: dict) -> dict[str, dict]:
    """The sources of a curation run with several (``curate.sources.<name>.<key>`` params, as
    ``components/curation/lineage.py`` logs them), by name, in order of name; {} for a one-source curation."""
    names = sorted(k.removeprefix("curate.sources.").removesuffix(".location") for k in cp
                   if k.startswith("curate.sources.") and k.endswith(".location"))
    return {n: {k.removeprefix(f"curate.sources.{n}."): v for k, v in cp.items()
                if k.startswith(f"curate.sources.{n}.")} for n in names}


def mixture_wording(sp: dict) -> str:
    """How a source enters each epoch: its ``weight`` (a share of the epoch's samples) where it set one, else its
    ``repeats`` (draws per image)."""
    weight = sp.get("weight")
    if weight not in (None, "", "None"):
        return f"weight {weight} (its share of each epoch's samples)"
    return f"drawn {sp.get('repeats')} time(s) per image per epoch"


def data_rows(f: Facts) -> tuple[list[tuple[str, str]], str]:
    """Training-data rows and where they came from (each source with its counts and its filters, when the
    curation had several)."""
    p = f.params
    if f.curation is not None:
        cm, cp = f.curation.data.metrics, f.curation.data.params
        sources = curated_sources(cp)
        rows = [] if sources else [("Source", f"`{cp.get('curate.source')}`")]
        rows += [("Images read", fmt_int(cm["inputs"])), ("Kept", fmt_int(cm["kept"])),
                 ("Dropped", fmt_int(cm["dropped"]))]
        rows += [(f"Dropped: {k.removeprefix('dropped.')}", fmt_int(v)) for k, v in sorted(cm.items())
                 if k.startswith("dropped.")]
        if sources:
            for name, sp in sources.items():
                filters = {k.removeprefix("filters."): v for k, v in sp.items() if k.startswith("filters.")}
                rows += [
                    (f"Source `{name}`", f"{sp.get('kind')} `{sp.get('location')}`, {mixture_wording(sp)}"),
                    (f"Source `{name}`: read, kept", f"{fmt_int(cm.get(f'source.{name}.inputs', 0))}, "
                                                     f"{fmt_int(cm.get(f'source.{name}.kept', 0))}"),
                    (f"Source `{name}`: filters", ", ".join(f"{k} {v}" for k, v in sorted(filters.items()))),
                ]
        else:
            filters = {k.removeprefix("curate.filters."): v for k, v in cp.items() if k.startswith("curate.filters.")}
            rows.append(("Filters", ", ".join(f"{k} {v}" for k, v in sorted(filters.items()))))
        captions = {k.removeprefix("captions."): v for k, v in cm.items() if k.startswith("captions.")}
        if captions:
            rows.append(("Captions by origin", ", ".join(f"{k} {fmt_int(v)}" for k, v in sorted(captions.items()))))
        where = f"curation run `{f.curation.info.run_id}`"
    else:
        rows = [("Source", f"`{p.get('train.data')}`")]
        where = "the training run (the dataset was curated outside this tracking store)"
    rows += [("Training rows", fmt_int(p["data.rows.train"])), ("Held-out rows", fmt_int(p["data.rows.val"])),
             ("Dataset digest", f"`{f.version_tags['dataset_digest']}`")]
    return rows, where


def preprocessing_rows(f: Facts) -> list[tuple[str, str]]:
    cp = f.curation.data.params if f.curation is not None else f.params
    rows = [
        ("Aspect buckets", f"area {fmt_int(cp['curate.buckets.area'])} px, sides multiples of "
                           f"{fmt_int(cp['curate.buckets.step'])} from {fmt_int(cp['curate.buckets.min_side'])} "
                           f"to {fmt_int(cp['curate.buckets.max_side'])}"),
        ("Resampling", "LANCZOS, downsampling only (never upsampled)"),
        ("Crops", f"{cp['curate.crop']}, the crop's top-left recorded as SDXL's crop coordinates"),
        ("Missing captions", cp["curate.missing_caption"] if "curate.missing_caption" in cp else ", ".join(
            f"{n}: {sp.get('missing_caption')}" for n, sp in curated_sources(cp).items())),
        ("JPEG quality", fmt_int(cp["curate.jpeg_quality"])),
        ("Held-out fraction", fmt_float(cp["curate.holdout_fraction"])),
    ]
    buckets = (f.curation_report or {}).get("buckets") or {}
    if buckets:
        rows.append(("Images per bucket", ", ".join(f"{b}: {fmt_int(n)}" for b, n in sorted(buckets.items()))))
    return rows


def hyper_rows(f: Facts) -> list[tuple[str, str]]:
    p, m = f.params, f.metrics
    workers, batch, accum = int(p["train.num_workers"]), int(p["train.batch_size"]), int(p["train.grad_accum"])
    ema = p["train.ema_decay"]
    return [
        ("Noise schedule", f"{p['diffusion.beta_schedule']} betas {p['diffusion.beta_start']} to "
                           f"{p['diffusion.beta_end']}, T = {fmt_int(p['diffusion.num_train_timesteps'])}"),
        ("Zero-terminal SNR", p["diffusion.zero_terminal_snr"]),
        ("Prediction type", p["diffusion.prediction_type"]),
        ("Min-SNR gamma", p["diffusion.min_snr_gamma"]),
        ("Terminal-step policy", p["diffusion.terminal_policy"]),
        ("Learning rate", f"warmup {fmt_int(p['train.lr.warmup_steps'])} steps, cosine "
                          f"{p['train.lr.max']} to {p['train.lr.min']}"),
        ("Batch", f"{batch} x {accum} accumulation x {workers} worker(s) = {batch * accum * workers}"),
        ("Optimizer steps", fmt_int(m["final_step"])),
        ("Epochs started", fmt_int(m["epoch"] + 1)),
        ("Samples seen", fmt_int(m["samples_seen"])),
        ("Precision", f"{p['train.precision']} configured, {f.run_tags.get('precision.effective')} used"),
        ("Optimizer", f"{p['train.optimizer']}, weight decay {p['train.weight_decay']}, gradient clipping "
                      f"{p['train.clip_grad_norm']}"),
        ("EMA", "none" if ema == "None" else f"decay {ema}"),
        ("Caption dropout", p["train.caption_dropout"]),
        ("Gradient checkpointing", p["train.grad_checkpointing"]),
        ("Checkpoint chosen", f"{p['train.select']} by held-out loss"),
        ("Seed", p["seed"]),
    ]


def speed_rows(f: Facts) -> list[tuple[str, str]]:
    p, m = f.params, f.metrics
    workers = int(p["train.num_workers"])
    hours = f.wall_s / 3600
    gpu = p["train.use_gpu"] == "True"
    rows = [
        ("Throughput (median over steps)", f"{fmt_float(statistics.median(f.history['images_per_s']))} images/s"),
        ("Started", fmt_time(f.run.info.start_time)),
        ("Wall time (training and export)", fmt_seconds(f.wall_s)),
        ("GPU-hours", fmt_hours(hours * workers if gpu else 0)),
    ]
    if not gpu:
        rows.append(("CPU-hours (reserved)", fmt_hours(hours * workers * float(p["train.cpus_per_worker"]))))
    rows.append(("Peak memory, rank 0 (resident)", fmt_mb(m["peak_rss_mb"])))
    if "peak_gpu_allocated_mb" in m:
        rows.append(("Peak GPU memory, rank 0 (allocated)", fmt_mb(m["peak_gpu_allocated_mb"])))
    rows += [("Final training loss", fmt_float(m["final_loss"])),
             ("Final held-out loss", fmt_float(m["final_val_loss"]))]
    return rows


def eval_rows(f: Facts) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    t = f.version_tags
    ep = f.evaluation.data.params if f.evaluation is not None else {}
    p = f.params
    protocol = [
        ("Protocol id", f"`{t['eval.protocol']}`"),
        ("Held-out data", f"dataset `{t['eval.dataset_digest']}`, at most {fmt_int(p['train.val_max_rows'])} rows"),
        ("Loss timesteps", ", ".join(str(x) for x in _list_param(p["train.val_timesteps"]))),
        ("Dark probe prompts", "; ".join(_list_param(ep.get("evaluate.dark_prompts")))),
        ("Bright probe prompts", "; ".join(_list_param(ep.get("evaluate.bright_prompts")))),
        ("Probe seeds", ", ".join(str(x) for x in _list_param(ep.get("evaluate.seeds")))),
        ("Probe images", f"{ep.get('evaluate.image_size')} px, {ep.get('evaluate.steps')} steps"),
        ("Blank threshold (pixel std)", ep.get("evaluate.blank_std", "")),
        ("Evaluation run", f"`{t.get('eval.run_id')}`"),
    ]
    results = [(label, fmt_float(t[f"eval.{key}"])) for key, label in (
        ("val_loss", "Held-out loss (min-SNR weighted)"), ("luminance_dark", "Mean luminance, dark prompts"),
        ("luminance_bright", "Mean luminance, bright prompts"), ("luminance_range", "Luminance range"),
        ("nan_images", "Images with NaN"), ("blank_images", "Blank images"))]
    return protocol, results


def compute_rows(f: Facts) -> list[tuple[str, str]]:
    rt, p = f.run_tags, f.params
    rows = [
        ("Accelerator", rt.get("hardware.accelerator", rt.get("device", "unrecorded"))),
        ("GPU", rt.get("hardware.gpu", "unrecorded")),
        ("CPU", f"{rt.get('hardware.cpu', 'unrecorded')} ({rt.get('cpu.capability', 'unrecorded')} kernels)"),
        ("CPUs on the machine", rt.get("hardware.cpu_count", "unrecorded")),
        ("Workers", f"{p['train.num_workers']} x {p['train.cpus_per_worker']} CPU"
                    + (" + 1 GPU" if p["train.use_gpu"] == "True" else "")),
        ("Hours used (wall)", fmt_hours(f.wall_s / 3600)),
    ]
    rows += [(f"Software: {k.removeprefix('software.')}", v) for k, v in sorted(rt.items())
             if k.startswith("software.")]
    return rows


def metadata(f: Facts, cfg: Config) -> dict:
    """The README's YAML block: the Hub's model-card fields, as huggingface_hub's ``ModelCardData`` reads them.
    ``base_model`` (with ``base_model_relation: finetune``: every weight was trained) only where there is one."""
    header = {"license": cfg.publish.license}
    if f.base_model:
        header |= {"base_model": f.base_model, "base_model_relation": "finetune"}
    return header | {"library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": TAGS}


def render(f: Facts, cfg: Config, single_file: str, images: list[tuple[str, str]], repo_id: str) -> str:
    """The README.md of the folder: the Hub's YAML block, then every section filled. ``repo_id`` is where the
    usage example loads it from."""
    precision = cfg.publish.precision
    header = metadata(f, cfg)
    inf = f.inference
    data, data_source = data_rows(f)
    protocol, results = eval_rows(f)
    variant = f.version_tags.get("weight_variant") or None
    image_md = "\n\n".join(f"![{caption}]({path})\n\n*{caption}*" for path, caption in images)
    parts = [
        "---\n" + yaml.safe_dump(header, sort_keys=False) + "---",
        f"# {f.name} v{f.version}",
        f"{summary(f)} with the Terminus recipe: {objective(f.params)}"
        + (" with min-SNR weighting" if f.params.get("diffusion.min_snr_gamma") not in (None, "None") else "")
        + ", trained, evaluated and registered by the Terminus platform. "
        "Every figure on this card is read from the MLflow record of its training run, its dataset's curation "
        "run and its evaluation run.",
        "## Model details\n\n" + _table(model_rows(f, cfg)) + (f"\n\n{f.base_model_note}" if f.base_model_note else ""),
        "### Model sources\n\n" + _table(source_rows(f, repo_id)),
        uses_section(f, cfg, single_file),
        risks_section(f),
        "## Files\n\nThe diffusers folder sits at the root of the repository; the single-file checkpoint next to "
        "it is the same model in the original SDXL key layout, for ComfyUI, A1111 and Forge.\n\n"
        + _table(file_rows(f, single_file, precision)),
        "## How to use\n\nWith diffusers: load the folder (the half-precision variant on a GPU) and sample with "
        "the scheduler it ships (DDIM, trailing spacing, rescaled betas) and guidance rescale.\n\n"
        "```python\nimport torch\nfrom diffusers import StableDiffusionXLPipeline\n\n"
        f"pipe = StableDiffusionXLPipeline.from_pretrained(\"{repo_id}\", "
        + (f"variant=\"{variant}\", torch_dtype=torch.float16" if variant == "fp16" else
           f"variant=\"{variant}\", torch_dtype=torch.bfloat16" if variant == "bf16" else "torch_dtype=torch.float32")
        + ").to(\"cuda\")\n"
        f"image = pipe(\"a photograph of an astronaut\", num_inference_steps={inf.get('steps')}, "
        f"guidance_scale={inf.get('guidance_scale')}, guidance_rescale={inf.get('guidance_rescale')}, "
        f"width={inf.get('width')}, height={inf.get('height')}).images[0]\n```\n\n"
        f"In ComfyUI, A1111 or Forge: load `{single_file}`. Its `v_pred` and `ztsnr` keys make those UIs sample "
        "it as a v-prediction, zero-terminal-SNR model; without them the images come out grey. diffusers' "
        f"`from_single_file` does not read them: pass `config=\"{repo_id}\"`, whose `scheduler/` is the one "
        "above, or set `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, "
        "prediction_type=\"v_prediction\", rescale_betas_zero_snr=True, timestep_spacing=\"trailing\")` and "
        "sample with the guidance rescale above.",
        "## Training details",
        f"### Training data\n\nFrom {data_source}.\n\n" + _table(data),
        "### Preprocessing\n\n" + _table(preprocessing_rows(f)),
        "### Training hyperparameters\n\n" + _table(hyper_rows(f)),
        "### Speeds, sizes, times\n\n" + _table(speed_rows(f)),
        "## Evaluation",
        "### Protocol\n\nThe held-out loss is measured at fixed timesteps with fixed noise; the luminance probe "
        "samples very dark and very bright prompts (a zero-terminal-SNR model reaches both ends, a model on the "
        "flawed schedule pulls both toward grey). Versions are compared only under the same protocol id.\n\n"
        + _table(protocol),
        "### Results\n\n" + _table(results),
        "### Validation images\n\nThe last validation round of the training run, and the evaluation's probe "
        "grid (dark prompts, then bright prompts).\n\n" + image_md,
        "## Compute infrastructure\n\n" + _table(compute_rows(f)),
    ]
    text = "\n\n".join(parts) + "\n"
    if m := PLACEHOLDERS.search(text):  # a template field left empty is a bug here, not a card
        raise CardError(f"the card contains the placeholder {m[0]!r}")
    return text


# --- the folder -----------------------------------------------------------------------------------


def _images(f: Facts, out: Path) -> list[tuple[str, str]]:
    """The last validation round's images and the evaluation's probe grid, copied into ``out/images``."""
    client = mlflow.MlflowClient()
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    prompts = _list_param(f.params.get("train.val_prompts"))
    found = []
    if f.images:
        last = max(step for _, step, _ in f.images)
        for key, step, path in sorted(i for i in f.images if i[1] == last):
            local = Path(client.download_artifacts(f.run.info.run_id, path, str(out / ".download")))
            target = out / IMAGES / f"{key}-step{step}.png"
            shutil.copyfile(local, target)
            index = int(key.rsplit("_", 1)[-1]) if key.rsplit("_", 1)[-1].isdigit() else -1
            prompt = prompts[index] if 0 <= index < len(prompts) else key
            found.append((f"{IMAGES}/{target.name}", f"validation, step {step}: \u201c{prompt}\u201d"))
    if f.evaluation is not None:
        local = Path(client.download_artifacts(f.evaluation.info.run_id, "probe_grid.png", str(out / ".download")))
        shutil.copyfile(local, out / IMAGES / "probe_grid.png")
        found.append((f"{IMAGES}/probe_grid.png", "evaluation probe grid"))
    shutil.rmtree(out / ".download", ignore_errors=True)
    if not found:
        raise CardError(f"models:/{f.name}/{f.version}: its training run logged no validation image")
    return found


def write_folder(cfg: Config, uri: str, out: str | Path | None = None, repo_id: str | None = None) -> dict:
    """The Hub-ready folder of the version ``uri`` names (``repo_id``: where it is to be pushed, named in
    the card's usage example; default ``publish.repo_id``, else the folder itself); returns its path and files."""
    setup_tracking(cfg)
    mv = _model_version(uri)
    name, version = mv.name, str(mv.version)
    out = Path(out) if out else cfg.state_path("publish", f"{name}-v{version}")
    if out.exists():
        shutil.rmtree(out)
    resolved = fetch_model(f"models:/{name}/{version}", cfg.state_path("cache", "models"))
    shutil.copytree(resolved.pipeline_dir, out)
    single_file = f"{name}-v{version}.safetensors"
    export_version(cfg, f"models:/{name}/{version}", out / single_file, cfg.publish.precision)  # tags its size
    facts = collect(cfg, f"models:/{name}/{version}")
    facts.inference = shipped_inference(resolved.pipeline_dir).model_dump() | facts.inference
    images = _images(facts, out)
    repo_id = repo_id or cfg.publish.repo_id or str(out)
    (out / "README.md").write_text(render(facts, cfg, single_file, images, repo_id))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    return {"model": name, "version": version, "folder": str(out), "files": files, "base_model": facts.base_model}


def push_folder(folder: str | Path, repo_id: str, token: str, private: bool = False,
                message: str | None = None) -> str:
    """Create (or reuse) the Hub model repository and upload the folder as one commit; the commit URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=message or f"Upload {Path(folder).name} from the Terminus platform")
    return str(info.commit_url)
