"""SDXL base at its published size: the component configs, and the models built from a seed.

The configs are those of ``stabilityai/stable-diffusion-xl-base-1.0`` (``unet/``, ``vae/``, ``text_encoder/``,
``text_encoder_2/config.json``; keys left at their diffusers default omitted). They are the one copy the
platform has: the memory plan counts parameters from them, the GPU benchmark builds from them, and the
``sdxl-random`` model source builds SDXL at real size from them, offline.

``build_component`` builds one component on the meta device (accelerate's ``init_empty_weights``: shapes, no
storage), then gives each parameter storage and a seeded value (``seeded_init``), which takes seconds for
SDXL's 3.5 B parameters where the modules' own initialisers take minutes. The values follow PyTorch's
default scales (linear and convolution weights and biases with the variance of PyTorch's default
uniform(+-1/sqrt(fan_in)), drawn from a normal, which CPU generators draw twice as fast; unit norms;
N(0, 0.02) embeddings), so a forward pass stays finite; they carry no meaning. Every value is an fp16
number (drawn, then rounded to fp16 and held in the build's dtype), as SDXL's released weights are: a
pipeline saved from it stores the weights in fp16 without losing a bit (``sdxl.save_pipeline``), half the
bytes of fp32. Each parameter has its own
generator, seeded from the seed, the component's name and the parameter's, so a component is the same built
alone or with the others, in any order, on any number of threads.

Pure: torch, diffusers, transformers and accelerate only; no platform imports (bench/gpu_bench.py imports it
on a bare GPU host).
"""

from __future__ import annotations

import hashlib
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SDXL_UNET_CONFIG: dict = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 1280 (pooled text_encoder_2) + 6 * 256 (time ids)
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_UNET_PARAMS = 2_567_463_684
"""Parameters of the UNet built from ``SDXL_UNET_CONFIG`` (the SDXL paper's 2.6 B)."""
SDXL_TEXT_ENCODER_CONFIG: dict = dict(
    hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    projection_dim=768, vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
"""OpenAI CLIP ViT-L/14's text tower (123,060,480 parameters)."""
SDXL_TEXT_ENCODER_2_CONFIG: dict = dict(
    hidden_act="gelu", hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
    projection_dim=1280, vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
"""OpenCLIP ViT-bigG/14's text tower with its projection (694,659,840 parameters)."""
SDXL_VAE_CONFIG: dict = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3,
                             down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                             latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=1024,
                             scaling_factor=0.13025, force_upcast=True)
"""83,653,863 parameters."""

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
EMBEDDING_STD = 0.02
_NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm)


def empty_component(name: str) -> torch.nn.Module:
    """Component ``name`` of SDXL base on the meta device: parameters with shapes and no storage; buffers
    (CLIP's position ids) are real, as the model computes them."""
    # accelerate, diffusers and transformers on first use: importing this module loads torch alone
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    builders = {
        "unet": lambda: UNet2DConditionModel(**SDXL_UNET_CONFIG),
        "vae": lambda: AutoencoderKL(**SDXL_VAE_CONFIG),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG)),
    }
    if name not in builders:
        raise ValueError(f"SDXL component {name!r}: one of {', '.join(COMPONENTS)}")
    with init_empty_weights(include_buffers=False):
        return builders[name]()


def component_seed(seed: int, name: str) -> int:
    """The generator seed of component ``name``: a function of the model's seed and the name only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


VALUES_DTYPE = torch.float16
"""The precision every seeded value is a number of (the dtype SDXL base was released in)."""


def _fill(value: torch.Tensor, how: str, scale: float, seed: int) -> None:
    if how == "ones":
        value.fill_(1.0)
    elif how == "zeros":
        value.zero_()
    else:
        value.normal_(0.0, scale, generator=torch.Generator().manual_seed(seed))
        if value.dtype != VALUES_DTYPE:
            value.copy_(value.to(VALUES_DTYPE))


@torch.no_grad()
def seeded_init(module: torch.nn.Module, seed: int, dtype: torch.dtype = torch.float32,
                threads: int | None = None) -> torch.nn.Module:
    """Give every parameter of ``module`` CPU storage in ``dtype`` and a seeded value (module docstring for
    the scales). Each parameter draws from a generator of its own, seeded from ``seed`` and its name, so the
    result does not depend on ``threads`` (default: torch's intra-op thread count), which fill parameters
    side by side (the generators release the GIL)."""
    jobs = []
    for mname, sub in module.named_modules():
        weight = sub._parameters.get("weight")
        fan_in = math.prod(weight.shape[1:]) if weight is not None and weight.dim() >= 2 else None
        for pname, param in list(sub._parameters.items()):
            if param is None:
                continue
            value = torch.empty(param.shape, dtype=dtype)
            if isinstance(sub, _NORMS):
                how, scale = ("ones" if pname == "weight" else "zeros"), 0.0
            elif isinstance(sub, torch.nn.Embedding):
                how, scale = "normal", EMBEDDING_STD
            elif fan_in is not None:
                how, scale = "normal", 1.0 / math.sqrt(3 * fan_in)
            else:
                how, scale = "zeros", 0.0
            jobs.append((value, how, scale, component_seed(seed, f"{mname}.{pname}")))
            sub._parameters[pname] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
    jobs.sort(key=lambda job: -job[0].numel())  # the largest first: the threads end together
    with ThreadPoolExecutor(threads or torch.get_num_threads()) as pool:
        list(pool.map(lambda job: _fill(*job), jobs))
    return module


def build_component(name: str, seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Component ``name`` of SDXL base at real size with seeded weights in ``dtype``, in eval mode."""
    return seeded_init(empty_component(name), component_seed(seed, name), dtype).eval()


_VARIANT_RE = re.compile(r"\.(?P<variant>[A-Za-z0-9_]+)(?:-\d+-of-\d+)?\.safetensors$")


def weight_files(directory: str | Path, variant: str | None = None) -> list[Path]:
    """The weight files diffusers reads from a pipeline directory for ``variant``: each component's
    ``*.safetensors`` named with ``.<variant>.`` (or, for None, with no variant infix: ``model.safetensors``,
    ``diffusion_pytorch_model-00001-of-00002.safetensors``)."""
    found = []
    for component in COMPONENTS:
        for path in sorted((Path(directory) / component).glob("*.safetensors")):
            m = _VARIANT_RE.search(path.name)
            infix = m["variant"] if m and m["variant"] not in ("model", "diffusion_pytorch_model") else None
            if infix == variant:
                found.append(path)
    return found
