"""The one typed configuration tree shared by every flow.

Presets are YAML files under ``flows/configs/`` validated on load; unknown keys are rejected
everywhere, so a YAML that names a parameter which no longer exists fails at once.
Every default lives here and nowhere else; derived values are properties, never repeated.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)


class PredictionType(enum.StrEnum):
    V = "v_prediction"
    EPSILON = "epsilon"


class TerminalPolicy(enum.StrEnum):
    """Min-SNR weight where SNR == 0 (only the terminal step of a ZT-SNR schedule).

    ``paper``: Hang et al.'s formula as written, weight 0 (v) -- t = T-1 gets no gradient.
    ``terminus``: weight 1.0, what the trainer Terminus XL Gamma v2 was made with did (Dec 2023).
    """

    PAPER = "paper"
    TERMINUS = "terminus"


class Precision(enum.StrEnum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class OptimizerName(enum.StrEnum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw8bit"
    ADAFACTOR = "adafactor"


class Parallel(enum.StrEnum):
    DDP = "ddp"  # replicated weights, gradients all-reduced (torch DistributedDataParallel)
    FSDP = "fsdp"  # weights, gradients and optimizer states sharded (torch FSDP2 fully_shard)


class CropMode(enum.StrEnum):
    RANDOM = "random"
    CENTER = "center"


class MissingCaption(enum.StrEnum):
    DROP = "drop"  # the image is dropped, counted under reason "no_caption"
    EMPTY = "empty"  # trained with the empty caption (it then only teaches the unconditional branch)
    FILENAME = "filename"  # the file stem, underscores as spaces


class TinyModelConfig(Strict):
    """Sizes of the offline SDXL-layout model (same wiring as SDXL, a few thousand times smaller)."""

    seed: int = 0
    unet_channels: tuple[int, int] = (32, 64)
    text_hidden_1: int = 32
    """Hidden size of text encoder 1 (CLIPTextModel); SDXL: 768."""
    text_hidden_2: int = 32
    """Hidden size of text encoder 2 (CLIPTextModelWithProjection); SDXL: 1280."""
    text_layers: int = 3
    addition_time_embed_dim: int = 8
    """SDXL: 256. The UNet's added embedding takes pooled_dim + 6 * this."""
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)
    """Four blocks, so the VAE downsamples by 8 as SDXL's does."""


class ModelConfig(Strict):
    source: str = "tiny"
    """``tiny`` (built offline), a local diffusers directory, a hub id, or an ``s3://`` prefix."""
    revision: str | None = None
    variant: str | None = None
    tiny: TinyModelConfig = TinyModelConfig()


class DiffusionConfig(Strict):
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    zero_terminal_snr: bool = True
    """Lin et al. 2023, Algorithm 1 (diffusers ``rescale_betas_zero_snr``)."""
    prediction_type: PredictionType = PredictionType.V
    min_snr_gamma: float | None = 5.0
    """Hang et al. 2023; None turns min-SNR weighting off (plain MSE)."""
    terminal_policy: TerminalPolicy = TerminalPolicy.TERMINUS


class InferenceConfig(Strict):
    steps: int = Field(30, ge=1, le=200)
    guidance_scale: float = 7.0
    guidance_rescale: float = 0.7
    """Lin et al. eq. 16; 0.7 keeps a ZT-SNR model's contrast."""
    height: int = 1024
    width: int = 1024
    strength: float = Field(0.8, gt=0.0, le=1.0)
    """img2img / inpainting: how far the input image is noised before denoising."""


class FilterConfig(Strict):
    max_pixels: int = 40_000_000
    """Decompression-bomb cap on the decoded pixel count."""
    require_exif: bool = False
    drop_edited: bool = False
    edited_software: list[str] = ["photoshop", "gimp", "lightroom", "snapseed", "picsart", "facetune"]
    max_watermark: float | None = None
    """Keep rows whose manifest ``pwatermark`` is <= this; rows without the column pass."""
    watermark_column: str = "pwatermark"
    """Manifest column with the watermark probability (LAION's name)."""
    max_luminance: float | None = None
    """Mean Rec. 709 relative luminance (0..1) of the sRGB pixel values, at most this."""
    min_aspect: float = 0.25
    max_aspect: float = 4.0
    dedupe: bool = True


