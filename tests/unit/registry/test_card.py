"""The model card's claims about where a version came from, without MLflow: ``base_model`` is the Hub id the
lineage starts from or nothing (the Hub takes only a Hub model id there, huggingface_hub's ``ModelCardData``),
and huggingface_hub's own parser reads the metadata block the card writes; the uses and risks sections follow
the lineage's root and say nothing a template would leave empty."""

from __future__ import annotations

from types import SimpleNamespace

import mlflow
import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id

from components.config import load_config
from components.registry.card import (
    PLACEHOLDERS,
    CardError,
    card_base_model,
    lineage_root,
    metadata,
    mixture_wording,
)
from components.registry.card_uses import risks_section, uses_section
from tests.fixtures.processes import REPO

HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
PARAMS = {"diffusion.prediction_type": "v_prediction", "diffusion.zero_terminal_snr": "True",
          "diffusion.min_snr_gamma": "5.0", "train.data": "data/demo/manifest.jsonl"}


def root(kind: str, source: str) -> dict:
    return {"lineage.kind": kind, "lineage.source": source}


def registered(name: str, version: str) -> dict:
    return {"lineage.kind": "registered", "lineage.source": f"models:/{name}/{version}",
            "lineage.parent_model": name, "lineage.parent_version": version}


class Registry:
    """The one call ``lineage_root`` makes of an MLflow client, over a dict of versions' tags."""

    def __init__(self, versions: dict[tuple[str, str], dict]):
        self.versions = versions

    def get_model_version(self, name, version):
        if (name, version) not in self.versions:
            raise mlflow.exceptions.MlflowException(f"models:/{name}/{version} not found")
        return SimpleNamespace(tags=self.versions[(name, version)])


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "flows/configs/tiny.yaml")


def parsed(header: dict) -> ModelCard:
    """The metadata block as huggingface_hub reads a README (``ModelCard``: YAML to ``ModelCardData``)."""
    return ModelCard("---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n# card\n")


def test_base_model_is_the_hub_model_the_lineage_starts_from(cfg):
    """Through two registered generations back to a hub source: that id, marked a fine-tune, and it parses
    as the Hub's ``base_model``."""
    client = Registry({("m", "1"): root("hub", HUB_ID), ("m", "2"): registered("m", "1")})
    start = lineage_root(client, registered("m", "2"))
    assert start == root("hub", HUB_ID)
    base, note = card_base_model(None, start)
    assert (base, note) == (HUB_ID, "")
    card = parsed(metadata(SimpleNamespace(base_model=base), cfg))
    validate_repo_id(card.data.base_model)
    assert card.data.base_model == HUB_ID and card.data.to_dict()["base_model_relation"] == "finetune"
    assert card.data.license == cfg.publish.license and card.data.pipeline_tag == "text-to-image"


@pytest.mark.parametrize("kind, source", [("tiny", "tiny"), ("sdxl_random", "sdxl-random"),
                                          ("directory", "/models/sdxl"), ("s3", "s3://bucket/sdxl"),
                                          ("single_file", "/models/x.safetensors")])
def test_a_root_not_on_the_hub_names_no_base_model(cfg, kind, source):
    """The tiny model, the random SDXL, a folder, s3:// and a single file: no ``base_model`` in the
    metadata (huggingface_hub reads none), and the card's note names the real root."""
    client = Registry({("m", "1"): root(kind, source)})
    base, note = card_base_model(None, lineage_root(client, registered("m", "1")))
    assert base is None and f"`{source}`" in note and "no `base_model`" in note
    header = metadata(SimpleNamespace(base_model=base), cfg)
    assert "base_model" not in header and "base_model_relation" not in header
    assert parsed(header).data.base_model is None


def test_a_parent_the_store_does_not_hold_ends_the_walk_unclaimed():
    start = lineage_root(Registry({}), registered("gone", "3"))
    assert start["lineage.kind"] == "registered"
    assert card_base_model(None, start)[0] is None


def test_publish_base_model_names_a_copy_but_never_contradicts_a_hub_root():
    """``publish.base_model`` is taken for a root that is not on the Hub (a folder holding a Hub model's
    weights), said so on the card; against a hub root it may only repeat it; it must be a Hub id."""
    base, note = card_base_model(HUB_ID, root("directory", "/models/sdxl"))
    assert base == HUB_ID and "`/models/sdxl`" in note and "publish.base_model" in note
    assert card_base_model(HUB_ID, root("hub", HUB_ID)) == (HUB_ID, "")
    with pytest.raises(CardError, match="not the Hub model this version was trained from"):
        card_base_model("someone/else", root("hub", HUB_ID))
    with pytest.raises(CardError, match="not a Hub model id"):
        card_base_model("s3://bucket/sdxl", root("s3", "s3://bucket/sdxl"))


def facts(start: dict, captions: dict | None = None) -> SimpleNamespace:
    """What ``uses_section`` and ``risks_section`` read of a version."""
    curation = None if captions is None else SimpleNamespace(info=SimpleNamespace(run_id="cur"),
                                                             data=SimpleNamespace(metrics=captions))
    return SimpleNamespace(name="m", version="2", params=PARAMS, lineage_root=start, curation=curation)


def test_uses_and_risks_follow_the_lineage_root(cfg):
    """A random root is a test of the platform and knows only its data; a hub root is for text-to-image and
    carries its base's biases; file-name captions are named as a risk only when there were some."""
    random_uses = uses_section(facts(root("tiny", "tiny")), cfg, "m-v2.safetensors")
    hub_uses = uses_section(facts(root("hub", HUB_ID)), cfg, "m-v2.safetensors")
    for text in (random_uses, hub_uses):
        for heading in ("## Uses", "### Direct use", "### Downstream use", "### Out-of-scope use"):
            assert f"\n{heading}\n" in f"\n{text}\n", heading
        assert "model.source: models:/m/2" in text and "an epsilon setting" in text
        assert "RAIL" in text and not PLACEHOLDERS.search(text)
    assert "A test of the platform" in random_uses and "Any use other than testing" in random_uses
    assert "Text-to-image generation" in hub_uses and "A test of the platform" not in hub_uses

    random_risks = risks_section(facts(root("tiny", "tiny"), {"captions.filename": 3.0}))
    hub_risks = risks_section(facts(root("hub", HUB_ID), {"captions.column": 5.0}))
    assert "random weights" in random_risks and "file name" in random_risks
    assert f"`{HUB_ID}`" in hub_risks and "file name" not in hub_risks and "random weights" not in hub_risks
    for text in (random_risks, hub_risks):
        assert text.startswith("## Bias, risks, and limitations\n") and "\n### Recommendations\n" in text
        assert not PLACEHOLDERS.search(text)


def test_a_source_is_described_by_its_weight_or_its_repeats():
    assert mixture_wording({"weight": "0.75", "repeats": "1.0"}) == "weight 0.75 (its share of each epoch's samples)"
    assert mixture_wording({"weight": "None", "repeats": "2.0"}) == "drawn 2.0 time(s) per image per epoch"
