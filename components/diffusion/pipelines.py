"""The one generation path, shared by validation, evaluation, the registered pyfunc and Serve.

Text-to-image, image-to-image and inpainting share one set of weights (diffusers ``from_pipe``). The
caller chooses the scheduler: the ZT-SNR one (``schedule.inference_scheduler``: trailing spacing,
v-prediction, rescaled betas) for any directory whose schedule comes from a config, or the scheduler a
platform-saved model carries (which is that one). Unset request settings come from ``defaults`` (the
preset's ``inference`` section; CFG rescale 0.7, Lin et al. 2023, eq. 16).

Imports nothing of the platform outside ``components.diffusion`` at run time, so a registered model
loads with this package alone (``components/diffusion/pyfunc.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from components.diffusion.request import GenerationRequest

if TYPE_CHECKING:
    from components.diffusion.parts import SDXLParts


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
"""The half-precision weight variants a saved directory may carry next to its fp32 weights."""


def half_variants(directory: str | Path) -> list[str]:
    """The half-precision variants a saved pipeline directory has for every model (``unet``, ``vae`` and
    both text encoders each hold ``*.<variant>.safetensors``), in ``HALF``'s order."""
    found = []
    for variant in HALF:
        if all(any((Path(directory) / part).glob(f"*.{variant}*safetensors"))
               for part in ("unet", "vae", "text_encoder", "text_encoder_2")):
            found.append(variant)
    return found


def variant_for(directory: str | Path, device: torch.device) -> tuple[str | None, torch.dtype]:
    """(weight variant, dtype) that suits ``device``: a CUDA device computes in half precision, so it reads
    a half variant when the directory has one (the bf16 one first: the precision a CUDA replica runs in
    without one; diffusers upcasts the VAE of an fp16 pipeline where its config asks) -- half the bytes to
    read and hold, the same weights; elsewhere the fp32 weights, in fp32 (a CPU computes fp32)."""
    if device.type != "cuda":
        return None, torch.float32
    variants = half_variants(directory)
    if "bf16" in variants:
        return "bf16", torch.bfloat16
    if "fp16" in variants:
        return "fp16", torch.float16
    return None, torch.bfloat16


