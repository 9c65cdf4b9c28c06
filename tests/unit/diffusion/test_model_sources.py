"""Everything a run starts from: a single-file checkpoint (local, s3://, an http URL) read with
diffusers' ``from_single_file``, a hub id from a local Hugging Face cache laid out here (offline, the real
loading code), and the lineage each records: the resolved revision and a content hash of the weights."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
import torch
from safetensors.torch import load_file

from components.config import load_config
from components.diffusion import single_file as sf
from components.diffusion.parts import ModelLoadError
from components.diffusion.sdxl import load_parts, save_pipeline
from components.diffusion.sources import describe_source, file_sha256, weights_sha256
from components.diffusion.tiny import build_tiny
from tests.fixtures.processes import REPO, subprocess_env
from tests.synthetic import write_synthetic_curated

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset's model: its parts, its diffusers folder and its fp16 single file."""
    cfg = load_config(REPO / "flows/configs/tiny.yaml")
    root = tmp_path_factory.mktemp("sources")
    parts = build_tiny(cfg.model.tiny)
    folder = save_pipeline(parts, cfg.diffusion, root / "pipe")
    single = sf.export_pipeline(folder, root / "tiny.safetensors", "fp16", title="tiny", date="2024-01-01",
                                resolution=(256, 256))
    return SimpleNamespace(cfg=cfg, parts=parts, folder=folder, file=single, root=root)


def config_for(tiny, tmp_path, source: str, **diffusion):
    sets = [f"state_dir={tmp_path / 'state'}", f"model.source={source}", f"model.single_file_config={tiny.folder}"]
    sets += [f"diffusion.{k}={v}" for k, v in diffusion.items()]
    return load_config(REPO / "flows/configs/tiny.yaml", sets)


def assert_fp16_of(parts, loaded) -> None:
    for name in MODELS:
        ours, theirs = getattr(parts, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k].half().float(), theirs[k]) for k in ours), name


def test_a_local_single_file_is_read_with_from_single_file(tiny, tmp_path):
    cfg = config_for(tiny, tmp_path, str(tiny.file))
    loaded = load_parts(cfg.model, cfg.state_path("cache"), diffusion=cfg.diffusion)
    assert_fp16_of(tiny.parts, loaded)
    assert loaded.unet.dtype == torch.float32
    info = describe_source(cfg.model, cfg.state_path("cache"))
    assert (info.kind, info.location) == ("single_file", str(tiny.file))
    assert info.weights_sha256 == hashlib.sha256(tiny.file.read_bytes()).hexdigest()


def test_an_s3_single_file_is_fetched_once_and_read(tiny, tmp_path, s3_env):
    bucket = f"ckpt-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket=bucket)
    client.upload_file(str(tiny.file), bucket, "models/tiny.safetensors")
    cfg = config_for(tiny, tmp_path, f"s3://{bucket}/models/tiny.safetensors")
    assert_fp16_of(tiny.parts, load_parts(cfg.model, cfg.state_path("cache"), diffusion=cfg.diffusion))
    cached = cfg.state_path("cache", "s3", bucket, "models", "tiny.safetensors")
    assert cached.read_bytes() == tiny.file.read_bytes()
    mtime = cached.stat().st_mtime_ns
    info = describe_source(cfg.model, cfg.state_path("cache"))
    assert info.weights_sha256 == file_sha256(tiny.file) and cached.stat().st_mtime_ns == mtime  # same ETag: reused
    cfg.model.source = f"s3://{bucket}/models/absent.safetensors"
    with pytest.raises(ModelLoadError, match="no object"):
        load_parts(cfg.model, cfg.state_path("cache"), diffusion=cfg.diffusion)


class _FileServer(BaseHTTPRequestHandler):
    """Serves one file with an ETag and answers If-None-Match with 304, as a CDN does."""

    body: bytes = b""
    answers: list[int] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        etag = '"' + hashlib.md5(self.body).hexdigest() + '"'
        if not self.path.endswith("/tiny.safetensors"):
            self.answers.append(404)
            self.send_response(404)
            self.end_headers()
            return
        if self.headers.get("If-None-Match") == etag:
            self.answers.append(304)
            self.send_response(304)
            self.end_headers()
            return
        self.answers.append(200)
        self.send_response(200)
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


