"""The HTTP contract: OpenAI Images API request models, their validation, and the error format.

Compatible with ``POST /v1/images/generations`` and ``POST /v1/images/edits`` of the OpenAI Images API
(https://platform.openai.com/docs/api-reference/images) as the current openai-python sends them: same field
names, same response shape (``{"created", "data": [{"b64_json"}], "output_format", "background", "usage"}``),
same error object (``{"error": {"message", "type", "param", "code"}}``). Every field, OpenAI's and this server's
extras (``extra_body`` in the OpenAI client), with what it does here, is in one table: the README, "The Images
API". vLLM-Omni's spelling ``num_inference_steps`` is accepted beside ``steps``; its ``guidance_scale``,
``seed`` and ``negative_prompt`` are this server's names too.

Differences from OpenAI, on purpose: ``response_format`` ``url`` is refused (images are returned
inline, ``b64_json`` is the default); ``background: transparent`` is refused (the model makes no alpha);
``quality`` picks a step count (``QUALITY_STEPS``; ``steps`` wins); ``moderation`` is accepted and moderates
nothing (this server runs no content filter); ``stream`` takes one image (``n`` 1), its partial images the sampler's
intermediate x0 predictions (``partial_images`` 0 to 3, ``MAX_PARTIAL_IMAGES``); images are uploaded
only as multipart files (as OpenAI's edits endpoint takes them), never as base64 strings; /v1/images/edits without
a mask is image-to-image (the image is noised to ``strength``, default ``inference.img2img_strength``, 0.8, and denoised
with the prompt) rather than "transparent areas of the image are the mask"; a mask's alpha 0 marks the area to
repaint, as OpenAI's. Prompts longer than the text encoders read (77 tokens for SDXL) are refused, never
truncated.

Every client mistake is an :class:`ApiError` with a 4xx status; nothing here touches Ray or a model,
so the whole contract is unit-tested without a server. Nor does it import torch: the request and result
types (``components/diffusion/request.py``) are plain data, so the ingress replica stays light (it
parses HTTP; the model replica imports the pipeline stack).
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from components.config import Config
from components.diffusion.request import LATENT_FACTOR, GenerationRequest, GenerationResult, PartialImage

SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what OpenAI's edits endpoint accepts
MAX_SEED = 2**53 - 1  # exact in a JSON number (a double)
MAX_GUIDANCE = 50.0
QUALITY_STEPS = {"low": 10, "medium": 20, "high": 30, "xhigh": 40, "max": 50, "standard": 20, "hd": 30}
"""OpenAI ``quality`` -> denoising steps (each at most ``serve.max_steps``); ``auto`` is ``serve.default_steps``.
DALL-E's ``standard`` and ``hd`` are ``medium`` and ``high``."""
MAX_PARTIAL_IMAGES = 3  # OpenAI's limit