class BucketConfig(Strict):
    area: int = 1024 * 1024
    """Target pixel area of every bucket (~1 MP for SDXL)."""
    step: int = 64
    min_side: int = 512
    max_side: int = 2048

    @model_validator(mode="after")
    def _check(self) -> BucketConfig:
        if self.min_side % self.step or self.max_side % self.step:
            raise ValueError("bucket min_side and max_side must be multiples of step")
        # The same rule as components.curation.buckets.make_buckets: some landscape bucket must exist.
        if not any(self.min_side <= (self.area // w) // self.step * self.step <= w
                   for w in range(self.min_side, self.max_side + 1, self.step)):
            raise ValueError(f"no bucket of area <= {self.area} has both sides in [{self.min_side}, {self.max_side}]")
        return self


class CurateConfig(Strict):
    source: str = "data/demo/manifest.jsonl"
    """A directory, an ``s3://bucket/prefix``, or a manifest (.jsonl, .csv, .parquet)."""
    root: str | None = None
    """What manifest paths are relative to: a directory, an ``s3://`` prefix, or ``pkg:<package>/<dir>``
    (a directory inside an installed package, e.g. ``pkg:skimage/data``); None: the manifest's directory.
    Paths that resolve outside it are dropped as ``path_escape``."""
    output: str = ".state/datasets/demo"
    path_column: str = "path"
    caption_column: str = "caption"
    missing_caption: MissingCaption = MissingCaption.FILENAME
    filters: FilterConfig = FilterConfig()
    buckets: BucketConfig = BucketConfig()
    crop: CropMode = CropMode.RANDOM
    jpeg_quality: int = 95
    workers: int = Field(2, ge=1)
    """Curation tasks running at once (one CPU each)."""
    batch_size: int = Field(8, ge=1)
    """Records per call of a latent-encoding actor."""
    rows_per_shard: int = Field(256, ge=1)
    """At most this many records per curation task, each writing its own shards."""
    holdout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of kept images (chosen by content hash, so stable) set aside for validation."""
    s3_endpoint_url: str | None = None
    track: bool = True
    """Log the curation to MLflow (report, counts, and the dataset with its digest)."""
    cache_latents: bool = False
    """After curating, also cache VAE posteriors and text embeddings of ``model`` (issue 4 item 6)."""
    cache_output: str | None = None
    """Where the latent cache goes; None: ``<output>-latents``."""
    cache_workers: int = Field(1, ge=1)
    """Latent-encoding actors, each holding the VAE and both text encoders."""
    cache_num_gpus: float = Field(0.0, ge=0.0)
    """GPUs per encoding actor: 0 encodes on CPU; 1 on a GPU cluster."""
    cache_dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of cached tensors (float16 halves a 1 MP row to ~0.6 MB)."""


class LRConfig(Strict):
    max: float = 8e-7
    min: float = 4e-7
    warmup_steps: int = 0


class TrainConfig(Strict):
    data: str = ".state/datasets/demo"
    batch_size: int = 24
    grad_accum: int = 15
    max_steps: int = 100
    """Optimizer steps (each is batch_size * grad_accum * num_workers samples)."""
    epochs: int | None = None
    """If set, overrides max_steps from the dataset size."""
    lr: LRConfig = LRConfig()
    optimizer: OptimizerName = OptimizerName.ADAMW
    weight_decay: float = 1e-2
    clip_grad_norm: float = 1.0
    precision: Precision = Precision.BF16
    grad_checkpointing: bool = False
    ema_decay: float | None = None
    ema_on_cpu: bool = True
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0)
    num_workers: int = 1
    parallel: Parallel = Parallel.DDP
    """How several workers share the UNet (one worker: neither). FSDP does not combine with EMA."""
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 2
    checkpoint_every: int = 50
    num_to_keep: int = 2
    val_every: int = 50
    val_timesteps: list[int] = [100, 300, 500, 700, 900, 999]
    val_max_rows: int = 64
    """Held-out rows used for the validation loss (the val split may be larger)."""
    val_prompts: list[str] = ["a photograph of an astronaut", "a cat on a sofa"]
    val_image_size: int = 256
    val_steps: int = 10
    select: str = "best"
    """``best`` (lowest validation loss) or ``last`` checkpoint becomes the registered model."""
    storage_path: str = ".state/ray_results"
    run_name: str | None = None
    """Same name, same Ray storage and MLflow run: running again resumes."""

    @model_validator(mode="after")
    def _check_parallel(self) -> TrainConfig:
        if self.parallel is Parallel.FSDP and self.ema_decay is not None:
            raise ValueError("train.ema_decay is not supported with train.parallel=fsdp (the EMA would need "
                             "the full weights on every rank); use ddp or set ema_decay to null")
        return self

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.num_workers


