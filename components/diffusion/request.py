"""What a generation asks for and what it gives back: plain data, no torch, no diffusers.

The HTTP ingress builds :class:`GenerationRequest` from a client's JSON, the model replica runs it and
answers a :class:`GenerationResult`; both cross Ray's handle as they are. Settings left ``None`` take
the defaults of the pipelines that run the request (the preset's ``inference`` section), filled in one
place: :meth:`GenerationRequest.complete`.
"""

from __future__ import annotations

import io
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

SETTINGS = ("width", "height", "steps", "guidance_scale", "guidance_rescale", "strength")
"""The request fields a preset's ``inference`` section gives defaults for."""
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
"""The OpenAI ``output_format`` values served -> PIL's format names."""
LATENT_FACTOR = 8
"""Pixels per latent position along each side (the SDXL VAE downsamples by 8): what ``usage`` counts as image
tokens."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    guidance_rescale: float | None = None
    """CFG rescale phi (Lin et al. 2023, eq. 16); 0.7 keeps a ZT-SNR model's contrast."""
    strength: float | None = None
    """img2img / inpaint: how far the input is noised (1.0: from pure noise, t = 999); None: the
    preset's ``inference.inpaint_strength`` or ``img2img_strength``."""
    seed: int | None = None
    """Image ``i`` is drawn from a generator seeded ``seed + i``; None: a fresh random seed."""
    n: int = 1
    image: Image.Image | None = None
    mask: Image.Image | None = None
    output_format: str = "png"
    """A key of :data:`OUTPUT_FORMATS`: how the images are encoded."""
    output_compression: int | None = None
    """JPEG / WebP quality 0-100 (PIL's ``quality``; 100 is the least lossy); None: 100, as OpenAI's default."""

    @property
    def latent_positions(self) -> int:
        """Latent positions of one image of this request's size (``width/8 x height/8``); 0 before completion."""
        if self.width is None or self.height is None:
            return 0
        return (self.width // LATENT_FACTOR) * (self.height // LATENT_FACTOR)

    @property
    def mode(self) -> str:
        if self.image is None:
            return "text2img"
        return "inpaint" if self.mask is not None else "img2img"

    def complete(self, defaults: Mapping[str, Any]) -> GenerationRequest:
        """This request with every unset setting taken from ``defaults`` (an ``InferenceConfig`` dump; the
        strength is its ``inpaint_strength`` or ``img2img_strength`` by mode)."""
        named = {**defaults, "strength": defaults.get(f"{self.mode}_strength")}  # text2img takes none
        missing = {k: named[k] for k in SETTINGS if getattr(self, k) is None and named.get(k) is not None}
        return replace(self, **missing) if missing else self

    def batch_key(self) -> Hashable:
        """Completed requests with equal keys can share one pipeline call."""
        strength = None if self.mode == "text2img" else self.strength
        return (self.mode, self.width, self.height, self.steps, self.guidance_scale, self.guidance_rescale,
                strength, self.negative_prompt is None)


@dataclass(frozen=True)
class Usage:
    """What a request used, in the shape of OpenAI's ``ImagesResponse.usage``, counted for a diffusion model:
    ``text_tokens`` are the CLIP tokens of the prompt and of the negative prompt (start and end tokens included,
    the larger count of the two tokenizers); ``image_tokens`` (input) the latent positions of an uploaded image
    (``width/8 x height/8``; 0 for generations); ``output_tokens`` the latent positions generated (that, times
    ``n``). They are sizes, not prices: the work of a request grows with ``output_tokens`` times its steps."""

    text_tokens: int
    image_tokens: int
    output_tokens: int

    @classmethod
    def of(cls, req: GenerationRequest, text_tokens: int) -> Usage:
        """The usage of a completed request whose prompts are ``text_tokens`` tokens."""
        return cls(text_tokens=text_tokens, image_tokens=req.latent_positions if req.image is not None else 0,
                   output_tokens=req.n * req.latent_positions)

    def body(self) -> dict[str, Any]:
        """The JSON of OpenAI's ``usage`` object."""
        inputs = self.text_tokens + self.image_tokens
        return {"input_tokens": inputs, "output_tokens": self.output_tokens,
                "total_tokens": inputs + self.output_tokens,
                "input_tokens_details": {"text_tokens": self.text_tokens, "image_tokens": self.image_tokens},
                "output_tokens_details": {"text_tokens": 0, "image_tokens": self.output_tokens}}


@dataclass
class GenerationResult:
    """What the model deployment answers for one request: encoded images, or why there are none."""

    name: str
    version: str
    seed: int | None
    images: list[bytes]
    error: str | None = None
    """Set when the request is refused (a client mistake only the model can see, e.g. too many tokens)."""
    param: str | None = None
    failure: str | None = None
    """Set when the pipeline failed on this request alone (the exception's type): a server error."""
    batch_size: int = 1
    """Requests that shared the pipeline call (observability; shows batching is happening)."""
    status: int = 400
    """The HTTP status of a refusal (``error``): 400, or 404 for an adapter that does not exist, 409 for an adapter
    of another base."""
    code: str | None = None
    """The OpenAI error ``code`` of a refusal (``model_not_found``, ``adapter_base_mismatch``)."""
    base: str | None = None
    """For a request served with an adapter (``name``/``version`` are the adapter's): ``NAME/VERSION`` of the base."""
    work_s: float | None = None
    """Seconds of the model replica's work for this request's batch (token check, pipeline, encoding), as timed on the
    thread that ran it; the ingress reports it in ``Server-Timing`` (observability, the Serve overhead breakdown)."""
    model_s: float | None = None
    """Seconds from the model deployment receiving the request to its answer (the work plus the batch queue and the
    hop to the worker thread)."""
    output_format: str = "png"
    """How ``images`` are encoded (a key of :data:`OUTPUT_FORMATS`)."""
    usage: Usage | None = None
    """What the request used (None for a refusal or a failure)."""


@dataclass(frozen=True)
class PartialImage:
    """One intermediate image of a streamed request (the sampler's x0 prediction after a step, decoded), encoded
    in the request's ``output_format``; ``index`` counts from 0. A streamed request's model answer is its partial
    images in order, then its :class:`GenerationResult`."""

    index: int
    image: bytes


def encode_png(image: Image.Image) -> bytes:
    return encode_image(image, "png")


def encode_image(image: Image.Image, output_format: str, compression: int | None = None) -> bytes:
    """``image`` as PNG (lossless; ``compression`` unused), or JPEG / WebP at PIL ``quality=compression``
    (None: 100). ``image`` is the pipeline's RGB output: the model makes no alpha."""
    buf = io.BytesIO()
    fmt = OUTPUT_FORMATS[output_format]
    if fmt == "PNG":
        image.save(buf, format=fmt)
    else:
        image.save(buf, format=fmt, quality=100 if compression is None else compression)
    return buf.getvalue()
