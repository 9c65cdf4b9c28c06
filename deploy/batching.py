"""Batched generation: compatible requests run as one pipeline call, each keeping its own prompt and seeds.

Requests are compatible when everything the pipeline takes as a scalar is equal (mode, size, steps,
guidance, CFG rescale, strength, and whether a negative prompt is given, since ``None`` means zero
embeddings in SDXL while ``""`` is an encoded empty prompt). Everything per image is a list:
prompts, negative prompts, input images, masks and one ``torch.Generator`` per image seeded
``seed + i``, exactly as :meth:`components.pipelines.ZTSNRPipelines.generate` seeds image ``i``.
diffusers draws each image's initial latents from its own generator (``randn_tensor`` with a list),
and DDIM with eta = 0 adds no noise after that, so an image does not depend on its batch mates.

A failure stays with its own request: when a shared call raises (out of memory for the batch, a
request the pipeline cannot take), its requests run again one at a time, so only the request that
fails alone gets the error (a 500 for that client) and its batch mates get their images.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Hashable

import torch
from PIL import Image

from components.pipelines import GenerationRequest, ZTSNRPipelines
from deploy.api import Outcome

log = logging.getLogger(__name__)


def batch_key(req: GenerationRequest) -> Hashable:
    """Requests with equal keys can share one pipeline call."""
    strength = None if req.mode == "text2img" else req.strength
    return (req.mode, req.width, req.height, req.steps, req.guidance_scale, req.guidance_rescale, strength,
            req.negative_prompt is None)


def group_compatible(reqs: list[GenerationRequest]) -> list[list[int]]:
    """Indices of ``reqs`` grouped by :func:`batch_key`, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, req in enumerate(reqs):
        groups.setdefault(batch_key(req), []).append(i)
    return list(groups.values())


def run_group(pipes: ZTSNRPipelines, group: list[GenerationRequest]) -> list[list[Image.Image]]:
    """One pipeline call for a compatible group; returns each request's n images, in order."""
    first = group[0]
    # Flatten to one entry per image: request r contributes r.n entries, image i seeded r.seed + i.
    per_image = [(r, i) for r in group for i in range(r.n)]
    kwargs = dict(
        prompt=[r.prompt for r, _ in per_image],
        negative_prompt=None if first.negative_prompt is None else [r.negative_prompt for r, _ in per_image],
        num_inference_steps=first.steps,
        guidance_scale=first.guidance_scale,
        guidance_rescale=first.guidance_rescale,
        num_images_per_prompt=1,
        generator=[torch.Generator("cpu").manual_seed(r.seed + i) for r, i in per_image],
    )
    mode = first.mode
    pipe = pipes.view(mode)
    pipe.set_progress_bar_config(disable=True)  # img2img / inpaint views are made without the factory's setting
    if mode == "text2img":
        out = pipe(width=first.width, height=first.height, **kwargs)
    elif mode == "img2img":
        out = pipe(image=[r.image for r, _ in per_image], strength=first.strength, **kwargs)
    else:
        out = pipe(
            image=[r.image for r, _ in per_image], mask_image=[r.mask for r, _ in per_image],
            strength=first.strength, width=first.width, height=first.height, **kwargs,
        )
    images = list(out.images)
    result, start = [], 0
    for r in group:
        result.append(images[start:start + r.n])
        start += r.n
    return result


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def run_isolated(pipes: ZTSNRPipelines, group: list[GenerationRequest]) -> list[list[Image.Image] | Exception]:
    """``run_group``, except that a failing shared call is retried one request at a time: each
    request gets its images, or the exception it raises alone."""
    try:
        return run_group(pipes, group)
    except Exception as err:
        if len(group) == 1:
            return [err]
        log.warning("a batch of %d requests failed (%s: %s); running them one at a time",
                    len(group), type(err).__name__, str(err)[:200])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # an out-of-memory batch leaves cached blocks behind
        return [run_isolated(pipes, [r])[0] for r in group]


def generate_batch(pipes: ZTSNRPipelines, reqs: list[GenerationRequest]) -> list[list[Image.Image] | Exception]:
    """Images for every request of a dynamic batch, grouped by compatibility; one result per
    request (the exception it raised on its own when it failed)."""
    results: list[list[Image.Image] | Exception] = [[] for _ in reqs]
    for idx in group_compatible(reqs):
        for i, images in zip(idx, run_isolated(pipes, [reqs[i] for i in idx]), strict=True):
            results[i] = images
    return results


def serve_batch(name: str, version: str, pipes: ZTSNRPipelines, reqs: list[GenerationRequest]) -> list[Outcome]:
    """A dynamic batch -> one Outcome per request: refused ones (too many tokens) and PNG images.

    The token check runs here, on the thread that runs the pipeline, because tokenizers are not
    safe to share between threads (a fast tokenizer's truncation setting is global to it).
    """
    outcomes: list[Outcome | None] = [None] * len(reqs)
    accepted: list[int] = []
    for i, req in enumerate(reqs):
        why = refusal(pipes, req)
        if why:
            outcomes[i] = Outcome(name, version, req.seed, [], error=why[1], param=why[0])
        else:
            accepted.append(i)
    batch = [reqs[i] for i in accepted]
    sizes = {i: len(g) for g in group_compatible(batch) for i in g}
    for j, (i, images) in enumerate(zip(accepted, generate_batch(pipes, batch), strict=True)):
        if isinstance(images, Exception):
            log.error("request failed on its own: %s: %s", type(images).__name__, str(images)[:500])
            outcomes[i] = Outcome(name, version, reqs[i].seed, [], failure=type(images).__name__, batch_size=1)
        else:
            outcomes[i] = Outcome(name, version, reqs[i].seed, [encode_png(im) for im in images], batch_size=sizes[j])
    return outcomes


def refusal(pipes: ZTSNRPipelines, req: GenerationRequest) -> tuple[str, str] | None:
    """(param, message) when the pipeline would refuse or silently alter this request, else None."""
    for field in ("prompt", "negative_prompt"):
        why = token_overflow(pipes, getattr(req, field))
        if why:
            return field, f"{field} {why}"
    # img2img / inpaint run int(steps * strength) denoising steps (diffusers get_timesteps); zero is an error.
    if req.mode != "text2img" and int(req.steps * req.strength) < 1:
        return "strength", (f"steps x strength must give at least one denoising step; got {req.steps} x "
                            f"{req.strength:g}: raise steps or strength")
    return None


def token_overflow(pipes: ZTSNRPipelines, text: str | None) -> str | None:
    """Why ``text`` is too long for the text encoders, or None.

    CLIP reads at most ``model_max_length`` tokens (77 for SDXL, start and end included) and diffusers
    silently drops the rest; a request that would lose words is refused instead.
    """
    if text is None:
        return None
    for tokenizer in (pipes.t2i.tokenizer, pipes.t2i.tokenizer_2):
        if tokenizer is None:
            continue
        count = len(tokenizer(text, truncation=False).input_ids)
        if count > tokenizer.model_max_length:
            return (f"is {count} tokens; the text encoders read at most {tokenizer.model_max_length} "
                    "(long prompts are refused, never truncated)")
    return None
