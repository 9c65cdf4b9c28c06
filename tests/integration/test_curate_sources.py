"""One curation over four sources on the local Ray: LAION-style URL metadata served by a real HTTP server
on 127.0.0.1 (tests/fixtures/http_images.py), a dataset written here in the Hugging Face Hub's parquet
layout, a folder whose uncaptioned image is captioned by a tiny transformers model in a Ray Data actor
pool, and webdataset tar shards named by a brace pattern. The report's per-source counts add up, each HTTP
failure and each refused sample is counted under its reason, every good input is curated, and the shards
and MLflow carry each row's source. Webdataset shards are also read over http(s) and from S3 (moto)."""

from __future__ import annotations

import functools
import hashlib
import json
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pyarrow.parquet as pq
import pytest

from components import dataset
from components.config import SourceConfig, load_config
from components.curation.pipeline import curate
from components.curation.sources import SourceError
from components.curation.webdataset import read_shards, shard_list, unreadable_shard
from components.registry.card import data_rows, preprocessing_rows
from components.storage import Store
from tests.fixtures.http_images import skimage_data
from tests.hub_layout import write_hub_dataset, write_laion_parquet
from tests.webdataset_layout import write_shard

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

    shards = [write_shard(tmp_path / "wds" / "wds-0.tar", {
        "s/0000": {"jpg": (PHOTOS / "hubble_deep_field.jpg").read_bytes(), "txt": b"the deep field\n"},
        "s/0001": {"jpg": (PHOTOS / "retina.jpg").read_bytes(), "txt": b"not this one",
                   "json": json.dumps({"caption": "a retina", "pwatermark": 0.2}).encode()},
        "s/0002": {"png": (PHOTOS / "ihc.png").read_bytes(), "json": b'{"caption": "stained tissue"}'},  # luma 0.64
    }), write_shard(tmp_path / "wds" / "wds-1.tar", {
        "s/0003": {"png": (PHOTOS / "grass.png").read_bytes(), "json": b'{"caption": "grass", "pwatermark": 0.95}'},
        "s/0004": {"cls": b"3"},
        "s/0005": {"png": (PHOTOS / "brick.png").read_bytes(), "json": b"not json"},
        "s/0006": {"png": (PHOTOS / "cell.png").read_bytes()},
    })]

    sources = [
        {"name": "laion", "kind": "urls", "location": str(laion.parent), "caption_column": "text",
         "caption_with_model": False, "filters": {"max_watermark": 0.7, "max_punsafe": 0.5}},
        {"name": "mj", "kind": "huggingface", "location": str(hub), "caption_column": "prompt",
         "missing_caption": "filename", "caption_with_model": False, "filters": {"dedupe": False}},
        {"name": "photos", "kind": "files", "location": str(folder), "repeats": 2},
        {"name": "wds", "kind": "webdataset", "location": str(tmp_path / "wds" / "wds-{0..1}.tar"),
         "caption_with_model": False, "filters": {"max_watermark": 0.7, "max_luminance": 0.5}},
    ]
    sets = [f"curate.sources={json.dumps(sources)}", f"curate.output={tmp_path / 'out'}",
            f"state_dir={tmp_path / 'state'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'state'}/mlflow.db",
            "curate.workers=2", "curate.rows_per_shard=4",
            "curate.holdout_fraction=0", "curate.download.timeout_s=1", "curate.download.connect_timeout_s=1",
            "curate.download.retries=1", "curate.download.backoff_s=0.05",
            "curate.download.allow_private_addresses=true",
            "curate.captioner.model=tiny", "curate.captioner.max_new_tokens=5",
            "curate.buckets={area: 65536, step: 64, min_side: 128, max_side: 512}"]
    expect_kept = {"laion": set(good), "mj": {"camera.png", "moon.png"}, "photos": {"coins.png", "clock_motion.png"},
                   "wds": {"0000", "0001"}}
    cfg = load_config(None, sets)  # the tiny defaults; no preset (its one-source keys)
    return cfg, failing, expect_kept, [str(s) for s in shards]