class ApiError(Exception):
    """A refusal with its HTTP status; ``type`` follows OpenAI (invalid_request_error, ...)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:  # noqa: A002
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class BodyBudget:
    """How many slow request bodies are being received at once: at most ``per_client`` for one client address and
    ``total`` in all. A body counts once it is still arriving after the ingress's grace (``deploy/app.py``
    ``receive_body``): prompt bodies, however many a client sends at once, never count. ``refuse_if_full(client)``
    refuses, before anything of a body is read, a request from an address that already has ``per_client`` slow
    bodies arriving (429), or when ``total`` are (503); ``receiving(client)`` refuses the same way or holds a place
    for the duration of its block. Both refusals carry ``Retry-After: retry_after_s``. A slow client thus holds at
    most ``per_client`` of the ingress's request slots past the grace, and all slow bodies together at most
    ``total``.

    Not thread-safe, by design: the ingress uses it on its event loop only, where nothing runs between the
    check and the count."""

    def __init__(self, per_client: int, total: int, retry_after_s: float):
        self.per_client, self.total = per_client, total
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
        self.by_client: dict[str, int] = {}
        self.receiving_now = 0

    def refuse_if_full(self, client: str) -> None:
        held = self.by_client.get(client, 0)
        if held >= self.per_client:
            raise ApiError(429, f"{held} request bodies from your address are still arriving (at most "
                           f"{self.per_client} at once); send the next when one has arrived", type="requests",
                           code="rate_limit_exceeded", headers=self.headers)
        if self.receiving_now >= self.total:
            raise ApiError(503, f"the server is receiving {self.receiving_now} slow request bodies, as many as it "
                           "takes at once; retry after the delay in Retry-After", type="server_overloaded",
                           headers=self.headers)

    @contextmanager
    def receiving(self, client: str) -> Iterator[None]:
        self.refuse_if_full(client)
        self.by_client[client] = self.by_client.get(client, 0) + 1
        self.receiving_now += 1
        try:
            yield
        finally:
            self.receiving_now -= 1
            left = self.by_client[client] - 1
            if left:
                self.by_client[client] = left
            else:
                del self.by_client[client]


class ImageParams(BaseModel):
    """Fields of both endpoints. Unknown fields are refused (OpenAI does the same) rather than ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: str | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    quality: Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"] | None = None
    moderation: Literal["auto", "low"] | None = None
    stream: bool | None = None
    partial_images: int | None = None
    # OpenAI fields accepted for compatibility; they do not change what this model produces.
    style: str | None = None
    user: str | None = None
    safety_identifier: str | None = None
    # Extras (this server only; vLLM-Omni's num_inference_steps is steps).
    negative_prompt: str | None = None
    steps: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_rescale: float | None = None
    seed: int | None = None
    strength: float | None = None


def parse_params(raw: Any) -> ImageParams:
    """A JSON object or form fields -> ImageParams, or a 400 naming the first bad field."""
    if not isinstance(raw, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return ImageParams.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown parameter {field!r}", param=field) from None
        if first["type"] == "missing":
            raise ApiError(400, f"missing required parameter {field!r}", param=field) from None
        raise ApiError(400, f"invalid {field}: {first['msg']}", param=field) from None


def size_grid(cfg: Config) -> str:
    """The sizes a request may ask for, in words (the 400s of a bad size quote it)."""
    s = cfg.serve
    return (f"'auto' ({s.default_size}x{s.default_size}) or WIDTHxHEIGHT with each side a multiple of "
            f"{LATENT_FACTOR} from {s.min_side} to {s.max_side}")


def parse_size(size: str | None, cfg: Config) -> tuple[int, int] | None:
    """``"WxH"`` on the model's grid (:func:`size_grid`) -> (width, height); None or ``"auto"`` -> None (the
    caller's default: ``serve.default_size`` square, or an edit's image size)."""
    if size is None or size == "auto":
        return None
    match = SIZE_RE.match(size)
    if not match:
        raise ApiError(400, f"size {size[:40]!r} is not a size; sizes are {size_grid(cfg)}", param="size")
    width, height = int(match[1]), int(match[2])
    check_side_limits(width, height, cfg, what="size")
    return width, height


def check_side_limits(width: int, height: int, cfg: Config, what: str) -> None:
    s = cfg.serve
    if width % LATENT_FACTOR or height % LATENT_FACTOR:
        raise ApiError(400, f"{what} {width}x{height} is off the model's grid (sides are multiples of "
                       f"{LATENT_FACTOR}, the VAE's factor); sizes are {size_grid(cfg)}", param="size")
    if min(width, height) < s.min_side or max(width, height) > s.max_side:
        raise ApiError(400, f"{what} {width}x{height} is outside the limits; sizes are {size_grid(cfg)}",
                       param="size")


def check_text(value: str | None, field: str, cfg: Config) -> None:
    if value is None:
        return
    try:  # JSON can carry lone UTF-16 surrogates ("\ud800"); the tokenizers raise on them, failing the batch
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{field} is not valid Unicode text (it contains a lone surrogate such as \\ud800)",
                       param=field) from None
    limit = cfg.serve.max_prompt_chars
    if len(value) > limit:
        raise ApiError(400, f"{field} is {len(value)} characters; the limit is {limit} (long prompts are refused, "
                       "never truncated)", param=field, code="prompt_too_long")


def _in_range(value: float | None, field: str, lo: float, hi: float) -> None:
    if value is not None and not lo <= value <= hi:
        raise ApiError(400, f"{field} must be between {lo} and {hi}, got {value}", param=field)


