"""The schema of the configuration tree: every section, field, default and cross-field rule.

Every field is documented here (``--print-config`` on any flow lists them with their defaults). Every
default lives here and nowhere else; derived values (state locations) are computed from ``state_dir``,
never repeated.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

REPO = Path(__file__).resolve().parents[2]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False,
                              use_attribute_docstrings=True)


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


class TrainMethod(enum.StrEnum):
    """What a fine-tune trains (docs/adapters.md)."""

    FULL = "full"  # every UNet weight (the recipe as Terminus XL Gamma v2 was made)
    LORA = "lora"  # a low-rank adapter beside the frozen UNet (peft LoRA: B @ A, scaled alpha / rank)
    LOKR = "lokr"  # a Kronecker-product adapter (peft LoKr, the LyCORIS method: kron(w1, w2), scaled alpha / rank)


class CropMode(enum.StrEnum):
    RANDOM = "random"
    CENTER = "center"


class MissingCaption(enum.StrEnum):
    """What an image gets when neither its caption column, a sidecar ``.txt`` nor the captioning model
    (``curate.captioner``) gave it a caption."""

    DROP = "drop"  # the image is dropped, counted under reason "no_caption"
    EMPTY = "empty"  # trained with the empty caption (it then only teaches the unconditional branch)
    FILENAME = "filename"  # the file stem, underscores as spaces


class LuminancePolicy(enum.StrEnum):
    """What ``filters.max_luminance`` does to an image above the cap (docs/recipe.md, "Luminance")."""

    DROP = "drop"  # drop it, counted as ``too_bright``
    CLAMP = "clamp"  # keep it darkened: RGB x (cap / mean luma), rounded; its row's ``luma_clamped`` is true


class SourceKind(enum.StrEnum):
    """How a curation source is read (docs/sources.md)."""

    FILES = "files"  # a folder, an s3:// prefix, or a manifest (.jsonl, .csv, .parquet) of image paths
    URLS = "urls"  # parquet of image URLs and their metadata (LAION's layout); images are downloaded
    HUGGINGFACE = "huggingface"  # a dataset in the Hugging Face Hub's parquet layout (image column + caption)
    WEBDATASET = "webdataset"  # webdataset tar shards: one sample per key (image member, .txt / .json caption)


class TinyModelConfig(Strict):
    """Sizes of the offline SDXL-layout model (same wiring as SDXL, a few thousand times smaller)."""

    seed: int = 0
    """Seed of the random initialisation (the same seed gives the same weights everywhere)."""
    unet_channels: tuple[int, int] = (32, 64)
    """Channels of the UNet's two down blocks; SDXL: (320, 640, 1280)."""
    text_hidden_1: int = Field(32, gt=0)
    """Hidden size of text encoder 1 (CLIPTextModel); SDXL: 768."""
    text_hidden_2: int = Field(32, gt=0)
    """Hidden size of text encoder 2 (CLIPTextModelWithProjection); SDXL: 1280."""
    text_layers: int = Field(3, gt=0)
    """Transformer layers of each text encoder; SDXL: 12 and 32."""
    addition_time_embed_dim: int = Field(8, gt=0)
    """SDXL: 256. The UNet's added embedding takes pooled_dim + 6 * this."""
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)
    """Four blocks, so the VAE downsamples by 8 as SDXL's does."""


class ModelDownloadConfig(Strict):
    """How an http(s) single-file ``model.source`` is downloaded (the guarded downloader of
    ``components/http_fetch.py``, as for URL sources' images): http(s) only at every redirect, no
    transparent decompression (an answer with a ``Content-Encoding`` is refused), bounded in size and time."""

    max_bytes: int = Field(16 * 2**30, gt=0)
    """Largest file accepted (by ``Content-Length``, else while reading): larger is refused and nothing is kept."""
    timeout_s: float = Field(4 * 3600.0, gt=0)
    """Seconds the whole download may take (every redirect, the headers and the whole body): past it the
    download is cut off and refused, however slowly the server keeps sending."""
    connect_timeout_s: float = Field(10.0, gt=0)
    """Seconds to connect."""
    read_timeout_s: float = Field(60.0, gt=0)
    """Seconds to wait for the headers, and for each next part of the body."""
    max_redirects: int = Field(5, ge=0)
    """Redirects followed; more (a loop) is refused."""
    allow_private_addresses: bool = False
    """Allow URLs (and redirects) whose host resolves to a loopback, private, link-local or reserved address.
    Off: a URL or a redirect cannot make the platform call into its own network (a cloud's instance-metadata
    endpoint, a service on the same host). Turn it on to serve models from 127.0.0.1 or a private network."""


class ModelConfig(Strict):
    """The SDXL model a run starts from."""

    source: str = "tiny"
    """``tiny`` (built offline), ``sdxl-random`` (SDXL base at its published size, 3.5 B parameters, seeded
    random weights, built offline: the real sizes without a download), a local diffusers directory, a Hugging
    Face hub id, an ``s3://`` prefix, a single-file ``.safetensors`` checkpoint in the original SDXL layout (a local
    path, an ``s3://`` object or an http(s) URL), or a registered version ``models:/NAME@ALIAS`` /
    ``models:/NAME/VERSION`` (continue from the champion). The run records its lineage: the source, the resolved
    revision and a content hash of the weights (docs/interchange.md)."""
    revision: str | None = None
    """Hub revision (a branch, tag or commit) of a hub id; None: the default branch. A run pins it to the
    commit it resolved to."""
    variant: str | None = None
    """diffusers weight variant to load (e.g. ``fp16``); None: the full-precision weights."""
    single_file_config: str | None = None
    """For a single-file ``model.source``: the diffusers folder (or hub id) whose component configs and
    tokenizers the file is read with (the file holds weights only); None: SDXL base's
    (``stabilityai/stable-diffusion-xl-base-1.0``, from the hub or the local Hugging Face cache). The
    scheduler always comes from the preset's ``diffusion`` section."""
    download: ModelDownloadConfig = ModelDownloadConfig()
    """How an http(s) ``model.source`` is downloaded."""
    tiny: TinyModelConfig = TinyModelConfig()
    """Sizes of the ``tiny`` model."""
    seed: int = 0
    """Seed of the ``sdxl-random`` weights (the same seed gives the same weights everywhere)."""