def test_three_sources_in_one_curation(ray_local, three_sources):
    cfg, failing, expect_kept, shards = three_sources
    report = curate(cfg)

    per = report["sources"]
    assert list(per) == ["laion", "mj", "photos", "wds"]
    for name, s in per.items():  # the counts add up, per source and in all
        assert s["inputs"] == s["kept"] + s["dropped"] and s["dropped"] == sum(s["reasons"].values()), name
        assert s["kept"] == sum(s["captions"].values()) == sum(s["watermark"].values()) == sum(s["rows"].values())
    # Each HTTP failure under its reason; the watermarked row refused from its metadata.
    assert per["laion"]["reasons"] == {"http_error": 3, "timeout": 1, "too_large": 1, "not_an_image": 1, "watermark": 1}
    assert per["mj"]["reasons"] == {"not_an_image": 1} and per["photos"]["reasons"] == {}
    # Each webdataset sample under its source's own policies: luminance, watermark, caption; a sample without
    # an image and one with a broken .json counted too.
    assert per["wds"]["reasons"] == {"too_bright": 1, "watermark": 1, "empty": 1, "unreadable": 1, "no_caption": 1}
    assert sum(s["inputs"] for s in per.values()) == report["inputs"] == 11 + 3 + 2 + 7
    assert sum(s["kept"] for s in per.values()) == report["kept"] == 4 + 2 + 2 + 2
    assert per["laion"]["watermark"] == {"passed": 3, "unchecked": 1} and per["mj"]["watermark"] == {"off": 2}
    assert per["laion"]["captions"] == {"column": 4} and per["mj"]["captions"] == {"column": 1, "filename": 1}
    assert per["photos"]["captions"] == {"model": 1, "sidecar": 1}
    assert per["wds"]["captions"] == {"column": 2} and per["wds"]["watermark"] == {"passed": 1, "unchecked": 1}
    assert per["wds"]["shards"] == shards and per["wds"]["kind"] == "webdataset"  # the shard list, in the lineage
    assert report["captions"] == {"column": 7, "filename": 1, "model": 1, "sidecar": 1}
    assert report["watermark"] == {"off": 4, "passed": 4, "unchecked": 2}
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
    assert by_name["0000"]["caption"] == "the deep field" and by_name["0001"]["caption"] == "a retina"
    assert by_name["0000"]["source"] == f"{shards[0]}#s/0000"  # shard#key, and the image member's own digest
    assert by_name["0000"]["sha256"] == hashlib.sha256((PHOTOS / "hubble_deep_field.jpg").read_bytes()).hexdigest()
    success = json.loads((Path(cfg.curate.output) / dataset.SUCCESS).read_text())
    assert {n: s["repeats"] for n, s in success["sources"].items()} == {"laion": 1.0, "mj": 1.0, "photos": 2.0,
                                                                       "wds": 1.0}

    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    run = mlflow.get_run(report["mlflow_run_id"])
    metrics = run.data.metrics
    assert metrics["source.laion.dropped.timeout"] == 1 and metrics["source.laion.dropped.too_large"] == 1
    assert metrics["source.photos.captions.model"] == 1 and metrics["source.laion.watermark.unchecked"] == 1
    assert metrics["watermark.unchecked"] == 2 and metrics["captions.sidecar"] == 1
    assert metrics["source.wds.inputs"] == 7 and metrics["source.wds.dropped.too_bright"] == 1
    named = sorted(d.dataset.name for d in run.inputs.dataset_inputs
                   if {t.key: t.value for t in d.tags}.get("mlflow.data.context") == "source")
    assert named == ["laion", "mj", "photos", "wds"]
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
    assert rows["Captions by origin"] == "column 7, filename 1, model 1, sidecar 1"
    assert dict(preprocessing_rows(facts))["Missing captions"] == "laion: drop, mj: filename, photos: drop, wds: drop"


@pytest.fixture
def shard_server(tmp_path):
    """A plain HTTP server on 127.0.0.1 serving ``tmp_path`` (webdataset shards are files, not photos)."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="shard-server", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_webdataset_shards_over_https_and_from_s3(ray_local, shard_server, s3_env, tmp_path):
    photo = (PHOTOS / "retina.jpg").read_bytes()
    shard = write_shard(tmp_path / "wds-0.tar", {"k/0": {"jpg": photo, "json": b'{"caption": "a retina"}'},
                                                 "k/1": {"txt": b"no image"}})
    store = Store(s3_env)
    store.client.create_bucket(Bucket="shards")
    store.client.upload_file(str(shard), "shards", "wds/wds-0.tar")
    env = {"env_vars": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": s3_env}}
    for location, uri in ((f"{shard_server}/wds-{{0..0}}.tar", f"{shard_server}/wds-0.tar"),
                          ("s3://shards/wds/", "s3://shards/wds/wds-0.tar")):
        src = SourceConfig(name="wds", kind="webdataset", location=location)
        shards = shard_list(src, store)
        assert shards == [uri]
        rows = sorted(read_shards(src, shards, s3_env, {"num_cpus": 1, "runtime_env": env}).take_all(),
                      key=lambda r: r["source"])
        assert [(r["source"], r["caption"], r["reject"]) for r in rows] == [(f"{uri}#k/0", "a retina", None),
                                                                           (f"{uri}#k/1", "no image", "empty")]
        assert rows[0]["data"] == photo and rows[0]["name"] == "0.jpg"
    with pytest.raises(SourceError, match="s3://shards/wds/wds-1.tar: no such shard"):
        shard_list(SourceConfig(name="wds", kind="webdataset", location="s3://shards/wds/wds-{0..1}.tar"), store)
    missing = SourceConfig(name="wds", kind="webdataset", location=f"{shard_server}/missing.tar")
    with pytest.raises(SourceError, match="cannot open its shards"):
        read_shards(missing, [missing.location], None, {"num_cpus": 1})
    # A shard that ends early stops the read with tarfile's error (wrapped by Ray), which curate() makes one line.
    (tmp_path / "cut.tar").write_bytes(shard.read_bytes()[:3000])
    cut = SourceConfig(name="wds", kind="webdataset", location=str(tmp_path / "cut.tar"))
    with pytest.raises(tarfile.ReadError) as err:
        read_shards(cut, [cut.location], None, {"num_cpus": 1}).take_all()
    assert str(unreadable_shard(err.value, [cut], "/out")) == (
        "a shard of curate.sources.wds.location is not a tar or ends early (unexpected end of data); curation "
        "stopped, /out has no _SUCCESS: check the shards (tar -tf) and rerun")