def raise_for_result(out: GenerationResult) -> None:
    """The model's answer as an HTTP error, if it is one: a refusal is the client's (400), a failure
    of the pipeline on this request is ours (500, the same shape as any server error)."""
    if out.failure:
        raise ApiError(500, f"the model failed on this request ({out.failure})", type="server_error")
    if out.error:
        code = out.code or ("prompt_too_long" if out.param in ("prompt", "negative_prompt") else None)
        raise ApiError(out.status, out.error, param=out.param, code=code)


ADAPTER_ID = re.compile(r"^(?:models:/)?([A-Za-z0-9][A-Za-z0-9_.\-]{0,127})"
                        r"(?:@([A-Za-z0-9][A-Za-z0-9_\-]{0,63})|/([0-9]{1,9}))?$")
"""An adapter as a request names it: ``NAME@ALIAS``, ``NAME/VERSION`` or a bare ``NAME`` (its ``@champion``), with or
without ``models:/``."""


def adapter_id(model: str | None, header: str | None, served_name: str) -> str | None:
    """The Serve multiplexed model id of a request -- ``NAME@ALIAS`` or ``NAME/VERSION`` of an adapter -- or None
    for the bare base. ``model`` is the body's OpenAI ``model`` field, ``header`` the ``serve_multiplexed_model_id``
    header; the base is asked for by leaving both out or by its registered name."""
    if header and model and model not in (header, served_name):
        raise ApiError(400, f"the model field {model!r} and the serve_multiplexed_model_id header {header!r} name "
                       "different models; send one", param="model")
    chosen = header or model
    if chosen is None or chosen in (served_name, f"models:/{served_name}"):
        return None
    match = ADAPTER_ID.match(chosen)
    if match is None:
        raise ApiError(400, f"model {chosen[:200]!r} is not a model name: use NAME, NAME@ALIAS or NAME/VERSION "
                       f"(GET /v1/models lists them)", param="model")
    name, alias, version = match.groups()
    if name == served_name:
        raise ApiError(404, f"model {chosen!r}: this server serves {served_name} as its base only; GET /v1/models "
                       "lists what it serves", param="model", code="model_not_found")
    return f"{name}/{version}" if version else f"{name}@{alias or 'champion'}"


def to_request(
    p: ImageParams, cfg: Config, image: Image.Image | None = None, mask: Image.Image | None = None,
) -> GenerationRequest:
    """Validate the parameters against the limits and fill in the serving defaults of the config.

    Settings left unset (strength without a value) take the model's defaults (the preset's
    ``inference`` section) on the model replica.
    """
    s = cfg.serve
    if p.response_format not in (None, "b64_json"):
        if p.response_format == "url":
            raise ApiError(400, "response_format 'url' is not supported: images are returned inline; "
                           "use response_format 'b64_json'", param="response_format")
        raise ApiError(400, f"response_format must be 'b64_json', got {p.response_format!r}",
                       param="response_format")
    output_format = p.output_format or "png"
    if p.output_compression is not None and output_format == "png":
        raise ApiError(400, "output_compression applies to output_format 'jpeg' or 'webp'; PNG is lossless",
                       param="output_compression")
    if p.background == "transparent":
        raise ApiError(400, "background 'transparent' is not supported: the model makes no alpha channel; send "
                       "background 'opaque' or 'auto'", param="background")
    check_streaming(p)
    steps = request_steps(p, cfg)
    if not p.prompt.strip():
        raise ApiError(400, "prompt must not be empty", param="prompt")
    check_text(p.prompt, "prompt", cfg)
    check_text(p.negative_prompt, "negative_prompt", cfg)
    _in_range(p.n, "n", 1, s.max_n)
    _in_range(p.guidance_scale, "guidance_scale", 0.0, MAX_GUIDANCE)
    _in_range(p.guidance_rescale, "guidance_rescale", 0.0, 1.0)
    _in_range(p.seed, "seed", 0, MAX_SEED - s.max_n)
    if image is None and p.strength is not None:
        raise ApiError(400, "strength applies to /v1/images/edits only", param="strength")
    if p.strength is not None and not 0.0 < p.strength <= 1.0:
        raise ApiError(400, f"strength must be in (0, 1], got {p.strength:g}", param="strength")

    size = parse_size(p.size, cfg)
    if image is not None:
        image, mask = fit_edit_images(image, mask, size, cfg)
        width, height = image.size
    else:
        width, height = size or (s.default_size, s.default_size)
        check_side_limits(width, height, cfg, what="default size")
    return GenerationRequest(
        prompt=p.prompt,
        negative_prompt=p.negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=p.guidance_scale,
        guidance_rescale=p.guidance_rescale,
        # A seed is always drawn here so that every response can report the seed that reproduces it.
        seed=p.seed if p.seed is not None else secrets.randbelow(MAX_SEED - s.max_n),
        n=p.n,
        image=image,
        mask=mask,
        strength=p.strength,
        output_format=output_format,
        output_compression=p.output_compression,
    )