class DiffusionConfig(Strict):
    """The noise schedule and the loss, shared by training, validation and inference."""

    num_train_timesteps: int = Field(1000, gt=1)
    """T, the number of diffusion steps of the training schedule."""
    beta_start: float = Field(0.00085, gt=0)
    """SDXL's scaled-linear schedule starts here ..."""
    beta_end: float = Field(0.012, gt=0)
    """... and ends here (before the ZT-SNR rescale)."""
    beta_schedule: str = "scaled_linear"
    """diffusers ``beta_schedule`` name."""
    zero_terminal_snr: bool = True
    """Lin et al. 2023, Algorithm 1 (diffusers ``rescale_betas_zero_snr``)."""
    prediction_type: PredictionType = PredictionType.V
    """What the UNet predicts: ``v_prediction`` (the recipe) or ``epsilon``."""
    min_snr_gamma: float | None = Field(5.0, gt=0)
    """Hang et al. 2023; None turns min-SNR weighting off (plain MSE)."""
    terminal_policy: TerminalPolicy = TerminalPolicy.TERMINUS
    """Loss weight at SNR = 0: ``terminus`` (1.0) or ``paper`` (0); see TerminalPolicy."""


class InferenceConfig(Strict):
    """Defaults of every generation (validation images, evaluation, the registered model, Serve)."""

    steps: int = Field(30, ge=1, le=200)
    """Denoising steps (trailing spacing, so the first is t = 999)."""
    guidance_scale: float = Field(7.0, ge=0)
    """Classifier-free guidance scale."""
    guidance_rescale: float = Field(0.7, ge=0, le=1)
    """Lin et al. eq. 16; 0.7 keeps a ZT-SNR model's contrast."""
    height: int = Field(1024, gt=0, multiple_of=8)
    """Image height in pixels."""
    width: int = Field(1024, gt=0, multiple_of=8)
    """Image width in pixels."""
    inpaint_strength: float = Field(1.0, gt=0.0, le=1.0)
    """Inpainting: how far the masked area is noised before denoising. 1.0 starts from pure noise at
    t = 999, where a ZT-SNR model makes its full range (the card's headline use); outside the mask the
    input is kept as it is."""
    img2img_strength: float = Field(0.8, gt=0.0, lt=1.0)
    """Image-to-image: how far the whole image is noised (1.0 would ignore the image: under ZT-SNR t = 999
    holds no signal at all)."""


class FilterConfig(Strict):
    """The curation filters; each dropped image is counted under its reason."""

    max_pixels: int = Field(40_000_000, gt=0)
    """Decompression-bomb cap on the decoded pixel count."""
    require_exif: bool = False
    """Keep only images whose EXIF names a camera (Make, Model, DateTimeOriginal, LensModel or GPS)."""
    drop_edited: bool = False
    """Drop images whose EXIF Software names an editor in ``edited_software``."""
    edited_software: list[str] = ["photoshop", "gimp", "lightroom", "snapseed", "picsart", "facetune"]
    """Editors ``drop_edited`` looks for (case-insensitive substrings)."""
    max_watermark: float | None = Field(None, ge=0, le=1)
    """Keep rows whose ``pwatermark`` (source metadata) is <= this. A row without a score cannot be checked:
    it passes and is counted as ``unchecked`` in the report, unless ``require_watermark_check``."""
    require_watermark_check: bool = False
    """With ``max_watermark`` set, refuse rows that have no watermark score (reason ``watermark_unchecked``)
    instead of passing them unchecked: for users who need every kept image checked."""
    watermark_column: str = "pwatermark"
    """Metadata column with the watermark probability (LAION's name)."""
    max_punsafe: float | None = Field(None, ge=0, le=1)
    """Keep rows whose ``punsafe`` (LAION's NSFW probability) is <= this; rows without a score pass."""
    min_similarity: float | None = Field(None, ge=-1, le=1)
    """Keep rows whose ``similarity`` (LAION's CLIP image-text cosine similarity) is >= this; rows without
    a score pass."""
    max_luminance: float | None = Field(None, ge=0, le=1)
    """Cap on the image's mean luma: the mean over pixels of BT.709 Y' = 0.2126 R' + 0.7152 G' + 0.0722 B' of
    the gamma-encoded sRGB values / 255, in 0..1 (a uniform grey of 128 reads 0.502). Not relative (linear)
    luminance. The card: "Luminance value of samples capped to 100 (.5)". None: no cap."""
    luminance_policy: LuminancePolicy = LuminancePolicy.DROP
    """Above ``max_luminance``: ``drop`` the image (``too_bright``), or ``clamp`` it: multiply its RGB by
    cap / mean luma and round (a darkening, so nothing clips; the mean lands on the cap to within 0.5/255)
    and keep it, its row's ``luma_clamped`` true."""
    min_aspect: float = Field(0.25, gt=0)
    """Smallest width / height kept."""
    max_aspect: float = Field(4.0, gt=0)
    """Largest width / height kept."""
    dedupe: bool = True
    """Drop byte-identical images (the one with the smallest source URI stays)."""

    @model_validator(mode="after")
    def _check(self) -> FilterConfig:
        if self.min_aspect > self.max_aspect:
            raise ValueError(f"min_aspect {self.min_aspect} is above max_aspect {self.max_aspect}")
        return self