def test_a_url_single_file_is_downloaded_once_and_read(tiny, tmp_path):
    handler = type("Handler", (_FileServer,), {"body": tiny.file.read_bytes(), "answers": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/files/tiny.safetensors"
        cfg = config_for(tiny, tmp_path, url)
        cfg.model.download.allow_private_addresses = True  # served from 127.0.0.1
        assert_fp16_of(tiny.parts, load_parts(cfg.model, cfg.state_path("cache"), diffusion=cfg.diffusion))
        info = describe_source(cfg.model, cfg.state_path("cache"))  # the run's lineage, after the workers' load
        assert info.weights_sha256 == file_sha256(tiny.file) and Path(info.location).read_bytes() == handler.body
        assert handler.answers == [200, 304]  # the second fetch kept the cached copy
        cfg.model.source = url.replace("tiny.safetensors", "gone.safetensors")
        with pytest.raises(ModelLoadError, match="answered 404"):
            load_parts(cfg.model, cfg.state_path("cache"), diffusion=cfg.diffusion)
    finally:
        server.shutdown()
        server.server_close()


def test_a_v_prediction_file_is_refused_for_an_epsilon_preset(tiny, tmp_path):
    cfg = config_for(tiny, tmp_path, str(tiny.file), prediction_type="epsilon", zero_terminal_snr="false")
    with pytest.raises(ModelLoadError, match="is a v-prediction checkpoint") as info:
        load_parts(cfg.model, cfg.state_path("cache"), diffusion=cfg.diffusion)
    assert "\n" not in str(info.value)


def test_the_weights_hash_follows_the_weights_not_the_place(tiny, tmp_path):
    copy = shutil.copytree(tiny.folder, tmp_path / "copy")
    assert weights_sha256(copy) == weights_sha256(tiny.folder)
    parts = build_tiny(tiny.cfg.model.tiny)
    with torch.no_grad():
        parts.vae.decoder.conv_out.bias.add_(1e-3)
    changed = save_pipeline(parts, tiny.cfg.diffusion, tmp_path / "changed")
    assert weights_sha256(changed) != weights_sha256(tiny.folder)


COMMIT = "c0ffee" + "0" * 34


def lay_out_hub_cache(folder: Path, cache: Path, repo: str) -> Path:
    """``folder`` as huggingface_hub caches a download of ``repo`` at ``COMMIT``: content in ``blobs/`` (named
    by their sha256, as LFS files are), ``snapshots/<commit>/`` of relative symlinks, ``refs/main``."""
    base = cache / ("models--" + repo.replace("/", "--"))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = base / "snapshots" / COMMIT / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(COMMIT)
    return base / "snapshots" / COMMIT


HUB_RUN = r"""
import json, sys
import mlflow
from components.config import load_config
from components.dataset import read_manifest
from components.registry.model_sources import load_source_parts
from components.training.driver import open_run, pin_source, resolve_paths
from components.training.preflight import check_model_source

cfg = resolve_paths(load_config(sys.argv[1], json.loads(sys.argv[2])))
check_model_source(cfg)
run_id = open_run(cfg, read_manifest(cfg.train.data))
pinned = pin_source(cfg, run_id)
parts = load_source_parts(cfg, pinned)
from safetensors.torch import save_file
save_file({k: v.contiguous() for k, v in parts.unet.state_dict().items()}, sys.argv[3])
print(json.dumps({"run_id": run_id, "tags": mlflow.MlflowClient().get_run(run_id).data.tags,
                  "pinned": pinned.model_dump(mode="json")}))
"""


@pytest.mark.parametrize("revision", [None, "main"])
def test_a_hub_id_loads_offline_from_the_cache_and_records_its_commit(tiny, tmp_path, revision):
    """The driver's lineage code (``open_run`` + ``pin_source``) and the workers' loader
    (``load_source_parts``) on a hub id with ``HF_HUB_OFFLINE=1`` and a Hub cache holding the tiny model:
    the MLflow run records the commit the branch resolved to (not "main"), the hash of the snapshot's
    weights, and the pinned source the workers load."""
    repo = "terminus-test/tiny-sdxl"
    snapshot = lay_out_hub_cache(tiny.folder, tmp_path / "hub-cache", repo)
    data = write_synthetic_curated(tmp_path / "data", n_train=2, n_val=1)
    sets = [f"state_dir={tmp_path / 'state'}", f"train.data={data}", f"model.source={repo}", "train.run_name=hub",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    sets += [f"model.revision={revision}"] if revision else []
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub-cache"), HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-c", HUB_RUN, str(REPO / "flows/configs/tiny.yaml"), json.dumps(sets),
                           str(tmp_path / "unet.safetensors")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    tags = out["tags"]
    assert tags["lineage.source"] == repo and tags["lineage.kind"] == "hub"
    assert tags["lineage.revision"] == COMMIT and tags["lineage.requested_revision"] == (revision or "main")
    assert tags["lineage.weights_sha256"] == weights_sha256(snapshot) == weights_sha256(tiny.folder)
    assert out["pinned"]["revision"] == COMMIT and json.loads(tags["lineage.pinned"]) == out["pinned"]
    unet = load_file(tmp_path / "unet.safetensors")
    assert all(torch.equal(v, unet[k]) for k, v in tiny.parts.unet.state_dict().items())