def check_streaming(p: ImageParams) -> None:
    """``stream`` and ``partial_images`` as this server serves them: ``partial_images`` 0 to ``MAX_PARTIAL_IMAGES``
    and only with ``stream: true``; a streamed request makes one image (``n`` 1)."""
    if p.partial_images is not None:
        if not p.stream:
            raise ApiError(400, "partial_images applies to streaming: send stream true with it, or leave it out",
                           param="partial_images")
        _in_range(p.partial_images, "partial_images", 0, MAX_PARTIAL_IMAGES)
    if p.stream and p.n != 1:
        raise ApiError(400, f"a streamed request makes one image; got n {p.n}: send n 1, or stream false",
                       param="n")


@dataclass(frozen=True)
class Streaming:
    """How a streamed request's events are shaped (OpenAI's ``ImageGenStreamEvent`` / ``ImageEditStreamEvent``):
    ``kind`` prefixes the event types (``image_generation`` or ``image_edit``), ``quality`` is echoed in each."""

    kind: str
    partial_images: int
    quality: str


def streaming(p: ImageParams, kind: str) -> Streaming | None:
    """The streaming a (validated) request asks for, or None. The echoed ``quality`` is OpenAI's name of it
    (``standard`` is ``medium``, ``hd`` ``high``; unset ``auto``)."""
    if not p.stream:
        return None
    quality = {"standard": "medium", "hd": "high"}.get(p.quality or "auto", p.quality or "auto")
    return Streaming(kind, p.partial_images or 0, quality)


def sse(event: str, body: dict[str, Any]) -> bytes:
    """One server-sent event (``event:`` and one ``data:`` line of JSON), as openai-python's SSE decoder reads it."""
    return f"event: {event}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


def stream_event(item: PartialImage | GenerationResult, req: GenerationRequest, s: Streaming) -> bytes:
    """A partial image -> ``<kind>.partial_image``; the final result -> ``<kind>.completed`` with its ``usage``, or,
    for a result that is an error (the model failed after the stream began), an ``error`` event with the error
    object, which the openai SDK raises as ``APIError``."""
    common = {"created_at": int(time.time()), "size": f"{req.width}x{req.height}", "quality": s.quality,
              "background": "opaque", "output_format": req.output_format}
    if isinstance(item, PartialImage):
        return sse(f"{s.kind}.partial_image", {"type": f"{s.kind}.partial_image", "b64_json":
                   base64.b64encode(item.image).decode(), "partial_image_index": item.index, **common})
    try:
        raise_for_result(item)
    except ApiError as err:
        return sse("error", err.body())
    body = {"type": f"{s.kind}.completed", "b64_json": base64.b64encode(item.images[0]).decode(), **common}
    if item.usage is not None:
        body["usage"] = item.usage.body()
    return sse(f"{s.kind}.completed", body)