class BucketConfig(Strict):
    """SDXL aspect buckets: every curated image is downsampled (never up) and cropped to one."""

    area: int = Field(1024 * 1024, gt=0)
    """Target pixel area of every bucket (~1 MP for SDXL)."""
    step: int = Field(64, gt=0)
    """Bucket sides are multiples of this."""
    min_side: int = Field(512, gt=0)
    """Shortest bucket side."""
    max_side: int = Field(2048, gt=0)
    """Longest bucket side."""

    @model_validator(mode="after")
    def _check(self) -> BucketConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} is above max_side {self.max_side}")
        if self.min_side % self.step or self.max_side % self.step:
            raise ValueError("bucket min_side and max_side must be multiples of step")
        # The same rule as components.curation.buckets.make_buckets: some landscape bucket must exist.
        if not any(self.min_side <= (self.area // w) // self.step * self.step <= w
                   for w in range(self.min_side, self.max_side + 1, self.step)):
            raise ValueError(f"no bucket of area <= {self.area} has both sides in [{self.min_side}, {self.max_side}]")
        return self


SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SHORTHAND = ("source", "root", "path_column", "caption_column", "missing_caption", "filters")
"""The ``curate`` keys that describe its one source when ``curate.sources`` is empty."""
DEFAULT_SOURCE = "default"
"""The name of the one source the shorthand keys describe."""


class SourceConfig(Strict):
    """One source of a curation (an entry of ``curate.sources``): where its images are, how its rows are
    read, its own filters, and how often its images are drawn in training."""

    name: str
    """Name of the source (letters, digits, ``_.-``): in the report, the MLflow lineage, every curated
    row (``source_name``) and the training mixture."""
    kind: SourceKind = SourceKind.FILES
    """``files`` (a folder, s3:// prefix or manifest of paths), ``urls`` (parquet of image URLs and
    metadata, LAION's layout), ``huggingface`` (the Hub's parquet layout) or ``webdataset`` (tar shards);
    docs/sources.md."""
    location: str
    """``files``: a directory, an ``s3://`` prefix or a manifest (.jsonl, .csv, .parquet). ``urls``: a
    parquet file or a folder / ``s3://`` prefix of them. ``huggingface``: a local copy of a dataset
    repository, an ``s3://`` prefix holding one, or ``hf://datasets/<owner>/<name>`` (read from the Hub).
    ``webdataset``: a ``.tar`` shard, a folder or ``s3://`` prefix of them, a glob, or http(s) URLs of shards;
    each may be a brace pattern (``shards-{000..009}.tar``)."""
    root: str | None = None
    """``files`` manifests: what their paths are relative to (a directory, an ``s3://`` prefix or
    ``pkg:<package>/<dir>``); None: the manifest's directory. Paths outside it are ``path_escape``."""
    path_column: str = "path"
    """``files`` manifests: the column with each image's path."""
    url_column: str = "url"
    """``urls``: the column with each image's URL (matched case-insensitively, so LAION's ``URL`` too)."""
    image_column: str = "image"
    """``huggingface``: the image column: the Hub's image struct (bytes, path), raw bytes, a path inside
    the dataset, or an http(s) URL (downloaded like a ``urls`` source)."""
    split: str = "train"
    """``huggingface``: the split to read (files named after it, e.g. ``data/train-00000-of-00004.parquet``)."""
    caption_column: str = "caption"
    """The column with each image's caption (case-insensitive for parquet sources: LAION's ``TEXT``,
    a Hugging Face dataset's ``prompt``); for ``webdataset``, the field of a sample's ``.json`` member (else
    its ``.txt`` member is the caption)."""
    missing_caption: MissingCaption = MissingCaption.DROP
    """An image without a caption (no column value, no sidecar ``.txt``, no captioning model or an empty
    model caption): ``drop`` it, train it with the ``empty`` caption, or caption it with its ``filename``."""
    caption_with_model: bool = True
    """Caption this source's uncaptioned images with ``curate.captioner.model`` when one is configured."""
    filters: FilterConfig = FilterConfig()
    """This source's filter policy."""
    repeats: float = Field(1.0, ge=0)
    """The training mixture by repeats: how many times each image of this source is drawn per epoch (2: twice,
    0.5: a fresh random half each epoch, 0: never), so a source's share grows with its size. Recorded with the
    dataset; ``train.mixture`` overrides it. Set this or ``weight``, not both."""
    weight: float | None = Field(None, ge=0)
    """The training mixture by sampling probability: this source's share of each epoch's samples is
    weight / (sum of the sources' weights), whatever its size (``train.epoch_samples`` and
    ``train.mixture_replacement`` say how the epoch is drawn; docs/shuffle.md). Set on every source of the
    curation or on none; set this or ``repeats``, not both. None: the mixture is by ``repeats``."""

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        if self.weight is not None and "repeats" in self.model_fields_set:
            raise ValueError(f"source {self.name!r} sets both repeats and weight: set one (weight: a share of each "
                             "epoch; repeats: draws per image)")
        if not SOURCE_NAME.fullmatch(self.name):
            raise ValueError(f"source name {self.name!r}: letters, digits, '_', '.', '-' (at most 64), "
                             "starting with a letter or digit")
        if not self.location.strip():
            raise ValueError(f"source {self.name!r} has an empty location")
        if self.location.startswith("hf://") and self.kind in (SourceKind.FILES, SourceKind.WEBDATASET):
            raise ValueError(f"source {self.name!r}: an hf:// location is read as kind 'urls' or 'huggingface' "
                             "(a webdataset on the Hub: its https://huggingface.co/.../resolve/... shard URLs)")
        return self


class DownloadConfig(Strict):
    """How images of URL sources are downloaded (inside the curation tasks)."""

    threads: int = Field(16, ge=1)
    """Downloads in flight per curation task (the cluster's total: ``curate.workers`` x this)."""
    max_per_host: int = Field(16, ge=1)
    """Requests in flight to one host across the whole curation: each of the ``curate.workers`` tasks
    allows ``max(1, max_per_host // workers)``."""
    connect_timeout_s: float = Field(5.0, gt=0)
    """Seconds to connect."""
    timeout_s: float = Field(30.0, gt=0)
    """Seconds one attempt may take in all (connect, headers and the whole body), counted from when it holds
    its host's slot: a server that trickles bytes cannot hold a task. Past it: ``timeout``."""
    retries: int = Field(2, ge=0)
    """Further attempts after a connection error, a timeout, 429 or 5xx (never after another 4xx)."""
    backoff_s: float = Field(0.5, ge=0)
    """Wait before retry k is ``backoff_s * 2**k`` (plus up to 50% jitter)."""
    max_bytes: int = Field(32 * 2**20, gt=0)
    """Largest body accepted (by ``Content-Length``, else while reading): larger is ``too_large``."""
    max_redirects: int = Field(5, ge=0)
    """Redirects followed per attempt; more (a loop) is ``http_error``."""
    allow_private_addresses: bool = False
    """Allow URLs whose host resolves to a loopback, private, link-local or reserved address. Off: a
    metadata file cannot make the workers call into their own network (a cloud's instance-metadata
    endpoint). The tests, which serve from 127.0.0.1, turn it on."""
    user_agent: str = "terminus-curation/0.1"
    """The User-Agent of every request."""


class CaptionerConfig(Strict):
    """The optional captioning model for images that have no caption (a Ray Data actor pool)."""

    model: str | None = None
    """A transformers image-to-text model (a hub id such as ``Salesforce/blip-image-captioning-large`` or a
    local directory), ``tiny`` (a randomly initialised BLIP built offline, for tests), or None: no model."""
    revision: str | None = None
    """Hub revision of ``model``; None: the default branch."""
    workers: int = Field(1, ge=1)
    """Captioning actors, each holding the model."""
    num_gpus: float | None = Field(None, ge=0.0)
    """GPUs per captioning actor: None: one where the cluster has GPUs, else none (captions on CPU); 0:
    always on CPU; 1 (or a fraction, to share a GPU) as given."""
    batch_size: int = Field(8, ge=1)
    """Images per model call."""
    max_new_tokens: int = Field(40, ge=1)
    """Longest caption in tokens."""
    prompt: str | None = None
    """Text prefix for conditional captioning models (BLIP: ``a photography of``); None: none."""


class CurateConfig(Strict):
    """Curation on Ray Data: where images come from, how they are filtered, where shards go."""

    sources: list[SourceConfig] = []
    """The sources of one curation, each with its own filters and mixture weight (docs/sources.md). Empty:
    the one source the shorthand keys below describe (``source``, ``root``, ``path_column``,
    ``caption_column``, ``missing_caption``, ``filters``), named ``default``; setting both is an error."""
    source: str = "data/demo/manifest.jsonl"
    """One-source shorthand: a directory, an ``s3://bucket/prefix``, or a manifest (.jsonl, .csv, .parquet)."""
    root: str | None = None
    """One-source shorthand: what manifest paths are relative to: a directory, an ``s3://`` prefix, or
    ``pkg:<package>/<dir>`` (a directory inside an installed package, e.g. ``pkg:skimage/data``); None: the
    manifest's directory. Paths that resolve outside it are dropped as ``path_escape``."""
    output: str | None = None
    """Where the curated dataset is written (a directory or ``s3://`` prefix); None:
    ``<state_dir>/datasets/<name>``."""
    path_column: str = "path"
    """One-source shorthand: manifest column with each image's path."""
    caption_column: str = "caption"
    """One-source shorthand: manifest column with each image's caption."""
    missing_caption: MissingCaption = MissingCaption.DROP
    """One-source shorthand: what to do with an image that has no caption (no column value, no sidecar
    ``.txt``, no model caption): ``drop``, ``empty`` or ``filename`` (the file name, only when allowed here)."""
    filters: FilterConfig = FilterConfig()
    """One-source shorthand: the filters."""
    download: DownloadConfig = DownloadConfig()
    """Downloads of URL sources."""
    captioner: CaptionerConfig = CaptionerConfig()
    """The optional captioning model."""
    buckets: BucketConfig = BucketConfig()
    """The aspect buckets."""
    crop: CropMode = CropMode.RANDOM
    """Where the bucket's crop is taken (its top-left is recorded as SDXL's crop coordinates)."""
    jpeg_quality: int = Field(95, ge=1, le=100)
    """Quality of the curated JPEGs."""
    workers: int = Field(2, ge=1)
    """Curation tasks running at once (one CPU each)."""
    batch_size: int = Field(8, ge=1)
    """Records per call of a latent-encoding actor."""
    rows_per_shard: int = Field(256, ge=1)
    """At most this many records per curation task, each writing its own shards."""
    holdout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of kept images (chosen by content hash, so stable) set aside for validation."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, R2, a local server); None: ``AWS_ENDPOINT_URL_S3``, else AWS."""
    track: bool = True
    """Log the curation to MLflow (report, counts, and the dataset with its digest)."""
    cache_latents: bool = False
    """After curating, also cache VAE posteriors and text embeddings of ``model``."""
    cache_output: str | None = None
    """Where the latent cache goes; None: ``<output>-latents``."""
    cache_workers: int = Field(1, ge=1)
    """Latent-encoding actors, each holding the VAE and both text encoders."""
    cache_num_gpus: float = Field(0.0, ge=0.0)
    """GPUs per encoding actor: 0 encodes on CPU; 1 on a GPU cluster."""
    cache_dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of cached tensors (float16 halves a 1 MP row to ~0.6 MB)."""

    @model_validator(mode="after")
    def _check_sources(self) -> CurateConfig:
        if self.sources:
            both = sorted(k for k in SHORTHAND if k in self.model_fields_set)
            if both:
                raise ValueError(f"curate.sources is set, and so is the one-source shorthand {', '.join(both)}: "
                                 "describe every source under curate.sources")
            names = [s.name for s in self.sources]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"curate.sources: the name(s) {twice} are used twice")
            weighted = [s.name for s in self.sources if s.weight is not None]
            if weighted and len(weighted) < len(self.sources):
                unweighted = [s.name for s in self.sources if s.weight is None]
                raise ValueError(f"curate.sources: {weighted} set a weight and {unweighted} do not: set a weight "
                                 "on every source or on none")
            if weighted and not sum(s.weight for s in self.sources) > 0:
                raise ValueError("curate.sources: the weights sum to 0: give at least one source a weight above 0")
        return self

    def resolved_sources(self) -> list[SourceConfig]:
        """The sources of this curation: ``sources``, or the one the shorthand keys describe."""
        if self.sources:
            return list(self.sources)
        return [SourceConfig(name=DEFAULT_SOURCE, kind=SourceKind.FILES, location=self.source, root=self.root,
                             path_column=self.path_column, caption_column=self.caption_column,
                             missing_caption=self.missing_caption, filters=self.filters)]


class LRConfig(Strict):
    """The learning-rate schedule: linear warmup, then cosine from ``max`` down to ``min``."""

    max: float = Field(8e-7, gt=0)
    """Peak learning rate (the card: 8e-7)."""
    min: float = Field(4e-7, gt=0)
    """Floor the cosine reaches at the last step (the card: 4e-7)."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup before the cosine."""
    schedule: Literal["cosine", "cosine_restarts"] = "cosine"
    """``cosine``: one decay from ``max`` to ``min`` over the run (the card's "4e-7 to 8e-7, cosine");
    ``cosine_restarts``: a decay every ``restart_every`` steps, back to ``max`` after each (the v1 notes'
    "cosine ... every 3200 steps"). docs/recipe.md discusses both readings."""
    restart_every: int | None = Field(None, gt=1)
    """Period of ``cosine_restarts`` in optimizer steps (after warmup)."""

    @model_validator(mode="after")
    def _check(self) -> LRConfig:
        if self.min > self.max:
            raise ValueError(f"lr.min {self.min} is above lr.max {self.max}")
        if self.schedule == "cosine_restarts" and self.restart_every is None:
            raise ValueError("lr.schedule cosine_restarts needs lr.restart_every (optimizer steps per cycle)")
        return self


ADAPTER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
"""The UNet's attention projections: the modules diffusers' SDXL LoRA scripts adapt by default."""


class AdapterConfig(Strict):
    """The adapter of a ``train.method: lora | lokr`` run: the shape peft builds, and where it is registered."""

    rank: int = Field(16, ge=1)
    """Rank r: LoRA's inner dimension; LoKr's rank of its second Kronecker factor where that factor is
    decomposed (peft keeps a factor whole when r >= half of its larger side)."""
    alpha: float | None = Field(None, gt=0)
    """The update is scaled by alpha / rank (LoRA's lora_alpha, LoKr's alpha); None: alpha = rank (scale 1)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """LoRA: dropout on the adapter's input (lora_dropout); LoKr: rank dropout of the Kronecker update."""
    target_modules: list[str] = ADAPTER_TARGETS
    """UNet modules that get an adapter: names or name suffixes, as peft matches them (``to_q``, ``to_out.0``,
    ``proj_in``, ``ff.net.2``, ...); only Linear and Conv2d layers can take one."""
    decompose_factor: int = -1
    """LoKr: how each dimension is split into the two Kronecker factors (-1: as close to square as it divides)."""
    registered_model: str | None = None
    """Registered model the adapter's versions go to; None: ``<tracking.registered_model>-<method>``."""
    base_registered_model: str | None = None
    """An adapter names a registered base version. When ``model.source`` is not one (``tiny``, a folder, a hub id),
    the source's weights are registered first, once (found again by their content hash), under this name; None:
    ``<tracking.registered_model>-base``."""

    @model_validator(mode="after")
    def _check(self) -> AdapterConfig:
        if not self.target_modules:
            raise ValueError("adapter.target_modules is empty: name at least one UNet module (e.g. to_q)")
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(f"adapter.decompose_factor {self.decompose_factor}: -1 or a positive factor")
        return self

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class TrainConfig(Strict):
    """The fine-tune on Ray Train."""

    method: TrainMethod = TrainMethod.FULL
    """``full`` (every UNet weight trains), ``lora`` or ``lokr`` (only an adapter trains; the UNet beside it is frozen
    and kept in the compute dtype, bf16 under the recipe, like the text encoders). The recipe is the same for all
    three: schedule, loss, precision policy, crop conditioning, checkpoints, validation, registration."""
    adapter: AdapterConfig = AdapterConfig()
    """The adapter of a ``lora`` / ``lokr`` run."""

    data: str | None = None
    """The curated dataset to train on (a directory or ``s3://`` prefix); None: ``curate.output``."""
    batch_size: int = Field(24, gt=0)
    """Images per micro-batch on each worker (the card: 24)."""
    grad_accum: int = Field(15, gt=0)
    """Micro-batches accumulated per optimizer step (the card: 15)."""
    max_steps: int = Field(100, gt=0)
    """Optimizer steps (each is batch_size * grad_accum * num_workers samples)."""
    epochs: int | None = Field(None, gt=0)
    """If set, overrides max_steps from the dataset size."""
    lr: LRConfig = LRConfig()
    """The learning-rate schedule."""
    optimizer: OptimizerName = OptimizerName.ADAMW
    """``adamw``, ``adamw8bit`` (CUDA and bitsandbytes) or ``adafactor``."""
    weight_decay: float = Field(1e-2, ge=0)
    """Decoupled weight decay."""
    clip_grad_norm: float = Field(1.0, gt=0)
    """Gradients are clipped to this global norm."""
    precision: Precision = Precision.BF16
    """Compute precision of the UNet step: ``bf16`` (the recipe), ``fp16`` or ``fp32``. bf16 runs only where
    the device computes it natively; elsewhere the run falls back to fp32, says so in one line and
    records the precision it used (``components.diffusion.loss.effective_precision``)."""
    grad_checkpointing: bool = False
    """Recompute activations in backward (the card's batch 24 at 1 MP needs it on 80 GB)."""
    compile: bool = False
    """``torch.compile`` the UNet the step calls (after DDP/FSDP wrapping; the parameters stay the UNet's).
    The first step pays the compilation; the run logs ``compile_graph_breaks`` after it (0 is a whole graph)."""
    compile_backend: str = "inductor"
    """The ``torch.compile`` backend: ``inductor`` generates kernels (needs a C++ compiler on CPU, Triton on
    GPU); ``aot_eager`` traces forward and backward without generating code (a quick check of a model)."""
    fused_optimizer: bool = True
    """AdamW's fused kernel (one launch for every parameter) on devices torch has it for (CUDA, CPU, ...);
    elsewhere the per-tensor ``foreach`` implementation."""
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """EMA of the UNet weights with this decay (diffusers EMAModel); None: no EMA."""
    ema_on_cpu: bool = True
    """Keep the EMA copy in host memory."""
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0)
    """Probability that a sample's caption is dropped (trains the unconditional branch CFG uses)."""
    caption_dropout_mode: Literal["auto", "zeros", "empty_prompt"] = "auto"
    """How a dropped caption is fed: ``zeros`` (all-zero text embeddings, SDXL's
    ``force_zeros_for_empty_prompt``) or ``empty_prompt`` (the encoded empty prompt, time ids zeroed, as
    the trainer of the Terminus era did). ``auto`` follows the base model's own
    ``force_zeros_for_empty_prompt``; the saved pipeline records the choice, so inference's unconditional
    branch matches what training taught."""
    num_workers: int = Field(1, ge=1)
    """Ray Train workers (one per GPU on a GPU cluster)."""
    parallel: Parallel = Parallel.DDP
    """How several workers share the UNet (one worker: neither). FSDP does not combine with EMA."""
    use_gpu: bool = False
    """Each worker takes one GPU."""
    cpus_per_worker: float = Field(1, gt=0)
    """CPUs each worker reserves."""
    max_failures: int = Field(2, ge=0)
    """Worker-group restarts Ray Train makes after a failure that may not recur (a lost node); errors
    that would recur every time (a bad config or dataset) fail at once."""
    checkpoint_every: int = Field(50, gt=0)
    """Optimizer steps between checkpoints (validation runs at each one too)."""
    num_to_keep: int = Field(2, gt=0)
    """Checkpoints Ray keeps (the best by val_loss)."""
    val_every: int = Field(50, gt=0)
    """Optimizer steps between validation rounds."""
    val_timesteps: list[int] = [100, 200, 300, 400, 600, 700, 850, 999]
    """Fixed timesteps of the held-out loss (two per bucket of ``VAL_BUCKETS``, so every bucket is seen)."""
    select_metric: Literal["bucket_mse", "paper", "recipe"] = "bucket_mse"
    """What ``val_loss`` (checkpoint selection, the promotion gate) measures: ``bucket_mse``, the plain
    v-MSE averaged within each timestep bucket (0-250, 250-500, 500-750, 750-1000), then over buckets, so
    no timestep weighs more than 1/8; ``paper``, the min-SNR weights of Hang et al. (t = 999 weighs 0);
    ``recipe``, the training loss's own weights (under the ``terminus`` policy t = 999 weighs 1.0 and
    dominates). docs/recipe.md explains the choice."""
    val_max_rows: int = Field(64, gt=0)
    """Held-out rows used for the validation loss (the val split may be larger)."""
    val_prompts: list[str] = ["a photograph of an astronaut", "a cat on a sofa"]
    """Prompts of the validation images logged at each validation round."""
    val_image_size: int = Field(256, gt=0, multiple_of=8)
    """Side of the validation images."""
    val_steps: int = Field(10, gt=0)
    """Denoising steps of the validation images."""
    prefetch_batches: int = Field(4, ge=0)
    """Micro-batches taken, decoded and collated ahead of the step, in threads, in the plan's order (0: each
    on the training thread when the step asks for it). ``data_wait`` in the run's metrics is what is left."""
    prefetch_threads: int = Field(2, ge=1)
    """Threads preparing the prefetched micro-batches (JPEG decoding releases the GIL)."""
    in_memory_mb: float = Field(512, ge=0)
    """A training split up to this size (MB in memory) is read into Ray's object store once; each epoch is
    then a fresh global shuffle of it, read from there (an epoch costs well under a second). A larger one
    streams its shards from storage every epoch, in a fresh shard order with rows shuffled within
    ``shuffle_window``. 0: always stream. docs/shuffle.md."""
    shuffle_window: int = Field(4096, ge=1)
    """Streaming only: rows shuffled together, taken in the epoch's shard order (at least a few shards'
    worth; the shards of that many rows are held in memory at once)."""
    mixture: dict[str, float] | None = None
    """By source name, overriding the mixture the dataset was curated with, in its own terms: draws per image
    where its sources set ``repeats`` (``{laion-hd: 1, midjourney: 2}``), weights where they set ``weight``
    (``{laion-hd: 0.75, midjourney: 0.25}``). None: the curated values. A source left out keeps its own."""
    epoch_samples: int | None = Field(None, gt=0)
    """Weighted mixtures: rows drawn per epoch (before bucket batching drops its leftovers); None: the train
    split's row count. Rejected with a mixture by repeats, whose epoch is sum(repeats x rows)."""
    mixture_replacement: bool = False
    """Weighted mixtures: False draws each source's share as evenly as its rows allow (every row
    floor(n / rows) times, a fresh random n mod rows of them once more); True draws n rows independently
    with replacement."""
    log_flush_s: float = Field(10.0, ge=0)
    """Seconds between live writes of the metrics to MLflow while training runs (0: after every step)."""
    log_every: int = Field(1, gt=0)
    """Optimizer steps between progress lines on the console (rank 0)."""
    log_every_s: float = Field(30.0, gt=0)
    """... or at least this often, whichever comes first."""
    export_variant: Literal["fp16", "bf16"] | None = "fp16"
    """Half-precision weight variant registered next to the fp32 weights of every version (diffusers'
    ``variant=`` files, ``*.fp16.safetensors``); a CUDA server loads it, a CPU the fp32 weights. None: fp32 only."""
    select: Literal["best", "last"] = "best"
    """``best`` (lowest validation loss) or ``last`` checkpoint becomes the registered model."""
    export_memory_gb: float | None = Field(None, gt=0)
    """Memory the export reserves as a Ray task on a worker (the base model in fp32 plus the checkpoint,
    then writing the pipeline; ``flows/plan.py`` states the figure); None: the export runs in the driver
    process (a single machine)."""
    storage_path: str | None = None
    """Ray Train's storage for checkpoints (a directory or ``s3://`` prefix); None: ``<state_dir>/ray_results``."""
    run_name: str | None = None
    """Same name, same Ray storage and MLflow run: running again resumes. None: ``<name>-<timestamp>``."""

    @model_validator(mode="after")
    def _check_parallel(self) -> TrainConfig:
        if self.mixture and any(v < 0 for v in self.mixture.values()):
            raise ValueError(f"train.mixture {self.mixture}: draws per image cannot be negative")
        if self.parallel is Parallel.FSDP and self.ema_decay is not None:
            raise ValueError("train.ema_decay is not supported with train.parallel=fsdp (the EMA would need "
                             "the full weights on every rank); use ddp or set ema_decay to null")
        if self.parallel is Parallel.FSDP and self.method is not TrainMethod.FULL and self.num_workers > 1:
            raise ValueError(f"train.method={self.method.value} with train.parallel=fsdp: an adapter is small enough "
                             "to replicate; use train.parallel=ddp")
        return self

    @property
    def is_adapter(self) -> bool:
        return self.method is not TrainMethod.FULL

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.num_workers


