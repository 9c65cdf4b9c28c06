"""One loader for every SDXL-layout model the platform touches.

Sources (``model.source``): ``tiny`` (built offline from a fixed seed, wired exactly as SDXL),
``sdxl-random`` (SDXL base at its published size with seeded random weights, built offline:
``components.diffusion.sdxl_base``), a local
diffusers directory, a Hugging Face hub id (``model.revision``, ``model.variant``), an ``s3://`` prefix
fetched into a local cache (``components.storage.fetch_prefix``), or a single-file ``.safetensors``
checkpoint in the original SDXL layout -- a local path, an ``s3://`` object or an http(s) URL --
loaded with diffusers' ``from_single_file`` (the component configs from ``model.single_file_config``,
the scheduler from the preset). Registered versions (``models:/``) are resolved a layer up, by the
registry (``components.registry.model.load_source_parts``), into a directory this loader reads.

``describe_source`` says what a source is made of, for the lineage of a run: the kind, the resolved hub
commit, and a content hash of the weight files (``weights_sha256``).

Saved models are plain diffusers directories in safetensors whose scheduler carries the ZT-SNR
trailing v-prediction settings, so vanilla ``StableDiffusionXLPipeline.from_pretrained`` is correct.
Each component is stored at the narrowest precision that holds its weights exactly (``exact_dtype``: fp16
for weights that are fp16 numbers, as SDXL base's are; fp32 for trained ones); ``save_pipeline`` can add
a half-precision weight variant next to them (diffusers' ``variant=`` convention:
``diffusion_pytorch_model.fp16.safetensors``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from components.config import DiffusionConfig, ModelConfig, RecurringError, TinyModelConfig
from components.diffusion.safetensors_stream import copy_cast
from components.diffusion.schedule import inference_scheduler
from components.diffusion.sdxl_base import COMPONENTS, build_component, weight_files
from components.host_memory import release_memory
from components.storage import fetch_object, fetch_prefix, is_s3


class ModelLoadError(RecurringError):
    pass


@dataclass
class SDXLParts:
    """The SDXL parts, as ``StableDiffusionXLPipeline`` names them."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    force_zeros_for_empty_prompt: bool = True
    """The pipeline's convention for an empty prompt (SDXL: zeros); training's caption dropout follows it
    (``train.caption_dropout_mode``), and a saved pipeline records it (``model_index.json``)."""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# --- the tiny offline model ---------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with no merges (one token per character), built offline.

    transformers 5's CLIPTokenizer takes the vocabulary and merges themselves (``vocab=``,
    ``merges=``); ``model_max_length=77`` as SDXL, without which padding to max length overflows.
    """
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def build_tiny(cfg: TinyModelConfig) -> SDXLParts:
    """SDXL wiring at toy size: two CLIP encoders whose hidden sizes sum to the UNet's
    cross_attention_dim; ``text_time`` added embedding of pooled_dim + 6 * time_embed_dim."""
    torch.manual_seed(cfg.seed)
    text_cfg = dict(
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=cfg.text_layers,
        vocab_size=1000, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
        hidden_act="gelu",
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=cfg.text_hidden_1, **text_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=cfg.text_hidden_2, projection_dim=cfg.text_hidden_2, **text_cfg)
    )
    unet = UNet2DConditionModel(
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=cfg.addition_time_embed_dim,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=cfg.text_hidden_2 + 6 * cfg.addition_time_embed_dim,
        cross_attention_dim=cfg.text_hidden_1 + cfg.text_hidden_2,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=cfg.vae_channels,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
    )
    return SDXLParts(unet, vae, text_encoder, text_encoder_2, tiny_tokenizer(), tiny_tokenizer())


SDXL_RANDOM = "sdxl-random"


def build_sdxl_random(seed: int) -> SDXLParts:
    """SDXL base at real size (3.5 B parameters, fp32) with seeded random weights and the offline tokenizer
    (its ids fit SDXL's 49408-entry vocabulary)."""
    modules = {name: build_component(name, seed) for name in COMPONENTS}
    return SDXLParts(**modules, tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer())


# --- sources -----------------------------------------------------------------------------------

SINGLE_FILE_SUFFIX = ".safetensors"
REGISTERED_PREFIX = "models:/"


def attention_kind(unet: torch.nn.Module) -> str:
    """``sdpa`` when every attention layer of ``unet`` runs PyTorch's scaled_dot_product_attention
    (diffusers' ``AttnProcessor2_0``, its default), else the processor class names."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = getattr(unet, "attn_processors", {})
    if processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values()):
        return "sdpa"
    return ",".join(sorted({type(p).__name__ for p in processors.values()})) or "none"


def source_kind(source: str) -> str:
    """``tiny``, ``sdxl_random``, ``registered`` (models:/), ``single_file`` (a .safetensors path, s3:// object or URL),
    ``s3`` (a prefix), ``url`` (an http(s) address that is not a .safetensors file: refused),
    ``directory`` (local) or ``hub`` (anything else: a hub id, checked when loaded)."""
    if source == "tiny":
        return "tiny"
    if source == SDXL_RANDOM:
        return "sdxl_random"
    if source.startswith(REGISTERED_PREFIX):
        return "registered"
    if source.lower().split("?", 1)[0].endswith(SINGLE_FILE_SUFFIX):
        return "single_file"
    if is_s3(source):
        return "s3"
    if source.startswith(("http://", "https://")):
        return "url"
    if Path(source).expanduser().is_dir() or source.startswith((".", "/", "~")):
        return "directory"
    return "hub"


def resolve_source(source: str, cache_dir: str | Path) -> str:
    """A local directory for s3:// sources (downloaded into ``cache_dir/s3``); anything else as is."""
    if is_s3(source):
        try:
            return str(fetch_prefix(source, Path(cache_dir) / "s3"))
        except (FileNotFoundError, ValueError) as err:
            raise ModelLoadError(f"model source {source}: {err}") from None
    return source


def fetch_single_file(source: str, cache_dir: str | Path) -> Path:
    """The local path of a single-file checkpoint: as given, or downloaded into ``cache_dir`` (an
    ``s3://`` object under ``s3/``, an http(s) URL under ``url/<hash of the URL>/``).

    A URL is fetched again only when the server says the file changed: the cached copy's ETag goes out
    as ``If-None-Match`` and a 304 keeps it. Downloads land in ``.partial`` and are renamed when whole.
    """
    if is_s3(source):
        try:
            return fetch_object(source, Path(cache_dir) / "s3")
        except (FileNotFoundError, ValueError) as err:
            raise ModelLoadError(f"model source {source}: {err}") from None
    if source.startswith(("http://", "https://")):
        return _download_url(source, Path(cache_dir) / "url" / hashlib.sha256(source.encode()).hexdigest()[:16])
    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"model source {source} is not a file")
    return path


def _download_url(url: str, directory: Path) -> Path:
    import requests

    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    target, etag_path = directory / name, directory / (name + ".etag")
    headers = {}
    if target.is_file() and etag_path.is_file():
        headers["If-None-Match"] = etag_path.read_text()
    try:
        with requests.get(url, headers=headers, stream=True, timeout=60) as resp:
            if resp.status_code == 304:
                return target
            if resp.status_code != 200:
                raise ModelLoadError(f"model source {url}: the server answered {resp.status_code}")
            directory.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(name + ".partial")
            with partial.open("wb") as fh:
                for chunk in resp.iter_content(1 << 20):
                    fh.write(chunk)
            partial.replace(target)
            if resp.headers.get("ETag"):
                etag_path.write_text(resp.headers["ETag"])
            else:
                etag_path.unlink(missing_ok=True)
    except requests.RequestException as err:
        raise ModelLoadError(f"model source {url}: cannot download ({type(err).__name__})") from None
    return target


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import) or at import time.

    Offline, a hub id is looked up in the local cache only (``local_files_only``), so loading fails
    at once with one line instead of a connection attempt and a logged warning.
    """
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return now or bool(constants.HF_HUB_OFFLINE)


# --- lineage -------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(directory: str | Path, variant: str | None = None) -> str:
    """A content hash of a pipeline directory's weights: sha256 over each weight file's relative path and
    sha256, in order. The same weights give the same hash wherever they are stored (a registry copy, an
    s3 prefix, a hub snapshot)."""
    files = weight_files(directory, variant)
    if not files:
        raise ModelLoadError(f"{directory} has no {variant or 'full-precision'} safetensors weights")
    lines = "".join(f"{p.relative_to(directory).as_posix()}\0{file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def tensors_sha256(parts: SDXLParts | None = None, build=None) -> str:
    """A content hash of in-memory weights (the built models, which have no files): sha256 over every
    tensor's name, dtype, shape and bytes, module by module. ``build`` (a component name -> module function)
    instead of ``parts`` builds one component at a time and drops it once hashed, so the peak is the largest
    component, not the model."""
    digest = hashlib.sha256()
    for name in COMPONENTS:
        module = getattr(parts, name) if build is None else build(name)
        for key, value in sorted(module.state_dict().items()):
            value = value.detach().contiguous().cpu()
            digest.update(f"{name}.{key}|{value.dtype}|{tuple(value.shape)}".encode())
            digest.update(memoryview(value.view(torch.uint8).numpy()) if value.numel() else b"")
        del module
    return digest.hexdigest()


@dataclass
class SourceInfo:
    """What a run starts from: ``kind`` (``source_kind``), the source as given, where it was read
    (``location``), the resolved ``revision`` (a hub commit hash) and ``weights_sha256``.
    ``pinned`` is the model config that loads exactly these weights again (a hub source with its
    commit instead of a branch), which every worker of the run and the export use."""

    kind: str
    source: str
    location: str
    weights_sha256: str
    revision: str | None = None
    pinned: ModelConfig | None = None
    extra: dict = field(default_factory=dict)


def describe_source(model: ModelConfig, cache_dir: str | Path) -> SourceInfo:
    """Resolve and hash a non-registered source (the registry handles ``models:/``). A hub id is
    downloaded (or found in the cache when offline) with diffusers' own ``download`` and pinned to the
    commit its snapshot is; its weights hash covers the files of ``model.variant``."""
    source, kind = model.source, source_kind(model.source)
    if kind == "tiny":
        return SourceInfo(kind, source, "tiny", tensors_sha256(build_tiny(model.tiny)), pinned=model)
    if kind == "sdxl_random":
        digest = tensors_sha256(build=lambda name: build_component(name, model.seed))
        release_memory()  # 10 GB of UNet built and dropped: the caller (the training driver) goes on
        return SourceInfo(kind, source, SDXL_RANDOM, digest, pinned=model, extra={"seed": model.seed})
    if kind == "single_file":
        path = fetch_single_file(source, cache_dir)
        return SourceInfo(kind, source, str(path), file_sha256(path), pinned=model)
    if kind in ("s3", "directory"):
        location = resolve_source(source, cache_dir)
        if not Path(location).is_dir():
            raise ModelLoadError(f"model source {source} is not a directory")
        return SourceInfo(kind, source, location, weights_sha256(location, model.variant), pinned=model)
    if kind != "hub" or "/" not in source:
        raise ModelLoadError(f"model source {source!r} is neither 'tiny', 'sdxl-random', a directory, a hub id, "
                             "a .safetensors file, s3:// nor models:/")
    offline = hub_offline()
    try:
        snapshot = Path(StableDiffusionXLPipeline.download(
            source, revision=model.revision, variant=model.variant, use_safetensors=True, local_files_only=offline))
    except (OSError, ValueError) as err:
        raise ModelLoadError(_hub_error(source, err, offline)) from None
    commit = snapshot.name if snapshot.parent.name == "snapshots" else None
    pinned = model.model_copy(update={"revision": commit}) if commit else model
    return SourceInfo(kind, source, str(snapshot), weights_sha256(snapshot, model.variant), revision=commit,
                      pinned=pinned, extra={"requested_revision": model.revision or "main"})


def _hub_error(source: str, err: BaseException, offline: bool) -> str:
    if offline:
        return (f"model source {source!r} is a hub id, not in the local Hugging Face cache, and HF_HUB_OFFLINE is "
                "set: run where the hub is reachable with HF_HUB_OFFLINE unset, or use a local directory, a "
                ".safetensors file or an s3:// prefix")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"cannot load SDXL hub id (is the hub reachable?) {source!r}: {first}"


# --- loading -------------------------------------------------------------------------------------


def load_parts(model: ModelConfig, cache_dir: str | Path, source: str | None = None,
               diffusion: DiffusionConfig | None = None) -> SDXLParts:
    """The SDXL parts of ``source`` (default ``model.source``), in fp32 (the precision policy casts
    later). ``cache_dir`` holds downloads (s3://, URLs). ``diffusion`` (the preset's schedule) gives
    a single-file checkpoint its scheduler and is checked against the file's schedule markers."""
    source = source or model.source
    kind = source_kind(source)
    if kind == "tiny":
        return build_tiny(model.tiny)
    if kind == "sdxl_random":
        return build_sdxl_random(model.seed)
    if kind == "registered":
        raise ModelLoadError(f"model source {source}: a registered version is loaded through the registry "
                             "(components.registry.model.load_source_parts)")
    if kind == "single_file":
        pipe = load_single_file(fetch_single_file(source, cache_dir), model.single_file_config,
                                diffusion or DiffusionConfig())
        return _parts(pipe)
    if kind == "url":
        raise ModelLoadError(f"model source {source}: a URL must name a single-file .safetensors checkpoint")
    location = resolve_source(source, cache_dir)
    is_local = Path(location).is_dir()
    if not is_local and ("/" not in location or location.startswith((".", "/"))):
        raise ModelLoadError(f"model source {source!r} is neither 'tiny', 'sdxl-random', a directory, a hub id, "
                             "a .safetensors file, s3:// nor models:/")
    offline = not is_local and hub_offline()
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            location, revision=model.revision, variant=model.variant, use_safetensors=True,
            dtype=torch.float32, local_files_only=offline,
        )
    except (OSError, ValueError) as err:
        if not is_local:
            raise ModelLoadError(_hub_error(location, err, offline)) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot load SDXL directory {location!r}: {first}") from None
    return _parts(pipe)


