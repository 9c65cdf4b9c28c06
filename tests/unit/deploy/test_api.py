"""The HTTP contract without a server: validation, defaults, limits, images, masks, multipart."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from components.config import Config, load_config
from components.diffusion.request import GenerationRequest
from deploy.api import (
    ApiError,
    adapter_id,
    api_token,
    decode_upload,
    fit_edit_images,
    mask_to_l,
    parse_multipart,
    parse_params,
    parse_size,
    to_request,
)

CFG = Config()
NAME = "terminus-tiny"


def png(size=(64, 64), mode="RGB", color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def refused(fn, *args, status=400, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as err:
        fn(*args, **kwargs)
    assert err.value.status == status, err.value.message
    assert err.value.message
    return err.value


def request(*args, **kwargs) -> GenerationRequest:
    """What the model replica runs: the ingress's request completed with the preset's inference defaults."""
    return to_request(*args, **kwargs).complete(CFG.inference.model_dump())


def test_defaults_come_from_the_config():
    req = request(parse_params({"prompt": "a cat"}), CFG)
    assert (req.width, req.height) == (CFG.serve.default_size, CFG.serve.default_size)
    assert req.steps == CFG.serve.default_steps
    assert req.guidance_rescale == 0.7  # Lin et al. eq. 16, the ZT-SNR default
    assert req.guidance_scale == CFG.inference.guidance_scale
    assert req.n == 1 and req.mode == "text2img"
    assert isinstance(req.seed, int) and req.seed >= 0  # drawn, so the response can report it


def test_openai_fields_and_extras_are_accepted():
    raw = {"prompt": "a cat", "model": NAME, "n": 2, "size": "64x128", "response_format": "b64_json",
           "quality": "standard", "style": "vivid", "user": "u1", "output_format": "png",
           "negative_prompt": "blur", "steps": 3, "guidance_scale": 5.5, "guidance_rescale": 0.5, "seed": 9}
    req = request(parse_params(raw), CFG)
    assert (req.width, req.height, req.n, req.steps, req.seed) == (64, 128, 2, 3, 9)
    assert (req.guidance_scale, req.guidance_rescale, req.negative_prompt) == (5.5, 0.5, "blur")


@pytest.mark.parametrize("size", ["64x64", "1024x1024", "64x1024", "auto", None])
def test_sizes_in_limits(size):
    parsed = parse_size(size, CFG)
    assert parsed is None or (parsed[0] % 8 == 0 and parsed[1] % 8 == 0)


@pytest.mark.parametrize("size", ["65x64", "64x60", "2048x2048", "1032x64", "32x32", "64", "64*64", "-64x64",
                                  "x", "64x64x64", "99999999x8"])
def test_sizes_refused(size):
    err = refused(parse_size, size, CFG)
    assert err.param == "size"


@pytest.mark.parametrize(
    "raw, param",
    [
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": "a", "n": CFG.serve.max_n + 1}, "n"),
        ({"prompt": "a", "steps": CFG.serve.max_steps + 1}, "steps"),
        ({"prompt": "a", "steps": 0}, "steps"),
        ({"prompt": "x" * (CFG.serve.max_prompt_chars + 1)}, "prompt"),
        ({"prompt": "a", "negative_prompt": "x" * (CFG.serve.max_prompt_chars + 1)}, "negative_prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "a", "guidance_rescale": 1.5}, "guidance_rescale"),
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "seed": 2**64}, "seed"),
        ({"prompt": "a", "strength": 0.5}, "strength"),  # text-to-image has no input image
        ({"prompt": "a", "response_format": "jpeg"}, "response_format"),
        ({"prompt": "a", "output_format": "gif"}, "output_format"),
    ],
)
def test_limits_refused_with_the_field_named(raw, param):
    err = refused(lambda: to_request(parse_params(raw), CFG))
    assert err.param == param


def test_url_response_format_says_why():
    err = refused(lambda: to_request(parse_params({"prompt": "a", "response_format": "url"}), CFG))
    assert "b64_json" in err.message and "not supported" in err.message


def test_long_prompt_is_refused_not_truncated():
    err = refused(lambda: to_request(parse_params({"prompt": "y" * 5000}), CFG))
    assert "never truncated" in err.message and err.code == "prompt_too_long"


def test_the_model_field_and_header_name_the_base_or_an_adapter():
    assert adapter_id(None, None, NAME) is None and adapter_id(NAME, None, NAME) is None
    assert adapter_id("terminus-style@champion", None, NAME) == "terminus-style@champion"
    assert adapter_id("models:/terminus-style/3", None, NAME) == "terminus-style/3"
    assert adapter_id("terminus-style", None, NAME) == "terminus-style@champion"
    assert adapter_id(None, "terminus-style@canary", NAME) == "terminus-style@canary"
    assert adapter_id(NAME, "terminus-style@canary", NAME) == "terminus-style@canary"  # the base + an adapter header
    err = refused(adapter_id, "other@champion", "terminus-style@champion", NAME)
    assert "different models" in err.message and err.param == "model"
    err = refused(adapter_id, "a style; rm -rf", None, NAME)
    assert "NAME@ALIAS" in err.message
    assert refused(adapter_id, f"{NAME}@challenger", None, NAME, status=404).code == "model_not_found"


def test_unknown_field_400():
    err = refused(parse_params, {"prompt": "a", "sampler": "euler"})
    assert err.param == "sampler"
    refused(parse_params, {"n": 1})  # prompt missing
    refused(parse_params, ["not", "an", "object"])
    refused(parse_params, {"prompt": "a", "guidance_scale": math.nan})
    refused(parse_params, {"prompt": 12})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
fields = st.sampled_from(["prompt", "n", "size", "steps", "seed", "guidance_scale", "guidance_rescale", "model",
                          "response_format", "negative_prompt", "strength", "quality", "extra"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(fields, json_values | st.sampled_from(["64x64", "a cat", "b64_json", "8x8"]), max_size=6))
def test_any_json_body_is_accepted_or_refused_with_4xx(raw):
    """Property: whatever a client sends, the contract answers a request or an ApiError 4xx, nothing else."""
    try:
        req = request(parse_params(raw), CFG)
    except ApiError as err:
        assert 400 <= err.status < 500 and err.message
    else:
        assert 1 <= req.n <= CFG.serve.max_n and 1 <= req.steps <= CFG.serve.max_steps
        assert req.width % 8 == 0 and req.width <= CFG.serve.max_side


# --- images and masks ----------------------------------------------------------------------------


def test_decode_upload_refuses_garbage_truncation_and_bombs():
    assert decode_upload(png(), "image", CFG).size == (64, 64)
    refused(decode_upload, b"", "image", CFG)
    refused(decode_upload, b"not an image at all", "image", CFG)
    refused(decode_upload, png()[:60], "image", CFG)  # truncated PNG
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    refused(decode_upload, gif.getvalue(), "image", CFG)  # not a format the API accepts
    small = load_config(None, ["serve.max_upload_pixels=4096"])
    err = refused(decode_upload, png((128, 128)), "image", small)  # refused from the header, undecoded
    assert "pixels" in err.message


def test_openai_mask_alpha_becomes_diffusers_white():
    mask = Image.new("RGBA", (16, 16), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (4, 4, 12, 12))  # transparent square = the area to edit (OpenAI)
    out = np.asarray(mask_to_l(mask))
    assert out[8, 8] == 255 and out[0, 0] == 0  # diffusers: white is repainted
    grey = Image.new("L", (16, 16), 255)
    assert np.asarray(mask_to_l(grey)).min() == 255  # no alpha: read as diffusers reads it


def test_edit_images_checks_mask_size_and_resizes():
    image = Image.new("RGB", (64, 64))
    err = refused(fit_edit_images, image, Image.new("L", (32, 32)), None, CFG)
    assert err.param == "mask" and "32x32" in err.message
    out, mask = fit_edit_images(image, Image.new("L", (64, 64)), (128, 128), CFG)
    assert out.size == mask.size == (128, 128)
    refused(fit_edit_images, Image.new("RGB", (100, 75)), None, None, CFG)  # not multiples of 8
    req = request(parse_params({"prompt": "a", "strength": 0.4}), CFG, image=image)
    assert req.mode == "img2img" and req.strength == 0.4 and (req.width, req.height) == (64, 64)
    req = request(parse_params({"prompt": "a"}), CFG, image=image, mask=Image.new("L", (64, 64)))
    assert req.mode == "inpaint" and req.strength == CFG.inference.inpaint_strength == 1.0  # the preset's default


# --- multipart -----------------------------------------------------------------------------------


def multipart(files, data):
    request = httpx.Request("POST", "http://x/v1/images/edits", files=files, data=data)
    return request.headers["content-type"], request.read()


def test_multipart_round_trips_binary_files_exactly():
    # Bytes that a line-oriented parser could mangle: CR, LF, CRLF, and a fake boundary prefix.
    tricky = png() + b"\r\n--\r\n\n\r" + bytes(range(256))
    ctype, body = multipart({"image": ("a.png", tricky, "image/png"), "mask": ("m.png", b"\x00\r\n", "image/png")},
                            {"prompt": "a caf\u00e9", "n": "2"})
    fields, files = parse_multipart(ctype, body)
    assert files["image"] == tricky and files["mask"] == b"\x00\r\n"
    assert fields == {"prompt": "a caf\u00e9", "n": "2"}
    params = parse_params(fields)
    assert params.n == 2


def test_multipart_refusals():
    refused(parse_multipart, "application/json", b"{}")
    refused(parse_multipart, "multipart/form-data", b"no boundary")
    ctype, body = multipart([("image", ("a.png", png(), "image/png")), ("image", ("b.png", png(), "image/png"))], {})
    err = refused(parse_multipart, ctype, body)
    assert "more than once" in err.message


# --- multipart structure: part count, nesting, boundaries, duplicates, headers ------------------------


def raw_part(name: bytes, payload: bytes = b"x", headers: bytes = b"", boundary: bytes = b"b") -> bytes:
    return (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name + b'"\r\n' + headers
            + b"\r\n" + payload + b"\r\n")


def body_of(*parts: bytes, boundary: bytes = b"b") -> bytes:
    return b"".join(parts) + b"--" + boundary + b"--\r\n"


def hostile_tiny_parts(size: int = 8 * 1024 * 1024) -> bytes:
    """About 140,000 tiny parts in 8 MiB, the body that cost the email parser ~28 s of CPU; each with
    its own name, so that no duplicate-name check stops it early."""
    parts, total, i = [], 0, 0
    while total < size - 200:
        part = b'--b\r\nContent-Disposition: form-data; name="%x"\r\n\r\n\r\n' % i
        parts.append(part)
        total, i = total + len(part), i + 1
    return body_of(*parts)


def nested(depth: int) -> tuple[str, bytes]:
    """A part that is itself multipart, ``depth`` levels deep (~340 KB at 3,000 levels)."""
    inner = b"x"
    for level in range(depth, 0, -1):
        b = f"n{level}".encode()
        inner = (b"--" + b + b"\r\nContent-Type: multipart/mixed; boundary=n" + str(level + 1).encode()
                 + b"\r\n\r\n" + inner + b"\r\n--" + b + b"--")
    part = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: multipart/mixed; boundary=n1\r\n\r\n" + inner + b"\r\n")
    return "multipart/form-data; boundary=b", body_of(part)


def test_a_body_of_many_tiny_parts_is_refused_at_once():
    """Before: the email parser spent ~28 s of CPU on this body, blocking the ingress's event loop."""
    body = hostile_tiny_parts()
    assert len(body) > 8_000_000 and body.count(b"--b\r\n") > 130_000
    start = time.process_time()
    err = refused(parse_multipart, "multipart/form-data; boundary=b", body)
    assert time.process_time() - start < 1.0 and "more than 32 parts" in err.message
    ok = body_of(*[raw_part(f"f{i}".encode()) for i in range(32)])
    assert len(parse_multipart("multipart/form-data; boundary=b", ok)[0]) == 32


