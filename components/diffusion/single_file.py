"""Single-file SDXL checkpoints: the original (SGM/LDM) key layout that ComfyUI, A1111 and Forge load.

One ``.safetensors`` holds the four models under the prefixes of Stability AI's ``generative-models``
code (``docs/interchange.md`` lists them): the UNet under ``model.diffusion_model.``, the OpenAI CLIP-L
text encoder under ``conditioner.embedders.0.transformer.``, the OpenCLIP bigG text encoder under
``conditioner.embedders.1.model.`` and the VAE under ``first_stage_model.``.

The diffusers -> original mapping is the inverse of the original -> diffusers conversion that diffusers
ships (``diffusers.loaders.single_file_utils``): its key tables (``DIFFUSERS_TO_LDM_MAPPING``) are
used as they are, and its per-block renames (``update_unet_resnet_ldm_to_diffusers``,
``update_vae_attentions_ldm_to_diffusers``, ``convert_open_clip_checkpoint``) are inverted here,
numbered from the model's own config instead of SDXL's fixed block counts (diffusers' reverse script,
``scripts/convert_diffusers_to_original_sdxl.py``, hard-codes three levels of two layers), so the tiny
model and SDXL go through the same code. Every key of a model must match exactly one rule; an unknown
key raises instead of passing through under its diffusers name (a wrong key is a silent bug in the
UIs). ``tests/unit/diffusion/test_single_file.py`` proves the mapping with diffusers' own converters,
on the tiny model's weights and on a full-size SDXL built on the meta device.

Two empty tensors mark the schedule (``docs/interchange.md``): ``v_pred`` (ComfyUI and A1111 then run
the model as v-prediction) and ``ztsnr`` (zero-terminal-SNR sampling). The header carries Stability
AI's ModelSpec metadata (``modelspec.*``).

Pure: no MLflow, no platform code beyond this package (the registry's export calls it).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from components.diffusion.safetensors_stream import DTYPES as DTYPES_BY_NAME
from components.diffusion.safetensors_stream import Entry, entries, iter_tensors, read_header, write_tensors
from components.diffusion.sdxl_base import weight_files

UNET_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"
CLIP_L_POSITION_IDS = CLIP_L_PREFIX + "text_model.embeddings.position_ids"
CLIP_G_LOGIT_SCALE = CLIP_G_PREFIX + "logit_scale"
OPENCLIP_LOGIT_SCALE = math.log(100.0)
"""OpenCLIP clamps its contrastive logit scale at ln 100 and bigG's trained value sits at the clamp; SDXL
base stores it (4.6055, ln 100 in fp16). No text-to-image path reads it; it is written so the file has
the original key set (docs/interchange.md)."""

ARCHITECTURE = "stable-diffusion-xl-v1-base"
IMPLEMENTATION = "sgm"
MODELSPEC_VERSION = "1.0.0"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
"""diffusers ResnetBlock2D -> the original ResBlock: the inverse of diffusers'
``update_unet_resnet_ldm_to_diffusers`` renames."""
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
"""diffusers' VAE mid-block Attention -> the original AttnBlock: the inverse of
``update_vae_attentions_ldm_to_diffusers``. The original's q, k, v and proj_out are 1x1 convolutions."""
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
"""transformers CLIPEncoderLayer -> OpenCLIP ResidualAttentionBlock (diffusers'
``DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"]`` renames, per layer); q, k and v are one
``attn.in_proj`` in OpenCLIP (``convert_open_clip_checkpoint`` splits it in that order)."""


class UnmappedKeyError(ValueError):
    """A diffusers key that no rule of the original layout covers."""


def _diffusers_tables() -> dict:
    # diffusers on first use: reading a file's keys and header (the preflight checks) needs torch alone
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    return DIFFUSERS_TO_LDM_MAPPING


# --- UNet ----------------------------------------------------------------------------------------


