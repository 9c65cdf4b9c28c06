"""Dynamic batching on the tiny pipeline: grouping, no mixing of prompts or seeds, a batched image
equal to the same request alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import deploy.batching as batching
from components.config import load_config
from components.diffusion.pipelines import Partials, ZTSNRPipelines, build_pipelines
from components.diffusion.request import GenerationRequest, GenerationResult
from components.diffusion.schedule import inference_scheduler
from components.diffusion.tiny import build_tiny
from deploy.api import ApiError, raise_for_result
from deploy.batching import generate_batch, group_compatible, serve_batch

# Batched float32 matmuls on CPU sum in a different order than single ones, so an image computed in a
# batch may differ from the same image computed alone by one 8-bit level (seen: max 1). Images of
# different prompts or seeds differ by ~100+ levels, so this tolerance cannot hide a mix-up.
TOLERANCE = 2


@pytest.fixture(scope="module")
def pipes():
    cfg = load_config("flows/configs/tiny.yaml")
    return build_pipelines(build_tiny(cfg.model.tiny), inference_scheduler(cfg.diffusion), cfg.inference.model_dump())


def req(prompt, seed, n=1, **kw):
    return GenerationRequest(prompt=prompt, seed=seed, n=n, **({"width": 64, "height": 64, "steps": 2} | kw))


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(int)


def diff(a, b) -> int:
    return int(np.abs(arr(a) - arr(b)).max())


def test_grouping_keys():
    a, b = req("a", 1), req("b", 2, n=2)
    assert a.batch_key() == b.batch_key()  # prompt, seed and n are per image, not per call
    other = [req("c", 3, steps=3), req("d", 4, guidance_scale=2.0), req("e", 5, negative_prompt="x"),
             GenerationRequest(prompt="f", seed=6, width=64, height=128, steps=2)]
    assert len({r.batch_key() for r in [a, *other]}) == 1 + len(other)
    assert group_compatible([a, other[0], b, other[0]]) == [[0, 2], [1, 3]]


def test_batch_keeps_each_requests_prompt_and_seeds(pipes):
    a, b = req("a red cat", 1), req("a blue dog on the grass", 7, n=2)
    alone_a, alone_b = generate_batch(pipes, [a])[0], generate_batch(pipes, [b])[0]
    together = generate_batch(pipes, [a, b])
    assert len(together[0]) == 1 and len(together[1]) == 2
    assert diff(together[0][0], alone_a[0]) <= TOLERANCE
    assert all(diff(x, y) <= TOLERANCE for x, y in zip(together[1], alone_b, strict=True))
    # ... and the images really are different images (so the tolerance above is meaningful).
    assert diff(alone_a[0], alone_b[0]) > 40 and diff(alone_b[0], alone_b[1]) > 40
    # Same as the shared factory (components.diffusion.pipelines) for a request alone: image i seeded seed + i.
    assert diff(alone_b[1], pipes.generate(b)[1]) <= TOLERANCE


def test_mixed_batch_runs_each_group_with_its_own_settings(pipes):
    a, slow = req("a", 1), req("b", 2, steps=3)
    out = generate_batch(pipes, [a, slow])
    assert diff(out[0][0], generate_batch(pipes, [a])[0][0]) <= TOLERANCE
    assert diff(out[1][0], generate_batch(pipes, [slow])[0][0]) <= TOLERANCE


def test_too_many_tokens_refuses_only_that_request(pipes):
    ok, long = req("a cat", 1), req("word " * 40, 2)  # the tiny tokenizer is per character: > 77 tokens
    outcomes = serve_batch("m", "3", pipes, [ok, long])
    assert outcomes[0].error is None and len(outcomes[0].images) == 1 and outcomes[0].version == "3"
    assert outcomes[1].error and "never truncated" in outcomes[1].error and outcomes[1].param == "prompt"
    assert Image.open(io.BytesIO(outcomes[0].images[0])).size == (64, 64)
    tokens = len(pipes.t2i.tokenizer("a cat", truncation=False).input_ids)
    assert outcomes[0].usage.text_tokens == tokens > 2 and outcomes[0].usage.output_tokens == 8 * 8
    assert outcomes[1].usage is None  # refused: nothing used


def test_each_request_of_a_batch_is_encoded_in_its_own_format(pipes):
    out = serve_batch("m", "1", pipes, [req("a", 1, output_format="jpeg", output_compression=50),
                                        req("b", 2, output_format="webp"), req("c", 3)])
    assert [Image.open(io.BytesIO(o.images[0])).format for o in out] == ["JPEG", "WEBP", "PNG"]
    assert [o.output_format for o in out] == ["jpeg", "webp", "png"] and out[0].batch_size == 3


def test_zero_denoising_steps_is_refused_not_an_error(pipes):
    image = Image.new("RGB", (64, 64))
    (out,) = serve_batch("m", "1", pipes, [req("x", 1, image=image, strength=0.2)])  # int(2 * 0.2) = 0
    assert out.param == "strength" and "at least one denoising step" in out.error and not out.images


def test_img2img_and_inpaint_batch(pipes):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    i2i = [req("x", 1, image=image, strength=0.6), req("y", 2, image=image, strength=0.6)]
    inp = [req("x", 1, image=image, mask=mask), req("y", 2, image=image, mask=mask)]
    for pair in (i2i, inp):
        together = generate_batch(pipes, pair)
        for r, images in zip(pair, together, strict=True):
            assert images[0].size == (64, 64)
            assert diff(images[0], generate_batch(pipes, [r])[0][0]) <= TOLERANCE


def test_a_failing_request_fails_alone_and_its_batch_mates_get_their_images(pipes, monkeypatch):
    """A shared call that raises is retried request by request: only the request that fails on its
    own gets ``failure``; the others get exactly the images they get alone."""
    real, calls = ZTSNRPipelines.generate_group, []

    def flaky(self, group, output_type="pil", partials=None):
        calls.append([r.prompt for r in group])
        if any(r.prompt == "boom" for r in group):
            raise RuntimeError("out of memory (simulated)")
        return real(self, group, output_type, partials)

    ok1, bad, ok2 = req("a red cat", 1), req("boom", 2), req("a blue dog", 3)
    alone = [generate_batch(pipes, [r])[0][0] for r in (ok1, ok2)]
    monkeypatch.setattr(ZTSNRPipelines, "generate_group", flaky)
    out = serve_batch("m", "1", pipes, [ok1, bad, ok2])
    assert calls == [["a red cat", "boom", "a blue dog"], ["a red cat"], ["boom"], ["a blue dog"]]
    assert out[1].failure == "RuntimeError" and out[1].images == [] and out[1].error is None
    for o, image in zip((out[0], out[2]), alone, strict=True):
        assert o.failure is None and len(o.images) == 1
        assert diff(Image.open(io.BytesIO(o.images[0])), image) == 0  # run alone, so bit-identical


def test_a_failure_is_a_500_and_a_refusal_a_400():
    with pytest.raises(ApiError) as err:
        raise_for_result(GenerationResult("m", "1", 0, [], failure="RuntimeError"))
    assert err.value.status == 500 and err.value.type == "server_error" and "RuntimeError" in err.value.message
    with pytest.raises(ApiError) as err:
        raise_for_result(GenerationResult("m", "1", 0, [], error="prompt is 90 tokens", param="prompt"))
    assert err.value.status == 400 and err.value.code == "prompt_too_long"
    raise_for_result(GenerationResult("m", "1", 0, [b"png"]))  # images: no error


def test_a_failing_token_check_or_png_encoding_fails_only_its_own_request(pipes, monkeypatch):
    """The steps of a dynamic batch outside the pipeline call are per request too: a token check that
    raises refuses its request alone (400), and a PNG encoding that raises fails its request alone (500);
    the batch mates get their images (docs/reliability.md, Endpoint)."""
    real_overflow, real_encode = batching.token_overflow, batching.encode_image

    def overflow(p, text):
        if text == "tokenizer bomb":
            raise TypeError("simulated tokenizer failure")
        return real_overflow(p, text)

    encoded = []

    def encode(image, *args):
        encoded.append(image)
        if len(encoded) == 2:  # the second image of the batch
            raise OSError("simulated encoder failure")
        return real_encode(image, *args)

    monkeypatch.setattr(batching, "token_overflow", overflow)
    monkeypatch.setattr(batching, "encode_image", encode)
    out = serve_batch("m", "1", pipes, [req("a red cat", 1), req("tokenizer bomb", 2), req("a blue dog", 3),
                                        req("a green frog", 4)])
    assert out[1].error and "could not be tokenized" in out[1].error and out[1].failure is None
    assert out[2].failure == "OSError" and out[2].images == []
    assert len(out[0].images) == 1 and len(out[3].images) == 1 and out[0].failure is None and out[3].failure is None


def test_a_streamed_request_gets_its_x0_predictions_then_the_same_final_image(pipes):
    """``PARTIALS`` on the thread: the one request's pipeline call emits a decoded x0 prediction after each
    partial step (the last step's is the final image's latents, so it is that image), and its final image is
    the one it gets unstreamed; a set ``stop`` skips the remaining steps, and nothing more is emitted."""
    r = req("a red cat", 7, steps=4)
    plain = generate_batch(pipes, [r])[0][0]
    got: list[tuple[int, Image.Image]] = []
    token = batching.PARTIALS.set(Partials(3, lambda i, im: got.append((i, im))))
    try:
        (out,) = serve_batch("m", "1", pipes, [r])
    finally:
        batching.PARTIALS.reset(token)
    assert [i for i, _ in got] == [0, 1, 2] and all(im.size == (64, 64) for _, im in got)
    assert diff(Image.open(io.BytesIO(out.images[0])), plain) == 0
    assert diff(got[0][1], plain) > 10  # the x0 predicted after step 2 of 4 is not yet the image
    stopped = Partials(3, lambda i, im: (got.append((i, im)), stopped.stop.set()))
    got.clear()
    token = batching.PARTIALS.set(stopped)
    try:
        (out,) = serve_batch("m", "1", pipes, [r])
    finally:
        batching.PARTIALS.reset(token)
    assert [i for i, _ in got] == [0] and out.failure is None
    assert diff(Image.open(io.BytesIO(out.images[0])), plain) > 10  # steps 2 to 4 were skipped
