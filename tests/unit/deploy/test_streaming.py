"""Streamed requests without a server: which are accepted, and the server-sent events as openai-python parses them
(its own SSE decoder and event types), and where the partial images are taken."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from openai import APIError, OpenAI, Stream
from openai._streaming import SSEDecoder
from openai.types import ImageEditStreamEvent, ImageGenStreamEvent
from pydantic import TypeAdapter

from components.config import Config
from components.diffusion.pipelines import partial_steps
from components.diffusion.request import GenerationRequest, GenerationResult, PartialImage, Usage
from deploy.api import parse_params, stream_event, streaming, to_request

CFG = Config()


def params(**raw):
    return parse_params({"prompt": "a cat", **raw})


def decoded(raw: bytes):
    (event,) = list(SSEDecoder().iter_bytes(iter([raw])))
    return event


@pytest.mark.parametrize("partial_images", [None, 0, 1, 3])
def test_stream_true_is_accepted_with_zero_to_three_partial_images(partial_images):
    p = params(stream=True, partial_images=partial_images)
    assert to_request(p, CFG).n == 1
    assert streaming(p, "image_generation").partial_images == (partial_images or 0)


def test_a_request_without_stream_is_not_streamed_and_quality_is_echoed_in_openais_names():
    assert streaming(params(), "image_generation") is None
    assert streaming(params(stream=False), "image_generation") is None
    assert streaming(params(stream=True), "image_edit").quality == "auto"
    assert streaming(params(stream=True, quality="hd"), "image_edit").quality == "high"
    assert streaming(params(stream=True, quality="low"), "image_edit").quality == "low"


REQ = GenerationRequest(prompt="a cat", width=64, height=48, steps=2, seed=1, output_format="webp")


def test_events_parse_as_the_sdks_stream_event_types():
    s = streaming(params(stream=True, partial_images=2, quality="medium"), "image_generation")
    partial = decoded(stream_event(PartialImage(1, b"partial"), REQ, s))
    assert partial.event == "image_generation.partial_image"
    event = TypeAdapter(ImageGenStreamEvent).validate_python(partial.json())
    assert (event.type, event.partial_image_index, base64.b64decode(event.b64_json)) == (
        "image_generation.partial_image", 1, b"partial")
    assert (event.size, event.quality, event.background, event.output_format) == ("64x48", "medium", "opaque", "webp")
    done = GenerationResult("m", "1", 1, [b"final"], output_format="webp", usage=Usage(5, 0, 48))
    completed = TypeAdapter(ImageGenStreamEvent).validate_python(decoded(stream_event(done, REQ, s)).json())
    assert completed.type == "image_generation.completed" and base64.b64decode(completed.b64_json) == b"final"
    assert (completed.usage.input_tokens, completed.usage.output_tokens, completed.usage.total_tokens) == (5, 48, 53)
    edit = streaming(params(stream=True), "image_edit")
    assert TypeAdapter(ImageEditStreamEvent).validate_python(
        decoded(stream_event(done, REQ, edit)).json()).type == "image_edit.completed"


def test_a_failure_after_the_stream_began_is_an_error_event_the_sdk_raises():
    s = streaming(params(stream=True), "image_generation")
    event = decoded(stream_event(GenerationResult("m", "1", 1, [], failure="RuntimeError"), REQ, s))
    assert event.event == "error" and "failed" in json.loads(event.data)["error"]["message"]
    # The SDK's own stream over a canned response: it raises the error event's message.
    client = OpenAI(api_key="x", base_url="http://127.0.0.1:9/v1")
    response = httpx.Response(200, content=stream_event(GenerationResult("m", "1", 1, [], failure="X"), REQ, s),
                              request=httpx.Request("POST", "http://127.0.0.1:9/v1/images/generations"))
    with pytest.raises(APIError, match="the model failed"):
        list(Stream(cast_to=ImageGenStreamEvent, response=response, client=client))


@pytest.mark.parametrize("steps, count, expected", [
    (2, 2, [0, 1]), (10, 3, [2, 5, 7]), (10, 1, [5]), (1, 3, [0]), (20, 0, []),
])
def test_partial_steps_are_evenly_spaced_and_distinct(steps, count, expected):
    assert partial_steps(steps, count) == expected
