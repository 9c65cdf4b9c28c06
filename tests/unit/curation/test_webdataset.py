"""Webdataset sources without Ray: brace patterns expand as webdataset's do, the driver lists shards from
files, folders, globs and brace patterns and refuses a missing one in one line (the preflight), and a
sample becomes the record the Ray Data read tasks make (image bytes inline, the caption from ``.json``
then ``.txt``, the metadata scores from ``.json``, a sample without an image or with a broken member
refused under its reason). The Ray reads (local, https, s3) are in tests/integration/test_curate_sources.py."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from components.config import CurateConfig, SourceConfig
from components.curation.pipeline import policy_lines
from components.curation.sources import SourceError, load_inputs, source_places
from components.curation.webdataset import expand_braces, shard_list, shard_root, webdataset_records
from components.storage import Store
from tests.webdataset_layout import write_shard


def test_brace_patterns_expand_like_webdatasets():
    assert expand_braces("s-{000..003}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar", "s-003.tar"]
    assert expand_braces("s-{8..10}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar"]
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="backwards"):
        expand_braces("s-{3..1}.tar")
    with pytest.raises(ValueError, match="neither a range"):
        expand_braces("s-{x}.tar")


def _source(location: str, **kw) -> SourceConfig:
    return SourceConfig(name="wds", kind="webdataset", location=location, **kw)


def test_shards_from_files_folders_globs_and_braces(tmp_path):
    for i in range(3):
        write_shard(tmp_path / "d" / f"s-{i:03d}.tar", {"k": {"txt": b"x"}})
    (tmp_path / "d" / "notes.md").write_text("not a shard")
    d = tmp_path / "d"
    want = [str(d / f"s-{i:03d}.tar") for i in range(3)]
    assert shard_list(_source(str(d)), Store()) == want
    assert shard_list(_source(f"{d}/*.tar"), Store()) == want
    assert shard_list(_source(f"{d}/s-{{000..002}}.tar"), Store()) == want
    assert shard_list(_source(f"{d}/s-{{002,000}}.tar"), Store()) == [want[2], want[0]]
    assert shard_list(_source("https://host/s-{0..1}.tar"), Store()) == ["https://host/s-0.tar", "https://host/s-1.tar"]
    assert shard_root(f"{d}/s-{{000..002}}.tar") == str(d) and shard_root(str(d)) == str(d)
    assert shard_root(f"{d}/s-000.tar") == str(d) and shard_root("s3://b/wds/*.tar") == "s3://b/wds"
    assert shard_root("https://host/s.tar") is None


def test_a_missing_shard_is_one_line_before_any_work(tmp_path):
    write_shard(tmp_path / "s-000.tar", {"k": {"txt": b"x"}})
    cfg = CurateConfig(sources=[_source(f"{tmp_path}/s-{{000..001}}.tar")])
    with pytest.raises(SourceError) as err:
        load_inputs(cfg, Store())
    assert str(err.value) == (f"curate.sources.wds.location {tmp_path}/s-{{000..001}}.tar: "
                              f"{tmp_path}/s-001.tar: no such shard")
    for bad, why in ((str(tmp_path / "nowhere"), "no .tar shards there"), (f"{tmp_path}/s-{{1..0}}.tar", "backwards"),
                     ("https://host/*.tar", "cannot be globbed"),
                     (f"{{{tmp_path}/s-000.tar,https://host/s.tar}}", "one source reads one kind")):
        with pytest.raises(SourceError, match=why):
            load_inputs(CurateConfig(sources=[_source(bad)]), Store())
    inputs = load_inputs(CurateConfig(sources=[_source(str(tmp_path / "s-000.tar"))]), Store())
    assert inputs.sources[0].shards == [str(tmp_path / "s-000.tar")] and inputs.rows == 0 and inputs.readable
    places = source_places(CurateConfig(sources=[_source(f"{tmp_path}/s-{{000..001}}.tar")], output="/elsewhere"))
    assert places == [("curate.sources.wds.location", str(tmp_path))]


def test_the_dry_run_names_where_a_webdatasets_captions_come_from():
    line = policy_lines(CurateConfig(sources=[_source("/x/s-{0..1}.tar", caption_column="prompt")]))[0]
    assert line.startswith("wds: webdataset /x/s-{0..1}.tar | captions: .json field 'prompt', .txt member, else drop")


def test_hf_locations_are_refused_for_webdatasets():
    with pytest.raises(ValueError, match="resolve"):
        _source("hf://datasets/o/n")


def _batch(samples: list[dict]) -> pd.DataFrame:
    """What ``read_webdataset(decoder=None)`` hands the map function: one column per member kind."""
    return pd.DataFrame.from_records(samples)


def test_samples_become_inline_records_with_their_caption_and_scores():
    src = _source("s3://bucket/wds/s-{0..1}.tar", caption_column="prompt", filters={"watermark_column": "wm"})
    url = "bucket/wds/s-0.tar"  # Ray hands S3 paths without their scheme
    batch = _batch([
        {"__key__": "a/0", "__url__": url, "jpg": b"JPG", "txt": b" from txt \n",
         "json": json.dumps({"prompt": "from json", "wm": 0.3, "punsafe": "0.1", "similarity": 0.25}).encode()},
        {"__key__": "a/1", "__url__": url, "png": b"PNG", "txt": b"only txt"},
        {"__key__": "a/2", "__url__": url, "webp": b"WEBP", "json": json.dumps({"prompt": "  "}).encode()},
        {"__key__": "a/3", "__url__": url, "txt": b"no image"},
        {"__key__": "a/4", "__url__": url, "jpg": b"JPG", "json": b"{not json"},
        {"__key__": "a/5", "__url__": url, "jpg": b"JPG", "txt": b"\xff\xfe"},
    ])
    rows = webdataset_records(batch, src.model_dump(mode="json")).to_pylist()
    assert [r["source"] for r in rows] == [f"s3://bucket/wds/s-0.tar#a/{i}" for i in range(6)]
    assert {r["fetch"] for r in rows} == {"inline"} and {r["source_name"] for r in rows} == {"wds"}
    first = rows[0]
    assert (first["data"], first["name"], first["caption"]) == (b"JPG", "0.jpg", "from json")
    assert (first["pwatermark"], first["punsafe"], first["similarity"]) == (0.3, 0.1, 0.25)
    assert (rows[1]["data"], rows[1]["caption"], rows[1]["pwatermark"]) == (b"PNG", "only txt", None)
    assert (rows[2]["data"], rows[2]["name"], rows[2]["caption"]) == (b"WEBP", "2.webp", None)
    assert [(r["reject"], r["detail"]) for r in rows[3:]] == [
        ("empty", "no .jpg, .jpeg, .png, .webp member"), ("unreadable", "its .json member is not a JSON object"),
        ("unreadable", "its .txt member is not UTF-8")]
    assert all(r["reject"] is None for r in rows[:3]) and rows[3]["data"] is None
