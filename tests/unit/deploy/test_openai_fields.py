"""The fields the current openai-python sends, without a server: output formats, background, quality, moderation,
sizes on the model's grid, vLLM-Omni's spellings, and ``usage`` as the SDK parses it."""

from __future__ import annotations

import io

import pytest
from openai.types import ImagesResponse
from PIL import Image

from components.config import Config
from components.diffusion.request import GenerationRequest, GenerationResult, Usage, encode_image
from deploy.api import QUALITY_STEPS, ApiError, parse_params, to_request
from deploy.app import render_result

CFG = Config()


def build(**raw) -> GenerationRequest:
    return to_request(parse_params({"prompt": "a cat", **raw}), CFG)


def refused(**raw) -> ApiError:
    with pytest.raises(ApiError) as err:
        build(**raw)
    assert err.value.status == 400 and err.value.message
    return err.value


@pytest.mark.parametrize("fmt, pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_each_output_format_encodes_as_itself(fmt, pil):
    req = build(output_format=fmt)
    assert req.output_format == fmt
    image = Image.new("RGB", (64, 48), (200, 40, 40))
    decoded = Image.open(io.BytesIO(encode_image(image, req.output_format, req.output_compression)))
    assert decoded.format == pil and decoded.size == (64, 48)


def test_no_output_format_is_png():
    assert build().output_format == "png"


def test_output_compression_sets_the_lossy_quality():
    noisy = Image.effect_noise((128, 128), 80).convert("RGB")
    for fmt in ("jpeg", "webp"):
        small, large = (len(encode_image(noisy, fmt, build(output_format=fmt, output_compression=c).output_compression))
                        for c in (10, 95))
        assert small < large / 2, (fmt, small, large)


@pytest.mark.parametrize("raw, param", [
    ({"output_format": "jpeg", "output_compression": 101}, "output_compression"),
    ({"output_format": "webp", "output_compression": -1}, "output_compression"),
    ({"output_compression": 50}, "output_compression"),  # PNG: lossless, nothing to set
    ({"output_format": "gif"}, "output_format"),
    ({"output_format": "svg"}, "output_format"),
    ({"background": "transparent"}, "background"),
    ({"background": "transparent", "output_format": "webp"}, "background"),
    ({"background": "green"}, "background"),
    ({"moderation": "none"}, "moderation"),
    ({"quality": "ultra"}, "quality"),
    ({"steps": 5, "num_inference_steps": 6}, "num_inference_steps"),
    ({"num_inference_steps": CFG.serve.max_steps + 1}, "num_inference_steps"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"partial_images": 2}, "partial_images"),  # without stream true
    ({"stream": False, "partial_images": 1}, "partial_images"),
    ({"stream": True, "partial_images": 4}, "partial_images"),
    ({"stream": True, "partial_images": -1}, "partial_images"),
    ({"stream": True, "n": 2}, "n"),
])
def test_refusals_name_the_field(raw, param):
    assert refused(**raw).param == param


def test_transparent_background_says_why():
    message = refused(background="transparent").message
    assert "background" in message and "alpha" in message and "opaque" in message


@pytest.mark.parametrize("background", ["opaque", "auto", None])
@pytest.mark.parametrize("moderation", ["auto", "low", None])
def test_opaque_auto_and_moderation_are_accepted(background, moderation):
    assert build(background=background, moderation=moderation).prompt == "a cat"


def test_quality_maps_to_the_documented_steps():
    for quality, steps in QUALITY_STEPS.items():
        assert build(quality=quality).steps == min(steps, CFG.serve.max_steps), quality
    assert build(quality="auto").steps == CFG.serve.default_steps
    assert build(quality="standard").steps == build(quality="medium").steps
    assert build(quality="hd").steps == build(quality="high").steps
    assert build(quality="auto", steps=7).steps == 7
    assert build(quality="high", num_inference_steps=7).steps == 7  # the exact setting wins
    capped = CFG.model_copy(update={"serve": CFG.serve.model_copy(update={"max_steps": 12})})
    assert to_request(parse_params({"prompt": "a", "quality": "max"}), capped).steps == 12


def test_vllm_omni_spellings_are_this_servers_settings():
    req = build(num_inference_steps=7, guidance_scale=4.5, seed=3, negative_prompt="blur")
    assert (req.steps, req.guidance_scale, req.seed, req.negative_prompt) == (7, 4.5, 3, "blur")
    assert build(steps=7, num_inference_steps=7).steps == 7


def test_auto_size_is_the_default_size_and_the_grid_is_accepted():
    s = CFG.serve
    req = build(size="auto")
    assert (req.width, req.height) == (s.default_size, s.default_size)
    for width, height in ((s.min_side, s.max_side), (s.min_side + 8, s.min_side + 16), (s.max_side, s.max_side)):
        req = build(size=f"{width}x{height}")
        assert (req.width, req.height) == (width, height)


@pytest.mark.parametrize("size", ["60x64", "64x1028", f"{CFG.serve.max_side + 8}x64", "56x64", "huge", "1024"])
def test_a_size_off_the_grid_names_the_grid(size):
    err = refused(size=size)
    s = CFG.serve
    assert err.param == "size"
    assert f"multiple of 8 from {s.min_side} to {s.max_side}" in err.message and "'auto'" in err.message


def test_usage_counts_tokens_and_latent_positions_and_the_sdk_parses_it():
    req = GenerationRequest(prompt="a", width=64, height=128, n=2)
    usage = Usage.of(req, text_tokens=5)
    assert (usage.image_tokens, usage.output_tokens) == (0, 2 * 8 * 16)
    edit = Usage.of(GenerationRequest(prompt="a", width=64, height=64, image=Image.new("RGB", (64, 64))), 5)
    assert (edit.image_tokens, edit.output_tokens) == (64, 64)

    result = GenerationResult("m", "1", 9, [b"img", b"img"], output_format="webp", usage=usage)
    parsed = ImagesResponse.model_validate_json(render_result(result).body)
    assert parsed.output_format == "webp" and parsed.background == "opaque" and len(parsed.data) == 2
    assert parsed.usage.input_tokens == 5 and parsed.usage.output_tokens == 256
    assert parsed.usage.total_tokens == 261
    assert parsed.usage.input_tokens_details.text_tokens == 5 and parsed.usage.input_tokens_details.image_tokens == 0
