"""Adapters as one ``.safetensors`` in kohya's layout, which ComfyUI, A1111 and Forge load (docs/adapters.md).

kohya-ss/sd-scripts (``networks/lora.py``) trains SDXL on its own copy of the original (SGM) UNet and names each
adapted module ``lora_unet_`` + its module path with every ``.`` as ``_``: diffusers'
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` is SGM's
``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` and the file's
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``. The SGM path comes from the rules of the single-file
export (``single_file.original_unet_module``). Per module:

- LoRA: ``.lora_down.weight`` (peft's ``lora_A``), ``.lora_up.weight`` (``lora_B``) and ``.alpha`` (a scalar);
  kohya scales the update by alpha / rank, as peft does with ``lora_alpha / r``.
- LoKr (LyCORIS' layout, which sd-scripts and ComfyUI read): ``.lokr_w1`` or ``.lokr_w1_a``/``_b``, ``.lokr_w2`` or
  ``.lokr_w2_a``/``_b``, and ``.alpha``. LyCORIS scales by alpha / rank only when a factor is decomposed (rank read
  off ``lokr_w2_b`` or ``lokr_w1_b``); with both factors whole it applies no scale, while peft always applies
  alpha / r. For whole factors the scale is therefore multiplied into ``lokr_w1`` and alpha is written as the rank.

The header carries sd-scripts' ``ss_*`` keys (its minimum set -- ``ss_v2``, ``ss_base_model_version``,
``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``, ``ss_network_args`` -- plus the training facts an
adapter manager shows) and ModelSpec's (``modelspec.architecture`` ``stable-diffusion-xl-v1-base/lora``, as sd-scripts
writes it for every SDXL network), with ``terminus.*`` provenance naming the base.

Pure: tensors and strings in, a file out; the registry's export calls it (components/registry/export.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from components.diffusion.adapters import AdapterError, AdapterWeights, rank_alpha
from components.diffusion.single_file import DTYPES, MODELSPEC_VERSION, original_unet_module, save_single_file

UNET_PREFIX = "lora_unet_"
LORA_SUFFIXES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
"""sd-scripts' ``determine_architecture`` for an SDXL network (LoRA and LyCORIS alike)."""
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
"""sd-scripts' ``determine_implementation`` for an SDXL network."""
BASE_MODEL_VERSION = "sdxl_base_v1-0"
"""sd-scripts' ``MODEL_VERSION_SDXL_BASE_V1_0``, its ``ss_base_model_version`` for SDXL."""
NETWORK_MODULE = {"lora": "networks.lora", "lokr": "lycoris.kohya"}
"""``ss_network_module``: sd-scripts' own LoRA, or LyCORIS through its kohya wrapper (``ss_network_args`` says the
algorithm)."""


def module_name(module: str, unet_config: Mapping) -> str:
    """kohya's name of a diffusers UNet module."""
    return UNET_PREFIX + original_unet_module(module, unet_config).replace(".", "_")


def _split(key: str, suffixes) -> tuple[str, str]:
    for suffix in suffixes:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise AdapterError(f"adapter key {key!r} is neither LoRA nor LoKr (no known peft suffix)")


def _check_plain(config) -> None:
    """Refuse what the kohya layout cannot say: per-module ranks or alphas, rank-stabilised or DoRA scaling,
    LoKr's Tucker (effective conv) core."""
    for attr in ("rank_pattern", "alpha_pattern"):
        if getattr(config, attr, None):
            raise AdapterError(f"adapter has a {attr}: one rank and alpha per file only")
    for attr in ("use_rslora", "use_dora", "use_effective_conv2d", "decompose_both"):
        if getattr(config, attr, False):
            raise AdapterError(f"adapter uses {attr}, which this export does not write")


def to_kohya(weights: AdapterWeights, unet_config: Mapping,
             dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under kohya's keys (floating tensors cast to ``dtype``; alphas stay float32)."""
    _check_plain(weights.config)
    rank, alpha = rank_alpha(weights.config)
    method = weights.method
    out: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.state.items():
        module, suffix = _split(key, LORA_SUFFIXES if method == "lora" else LOKR_SUFFIXES)
        modules.setdefault(module, {})[suffix] = value
    for module, parts in modules.items():
        name = module_name(module, unet_config)
        cast = (lambda t: t.to(dtype) if dtype is not None else t)  # noqa: E731
        if method == "lora":
            if set(parts) != set(LORA_SUFFIXES):
                raise AdapterError(f"LoRA module {module}: has {sorted(parts)}, needs lora_A and lora_B")
            for suffix, value in parts.items():
                out[f"{name}.{LORA_SUFFIXES[suffix]}"] = cast(value).contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            continue
        whole = "lokr_w1" in parts and "lokr_w2" in parts
        parts = dict(parts)
        if whole and alpha != rank:  # LyCORIS applies no scale to whole factors: carry peft's alpha / r in w1
            parts["lokr_w1"] = parts["lokr_w1"] * (alpha / rank)
        for suffix, value in parts.items():
            out[f"{name}.{suffix}"] = cast(value).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(rank) if whole else alpha, dtype=torch.float32)
    return out


def metadata(weights: AdapterWeights, *, title: str, date: str, resolution: tuple[int, int], prediction_type: str,
             base_name: str, training: Mapping[str, object] | None = None, provenance: Mapping[str, str] | None = None,
             **modelspec_optional: str | None) -> dict[str, str]:
    """sd-scripts' ``ss_*`` keys, ModelSpec's ``modelspec.*`` keys and ``terminus.*`` provenance, all strings
    (safetensors headers hold strings only; sd-scripts writes ``str(value)`` too)."""
    rank, alpha = rank_alpha(weights.config)
    method = weights.method
    args = {"algo": "lokr", "factor": str(weights.config.decompose_factor)} if method == "lokr" else {}
    meta: dict[str, object] = {
        "ss_network_module": NETWORK_MODULE[method], "ss_network_dim": rank, "ss_network_alpha": alpha,
        "ss_network_args": json.dumps(args), "ss_v2": False, "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_sd_model_name": base_name, "ss_output_name": title,
        "ss_network_dropout": getattr(weights.config, "lora_dropout", getattr(weights.config, "rank_dropout", 0.0)),
        **{f"ss_{k}": v for k, v in (training or {}).items()},
    }
    pred = "v" if prediction_type == "v_prediction" else "epsilon"
    meta.update({
        "modelspec.sai_model_spec": MODELSPEC_VERSION, "modelspec.architecture": ARCHITECTURE,
        "modelspec.implementation": IMPLEMENTATION, "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}", "modelspec.prediction_type": pred,
        "modelspec.date": date,
    })
    meta.update({f"modelspec.{k}": v for k, v in modelspec_optional.items() if v is not None})
    meta.update(provenance or {})
    return {k: str(v) for k, v in meta.items()}


def export_kohya(weights: AdapterWeights, unet_config: Mapping, path: str | Path, meta: Mapping[str, str],
                 precision: str = "fp16") -> Path:
    """Write the kohya-layout file (``modelspec.hash_sha256`` added over its tensor bytes, as the single-file
    export does)."""
    if precision not in DTYPES:
        raise AdapterError(f"precision {precision!r}: one of {sorted(DTYPES)}")
    return save_single_file(to_kohya(weights, unet_config, DTYPES[precision]), path, meta)
