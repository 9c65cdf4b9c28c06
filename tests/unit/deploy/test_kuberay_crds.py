"""The KubeRay manifests against KubeRay's own CRD schemas (tests/fixtures/kuberay/README.md says which), with
unknown fields as errors: the API server prunes an unknown field silently, so a misspelt setting would be lost
on the cluster instead of refused."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.fixtures.processes import REPO

SCHEMAS = Path(__file__).resolve().parents[2] / "fixtures" / "kuberay"
MANIFESTS = {"rayjob.yaml": "rayjobs", "rayservice.yaml": "rayservices"}


def strict(node):
    """The schema with ``additionalProperties: false`` on every object that lists its properties and says
    nothing about others (Kubernetes' structural-schema pruning, made an error)."""
    if isinstance(node, list):
        return [strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


def validator(kind: str) -> jsonschema.Draft7Validator:
    with gzip.open(SCHEMAS / f"{kind}.schema.json.gz", "rt", encoding="utf-8") as fh:
        schema = strict(json.load(fh))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def errors(kind: str, manifest: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(kind).iter_errors(manifest)]


def manifest(name: str) -> dict:
    return yaml.safe_load((REPO / "deploy/kubernetes" / name).read_text())


@pytest.mark.parametrize(("name", "kind"), MANIFESTS.items())
def test_the_manifests_validate_against_kuberays_schemas_with_unknown_fields_as_errors(name, kind):
    doc = manifest(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert errors(kind, doc) == []


@pytest.mark.parametrize(("name", "kind"), MANIFESTS.items())
def test_a_misspelt_or_mistyped_field_is_an_error(name, kind):
    doc = manifest(name)
    cluster = doc["spec"]["rayClusterSpec" if kind == "rayjobs" else "rayClusterConfig"]
    misspelt = copy.deepcopy(doc)
    head = misspelt["spec"]["rayClusterSpec" if kind == "rayjobs" else "rayClusterConfig"]["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams", {})
    assert any("rayStartParam" in e and "not allowed" in e for e in errors(kind, misspelt))
    mistyped = copy.deepcopy(doc)
    group = mistyped["spec"]["rayClusterSpec" if kind == "rayjobs" else "rayClusterConfig"]["workerGroupSpecs"][0]
    group["replicas"] = "two"
    assert any(e.endswith("'two' is not of type 'integer'") for e in errors(kind, mistyped))
    assert cluster["workerGroupSpecs"]  # (the originals are untouched)