def test_nested_multipart_is_a_400_not_a_recursion_error():
    """Before: ~3,000 levels raised RecursionError inside the email parser (a 500)."""
    err = refused(parse_multipart, *nested(3000))
    assert "nested multipart" in err.message
    refused(parse_multipart, *nested(1))


B = "multipart/form-data; boundary=b"
STRUCTURE = {
    "boundary-too-long": ("multipart/form-data; boundary=" + "a" * 71,
                          body_of(raw_part(b"prompt"), boundary=b"a" * 71)),
    "boundary-empty": ("multipart/form-data; boundary=", body_of(raw_part(b"prompt"), boundary=b"")),
    "boundary-bad-char": ("multipart/form-data; boundary=a\x00b", b"--a\x00b--\r\n"),
    "boundary-mismatch": ("multipart/form-data; boundary=other", body_of(raw_part(b"prompt"))),
    "no-closing-boundary": (B, raw_part(b"prompt")),
    "cut-in-headers": (B, b'--b\r\nContent-Disposition: form-data; na'),
    "empty-body": (B, b""),
    "garbage-before-boundary": (B, b"junk" + body_of(raw_part(b"prompt"))),
    "boundary-without-crlf": (B, b"--bXContent-Disposition: form-data\r\n\r\nx\r\n--b--"),
    "duplicate-field": (B, body_of(raw_part(b"prompt"), raw_part(b"prompt"))),
    "duplicate-field-brackets": (B, body_of(raw_part(b"image[]", headers=b"Content-Type: image/png\r\n"),
                                           raw_part(b"image"))),
    "duplicate-header": (B, body_of(raw_part(b"prompt", headers=b'Content-Disposition: form-data; name="n"\r\n'))),
    "huge-header": (B, body_of(raw_part(b"prompt", headers=b"X-Pad: " + b"a" * 5000 + b"\r\n"))),
    "huge-name": (B, body_of(raw_part(b"p" * 5000))),
    "many-headers": (B, body_of(raw_part(b"prompt", headers=b"".join(b"X-H%d: v\r\n" % i for i in range(12))))),
    "no-name": (B, b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n"),
    "not-form-data": (B, b'--b\r\nContent-Disposition: attachment; name="prompt"\r\n\r\nx\r\n--b--\r\n'),
    "no-disposition": (B, b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--\r\n"),
    "base64-encoded": (B, body_of(raw_part(b"prompt", b"YQ==", b"Content-Transfer-Encoding: base64\r\n"))),
    "name-not-utf8": (B, body_of(raw_part(b"\xff\xfe"))),
    "header-without-colon": (B, b"--b\r\nContent-Disposition form-data\r\n\r\nx\r\n--b--\r\n"),
    "too-many-parts": (B, body_of(*[raw_part(f"f{i}".encode()) for i in range(33)])),
}


@pytest.mark.parametrize(("ctype", "body"), STRUCTURE.values(), ids=STRUCTURE.keys())
def test_multipart_structure_abuse_is_a_400(ctype, body):
    refused(parse_multipart, ctype, body)


def test_multipart_quoted_boundary_and_epilogue_are_accepted():
    ctype = 'multipart/form-data; boundary="a b:c"'
    body = body_of(raw_part(b"prompt", b"a cat", boundary=b"a b:c"), boundary=b"a b:c") + b"an epilogue\r\n"
    assert parse_multipart(ctype, body) == ({"prompt": "a cat"}, {})


def test_the_api_key_is_stripped_and_a_blank_one_fails_closed():
    """A key from ``kubectl create secret --from-file`` ends with a newline: every request was a 401."""
    assert api_token("TERMINUS_API_KEY", {"TERMINUS_API_KEY": "sk-abc123\n"}) == b"sk-abc123"
    assert api_token("TERMINUS_API_KEY", {"TERMINUS_API_KEY": "  sk-abc123\r\n"}) == b"sk-abc123"
    assert api_token(None, {"TERMINUS_API_KEY": "sk-abc123"}) is None
    for environ in ({}, {"TERMINUS_API_KEY": ""}, {"TERMINUS_API_KEY": " \n"}):
        with pytest.raises(RuntimeError, match="unset or blank"):
            api_token("TERMINUS_API_KEY", environ)


def test_ingress_side_imports_no_model_stack():
    """The ingress replica imports deploy.app; torch, diffusers and mlflow belong to the model replica."""
    code = "import sys, deploy.app; print(sorted(m for m in ('torch', 'diffusers', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
