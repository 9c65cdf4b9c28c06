"""A dynamic batch of requests on one model replica: grouped into pipeline calls, failures kept apart.

Requests are compatible when everything the pipeline takes as a scalar is equal
(:meth:`GenerationRequest.batch_key`: mode, size, steps, guidance, CFG rescale, strength, and whether
a negative prompt is given, since ``None`` means zero embeddings in SDXL while ``""`` is an encoded
empty prompt); each compatible group is one call of :meth:`ZTSNRPipelines.generate_group`, the same
path every other caller takes, so a batched image equals the image of the same request alone.

A failure stays with its own request: when a shared call raises (out of memory for the batch, a
request the pipeline cannot take), its requests run again one at a time, so only the request that
fails alone gets the error (a 500 for that client) and its batch mates get their images.

A streamed request (``Model.generate_stream``) runs alone, through this same path, with :data:`PARTIALS` set on
its worker thread: its group's pipeline call then takes the partial images (``Partials``).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from contextvars import ContextVar

import torch
from PIL import Image

from components.diffusion.pipelines import Partials, ZTSNRPipelines
from components.diffusion.request import GenerationRequest, GenerationResult, Usage, encode_image

log = logging.getLogger(__name__)
PARTIALS: ContextVar[Partials | None] = ContextVar("partials", default=None)
"""The partial images a streamed request's thread asks for; None (a batch) takes none. A context variable, not an
argument, because the call reaches here through the adapter layer (``ReplicaAdapters.run``), which need not know."""


def group_compatible(reqs: list[GenerationRequest]) -> list[list[int]]:
    """Indices of (completed) ``reqs`` grouped by their batch key, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, req in enumerate(reqs):
        groups.setdefault(req.batch_key(), []).append(i)
    return list(groups.values())


def run_isolated(pipes: ZTSNRPipelines, group: list[GenerationRequest]) -> list[list[Image.Image] | Exception]:
    """``generate_group``, except that a failing shared call is retried one request at a time: each
    request gets its images, or the exception it raises alone."""
    try:
        return pipes.generate_group(group, partials=PARTIALS.get())
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
    reqs = [pipes.complete(r) for r in reqs]
    results: list[list[Image.Image] | Exception] = [[] for _ in reqs]
    for idx in group_compatible(reqs):
        for i, images in zip(idx, run_isolated(pipes, [reqs[i] for i in idx]), strict=True):
            results[i] = images
    return results


def serve_batch(name: str, version: str, pipes: ZTSNRPipelines,
                reqs: list[GenerationRequest]) -> list[GenerationResult]:
    """A dynamic batch -> one GenerationResult per request: refused ones (too many tokens), and images in each
    request's ``output_format`` with its ``usage`` (``Usage``: the prompts' tokens, the latent positions).

    The token check runs here, on the thread that runs the pipeline, because tokenizers are not
    safe to share between threads (a fast tokenizer's truncation setting is global to it).
    """
    reqs = [pipes.complete(r) for r in reqs]
    results: list[GenerationResult | None] = [None] * len(reqs)
    accepted: list[int] = []
    for i, req in enumerate(reqs):
        why = refusal(pipes, req)
        if why:
            results[i] = GenerationResult(name, version, req.seed, [], error=why[1], param=why[0])
        else:
            accepted.append(i)
    batch = [reqs[i] for i in accepted]
    sizes = {i: len(g) for g in group_compatible(batch) for i in g}
    for j, (i, images) in enumerate(zip(accepted, generate_batch(pipes, batch), strict=True)):
        if isinstance(images, Exception):
            log.error("request failed on its own: %s: %s", type(images).__name__, str(images)[:500])
            results[i] = GenerationResult(name, version, reqs[i].seed, [], failure=type(images).__name__)
            continue
        r = reqs[i]
        try:
            encoded = [encode_image(im, r.output_format, r.output_compression) for im in images]
            usage = Usage.of(r, prompt_tokens(pipes, r.prompt) + prompt_tokens(pipes, r.negative_prompt))
        except Exception as err:  # an image that cannot be encoded fails its own request only
            log.error("encoding a result failed: %s: %s", type(err).__name__, str(err)[:500])
            results[i] = GenerationResult(name, version, r.seed, [], failure=type(err).__name__)
            continue
        results[i] = GenerationResult(name, version, r.seed, encoded, batch_size=sizes[j],
                                      output_format=r.output_format, usage=usage)
    return results


def refusal(pipes: ZTSNRPipelines, req: GenerationRequest) -> tuple[str, str] | None:
    """(param, message) when the pipeline would refuse or silently alter this (completed) request.
    A check that itself fails refuses the request alone, never its batch."""
    try:
        for field in ("prompt", "negative_prompt"):
            why = token_overflow(pipes, getattr(req, field))
            if why:
                return field, f"{field} {why}"
    except Exception as err:
        return "prompt", f"prompt could not be tokenized ({type(err).__name__})"
    # img2img / inpaint run int(steps * strength) denoising steps (diffusers get_timesteps); zero is an error.
    if req.mode != "text2img" and int(req.steps * req.strength) < 1:
        return "strength", (f"steps x strength must give at least one denoising step; got {req.steps} x "
                            f"{req.strength:g}: raise steps or strength")
    return None


def prompt_tokens(pipes: ZTSNRPipelines, text: str | None) -> int:
    """The tokens the text encoders read of ``text`` (start and end included; the larger count of the two
    tokenizers); 0 for None."""
    if text is None:
        return 0
    return max((len(t(text, truncation=False).input_ids) for t in (pipes.t2i.tokenizer, pipes.t2i.tokenizer_2)
                if t is not None), default=0)


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