def _unet_key(key: str, layers: int, up_attention: set[int], top: Mapping[str, str]) -> str:
    """The original key of one diffusers UNet key. ``layers``: layers per down block (an up block has one
    more); ``up_attention``: the up blocks that have attentions (their upsampler sits one slot later)."""
    if key in top:
        return top[key]
    per = layers + 1  # original input/output_blocks per level: the layers, then the down/upsampler
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = 1 + i * per + j
        return f"input_blocks.{slot}.0.{_resnet(rest, key)}" if kind == "resnets" else f"input_blocks.{slot}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2], key)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = i * per + j
        return f"output_blocks.{slot}.0.{_resnet(rest, key)}" if kind == "resnets" else f"output_blocks.{slot}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        i = int(m[1])
        return f"output_blocks.{i * per + layers}.{2 if i in up_attention else 1}.conv.{m[2]}"
    raise UnmappedKeyError(f"UNet key {key!r} has no place in the original SDXL layout")


def _resnet(rest: str, key: str) -> str:
    name, _, leaf = rest.rpartition(".")
    if name not in _UNET_RESNET:
        raise UnmappedKeyError(f"UNet key {key!r}: unknown resnet part {name!r}")
    return f"{_UNET_RESNET[name]}.{leaf}"


def convert_unet(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict -> the original keys (without ``UNET_PREFIX``)."""
    tables = _diffusers_tables()["unet"]
    top = {**tables["layers"], **tables["addition_embed_type"]}
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise UnmappedKeyError(f"layers_per_block {layers!r}: the original layout needs one count for every level")
    up_attention = {int(k.split(".")[1]) for k in state_dict if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    return {_unet_key(k, layers, up_attention, top): v for k, v in state_dict.items()}


def original_unet_module(module: str, config: Mapping) -> str:
    """The original (SGM) name of one diffusers UNet module (``down_blocks.1.attentions.0.proj_in`` ->
    ``input_blocks.4.1.proj_in`` in SDXL), by the same rules as its weights' keys (``convert_unet``). The kohya
    adapter layout names modules this way (components/diffusion/kohya.py)."""
    tables = _diffusers_tables()["unet"]
    top = {**tables["layers"], **tables["addition_embed_type"]}
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise UnmappedKeyError(f"layers_per_block {layers!r}: the original layout needs one count for every level")
    up_attention = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    return _unet_key(module + ".weight", layers, up_attention, top).removesuffix(".weight")


# --- VAE -----------------------------------------------------------------------------------------


def _vae_key(key: str, levels: int, top: Mapping[str, str]) -> tuple[str, bool]:
    """(original key, whether the tensor is a linear weight the original stores as a 1x1 convolution)."""
    if key in top:
        return top[key], False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        rest = m[3].replace("conv_shortcut", "nin_shortcut")
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{rest}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        if m[2] not in _VAE_ATTENTION:
            raise UnmappedKeyError(f"VAE key {key!r}: unknown attention part {m[2]!r}")
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}", m[2] != "group_norm" and m[3] == "weight"
    raise UnmappedKeyError(f"VAE key {key!r} has no place in the original SDXL layout")


def convert_vae(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict -> the original keys (without ``VAE_PREFIX``)."""
    top = _diffusers_tables()["vae"]
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in state_dict.items():
        new, conv = _vae_key(key, levels, top)
        out[new] = value.reshape(*value.shape, 1, 1) if conv else value
    return out


# --- text encoders -------------------------------------------------------------------------------


def convert_clip_l(state_dict: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModel`` -> the original keys (without ``CLIP_L_PREFIX``): the original
    keeps the transformers names under ``text_model.`` (transformers 5.6+ dropped that level from the
    module) plus the ``position_ids`` buffer, which SDXL base stores as int64 [1, 77]."""
    out = {f"text_model.{k.removeprefix('text_model.')}": v for k, v in state_dict.items()}
    positions = config.max_position_embeddings
    out["text_model.embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64).unsqueeze(0)
    return out


def convert_clip_g(state_dict: Mapping[str, torch.Tensor], config=None) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModelWithProjection`` -> OpenCLIP's keys (without ``CLIP_G_PREFIX``):
    q, k, v concatenated into ``in_proj`` (that order), the projection transposed (OpenCLIP multiplies
    ``x @ text_projection``), plus the ``logit_scale`` SDXL base stores."""
    top = {k.removeprefix("text_model."): v for k, v in _diffusers_tables()["openclip"]["layers"].items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        bare = key.removeprefix("text_model.")
        if bare in top:
            out[top[bare]] = value.T.contiguous() if bare == "text_projection.weight" else value
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", bare)
        if m is None:
            raise UnmappedKeyError(f"text encoder 2 key {key!r} has no place in the OpenCLIP layout")
        layer, part, leaf = m[1], m[2], m[3]
        if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer, leaf), {})[part[10]] = value
        elif part in _OPENCLIP_LAYER:
            out[f"transformer.resblocks.{layer}.{_OPENCLIP_LAYER[part]}.{leaf}"] = value
        else:
            raise UnmappedKeyError(f"text encoder 2 key {key!r}: unknown layer part {part!r}")
    for (layer, leaf), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise UnmappedKeyError(f"text encoder 2 layer {layer}: q, k and v {leaf}s are not all there")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    out["logit_scale"] = torch.tensor(OPENCLIP_LOGIT_SCALE, dtype=torch.float32)
    return out


# --- the whole checkpoint ------------------------------------------------------------------------


def to_original(unet, vae, text_encoder, text_encoder_2, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The four models' weights as one state dict in the original SDXL layout, floating tensors cast to
    ``dtype`` (the int64 ``position_ids`` stay int64, as in SDXL base)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, converted in (
        (UNET_PREFIX, convert_unet(unet.state_dict(), unet.config)),
        (VAE_PREFIX, convert_vae(vae.state_dict(), vae.config)),
        (CLIP_L_PREFIX, convert_clip_l(text_encoder.state_dict(), text_encoder.config)),
        (CLIP_G_PREFIX, convert_clip_g(text_encoder_2.state_dict(), text_encoder_2.config)),
    ):
        for key, value in converted.items():
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            out[prefix + key] = value
    return out


def schedule_markers(prediction_type: str, zero_terminal_snr: bool) -> dict[str, torch.Tensor]:
    """``v_pred`` for a v-prediction model, and ``ztsnr`` with it when the schedule is zero-terminal-SNR:
    empty float tensors, as ComfyUI's own checkpoint saver writes them (``torch.tensor([])``). ComfyUI
    reads ``ztsnr`` only alongside ``v_pred``."""
    if prediction_type != "v_prediction":
        return {}
    markers = {V_PRED_KEY: torch.tensor([])}
    if zero_terminal_snr:
        markers[ZTSNR_KEY] = torch.tensor([])
    return markers


def modelspec(title: str, resolution: tuple[int, int], prediction_type: str, date: str,
              **optional: str | None) -> dict[str, str]:
    """ModelSpec metadata (Stability AI's ``modelspec.*`` header keys, docs/interchange.md): the MUST
    keys, the image keys, and any of the SHOULD/CAN keys given (``description``, ``author``,
    ``license``, ``usage_hint``, ``tags``, ...; None is left out). ``modelspec.predict_key`` repeats the
    prediction type under the name ComfyUI's checkpoint saver uses."""
    pred = "v" if prediction_type == "v_prediction" else "epsilon"
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": ARCHITECTURE,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.prediction_type": pred,
        "modelspec.predict_key": pred,
        "modelspec.date": date,
    }
    meta.update({f"modelspec.{k}": str(v) for k, v in optional.items() if v is not None})
    return meta


def data_sha256(path: str | Path) -> str:
    """ModelSpec's ``hash_sha256``: sha256 of everything after the header (the tensor bytes), ``0x``-prefixed."""
    path = Path(path)
    size, _ = read_header(path)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        fh.seek(8 + size)
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return "0x" + digest.hexdigest()


HASH_KEY = "modelspec.hash_sha256"


def save_single_file(state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str]) -> Path:
    """Write ``state_dict`` with ``metadata`` plus ``modelspec.hash_sha256`` of its tensor bytes (the header is
    written first with a placeholder of the hash's width, filled in once the data is written). The file
    appears at ``path`` only when complete."""
    layout = [Entry.of(k, v) for k, v in state_dict.items()]
    return write_tensors(path, layout, state_dict.items(), metadata, hash_key=HASH_KEY)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (header only, no tensor is read)."""
    return dict(read_header(path)[1].get("__metadata__") or {})


def read_keys(path: str | Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor key of a safetensors file with its dtype and shape (header only)."""
    return {k: (v["dtype"], v["shape"]) for k, v in read_header(path)[1].items() if k != "__metadata__"}