class TrackingConfig(Strict):
    """MLflow: where runs and the registry live."""

    tracking_uri: str | None = None
    """None: ``MLFLOW_TRACKING_URI`` if set, else SQLite under the state directory."""
    experiment: str = "terminus"
    """MLflow experiment of every run."""
    registered_model: str = "terminus-tiny"
    """Registered model that training adds versions to."""


class PublishConfig(Strict):
    """A registered version as a Hugging Face Hub model repository (``flows/publish.py``)."""

    repo_id: str | None = None
    """Hub repository (``org/name``) ``--push`` uploads to; None: ``--repo-id`` must name it."""
    base_model: str | None = None
    """Hub id the model card names as ``base_model`` when the lineage starts from a copy of a Hub model that is
    not on the Hub itself (a local folder, s3://, a single file); None: the Hub id the lineage starts from (its
    hub source, or that of the registered version it continued from), else none (docs/interchange.md)."""
    license: str = "openrail++"
    """Licence of the card (SDXL's CreativeML Open RAIL++-M, which a fine-tune of it carries)."""
    author: str | None = None
    """Who the card and the single file name as the developer; None: the card says the Terminus platform."""
    precision: Literal["fp16", "bf16"] = "fp16"
    """Weight precision of the single-file checkpoint in the folder."""
    private: bool = False
    """Create the Hub repository private."""


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ServeConfig(Strict):
    """The Ray Serve endpoint (OpenAI Images API)."""

    model_uri: str | None = None
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; None: the registered model @champion."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds (loopback by default)."""
    port: int = Field(8000, ge=1, le=65535)
    """Port the HTTP proxy binds."""
    max_n: int = Field(4, ge=1)
    """Most images one request may ask for."""
    max_steps: int = Field(50, ge=1)
    """Most denoising steps one request may ask for."""
    max_side: int = Field(1024, gt=0)
    """Longest image side a request may ask for (pixels)."""
    max_prompt_chars: int = Field(1000, gt=0)
    """Longest prompt accepted, in characters."""
    max_upload_bytes: int = Field(8 * 1024 * 1024, gt=0)
    """Largest request body accepted."""
    body_timeout_s: float = Field(15.0, gt=0)
    """Longest the ingress waits for one request's body, from the moment the request reaches it; past it the
    request is answered 408 (``max_upload_bytes`` then needs about 4.5 Mbit/s). A body is awaited inside an
    ingress request slot, so this bounds how long a client that sends slowly holds one."""
    max_bodies_per_client: int = Field(8, ge=1)
    """Slow request bodies (still arriving 1 s after the request reached the ingress: ``deploy/app.py``
    ``BODY_GRACE_S``) one client address may have being received by one ingress replica at once; the next slow one
    is answered 429 + Retry-After, and a request arriving while the address has this many is refused so at once,
    unread (the address is the one the HTTP proxy reports: docs/reliability.md, Endpoint)."""
    max_bodies: int = Field(160, ge=1)
    """Slow request bodies one ingress replica receives at once, from all clients; past it 503 + Retry-After, as
    for ``max_bodies_per_client``. Kept below the Ingress deployment's ``max_ongoing_requests``
    (deploy/serve.yaml) by more than the model deployment's capacity, so that bodies being received never take the
    slots ``/healthz`` and the requests waiting on the model need (tests/unit/deploy/test_bodies.py checks it)."""
    default_size: int = Field(256, gt=0)
    """Image side when a request gives no size."""
    default_steps: int = Field(20, gt=0)
    """Denoising steps when a request gives none."""
    poll_alias_s: float = Field(2.0, ge=0)
    """How often a replica checks whether its alias moved (0: never; a pinned version never moves)."""
    compile: bool = False
    """``torch.compile`` each loaded version's UNet and run one warm-up generation (``default_size``,
    ``default_steps``) before the version takes traffic, at replica start and at every hot swap, so no user
    pays for the compilation. Other sizes compile on their first request."""
    compile_backend: str = "inductor"
    """The ``torch.compile`` backend for ``compile`` (``aot_eager``: traced, no generated code)."""
    api_key_env: str | None = None
    """Name of an env var holding a bearer token (surrounding whitespace of its value is ignored); None
    leaves the endpoint open (loopback default). An empty name is refused, never read as "no key"."""
    min_side: int = Field(64, gt=0)
    """Smallest image side a request may ask for (pixels)."""
    max_upload_pixels: int = Field(4096 * 4096, gt=0)
    """Decompression-bomb cap: an uploaded image whose header declares more pixels is refused undecoded."""
    max_batch_size: int = Field(4, ge=1)
    """``@serve.batch`` size (images of compatible requests run as one pipeline call); 1 turns batching off."""
    batch_wait_timeout_s: float = Field(0.02, ge=0.0)
    """How long a batch waits to fill before it runs."""
    retry_after_s: float = Field(1.0, ge=0)
    """Retry-After (seconds) on a 503 when Serve's backpressure config names none."""
    max_adapters_per_replica: int = Field(4, ge=1)
    """Adapters one model replica keeps attached to its base at once (Ray Serve's multiplexing LRU,
    ``@serve.multiplexed(max_num_models_per_replica=...)``): the least recently used is detached to make room."""

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} is above max_side {self.max_side}")
        if self.max_bodies_per_client > self.max_bodies:
            raise ValueError(f"max_bodies_per_client {self.max_bodies_per_client} is above max_bodies "
                             f"{self.max_bodies}")
        if self.api_key_env is not None and not ENV_NAME.fullmatch(self.api_key_env):
            # "" would read as "no key" and leave the endpoint open without a word; say so instead.
            raise ValueError(f"api_key_env {self.api_key_env!r} is not the name of an environment variable "
                             "(letters, digits, _); leave it null to serve without a key")
        return self