def partial_steps(steps: int, count: int) -> list[int]:
    """The 0-based denoising steps after which ``count`` partial images are taken: evenly spaced over ``steps``
    (``(j + 1) * steps // (count + 1)``), repeats dropped, so a run of fewer steps than ``count`` gives fewer."""
    return sorted({(j + 1) * steps // (count + 1) for j in range(count)})


@dataclass
class Partials:
    """What a streamed generation asks of :meth:`ZTSNRPipelines.generate_group`: after each of ``partial_steps``
    the scheduler's x0 prediction (DDIM's ``pred_original_sample``), decoded by the VAE, goes to
    ``emit(index, image)``; once ``stop`` is set (the client went away) the remaining steps are skipped."""

    count: int
    emit: Callable[[int, Any], None]
    stop: threading.Event = field(default_factory=threading.Event)


class ZTSNRPipelines:
    """Holds the text-to-image pipeline and lazily derived img2img / inpaint views of it."""

    def __init__(self, t2i: StableDiffusionXLPipeline, defaults: Mapping[str, Any]):
        self.t2i = t2i
        self.defaults = dict(defaults)
        self._views: dict[str, StableDiffusionXLPipeline] = {}

    @property
    def device(self) -> torch.device:
        return self.t2i.device

    def compile(self, backend: str = "inductor") -> None:
        """``torch.compile`` the UNet in place; the img2img and inpaint views share it."""
        self.t2i.unet.compile(backend=backend)

    def complete(self, req: GenerationRequest) -> GenerationRequest:
        return req.complete(self.defaults)

    def view(self, mode: str):
        if mode == "text2img":
            return self.t2i
        if mode not in self._views:
            cls = StableDiffusionXLImg2ImgPipeline if mode == "img2img" else StableDiffusionXLInpaintPipeline
            view = cls.from_pipe(self.t2i)
            view.set_progress_bar_config(disable=True)
            self._views[mode] = view
        return self._views[mode]

    def generate_group(self, reqs: list[GenerationRequest], output_type: str = "pil",
                       partials: Partials | None = None) -> list[list]:
        """One pipeline call for requests that share a ``batch_key`` once completed; returns each
        request's ``n`` images, in order.

        Image ``i`` of a request is drawn from a generator seeded ``seed + i``: diffusers draws each
        image's initial latents from its own generator (``randn_tensor`` with a list) and DDIM with
        eta = 0 adds no noise after that, so an image does not depend on its batch mates.
        ``output_type="np"`` gives float arrays (H, W, 3) in [0, 1] with any NaN kept. ``partials`` (one image
        only) streams the intermediate x0 predictions (:class:`Partials`).
        """
        reqs = [self.complete(r) for r in reqs]
        first = reqs[0]
        if any(r.batch_key() != first.batch_key() for r in reqs):
            raise ValueError("generate_group takes requests with one batch_key only")
        per_image = [(r, i) for r in reqs for i in range(r.n)]  # one entry per image

        def generator(seed: int | None, i: int) -> torch.Generator:
            gen = torch.Generator("cpu")
            return gen.manual_seed(seed + i) if seed is not None else gen.manual_seed(gen.seed())

        split_decode = self.t2i.vae.dtype != self.t2i.unet.dtype  # the fp32 VAE of a bf16 pipeline
        kwargs = dict(
            prompt=[r.prompt for r, _ in per_image],
            negative_prompt=None if first.negative_prompt is None else [r.negative_prompt for r, _ in per_image],
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            guidance_rescale=first.guidance_rescale,
            num_images_per_prompt=1,
            generator=[generator(r.seed, i) for r, i in per_image],
            output_type="latent" if split_decode else output_type,
        )
        pipe = self.view(first.mode)
        if partials is not None:
            if len(per_image) != 1:
                raise ValueError("partial images are taken of a single image only")
            with self._taking_partials(pipe, partials) as callback:
                out = self._call(pipe, first, per_image, callback_on_step_end=callback, **kwargs)
        else:
            out = self._call(pipe, first, per_image, **kwargs)
        images = self._decode(out.images, output_type) if split_decode else list(out.images)
        if first.mode == "inpaint" and output_type == "pil":
            # Outside the mask the result is the input itself (what the user did not ask to repaint stays
            # exactly as it was); inside, the generated pixels.
            processor = self.view("inpaint").image_processor
            images = [processor.apply_overlay(r.mask.convert("L"), r.image.convert("RGB"), im)
                      for (r, _), im in zip(per_image, images, strict=True)]
        result, start = [], 0
        for r in reqs:
            result.append(images[start:start + r.n])
            start += r.n
        return result

    @staticmethod
    def _call(pipe, first: GenerationRequest, per_image: list, **kwargs):
        """The diffusers call for the group's mode."""
        if first.mode == "text2img":
            return pipe(width=first.width, height=first.height, **kwargs)
        if first.mode == "img2img":
            return pipe(image=[r.image.convert("RGB") for r, _ in per_image], strength=first.strength, **kwargs)
        return pipe(
            image=[r.image.convert("RGB") for r, _ in per_image],
            mask_image=[r.mask.convert("L") for r, _ in per_image],
            strength=first.strength, width=first.width, height=first.height, **kwargs,
        )

    @contextmanager
    def _taking_partials(self, pipe, partials: Partials) -> Iterator[Callable]:
        """A ``callback_on_step_end`` for ``partials``, with ``pipe.scheduler.step`` wrapped for the duration to keep
        its x0 prediction (``pred_original_sample``: diffusers hands the callback only the next noisy latents). A
        scheduler without one gives the latents themselves. Safe because pipeline calls on one UNet run one at a
        time (deploy/served_adapters.py), and the scheduler is stateful anyway."""
        scheduler, x0 = pipe.scheduler, {}
        step = scheduler.step

        def keeping_x0(*args, **kwargs):
            out = step(*args, **kwargs)
            x0["latents"] = (out[1] if len(out) > 1 else None) if isinstance(out, tuple) else getattr(
                out, "pred_original_sample", None)
            return out

        def on_step_end(p, i: int, t, tensors: dict) -> dict:
            if partials.stop.is_set():
                p._interrupt = True  # diffusers' own interruption: the remaining steps are skipped
                return {}
            wanted = partial_steps(p.num_timesteps, partials.count)
            if i in wanted:
                latents = x0.get("latents")
                partials.emit(wanted.index(i), self._decode(tensors["latents"] if latents is None else latents,
                                                            "pil")[0])
            return {}

        scheduler.step = keeping_x0  # an instance attribute shadowing the method
        try:
            yield on_step_end
        finally:
            del scheduler.step

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor, output_type: str) -> list:
        """Latents -> images with the VAE in fp32, whatever the UNet's dtype (diffusers upcasts only an
        fp16 VAE; a bf16 decode would lose precision in the last step for nothing: the VAE is small)."""
        vae = self.t2i.vae
        if vae.dtype != torch.float32:  # img2img's encode may have cast it back to the pipeline's dtype
            vae.to(torch.float32)
        latents = latents.to(vae.device, torch.float32)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        return list(self.t2i.image_processor.postprocess(image, output_type=output_type))

    def generate(self, req: GenerationRequest, output_type: str = "pil") -> list:
        """The ``n`` images of one request. Seeds are honoured: the same request gives the same images."""
        return self.generate_group([req], output_type)[0]


def build_pipelines(
    source: SDXLParts | str | Path,
    scheduler,
    defaults: Mapping[str, Any],
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> ZTSNRPipelines:
    """From in-memory parts (validation, evaluation) or a saved diffusers directory (Serve, the pyfunc).

    A loaded directory reads the weight variant that suits the device (``variant_for``: on CUDA its half
    variant, in that dtype, or the fp32 weights cast to bf16; on CPU fp32), with PyTorch SDPA attention
    (diffusers' default processor). The VAE stays in fp32 whatever the UNet's dtype, and decodes in fp32
    (``ZTSNRPipelines._decode``).
    """
    device = device or pick_device()
    if isinstance(source, str | Path):
        variant, suited = variant_for(source, device)
        pipe = StableDiffusionXLPipeline.from_pretrained(str(source), use_safetensors=True, variant=variant,
                                                         dtype=dtype or suited)
        pipe.scheduler = scheduler
    else:
        pipe = StableDiffusionXLPipeline(scheduler=scheduler, **source.as_dict())
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)
    return ZTSNRPipelines(pipe, defaults)