def _parts(pipe: StableDiffusionXLPipeline) -> SDXLParts:
    return SDXLParts(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
                     bool(pipe.config.get("force_zeros_for_empty_prompt", True)))


def check_markers(path: str | Path, diffusion: DiffusionConfig) -> None:
    """A single file's schedule markers (``v_pred``, ``ztsnr``; docs/interchange.md) must not contradict
    the preset: a v-prediction checkpoint fine-tuned as epsilon (or the reverse of ztsnr) trains the
    wrong objective without any error. A file without markers is taken at the preset's word."""
    from components.diffusion.single_file import V_PRED_KEY, ZTSNR_KEY, read_keys

    try:
        keys = read_keys(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path} is not a safetensors file ({type(err).__name__})") from None
    if V_PRED_KEY in keys and diffusion.prediction_type.value != "v_prediction":
        raise ModelLoadError(f"{path} is a v-prediction checkpoint (it has the {V_PRED_KEY} key) but "
                             f"diffusion.prediction_type is {diffusion.prediction_type.value}")
    if ZTSNR_KEY in keys and not diffusion.zero_terminal_snr:
        raise ModelLoadError(f"{path} is a zero-terminal-SNR checkpoint (it has the {ZTSNR_KEY} key) but "
                             "diffusion.zero_terminal_snr is false")