MIN_SAMPLES = {"val_loss": 8, "clip_score": 32, "fid": 2048, "kid": 100, "luminance_range": 8, "dark_spread": 8,
               "bright_spread": 8}
"""Default fewest samples per metric (``EvaluateConfig.min_samples``)."""


class EvaluateConfig(Strict):
    """Evaluation of a registered version: the numbers promotion is gated on."""

    dark_prompts: list[str] = ["a black cat in a dark room at night", "a starless night sky over a dark lake"]
    """Prompts of very dark scenes (the ZT-SNR dynamic-range probe)."""
    bright_prompts: list[str] = ["a white snowy field under a bright overcast sky", "a white sheet of paper"]
    """Prompts of very bright scenes."""
    seeds: list[int] = [0, 1]
    """Seeds of each probe prompt."""
    image_size: int = Field(256, gt=0, multiple_of=8)
    """Side of the probe images."""
    steps: int = Field(10, gt=0)
    """Denoising steps of the probe images."""
    blank_std: float = Field(0.01, ge=0)
    """An image whose pixel std (0..1 scale) is below this counts as blank."""
    prompts: str = "data/eval/prompts.jsonl"
    """The versioned prompt set of the quality metrics (one JSON object per line: prompt, category)."""
    num_prompts: int | None = Field(None, gt=0)
    """Use only the first N prompts of the set (None: all of them)."""
    clip_model: str = "tiny"
    """CLIP model of the CLIP score: a hub id or local directory (``openai/clip-vit-large-patch14`` gives the
    published numbers), or ``tiny``, a randomly initialised one built offline (the demo and the tests)."""
    fid_features: str = "tiny"
    """Feature extractor of FID and KID: ``inception`` (torchmetrics' InceptionV3, the published numbers;
    needs torch-fidelity and its weights, ``fid_weights`` for an offline file), a TorchScript module (a local
    path or an ``s3://`` object), or ``tiny``, a small randomly initialised conv net built offline (the demo
    and the tests). The evaluation records the weights' hash (``eval.features.fid``)."""
    fid_weights: str | None = None
    """The FID InceptionV3 weights file (pt_inception-2015-12-05: a local path or an ``s3://`` object), for
    ``fid_features: inception`` on a machine that cannot download them."""
    kid_subset_size: int = Field(50, gt=1)
    """KID's subset size (capped at the number of images)."""
    compare_champion: bool = True
    """Also evaluate the current champion on the same prompts and seeds (side-by-side grid and table)."""
    gate: dict[str, float] = {"val_loss": 0.05}
    """Promotion gate: metric -> the relative regression allowed against the reference (both measured under
    the same protocol). Known metrics and their better direction: val_loss, fid, kid (lower); clip_score,
    luminance_range, dark_spread, bright_spread (higher). ``val_loss`` is judged on its paired interval:
    refused when the interval's bound on the increase is above the tolerance. A gated metric that is missing,
    not finite, measured on fewer than ``min_samples`` or by a random feature model blocks promotion."""
    informational: list[str] = []
    """Metrics reported beside the gate that never decide (none of them may be in ``gate``)."""
    min_samples: dict[str, int] = MIN_SAMPLES
    """The fewest samples each metric is evidence on (docs/recipe.md, Evaluation): held-out rows for val_loss,
    generated images for the others. Metrics left out keep these defaults."""
    bootstrap_resamples: int = Field(2000, ge=100)
    """Resamples of the paired bootstrap interval of a mean (held-out loss, CLIP score)."""
    set_resamples: int = Field(200, ge=50)
    """Resamples of the paired bootstrap interval of a set statistic (FID, KID, the probe's spreads and range):
    each recomputes the statistic on resampled sets, an SVD of held-out x generated features for FID."""
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    """Confidence of the paired interval."""
    reference_alias: str = "champion"
    """What a promotion to any alias is judged against: the version holding this alias."""

    @field_validator("min_samples")
    @classmethod
    def _keep_default_minimums(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = set(value) - set(MIN_SAMPLES)
        if unknown:
            raise ValueError(f"unknown metric(s) {sorted(unknown)}; known: {sorted(MIN_SAMPLES)}")
        if any(n < 1 for n in value.values()):
            raise ValueError("each minimum is at least 1 sample")
        return {**MIN_SAMPLES, **value}


GATE_DIRECTIONS = {"val_loss": -1, "fid": -1, "kid": -1, "clip_score": 1, "luminance_range": 1,
                   "dark_spread": 1, "bright_spread": 1}
"""Metrics the promotion gate can hold against the champion: +1 higher is better, -1 lower is better."""


class Config(Strict):
    """Everything a flow needs, in one tree."""

    name: str = "tiny"
    """Name of the preset (names the default dataset and run names)."""
    seed: int = 0
    """Seed of data order, crops and training noise."""
    state_dir: str = ".state"
    """Where this platform keeps its state (the MLflow store, datasets, checkpoints, exports, caches);
    every state location below defaults to a place under it."""
    model: ModelConfig = ModelConfig()
    """The base model."""
    diffusion: DiffusionConfig = DiffusionConfig()
    """The schedule and the loss."""
    inference: InferenceConfig = InferenceConfig()
    """Generation defaults."""
    curate: CurateConfig = CurateConfig()
    """Curation."""
    train: TrainConfig = TrainConfig()
    """Training."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow."""
    serve: ServeConfig = ServeConfig()
    """Serving."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Evaluation and the promotion gate."""
    publish: PublishConfig = PublishConfig()
    """Hub-ready folders and model cards."""

    @model_validator(mode="after")
    def _derive(self) -> Config:
        """Cross-section checks, then the state locations left unset, derived from ``state_dir``."""
        last = self.diffusion.num_train_timesteps - 1
        bad = [t for t in self.train.val_timesteps if not 0 <= t <= last]
        if bad:
            raise ValueError(f"train.val_timesteps {bad} outside 0..{last}")
        if not self.serve.min_side <= self.serve.default_size <= self.serve.max_side:
            raise ValueError(f"serve.default_size {self.serve.default_size} outside "
                             f"[serve.min_side, serve.max_side] = [{self.serve.min_side}, {self.serve.max_side}]")
        unknown = set(self.evaluate.gate) - set(GATE_DIRECTIONS)
        if unknown:
            raise ValueError(f"evaluate.gate: unknown metric(s) {sorted(unknown)}; known: {sorted(GATE_DIRECTIONS)}")
        both = set(self.evaluate.gate) & set(self.evaluate.informational)
        if both:
            raise ValueError(f"evaluate: {sorted(both)} both gated and informational: an informational metric "
                             "never decides, so drop it from evaluate.gate")
        if self.curate.output is None:
            self.curate.output = _under(self.state_dir, "datasets", self.name)
        if self.train.data is None:
            self.train.data = self.curate.output
        if self.train.storage_path is None:
            self.train.storage_path = _under(self.state_dir, "ray_results")
        return self

    @property
    def adapter_model_name(self) -> str:
        """Where an adapter run registers its versions (``train.adapter.registered_model``)."""
        return self.train.adapter.registered_model or f"{self.tracking.registered_model}-{self.train.method.value}"

    @property
    def base_model_name(self) -> str:
        """Where an adapter run registers an unregistered base (``train.adapter.base_registered_model``)."""
        return self.train.adapter.base_registered_model or f"{self.tracking.registered_model}-base"

    def state_path(self, *parts: str) -> Path:
        """An absolute path under the state directory."""
        return Path(self.state_dir).expanduser().resolve().joinpath(*parts)

    def digest(self) -> str:
        """Stable hash of the resolved config (recorded as lineage)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]



def _under(root: str, *parts: str) -> str:
    """``root/parts`` for a local path or an ``s3://`` prefix."""
    return "/".join([root.rstrip("/"), *parts])
