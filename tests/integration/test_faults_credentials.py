"""Security: planted credentials appear nowhere a run leaves things (docs/reliability.md, "Credentials").

What an operator actually does, three ways a secret reaches a run:
- AWS keys in the environment, the secret key holding ``/`` and ``+`` as real ones do, used for real:
  a curation whose source and output are on the loopback S3 server (its Ray tasks read and write S3);
- a Hugging Face token in the environment, unused;
- a password that is NOT in the environment, pasted into a config value (an S3 endpoint URL with
  ``user:password@``), which only the redaction patterns can catch.

Then the flows run (curate from S3 to S3, curate a folder, train; in this process, so their stdout and
stderr, Ray workers' lines included, are captured) and every place they leave things is searched for
the secrets: the captured output, every file under the test's folders (the MLflow SQLite store, its
artifacts, the curated dataset with its report and rejects, the export, the Ray Train storage), every
object in the S3 bucket (shards read back as rows too, since parquet compresses), and every file of the
Ray session directory of this test's cluster (its logs include the runtime environments Ray sets up).
"""

from __future__ import annotations

import io
import json
import os
import runpy
import stat
import sys
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from tests.fixtures.processes import REPO
from tests.integration.test_train import SMALL

FAKE_KEY_ID = "AKIAQ7FAKEKEY0000042"  # AKIA + 16 characters: the shape of an AWS access key id
FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCY/FAKE+KEY"  # "/" and "+", as AWS secret keys have
FAKE_HF = "hf_" + "Q7fakeTOKENnotREALatALL0000000042"
URL_PASSWORD = "q7/NotInTheEnv+" + "P4ssw0rd"  # only in a config value, never in the environment
SECRETS = (FAKE_KEY_ID, FAKE_SECRET, FAKE_HF, URL_PASSWORD)
BUCKET = "planted"


def _flow(monkeypatch, capfd, script: str, sets: list[str]) -> tuple[dict, str]:
    monkeypatch.syspath_prepend(str(REPO / "flows"))
    monkeypatch.setattr(sys, "argv", [script, "--config", str(REPO / "flows/configs/tiny.yaml"),
                                      *[x for s in sets for x in ("--set", s)]])
    runpy.run_path(str(REPO / "flows" / script), run_name="__main__")
    out, err = capfd.readouterr()
    return json.loads(out.strip().splitlines()[-1]), out + err


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 160, size=(96, 96, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _found(blob: bytes, where: str) -> list[str]:
    return [f"{where}: {s[:6]}..." for s in SECRETS if s.encode() in blob]


@pytest.mark.slow
def test_planted_credentials_never_leak(ray_local, s3_server, monkeypatch, capfd, tmp_path):
    for name in ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("HF_TOKEN", FAKE_HF)
    assert not any(URL_PASSWORD in v for v in os.environ.values())

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=BUCKET)
    for i in range(8):
        s3.put_object(Bucket=BUCKET, Key=f"in/p{i:02d}.jpg", Body=_jpeg(100 + i))
        s3.put_object(Bucket=BUCKET, Key=f"in/p{i:02d}.txt", Body=f"photo number {i}".encode())
    s3.put_object(Bucket=BUCKET, Key="in/broken.jpg", Body=b"not an image")  # a rejects shard, with a detail
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(12):
        (photos / f"p{i:02d}.jpg").write_bytes(_jpeg(i))

    state, data = tmp_path / "state", tmp_path / "curated"
    store = f"sqlite:///{state}/mlflow.db"
    small_buckets = ["curate.buckets.area=4096", "curate.buckets.min_side=64", "curate.buckets.max_side=128",
                     "curate.holdout_fraction=0.2"]
    capfd.readouterr()
    # 1. From S3 to S3 with the environment's keys: the curation tasks read and write the bucket.
    from_s3, logs = _flow(monkeypatch, capfd, "curate.py", [
        f"state_dir={state}", f"tracking.tracking_uri={store}", f"curate.s3_endpoint_url={s3_server}",
        f"curate.source=s3://{BUCKET}/in", f"curate.output=s3://{BUCKET}/out", *small_buckets])
    assert from_s3["kept"] == 8 and from_s3["reasons"] == {"not_an_image": 1}
    # 2. and 3. A folder, then training, with the password pasted into a config value.
    pasted = [f"state_dir={state}", f"tracking.tracking_uri={store}",
              f"curate.s3_endpoint_url=http://{FAKE_KEY_ID}:{URL_PASSWORD}@127.0.0.1:9"]
    curated, more = _flow(monkeypatch, capfd, "curate.py", [
        *pasted, f"curate.source={photos}", f"curate.output={data}", *small_buckets])
    logs += more
    trained, more = _flow(monkeypatch, capfd, "train.py", [
        *pasted, *SMALL, f"train.data={data}", f"train.storage_path={tmp_path / 'ray'}", "train.max_steps=2",
        "train.checkpoint_every=2", "train.run_name=planted"])
    logs += more
    assert curated["kept"] == 12 and trained["version"]

    # The pasted value did reach what is logged, redacted: this test would see a leak.
    client = mlflow.MlflowClient(store)
    for run_id in (curated["mlflow_run_id"], trained["run_id"]):
        params = client.get_run(run_id).data.params
        assert params["curate.s3_endpoint_url"] == "http://<redacted>@127.0.0.1:9"
        assert not any(s in v for s in SECRETS for v in params.values())

    assert "==== train:" in logs and "(RayTrainWorker" in logs  # the capture holds the workers' lines too
    leaks = _found(logs.encode(), "stdout/stderr")

    # Every file the runs wrote, except the credentials file the workers read (checked below).
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.parent not in (photos, state / "credentials")]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "report.json" for p in files)
    for path in files:
        leaks += _found(path.read_bytes(), str(path.relative_to(tmp_path)))

    # Every object of the S3 run, parquet shards also as rows (compressed bytes would hide a string).
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="out/")["Contents"]]
    assert "out/report.json" in keys and any(k.startswith("out/rejects/") for k in keys)
    for key in keys:
        blob = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        if key.endswith(".parquet"):
            blob += repr(pq.read_table(io.BytesIO(blob)).to_pylist()).encode()
        leaks += _found(blob, f"s3://{BUCKET}/{key}")

    # Ray's session directory: logs of every process of the cluster, the runtime-env agent's included.
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    searched = 0
    for path in session.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                leaks += _found(path.read_bytes(), f"ray session {path.relative_to(session)}")
                searched += 1
            except OSError:  # a socket or a file removed while we walk
                pass
    assert searched > 10 and any(p.name.startswith("runtime_env") for p in (session / "logs").iterdir())
    assert not leaks, leaks

    # The workers' credentials came through the standard chain: a shared-credentials file, the chain's own
    # store (like ~/.aws/credentials), which holds the keys and is readable by the user alone.
    (creds,) = (state / "credentials").iterdir()
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600 and FAKE_SECRET in creds.read_text()
