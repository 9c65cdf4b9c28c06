"""One loader for every SDXL-layout model the platform touches, and the saver of the pipelines it makes.

``load_parts`` reads any model source (``components.diffusion.sources``: the offline builds, a diffusers
directory, a hub id, an ``s3://`` prefix, a single-file checkpoint loaded with diffusers'
``from_single_file``, its component configs from ``model.single_file_config``, the scheduler from the
preset) into ``SDXLParts`` in fp32.

Saved models are plain diffusers directories in safetensors whose scheduler carries the ZT-SNR
trailing v-prediction settings, so vanilla ``StableDiffusionXLPipeline.from_pretrained`` is correct.
Each component is stored at the narrowest precision that holds its weights exactly (``exact_dtype``: fp16
for weights that are fp16 numbers, as SDXL base's are; fp32 for trained ones); ``save_pipeline`` can add
a half-precision weight variant next to them (diffusers' ``variant=`` convention:
``diffusion_pytorch_model.fp16.safetensors``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import SingleFileComponentError
from diffusers.models.attention_processor import AttnProcessor2_0

from components.config import DiffusionConfig, ModelConfig
from components.diffusion.parts import ModelLoadError, SDXLParts
from components.diffusion.safetensors_stream import copy_cast
from components.diffusion.schedule import inference_scheduler
from components.diffusion.sdxl_base import COMPONENTS, weight_files
from components.diffusion.single_file import V_PRED_KEY, ZTSNR_KEY, read_keys
from components.diffusion.source_kinds import hub_offline, source_kind
from components.diffusion.sources import fetch_single_file, hub_error, resolve_source
from components.diffusion.tiny import build_sdxl_random, build_tiny


def attention_kind(unet: torch.nn.Module) -> str:
    """``sdpa`` when every attention layer of ``unet`` runs PyTorch's scaled_dot_product_attention
    (diffusers' ``AttnProcessor2_0``, its default), else the processor class names."""
    processors = getattr(unet, "attn_processors", {})
    if processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values()):
        return "sdpa"
    return ",".join(sorted({type(p).__name__ for p in processors.values()})) or "none"



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
                             "(components.registry.model_sources.load_source_parts)")
    if kind == "single_file":
        pipe = load_single_file(fetch_single_file(source, cache_dir, model.download), model.single_file_config,
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
            raise ModelLoadError(hub_error(location, err, offline)) from None
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
SHARD_SIZE = "1GB"
"""The largest weight file ``save_pipeline`` writes per component (diffusers' and transformers' ``max_shard_size``).
diffusers and transformers load a sharded model one file at a time, so a reader holds the model in its target
dtype plus one shard as stored: with SDXL's UNet in one 5 GB fp16 file, loading it in fp32 peaked at the fp32 model
plus the whole fp16 state dict; in 1 GB shards the surplus is at most 1 GB."""


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
                  variant: str | None = None, max_shard_size: str | int = SHARD_SIZE) -> Path:
    """A plain diffusers directory in safetensors with the ZT-SNR trailing v-prediction scheduler. Each model
    is written in the narrowest precision that holds it exactly (``exact_dtype``; the modules are cast for the
    write and back after it), else in fp32, in files of at most ``max_shard_size`` (``SHARD_SIZE``). With
    ``variant`` (``fp16`` or ``bf16``) the same weights also in that precision, next to those (``save_variant``)."""
    pipe = StableDiffusionXLPipeline(scheduler=inference_scheduler(diffusion), **parts.as_dict())
    narrowed = []
    for name in COMPONENTS:
        module = getattr(parts, name)
        if (dtype := exact_dtype(module)) is not None:
            narrowed.append(module.to(dtype))
    try:
        pipe.save_pretrained(str(directory), safe_serialization=True, max_shard_size=max_shard_size)
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
