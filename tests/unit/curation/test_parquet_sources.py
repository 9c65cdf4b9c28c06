"""Parquet sources (URL metadata, Hugging Face layout), captions and the watermark check, without Ray:
URL and Hugging Face sources are opened on the driver (files, row counts, columns; bad ones refused in one
line), their rows become records exactly as the Ray Data read tasks make them, each source curates under its own
policy, captions come in their order of precedence and are counted by origin, and the watermark check is counted or
required."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.config import CaptionerConfig, CurateConfig, SourceConfig
from components.curation.captioner import CaptionBatch
from components.curation.filters import Reason
from components.curation.pipeline import captioner_gpus
from components.curation.process import PENDING, Curator
from components.curation.sources import SourceError, from_parquet, hub_files, load_inputs, parquet_records
from components.curation.writer import outcomes_table
from components.storage import Store
from tests.fixtures.http_images import skimage_data
from tests.hub_layout import write_hub_dataset, write_laion_parquet

PHOTOS = skimage_data()
SMALL = {"area": 65536, "min_side": 128, "max_side": 512}


def _records(inputs) -> list[dict]:
    """What the pipeline's read tasks hand the curation tasks for one source (its files read whole)."""
    table = pa.concat_tables([pq.read_table(f, columns=sorted(set(inputs.columns.values())))
                              .append_column("path", pa.array([f] * pq.read_metadata(f).num_rows))
                              for f in inputs.files])
    root = inputs.source.location if inputs.source.kind.value == "huggingface" else ""
    return parquet_records(table, inputs.source.model_dump(mode="json"), inputs.columns, inputs.image_type,
                           root).to_pylist()


@pytest.fixture
def hub(tmp_path):
    return write_hub_dataset(tmp_path / "mj", {
        "train": [{"bytes": (PHOTOS / "camera.png").read_bytes(), "path": "camera.png", "prompt": "a cameraman"},
                  {"bytes": (PHOTOS / "cell.png").read_bytes(), "path": "cell.png", "prompt": ""},
                  {"bytes": b"not an image at all", "path": "junk.png", "prompt": "junk"}],
        "test": [{"bytes": (PHOTOS / "moon.png").read_bytes(), "path": "moon.png", "prompt": "the moon"}],
    })


def test_hub_split_files_follow_the_hubs_naming():
    files = ["r/data/train-00000-of-00002.parquet", "r/data/train-00001-of-00002.parquet",
             "r/data/test-00000-of-00001.parquet", "r/data/validation-00000-of-00001.parquet"]
    assert hub_files(files, "train") == files[:2]
    assert hub_files(files, "test") == files[2:3] and hub_files(files, "validation") == files[3:]
    converted = ["r/default/train/0000.parquet", "r/default/test/0000.parquet"]
    assert hub_files(converted, "train") == converted[:1]
    unnamed = ["r/mj-general-0001.parquet", "r/mj-general-0002.parquet"]  # no split named: all train
    assert hub_files(unnamed, "train") == unnamed and hub_files(unnamed, "test") == []


def test_a_hub_dataset_is_read_in_its_own_layout(hub):
    src = SourceConfig(name="mj", kind="huggingface", location=str(hub), caption_column="prompt")
    inputs = from_parquet(src, None)
    assert [f.rsplit("/", 1)[-1] for f in inputs.files] == ["train-00000-of-00001.parquet"]  # not the test split
    assert inputs.rows == 3 and inputs.image_type == "struct" and inputs.columns["caption"] == "prompt"
    records = _records(inputs)
    assert [r["fetch"] for r in records] == ["inline"] * 3
    assert records[0]["data"] == (PHOTOS / "camera.png").read_bytes()
    assert records[0]["source"].endswith("train-00000-of-00001.parquet#camera.png")
    assert [r["caption"] for r in records] == ["a cameraman", "", "junk"]
    cur = Curator(CurateConfig(sources=[src.model_copy(update={"missing_caption": "filename"})], buckets=SMALL), 0)
    out = cur.process_all(records)
    assert out[0].kept and out[0].row["caption_origin"] == "column" and out[0].row["source_name"] == "mj"
    assert out[1].kept and out[1].row["caption"] == "cell" and out[1].row["caption_origin"] == "filename"
    assert out[2].reason is Reason.NOT_AN_IMAGE
    assert [o.reason for o in out] == [o.reason for o in map(cur.process, records)]  # the same as one by one


