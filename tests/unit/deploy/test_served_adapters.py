"""The adapter a request names, refused the way a client can act on: a name that is not a servable adapter is one
404 whatever the registry said, and a weights file that cannot be loaded a 422 with its reason in one line (never
a 500, never an unpickling, the base left as it was)."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST
from safetensors import safe_open
from safetensors.torch import save

from components.diffusion.adapters import ADAPTER_FILE, AdapterError, AdapterSlots, read_adapter, save_adapter
from components.diffusion.request import GenerationRequest
from components.registry.adapter_versions import AdapterVersion
from deploy import served_adapters
from deploy.api import ApiError, raise_for_result
from deploy.served_adapters import AdapterRefused, ReplicaAdapters
from tests.unit.diffusion.test_adapters import base_dir, fresh_unet, random_adapter, unet_output  # noqa: F401

READ_TIME = ("pickle", "empty", "cut_header", "header_past_the_end", "header_not_json", "metadata_not_json")
"""Hostile files refused as they are read; the others are refused when attached to the base."""


class _RunsCode:
    """Unpickling this creates ``marker``: the proof, if the file shows up, that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_files(good: Path, marker: Path) -> dict[str, bytes]:
    """Weights files that must not load in place of the adapter file ``good``, by kind."""
    data = good.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    with safe_open(str(good), framework="pt") as fh:
        meta = fh.metadata()
        state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    bad_json = b'{"__metadata__": {'
    return {
        "pickle": pickle.dumps({"unet.x.lora_A.weight": _RunsCode(marker)}),  # named .safetensors in its folder
        "empty": b"",
        "cut_header": data[:8 + header_len // 2],
        "header_past_the_end": struct.pack("<Q", len(data) * 4) + data[8:],
        "header_not_json": struct.pack("<Q", len(bad_json)) + bad_json,
        "metadata_not_json": save(state, metadata={**meta, "lora_adapter_metadata": "{not json"}),
        "wrong_shapes": save({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in state.items()}, metadata=meta),
        "unknown_keys": save({**state, "unet.down_blocks.7.attentions.0.to_q.lora_A.weight": torch.zeros(4, 8)},
                             metadata=meta),
    }


@pytest.fixture(scope="module")
def good_adapter(base_dir, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    weights = random_adapter(base_dir, "lora", seed=5)
    return weights, save_adapter(tmp_path_factory.mktemp("good"), weights.state, weights.config)


def http_answer(refused: AdapterRefused) -> tuple[int, dict]:
    """The status and JSON body the client gets for ``refused`` (the ingress's ``raise_for_result``)."""
    with pytest.raises(ApiError) as err:
        raise_for_result(refused.result(GenerationRequest(prompt="a cat", seed=1)))
    return err.value.status, err.value.body()


@pytest.mark.parametrize("kind", [*READ_TIME, "wrong_shapes", "unknown_keys"])
def test_each_hostile_weights_file_is_refused_and_the_base_stays_as_it_was(
        kind, good_adapter, base_dir, tmp_path, monkeypatch):  # noqa: F811 (the fixture imported above)
    _, good = good_adapter
    marker = tmp_path / "pickle-ran"
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / ADAPTER_FILE).write_bytes(hostile_files(good, marker)[kind])
    version = AdapterVersion("terminus-bad", "3", folder, "lora", "models:/terminus/1", "0" * 64)
    monkeypatch.setattr(served_adapters, "fetch_adapter", lambda uri, cache: version)
    adapters = ReplicaAdapters(tmp_path / "cache", 0)
    if kind in READ_TIME:
        with pytest.raises(AdapterRefused) as err:
            adapters.read("terminus-bad@champion")
        refused = err.value
    else:
        weights = adapters.read("terminus-bad@champion")[1]
        unet = fresh_unet(base_dir)
        before = unet_output(unet)
        slots = AdapterSlots(unet)
        with pytest.raises(AdapterError) as err:
            slots.ensure(version.key, weights)
        refused = served_adapters.unloadable(version, err.value)
        assert not slots.attached and not (getattr(unet, "peft_config", None) or {})
        with slots.running(None):
            assert torch.equal(unet_output(unet), before)
    status, body = http_answer(refused)
    message = body["error"]["message"]
    assert status == 422 and body["error"]["code"] == "adapter_unloadable", body
    assert message.startswith("adapter terminus-bad v3 cannot be loaded: ") and "\n" not in message
    assert str(tmp_path) not in message  # the server's paths stay on the server
    assert not marker.exists()


def test_a_good_file_still_reads(good_adapter):
    weights, good = good_adapter
    assert set(read_adapter(good).state) == set(weights.state)


class _Registry:
    """``mlflow.MlflowClient`` for one answer: raise ``error`` (an MlflowException) or return ``version``."""

    def __init__(self, error: Exception | None = None, version: object = None):
        self.error, self.version = error, version

    def __call__(self):
        return self

    def get_model_version_by_alias(self, name, alias):
        if self.error is not None:
            raise self.error
        return self.version

    get_model_version = get_model_version_by_alias


def test_unknown_unauthorised_and_full_model_names_get_the_same_answer(tmp_path, monkeypatch):
    answers = []
    registries = [
        _Registry(MlflowException("Registered Model with name=terminus-secret not found",
                                  error_code=RESOURCE_DOES_NOT_EXIST)),
        _Registry(MlflowException("Permission denied for terminus-secret", error_code=PERMISSION_DENIED)),
        _Registry(version=SimpleNamespace(name="terminus-secret", version="2", tags={}, source="")),  # a full model
    ]
    for registry in registries:
        monkeypatch.setattr(mlflow, "MlflowClient", registry)
        with pytest.raises(AdapterRefused) as err:
            ReplicaAdapters(tmp_path, 0).read("terminus-secret@champion")
        answers.append(http_answer(err.value))
    assert answers[0][0] == 404 and answers[0][1]["error"]["code"] == "model_not_found"
    assert answers[0] == answers[1] == answers[2], answers
    text = str(answers[0])
    assert "RESOURCE_DOES_NOT_EXIST" not in text and "PERMISSION_DENIED" not in text and "full model" not in text
