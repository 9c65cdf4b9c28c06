"""The one inference-pipeline factory shared by validation, evaluation and Serve.

Text-to-image, image-to-image and inpainting share one set of weights (diffusers ``from_pipe``).
The scheduler is always the ZT-SNR one (trailing spacing, v-prediction, rescaled betas), whatever
the loaded directory says, and CFG rescale defaults to 0.7 (Lin et al. 2023, eq. 16).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from components.config import DiffusionConfig, InferenceConfig
from components.diffusion import inference_scheduler
from components.models import Components


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_DEFAULTS = InferenceConfig()  # defaults live in the config tree only; read here, never repeated


@dataclass
class GenerationRequest:
    """One generation. Unset settings take ``InferenceConfig``'s defaults; for a server's own
    (possibly non-default) ``InferenceConfig`` build requests with ``ZTSNRPipelines.request``."""

    prompt: str
    negative_prompt: str | None = None
    width: int = _DEFAULTS.width
    height: int = _DEFAULTS.height
    steps: int = _DEFAULTS.steps
    guidance_scale: float = _DEFAULTS.guidance_scale
    guidance_rescale: float = _DEFAULTS.guidance_rescale
    seed: int | None = None
    n: int = 1
    image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float = 0.8
    extra: dict = field(default_factory=dict)

    @property
    def mode(self) -> str:
        if self.image is None:
            return "text2img"
        return "inpaint" if self.mask is not None else "img2img"


class ZTSNRPipelines:
    """Holds the text-to-image pipeline and lazily derived img2img / inpaint views of it."""

    def __init__(self, t2i: StableDiffusionXLPipeline, defaults: InferenceConfig):
        self.t2i = t2i
        self.defaults = defaults
        self._views: dict[str, StableDiffusionXLPipeline] = {}

    @property
    def device(self) -> torch.device:
        return self.t2i.device

    def request(self, prompt: str, **fields) -> GenerationRequest:
        """A request whose settings not given in ``fields`` come from this holder's InferenceConfig
        (so a preset's ``inference.guidance_rescale`` or ``steps`` actually reaches the pipeline)."""
        d = self.defaults
        settings = dict(
            width=d.width, height=d.height, steps=d.steps, guidance_scale=d.guidance_scale,
            guidance_rescale=d.guidance_rescale,
        )
        return GenerationRequest(prompt=prompt, **{**settings, **fields})

    def view(self, mode: str):
        if mode == "text2img":
            return self.t2i
        if mode not in self._views:
            cls = StableDiffusionXLImg2ImgPipeline if mode == "img2img" else StableDiffusionXLInpaintPipeline
            self._views[mode] = cls.from_pipe(self.t2i)
        return self._views[mode]

    def generate(self, req: GenerationRequest) -> list[Image.Image]:
        """Seeds are honoured: the same request with the same seed gives the same images."""
        gen = None
        if req.seed is not None:
            gen = [torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.n)]
        common = dict(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance_scale,
            guidance_rescale=req.guidance_rescale,
            num_images_per_prompt=req.n,
            generator=gen,
        )
        mode = req.mode
        pipe = self.view(mode)
        if mode == "text2img":
            out = pipe(width=req.width, height=req.height, **common)
        elif mode == "img2img":
            out = pipe(image=req.image.convert("RGB"), strength=req.strength, **common)
        else:
            out = pipe(
                image=req.image.convert("RGB"), mask_image=req.mask.convert("L"), strength=req.strength,
                width=req.width, height=req.height, **common,
            )
        return list(out.images)


def build_pipelines(
    source: Components | str,
    diffusion: DiffusionConfig,
    defaults: InferenceConfig,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> ZTSNRPipelines:
    """From in-memory components (validation) or a saved diffusers directory (evaluation, Serve).

    On CUDA the pipeline runs in bf16 with PyTorch SDPA attention (diffusers' default processor);
    the VAE is upcast by the pipeline where its config asks for it.
    """
    device = device or pick_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scheduler = inference_scheduler(diffusion)
    if isinstance(source, Components):
        pipe = StableDiffusionXLPipeline(scheduler=scheduler, **source.as_dict())
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(source, use_safetensors=True, dtype=dtype)
        pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return ZTSNRPipelines(pipe.to(device), defaults)