class SingleFileExportError(ValueError):
    """A pipeline that cannot be written as a single file vanilla diffusers reads back correctly."""


_CONVERTERS = (("unet", UNET_PREFIX, convert_unet), ("vae", VAE_PREFIX, convert_vae),
               ("text_encoder", CLIP_L_PREFIX, convert_clip_l), ("text_encoder_2", CLIP_G_PREFIX, convert_clip_g))


def _component_files(pipeline_dir: Path, component: str) -> list[Path]:
    files = [p for p in weight_files(pipeline_dir) if p.parent.name == component]
    if not files:
        raise SingleFileExportError(f"{pipeline_dir / component} has no full-precision safetensors weights")
    return files


def _component_config(pipeline_dir: Path, component: str):
    if component.startswith("text_encoder"):
        from transformers import CLIPTextConfig  # transformers on first use (see _diffusers_tables)

        return CLIPTextConfig.from_pretrained(str(pipeline_dir / component))
    return json.loads((pipeline_dir / component / "config.json").read_text())


def _converted(component: str, convert, config, state: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = convert(state, config)
    state.clear()  # the converted dict holds what is still needed (the UNet's tensors are the same objects)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}


def export_pipeline(pipeline_dir: str | Path, path: str | Path, precision: str = "fp16", *, title: str,
                    date: str, resolution: tuple[int, int], metadata: Mapping[str, str] | None = None,
                    **modelspec_optional: str | None) -> Path:
    """A saved diffusers pipeline directory -> one ``.safetensors`` in the original SDXL layout.

    Streams: the layout is worked out from the weight files' headers (the conversion run on meta tensors),
    written first, and the four models follow one at a time, each read from its fp32 files tensor by tensor
    and cast to ``precision`` (``fp16``, ``bf16`` or ``fp32``) as it is read, then written and let go tensor
    by tensor. The peak is about the largest model in ``precision`` plus one tensor, never the pipeline. The
    schedule markers come from the directory's own scheduler (what the model was trained with); ``metadata``
    adds keys outside ModelSpec.
    """
    if precision not in DTYPES:
        raise SingleFileExportError(f"precision {precision!r}: one of {sorted(DTYPES)}")
    pipeline_dir, dtype = Path(pipeline_dir), DTYPES[precision]
    configs = {name: _component_config(pipeline_dir, name) for name, _, _ in _CONVERTERS}
    widths = configs["text_encoder"].hidden_size, configs["text_encoder_2"].hidden_size
    if widths[0] == widths[1]:
        raise SingleFileExportError(
            f"both text encoders are {widths[0]} wide: diffusers' from_single_file tells SDXL's two encoders apart "
            "by width (768 and 1280) and would read the first into the second (docs/interchange.md)")
    files = {name: _component_files(pipeline_dir, name) for name, _, _ in _CONVERTERS}
    sched = json.loads((pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
    markers = schedule_markers(sched["prediction_type"], bool(sched.get("rescale_betas_zero_snr", False)))

    layout: list[Entry] = []
    for name, prefix, convert in _CONVERTERS:
        meta_state = {e.key: torch.empty(e.shape, dtype=DTYPES_BY_NAME[e.dtype], device="meta")
                      for f in files[name] for e in entries(f)}
        for key, value in _converted(name, convert, configs[name], meta_state, dtype).items():
            layout.append(Entry.of(prefix + key, value))
    layout += [Entry.of(k, v) for k, v in markers.items()]

    def produce():
        for name, prefix, convert in _CONVERTERS:
            state = {k: v for f in files[name] for k, v in iter_tensors(f, dtype)}
            converted = _converted(name, convert, configs[name], state, dtype)
            while converted:
                key = next(iter(converted))
                yield prefix + key, converted.pop(key)
        yield from markers.items()

    meta = modelspec(title, resolution, sched["prediction_type"], date, **modelspec_optional)
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    return write_tensors(path, layout, produce(), meta, hash_key=HASH_KEY)
