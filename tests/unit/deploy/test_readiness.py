"""The ingress's readiness (``/healthz``): the model's answers to requests keep it current, and the watcher asks
the model only when it has heard nothing for a poll interval."""

from __future__ import annotations

import asyncio

from components.diffusion.request import GenerationResult
from deploy.app import Readiness, served_base

INFO = {"name": "terminus", "version": "3"}


class Model:
    """The model deployment's ``info`` call, counted; it fails while ``down``."""

    def __init__(self):
        self.asked, self.down = 0, False

    async def info(self) -> dict:
        self.asked += 1
        if self.down:
            raise ConnectionError("replica gone")
        return dict(INFO)


def test_a_probe_before_any_traffic_asks_the_model_once():
    async def run():
        model = Model()
        ready = Readiness(model.info, poll_s=60)
        first = await ready.current()
        await asyncio.sleep(0.05)
        return first, await ready.current(), model.asked

    first, again, asked = asyncio.run(run())
    assert first == again == (INFO, "") and asked == 1


def test_answered_requests_keep_it_ready_without_asking_the_model():
    async def run():
        model = Model()
        ready = Readiness(model.info, poll_s=60)
        ready.seen({"name": "terminus", "version": "4"})  # a request was answered before the first probe
        answers = []
        for _ in range(5):
            answers.append(await ready.current())
            await asyncio.sleep(0.01)
        return answers, model.asked

    answers, asked = asyncio.run(run())
    assert answers == [({"name": "terminus", "version": "4"}, "")] * 5 and asked == 0


def test_it_asks_again_once_quiet_and_a_later_answer_makes_it_ready_again():
    async def run():
        model = Model()
        ready = Readiness(model.info, poll_s=0.05, timeout_s=1.0, stale_s=60)
        assert await ready.current() == (INFO, "")
        model.down = True
        for _ in range(100):  # the watcher asks again after 0.05 s of silence, and hears the failure
            await asyncio.sleep(0.02)
            if (await ready.current())[0] is None:
                break
        down = await ready.current()
        ready.seen(INFO)  # a request served by another replica
        return down, await ready.current(), model.asked

    down, after, asked = asyncio.run(run())
    assert down == (None, "ConnectionError") and after == (INFO, "") and asked >= 2


def test_served_base_names_the_base_for_a_base_and_for_an_adapter_result():
    base = GenerationResult(images=[], seed=0, name="terminus", version="7")
    adapted = GenerationResult(images=[], seed=0, name="terminus-style", version="2", base="terminus/7")
    assert served_base(base) == served_base(adapted) == {"name": "terminus", "version": "7"}