def load_single_file(path: str | Path, config: str | None, diffusion: DiffusionConfig,
                     dtype: torch.dtype = torch.float32) -> StableDiffusionXLPipeline:
    """A single-file checkpoint through vanilla diffusers' ``from_single_file``.

    The file holds weights only; ``config`` (a local diffusers folder or a hub id) gives the component
    configs and tokenizers -- None lets diffusers pick SDXL base's from the hub (or its cache) -- and the
    scheduler is the preset's (``inference_scheduler``): the file does not say how it was trained
    beyond its markers, which are checked against the preset first.
    """
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    check_markers(path, diffusion)
    offline = hub_offline()
    try:
        return StableDiffusionXLPipeline.from_single_file(
            str(path), config=config, scheduler=inference_scheduler(diffusion), dtype=dtype,
            local_files_only=offline or (config is not None and Path(config).is_dir()),
        )
    except (OSError, ValueError, KeyError, RuntimeError, SingleFileComponentError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        where = f"with the configs of {config}" if config else \
            "with SDXL base's configs from the hub (set model.single_file_config to a local diffusers folder offline)"
        raise ModelLoadError(f"cannot load single-file checkpoint {path} {where}: {first}") from None


# --- saving --------------------------------------------------------------------------------------

HALF_VARIANTS = {"fp16": torch.float16, "bf16": torch.bfloat16}


@torch.no_grad()
def exact_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """fp16 (else bf16) when every floating tensor of an fp32 ``module`` survives the round trip through it
    bit for bit, so storing the module in it loses nothing; None otherwise (and for a module not in fp32)."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    if not tensors or any(t.dtype != torch.float32 for t in tensors):
        return None
    for dtype in HALF_VARIANTS.values():
        if all(torch.equal(t.to(dtype).to(torch.float32), t) for t in tensors):
            return dtype
    return None


def save_pipeline(parts: SDXLParts, diffusion: DiffusionConfig, directory: str | Path,
                  variant: str | None = None) -> Path:
    """A plain diffusers directory in safetensors with the ZT-SNR trailing v-prediction scheduler. Each model
    is written in the narrowest precision that holds it exactly (``exact_dtype``; the modules are cast for the
    write and back after it), else in fp32. With ``variant`` (``fp16`` or ``bf16``) the same weights also in
    that precision, next to those (``save_variant``)."""
    pipe = StableDiffusionXLPipeline(scheduler=inference_scheduler(diffusion), **parts.as_dict())
    narrowed = []
    for name in COMPONENTS:
        module = getattr(parts, name)
        if (dtype := exact_dtype(module)) is not None:
            narrowed.append(module.to(dtype))
    try:
        pipe.save_pretrained(str(directory), safe_serialization=True)
    finally:
        for module in narrowed:
            module.to(torch.float32)
    if variant is not None:
        save_variant(directory, variant)
    return Path(directory)


def save_variant(directory: str | Path, variant: str) -> Path:
    """Add the ``variant`` (``fp16`` or ``bf16``) weights to a saved directory, next to its plain ones, as
    ``from_pretrained(..., variant="fp16")`` reads them: per component one unsharded ``<name>.<variant>.safetensors``
    (``diffusion_pytorch_model.fp16.safetensors``, ``model.fp16.safetensors``) with the plain files' tensors
    under the same keys, cast as each is read and written (one tensor in memory at a time). The configs are
    not touched."""
    if variant not in HALF_VARIANTS:
        raise ValueError(f"weight variant {variant!r}: one of {sorted(HALF_VARIANTS)}")
    for component in COMPONENTS:
        files = [p for p in weight_files(directory, None) if p.parent.name == component]
        if not files:
            raise ModelLoadError(f"{Path(directory) / component} has no plain safetensors weights to make a variant of")
        stem = "diffusion_pytorch_model" if files[0].name.startswith("diffusion_pytorch_model") else "model"
        copy_cast(files, files[0].parent / f"{stem}.{variant}.safetensors", HALF_VARIANTS[variant])
    return Path(directory)