def request_steps(p: ImageParams, cfg: Config) -> int:
    """The denoising steps a request asks for: ``steps`` or its vLLM-Omni spelling ``num_inference_steps`` (1 to
    ``serve.max_steps``), else its ``quality`` (``QUALITY_STEPS``, capped at ``serve.max_steps``), else
    ``serve.default_steps``: the exact setting wins over the coarse one."""
    s = cfg.serve
    if p.steps is not None and p.num_inference_steps is not None and p.steps != p.num_inference_steps:
        raise ApiError(400, f"steps {p.steps} and num_inference_steps {p.num_inference_steps} are the same setting; "
                       "send one", param="num_inference_steps")
    field, steps = ("steps", p.steps) if p.steps is not None else ("num_inference_steps", p.num_inference_steps)
    if steps is not None:
        _in_range(steps, field, 1, s.max_steps)
        return steps
    if p.quality not in (None, "auto"):
        return min(QUALITY_STEPS[p.quality], s.max_steps)
    return s.default_steps


def api_token(env_name: str | None, environ: Mapping[str, str]) -> bytes | None:
    """The bearer key every /v1 route requires: the value of the variable ``serve.api_key_env`` names,
    stripped (a key made with ``kubectl create secret --from-file`` ends with a newline no client
    sends: every request was a 401); None when no variable is named. A variable that is named but unset
    or blank fails closed: the replica does not start."""
    if env_name is None:
        return None
    value = (environ.get(env_name) or "").strip()
    if not value:
        raise RuntimeError(f"serve.api_key_env is {env_name!r} but that variable is unset or blank in the ingress "
                           "replica; set it there (runtime_env env_vars, a Kubernetes Secret) or unset "
                           "serve.api_key_env")
    return value.encode()


# --- uploaded images -----------------------------------------------------------------------------


def decode_upload(data: bytes, field: str, cfg: Config) -> Image.Image:
    """Bytes -> a loaded PIL image; the pixel count is checked from the header before decoding."""
    if not data:
        raise ApiError(400, f"{field} is empty", param=field)
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        pixels = img.width * img.height
        if pixels > cfg.serve.max_upload_pixels:
            raise ApiError(400, f"{field} is {img.width}x{img.height}; at most {cfg.serve.max_upload_pixels} "
                           "pixels are accepted", param=field)
        img.load()
    except ApiError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        raise ApiError(400, f"{field} could not be decoded as PNG, JPEG or WebP ({type(err).__name__})",
                       param=field) from None
    return img


def mask_to_l(mask: Image.Image) -> Image.Image:
    """OpenAI's convention -> diffusers'.

    OpenAI: the fully transparent pixels of the mask (alpha 0) are the area to edit. diffusers: white
    (255) is repainted, black kept. A mask with an alpha channel is converted (255 - alpha); a mask
    without one is read as diffusers reads it (white = repaint).
    """
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 - a)
    return mask.convert("L")


def fit_edit_images(
    image: Image.Image, mask: Image.Image | None, size: tuple[int, int] | None, cfg: Config
) -> tuple[Image.Image, Image.Image | None]:
    """Check the mask matches the image, then bring both to ``size`` (LANCZOS for the image).

    Without ``size`` the output has the image's size, which must then meet the size rules.
    """
    if mask is not None and mask.size != image.size:
        raise ApiError(400, f"mask is {mask.size[0]}x{mask.size[1]} but image is {image.size[0]}x{image.size[1]}; "
                       "they must match", param="mask")
    try:
        rgb = image.convert("RGB")
        l_mask = mask_to_l(mask) if mask is not None else None
    except (ValueError, OSError) as err:  # e.g. 16-bit or exotic modes PIL cannot convert
        raise ApiError(400, f"image or mask has an unsupported pixel format ({err})", param="image") from None
    if size is None:
        check_side_limits(*rgb.size, cfg, what="image")
        return rgb, l_mask
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        l_mask = l_mask.resize(size, Image.Resampling.NEAREST) if l_mask is not None else None
    return rgb, l_mask


# --- multipart/form-data -------------------------------------------------------------------------

MAX_PARTS = 32
"""Parts one edit request may have: an image, a mask and the twenty-odd form fields, with room to spare.
The body is refused at the first part past it: 140,000 tiny parts in 8 MiB cost the standard library's
MIME parser about 28 s of CPU."""
MAX_PART_HEADERS = 8
"""Header lines per part (Content-Disposition, Content-Type and a few more a client may add)."""
MAX_HEADER_BYTES = 4096
"""Longest header line of a part."""
BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]")
"""RFC 2046 section 5.1.1: 1 to 70 of these characters, the last not a space."""
PLAIN_ENCODINGS = {b"7bit", b"8bit", b"binary"}


