"""One curation over three sources on the local Ray: LAION-style URL metadata served by a real HTTP server
on 127.0.0.1 (tests/fixtures/http_images.py), a dataset written here in the Hugging Face Hub's parquet
layout, and a folder whose uncaptioned image is captioned by a tiny transformers model in a Ray Data actor
pool. The report's per-source counts add up, each HTTP failure is counted under its reason, every good
input is curated, and the shards and MLflow carry each row's source."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pyarrow.parquet as pq
import pytest

from components import dataset
from components.config import load_config
from components.curation.pipeline import curate
from components.registry.card import data_rows, preprocessing_rows
from tests.fixtures.http_images import skimage_data
from tests.hub_layout import write_hub_dataset, write_laion_parquet

PHOTOS = skimage_data()


@pytest.fixture
def three_sources(tmp_path, image_server):
    url = image_server.url
    good = {url("/img/astronaut.png"): 0.1, url("/redirect/rocket.jpg"): 0.2, url("/flaky/coffee.png"): 0.05,
            url("/img/chelsea.png"): None}  # no pwatermark: "unchecked"
    failing = {"/404": "http_error", "/500": "http_error", "/loop": "http_error", "/slow": "timeout",
               "/big": "too_large", "/html": "not_an_image"}
    rows = [{"URL": u, "TEXT": f"photo {i}", "WIDTH": 512, "HEIGHT": 512, "pwatermark": w, "punsafe": 0.01,
             "similarity": 0.3} for i, (u, w) in enumerate(good.items())]
    rows += [{"URL": url(p), "TEXT": f"fails {p}", "pwatermark": 0.1} for p in failing]
    rows.append({"URL": url("/img/camera.png"), "TEXT": "watermarked", "pwatermark": 0.95})  # never fetched
    laion = write_laion_parquet(tmp_path / "laion" / "part-00000.parquet", rows)

    hub = write_hub_dataset(tmp_path / "mj", {
        "train": [{"bytes": (PHOTOS / "camera.png").read_bytes(), "path": "camera.png", "prompt": "a cameraman"},
                  {"bytes": (PHOTOS / "moon.png").read_bytes(), "path": "moon.png", "prompt": None},
                  {"bytes": b"\x89PNG but not really", "path": "junk.png", "prompt": "junk"}],
        "test": [{"bytes": (PHOTOS / "horse.png").read_bytes(), "path": "horse.png", "prompt": "not read"}],
    })

    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("coins.png", "clock_motion.png"):
        (folder / name).write_bytes((PHOTOS / name).read_bytes())
    (folder / "coins.txt").write_text("old coins on a table\n")  # clock_motion.png: no caption, the model's

    sources = [
        {"name": "laion", "kind": "urls", "location": str(laion.parent), "caption_column": "text",
         "caption_with_model": False, "filters": {"max_watermark": 0.7, "max_punsafe": 0.5}},
        {"name": "mj", "kind": "huggingface", "location": str(hub), "caption_column": "prompt",
         "missing_caption": "filename", "caption_with_model": False, "filters": {"dedupe": False}},
        {"name": "photos", "kind": "files", "location": str(folder), "repeats": 2},
    ]
    sets = [f"curate.sources={json.dumps(sources)}", f"curate.output={tmp_path / 'out'}",
            f"state_dir={tmp_path / 'state'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'state'}/mlflow.db",
            "curate.workers=2", "curate.rows_per_shard=4",
            "curate.holdout_fraction=0", "curate.download.timeout_s=1", "curate.download.connect_timeout_s=1",
            "curate.download.retries=1", "curate.download.backoff_s=0.05",
            "curate.download.allow_private_addresses=true",
            "curate.captioner.model=tiny", "curate.captioner.max_new_tokens=5",
            "curate.buckets={area: 65536, step: 64, min_side: 128, max_side: 512}"]
    expect_kept = {"laion": set(good), "mj": {"camera.png", "moon.png"}, "photos": {"coins.png", "clock_motion.png"}}
    return load_config(None, sets), failing, expect_kept  # the tiny defaults; no preset (its one-source keys)


def test_three_sources_in_one_curation(ray_local, three_sources):
    cfg, failing, expect_kept = three_sources
    report = curate(cfg)

    per = report["sources"]
    assert list(per) == ["laion", "mj", "photos"]
    for name, s in per.items():  # the counts add up, per source and in all
        assert s["inputs"] == s["kept"] + s["dropped"] and s["dropped"] == sum(s["reasons"].values()), name
        assert s["kept"] == sum(s["captions"].values()) == sum(s["watermark"].values()) == sum(s["rows"].values())
    # Each HTTP failure under its reason; the watermarked row refused from its metadata.
    assert per["laion"]["reasons"] == {"http_error": 3, "timeout": 1, "too_large": 1, "not_an_image": 1, "watermark": 1}
    assert per["mj"]["reasons"] == {"not_an_image": 1} and per["photos"]["reasons"] == {}
    assert sum(s["inputs"] for s in per.values()) == report["inputs"] == 11 + 3 + 2
    assert sum(s["kept"] for s in per.values()) == report["kept"] == 4 + 2 + 2
    assert per["laion"]["watermark"] == {"passed": 3, "unchecked": 1} and per["mj"]["watermark"] == {"off": 2}
    assert per["laion"]["captions"] == {"column": 4} and per["mj"]["captions"] == {"column": 1, "filename": 1}
    assert per["photos"]["captions"] == {"model": 1, "sidecar": 1}
    assert report["captions"] == {"column": 5, "filename": 1, "model": 1, "sidecar": 1}
    assert report["watermark"] == {"off": 4, "passed": 3, "unchecked": 1}
    assert per["photos"]["repeats"] == 2 and per["laion"]["filters"]["max_watermark"] == 0.7

    m = dataset.read_manifest(cfg.curate.output)
    rows = pq.read_table(m.paths("train") + m.paths("val")).to_pylist()
    kept: dict[str, set] = {}
    for r in rows:
        kept.setdefault(r["source_name"], set()).add(r["source"] if r["source_name"] == "laion"
                                                     else r["source"].rsplit("/", 1)[-1].rsplit("#", 1)[-1])
    assert kept == expect_kept  # nothing lost from the good inputs
    by_name = {r["source"].rsplit("/", 1)[-1].rsplit("#", 1)[-1]: r for r in rows}
    assert by_name["moon.png"]["caption"] == "moon" and by_name["coins.png"]["caption"] == "old coins on a table"
    assert by_name["clock_motion.png"]["caption"].strip()  # the model's words
    success = json.loads((Path(cfg.curate.output) / dataset.SUCCESS).read_text())
    assert {n: s["repeats"] for n, s in success["sources"].items()} == {"laion": 1.0, "mj": 1.0, "photos": 2.0}

    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    run = mlflow.get_run(report["mlflow_run_id"])
    metrics = run.data.metrics
    assert metrics["source.laion.dropped.timeout"] == 1 and metrics["source.laion.dropped.too_large"] == 1
    assert metrics["source.photos.captions.model"] == 1 and metrics["source.laion.watermark.unchecked"] == 1
    assert metrics["watermark.unchecked"] == 1 and metrics["captions.sidecar"] == 1
    named = sorted(d.dataset.name for d in run.inputs.dataset_inputs
                   if {t.key: t.value for t in d.tags}.get("mlflow.data.context") == "source")
    assert named == ["laion", "mj", "photos"]
    assert "curate.source" not in run.data.params and run.data.params["curate.sources.mj.kind"] == "huggingface"

    # The model card's data section, from this curation run as MLflow holds it: each source with its counts
    # and its own filters.
    facts = SimpleNamespace(params={"data.rows.train": report["kept"], "data.rows.val": 0}, curation=run,
                            version_tags={"dataset_digest": report["digest"]}, curation_report=report)
    rows = dict(data_rows(facts)[0])
    assert "Source" not in rows and rows["Source `mj`"].startswith(f"huggingface `{cfg.curate.sources[1].location}`")
    assert rows["Source `laion`: read, kept"] == "11, 4" and rows["Source `photos`: read, kept"] == "2, 2"
    assert "max_watermark 0.7" in rows["Source `laion`: filters"] and "dedupe False" in rows["Source `mj`: filters"]
    assert "drawn 2.0 time(s)" in rows["Source `photos`"]
    assert rows["Captions by origin"] == "column 5, filename 1, model 1, sidecar 1"
    assert dict(preprocessing_rows(facts))["Missing captions"] == "laion: drop, mj: filename, photos: drop"