class TrackingConfig(Strict):
    tracking_uri: str | None = None
    """None: ``MLFLOW_TRACKING_URI`` if set, else SQLite under the state directory."""
    experiment: str = "terminus"
    registered_model: str = "terminus-tiny"


class ServeConfig(Strict):
    model_uri: str | None = None
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; None: the registered model @champion."""
    host: str = "127.0.0.1"
    port: int = 8000
    max_n: int = 4
    max_steps: int = 50
    max_side: int = 1024
    max_prompt_chars: int = 1000
    max_upload_bytes: int = 8 * 1024 * 1024
    default_size: int = 256
    default_steps: int = 20
    poll_alias_s: float = 2.0
    api_key_env: str | None = None
    """Name of an env var holding a bearer token; None leaves the endpoint open (loopback default)."""
    min_side: int = 64
    """Smallest image side a request may ask for (pixels)."""
    max_upload_pixels: int = 4096 * 4096
    """Decompression-bomb cap: an uploaded image whose header declares more pixels is refused undecoded."""
    max_batch_size: int = Field(4, ge=1)
    """``@serve.batch`` size (images of compatible requests run as one pipeline call); 1 turns batching off."""
    batch_wait_timeout_s: float = Field(0.02, ge=0.0)
    """How long a batch waits to fill before it runs."""
    retry_after_s: float = 1.0
    """Retry-After (seconds) on a 503 when Serve's backpressure config names none."""


class EvaluateConfig(Strict):
    dark_prompts: list[str] = ["a black cat in a dark room at night", "a starless night sky over a dark lake"]
    bright_prompts: list[str] = ["a white snowy field under a bright overcast sky", "a white sheet of paper"]
    seeds: list[int] = [0, 1]
    image_size: int = 256
    steps: int = 10
    blank_std: float = 0.01
    """An image whose pixel std (0..1 scale) is below this counts as blank."""
    tolerance: float = 0.05
    """Relative val_loss regression allowed against the champion at promotion."""


class Config(Strict):
    name: str = "tiny"
    seed: int = 0
    state_dir: str = ".state"
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    inference: InferenceConfig = InferenceConfig()
    curate: CurateConfig = CurateConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    serve: ServeConfig = ServeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    def state_path(self, *parts: str) -> Path:
        """An absolute path under the state directory (``TERMINUS_STATE_DIR`` overrides ``state_dir``)."""
        root = Path(os.environ.get("TERMINUS_STATE_DIR", self.state_dir)).expanduser().resolve()
        return root.joinpath(*parts)

    def digest(self) -> str:
        """Stable hash of the resolved config (recorded as lineage)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class ConfigError(ValueError):
    pass


def _set_path(tree: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset, apply ``key.path=value`` overrides (YAML-typed), validate the whole tree."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), raw)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"invalid config at {where}: {first['msg']} ({err.error_count()} error(s))") from None