def test_bad_parquet_sources_are_refused_in_one_line_before_work(tmp_path, hub):
    laion = write_laion_parquet(tmp_path / "laion" / "part-0.parquet", [{"URL": "http://x/a.jpg", "TEXT": "a"}])
    cases = [
        (SourceConfig(name="l", kind="urls", location=str(tmp_path / "nothing-here")), "no parquet files"),
        (SourceConfig(name="l", kind="urls", location=str(laion), url_column="link"), "no column 'link'"),
        (SourceConfig(name="m", kind="huggingface", location=str(hub), split="validation"),
         "no parquet files of split"),
        (SourceConfig(name="m", kind="huggingface", location=str(hub), image_column="picture"), "no column 'picture'"),
    ]
    for src, words in cases:
        with pytest.raises(SourceError) as err:
            load_inputs(CurateConfig(sources=[src]), Store())
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert f"curate.sources.{src.name}." in str(err.value)  # as --set names it


def test_laion_columns_are_found_whatever_their_case_and_feed_the_filters(tmp_path):
    path = write_laion_parquet(tmp_path / "laion.parquet", [
        {"URL": "http://h/a.jpg", "TEXT": "a", "pwatermark": 0.9, "punsafe": 0.1, "similarity": 0.3},
        {"URL": "http://h/b.jpg", "TEXT": "b", "pwatermark": 0.1, "punsafe": 0.95, "similarity": 0.3},
        {"URL": "http://h/c.jpg", "TEXT": "c", "pwatermark": 0.1, "punsafe": 0.1, "similarity": 0.1},
        {"URL": "http://h/d.jpg", "TEXT": "", "pwatermark": None},
        {"URL": "", "TEXT": "no url"},
    ])
    src = SourceConfig(name="laion", kind="urls", location=str(path), caption_column="text",
                       filters={"max_watermark": 0.5, "max_punsafe": 0.5, "min_similarity": 0.2})
    inputs = from_parquet(src, None)
    assert inputs.columns == {"url": "URL", "caption": "TEXT", "pwatermark": "pwatermark", "punsafe": "punsafe",
                              "similarity": "similarity"}
    records = _records(inputs)
    assert [r["fetch"] for r in records] == ["url"] * 5 and records[0]["source"] == "http://h/a.jpg"
    cur = Curator(CurateConfig(sources=[src], buckets=SMALL), 0)
    outcomes = [cur.screen(r) for r in records]  # all decided before any download
    assert [getattr(o, "reason", None) for o in outcomes] == [Reason.WATERMARK, Reason.UNSAFE, Reason.LOW_SIMILARITY,
                                                              Reason.NO_CAPTION, Reason.HTTP_ERROR]


def test_caption_precedence_column_sidecar_model_then_filename(tmp_path):
    """column > sidecar > the model (pending) > the missing-caption policy; with the model configured, the
    policy is only what the model's empty caption falls back to."""
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.png").write_bytes((PHOTOS / "camera.png").read_bytes())
    (tmp_path / "a.txt").write_text("sidecar a")
    (tmp_path / "b.txt").write_text("sidecar b")
    records = load_inputs(CurateConfig(source=str(tmp_path)), Store()).records.to_pylist()
    records[0]["caption"] = "from the column"
    plain = Curator(CurateConfig(source=str(tmp_path), missing_caption="filename", buckets=SMALL), 0)
    assert [(o.row["caption"], o.row["caption_origin"]) for o in plain.process_all(records)] == [
        ("from the column", "column"), ("sidecar b", "sidecar"), ("c", "filename")]
    strict = Curator(CurateConfig(source=str(tmp_path), buckets=SMALL), 0)  # the default: drop
    assert strict.process(records[2]).reason is Reason.NO_CAPTION
    model = Curator(CurateConfig(source=str(tmp_path), missing_caption="filename", buckets=SMALL,
                                 captioner={"model": "tiny"}), 0)
    out = model.process(records[2])
    assert out.kept and out.row["caption_origin"] == PENDING and out.row["caption"] is None
    assert out.row["caption_fallback"] == "c"
    table = outcomes_table([out], 0.1)
    assert table["caption_fallback"].to_pylist() == ["c"]