class _FormParts:
    """The callbacks of python-multipart's streaming parser: collects the parts of one body, refusing
    (``ApiError``) as soon as a limit or a rule is broken, so a hostile body costs little CPU."""

    def __init__(self):
        self.fields: dict[str, str] = {}
        self.files: dict[str, bytes] = {}
        self.count = 0
        self._headers: dict[bytes, bytes] = {}
        self._field = self._value = b""
        self._name: str | None = None
        self._is_file = False
        self._chunks: list[bytes] = []

    def callbacks(self) -> dict:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
                "on_part_end": self.part_end}

    def part_begin(self) -> None:
        self.count += 1
        if self.count > MAX_PARTS:
            raise ApiError(400, f"multipart body has more than {MAX_PARTS} parts (image, mask and the form fields)")
        self._headers, self._chunks, self._name = {}, [], None

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def header_end(self) -> None:
        name = self._field.strip().lower()
        if name in self._headers:
            raise ApiError(400, f"a multipart part repeats its {name.decode('latin-1')!r} header")
        self._headers[name] = self._value.strip()
        self._field = self._value = b""

    def headers_finished(self) -> None:
        kind, options = parse_options_header(self._headers.get(b"content-disposition"))
        raw = options.get(b"name")
        if kind != b"form-data" or not raw:
            raise ApiError(400, "a multipart part has no name (Content-Disposition: form-data; name=...)")
        part_type, _ = parse_options_header(self._headers.get(b"content-type"))
        if part_type.startswith(b"multipart/"):
            raise ApiError(400, "nested multipart is not accepted: send each file as its own part")
        encoding = self._headers.get(b"content-transfer-encoding", b"binary").lower()
        if encoding not in PLAIN_ENCODINGS:
            raise ApiError(400, f"Content-Transfer-Encoding {encoding.decode('latin-1')!r} is not accepted: send "
                           "files as binary (RFC 7578)")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "a multipart part name is not UTF-8 text") from None
        name = name[:-2] if name.endswith("[]") else name  # OpenAI's client sends image[] for lists
        if name in self.fields or name in self.files:
            raise ApiError(400, f"field {name!r} given more than once (one image and one mask per request)",
                           param=name)
        self._name, self._is_file = name, b"filename" in options or name in ("image", "mask")

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self._chunks.append(data[start:end])

    def part_end(self) -> None:
        payload, name = b"".join(self._chunks), self._name
        self._chunks = []
        if name is None:  # a part whose headers never finished: the parser reports the body as malformed
            return
        if self._is_file:
            self.files[name] = payload
            return
        try:
            self.fields[name] = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, f"field {name!r} is not UTF-8 text", param=name) from None


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, bytes]]:
    """``multipart/form-data`` -> (text fields, file fields), with python-multipart's streaming parser
    (the one FastAPI uses). The body has already been size-capped by the caller.

    CPU-bound, so the ingress runs it off its event loop; and bounded: at most ``MAX_PARTS`` parts of at
    most ``MAX_PART_HEADERS`` header lines of ``MAX_HEADER_BYTES`` each, no nested multipart (the parser
    does not recurse at all: a body nested 3,000 deep made the ``email`` parser raise RecursionError,
    a 500), and the body must end with its closing boundary.
    """
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise ApiError(400, "this endpoint expects multipart/form-data with a boundary (image, mask, prompt, ...)")
    boundary = options.get(b"boundary", b"")
    if not BOUNDARY_RE.fullmatch(boundary.decode("latin-1")):
        raise ApiError(400, "multipart/form-data needs a boundary of 1 to 70 characters (RFC 2046)")
    parts = _FormParts()
    parser = MultipartParser(boundary, parts.callbacks(), max_header_count=MAX_PART_HEADERS,
                             max_header_size=MAX_HEADER_BYTES)
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as err:  # what the parser itself refuses: bad boundary lines, headers past the caps
        raise ApiError(400, f"malformed multipart body ({str(err)[:100]})") from None
    if parser.state != MultipartState.END:
        raise ApiError(400, "malformed multipart body: it ends before its closing boundary")
    return parts.fields, parts.files