def test_watermark_not_checked_is_counted_or_refused(tmp_path):
    (tmp_path / "a.png").write_bytes((PHOTOS / "camera.png").read_bytes())
    rec = {"source": str(tmp_path / "a.png"), "caption": "c", "pwatermark": None}
    counted = Curator(CurateConfig(source=str(tmp_path), buckets=SMALL, filters={"max_watermark": 0.5}), 0)
    assert counted.process(rec).row["watermark_check"] == "unchecked"
    assert counted.process({**rec, "pwatermark": 0.2}).row["watermark_check"] == "passed"
    off = Curator(CurateConfig(source=str(tmp_path), buckets=SMALL), 0)
    assert off.process(rec).row["watermark_check"] == "off"
    required = Curator(CurateConfig(source=str(tmp_path), buckets=SMALL,
                                    filters={"max_watermark": 0.5, "require_watermark_check": True}), 0)
    assert required.process(rec).reason is Reason.WATERMARK_UNCHECKED
    assert required.process({**rec, "pwatermark": 0.2}).kept


def test_the_captioning_model_captions_pending_rows_and_falls_back(tmp_path):
    """The real actor class, called as Ray Data calls it: a tiny BLIP built offline captions the pending row;
    an empty model caption falls back to the recorded policy, or drops the row."""
    (tmp_path / "a.png").write_bytes((PHOTOS / "camera.png").read_bytes())
    cfg = CurateConfig(source=str(tmp_path), buckets=SMALL, captioner={"model": "tiny", "max_new_tokens": 6})
    cur = Curator(cfg, 0)
    pending = cur.process({"source": str(tmp_path / "a.png"), "caption": None})
    captioned = cur.process({"source": str(tmp_path / "a.png"), "caption": "given"})
    table = outcomes_table([pending, captioned, pending], 0.0)
    actor = CaptionBatch(cfg.captioner.model_dump(mode="json"), str(tmp_path / "cache"), "cpu")
    rows = actor(table).to_pylist()
    assert rows[0]["caption_origin"] == "model" and rows[0]["caption"].strip()
    assert rows[1]["caption_origin"] == "column" and rows[1]["caption"] == "given"
    actor.model = lambda images: [""] * len(images)  # a model that says nothing
    rows = actor(table).to_pylist()
    assert rows[0]["reason"] == "no_caption" and rows[0]["source_name"] == "default"
    with_fallback = table.set_column(table.schema.get_field_index("caption_fallback"), "caption_fallback",
                                     pa.array(["a", None, ""]))
    rows = actor(with_fallback).to_pylist()
    assert [(r["caption"], r["caption_origin"]) for r in rows] == [
        ("a", "filename"), ("given", "column"), ("", "empty")]
    assert json.dumps(rows[0]["caption"])  # plain text


def test_the_captioning_actors_take_a_gpu_where_the_cluster_has_one():
    auto = CaptionerConfig(model="tiny")
    assert captioner_gpus(auto, 0) == 0.0 and captioner_gpus(auto, 4) == 1.0
    assert captioner_gpus(CaptionerConfig(model="tiny", num_gpus=0), 4) == 0.0  # CPU asked for
    assert captioner_gpus(CaptionerConfig(model="tiny", num_gpus=0.5), 0) == 0.5  # as given
