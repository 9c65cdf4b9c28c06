"""Fault: the S3 endpoint fails during curation (docs/reliability.md).

Promise: the run stops with one clear error line; the output has no ``_SUCCESS`` (nothing that looks
complete; readers refuse it); no input is silently dropped as "unreadable" because of the outage;
a rerun once the endpoint is back publishes a complete dataset and removes the failed run's shards.

A dedicated moto server (its own process, stopped by its PID) holds the bucket; curation reaches it
through a loopback TCP relay that the test cuts once the first shard has landed: the endpoint then
refuses every connection and drops the open ones, while the bucket keeps what was written, so the
test can inspect the partial output. The rerun goes through the same relay, reopened on its port.
"""

from __future__ import annotations

import json
import runpy
import select
import socket
import subprocess
import sys
import threading
import time

import boto3
import numpy as np
import pytest
from PIL import Image

from components import dataset
from components.config import CurateConfig
from components.curation.process import Curator
from components.environment import snapshot
from components.storage import StorageUnavailable, Store
from tests.fixtures.processes import REPO, free_port, stop, wait_for_port

N_IMAGES = 24


class Relay:
    """A loopback TCP relay to a real server that a test can cut (refuse and drop every connection)
    and reopen on the same port."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                if listener is not self._listener:  # cut while this connection was being accepted
                    client.close()
                    return
                try:
                    upstream = socket.create_connection(self.target)
                except OSError:
                    client.close()
                    continue
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        raise OSError("closed")
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):
            for s in (a, b):
                s.close()

    def cut(self) -> None:
        with self._lock:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept(); close alone may not
            except OSError:
                pass
            self._listener.close()
            self._listener = None
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._socks = []


@pytest.fixture
def moto_relay(monkeypatch):
    """A moto server of this test's own (stopped by PID), its bucket ``lake``, and a relay to it."""
    port = free_port()
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in creds.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(snapshot(), **creds))
    try:
        wait_for_port(port, proc=proc)
        direct = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        direct.create_bucket(Bucket="lake")
        yield direct, Relay(port)
    finally:
        stop(proc)


def _keys(s3, prefix: str) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket="lake", Prefix=prefix).get("Contents", [])}


def _run_flow(monkeypatch, capsys, sets: list[str]):
    monkeypatch.syspath_prepend(str(REPO / "flows"))
    monkeypatch.setattr(sys, "argv", ["curate.py", "--config", str(REPO / "flows/configs/tiny.yaml"),
                                      *[x for s in sets for x in ("--set", s)]])
    capsys.readouterr()
    runpy.run_path(str(REPO / "flows/curate.py"), run_name="__main__")
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_s3_outage_during_curation_publishes_nothing_and_a_rerun_completes(
        ray_local, moto_relay, monkeypatch, capsys, tmp_path):
    direct, relay = moto_relay
    source = tmp_path / "photos"
    source.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 160, size=(256, 320, 3), dtype=np.uint8)).save(source / f"p{i:02d}.jpg")
    sets = [f"curate.source={source}", "curate.output=s3://lake/ds", f"state_dir={tmp_path / 'state'}",
            "curate.track=false", "curate.rows_per_shard=2", "curate.batch_size=2",
            f"curate.s3_endpoint_url=http://127.0.0.1:{relay.port}"]
    cut_at: list[float] = []

    def cut_after_first_shard() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if any(k.endswith(".parquet") for k in _keys(direct, "ds/")):
                relay.cut()
                cut_at.append(time.time())
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=cut_after_first_shard, daemon=True)
    watcher.start()
    with pytest.raises(SystemExit) as exit_info:
        _run_flow(monkeypatch, capsys, sets)
    failed_at = time.time()
    watcher.join(timeout=10)
    assert cut_at, "the relay was never cut"
    assert exit_info.value.code == 1  # the work failed (not the input): flows/_common.py's exit codes
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: S3 store unavailable: ") and "has no _SUCCESS" in last, last
    assert f"127.0.0.1:{relay.port}" in last and "Traceback" not in last
    print(f"outage noticed {failed_at - cut_at[0]:.1f} s after the cut")

    left = _keys(direct, "ds/")
    assert any(k.endswith(".parquet") for k in left)  # shards were written before the outage...
    assert "ds/_SUCCESS" not in left and "ds/report.json" not in left  # ...yet nothing looks complete
    with pytest.raises(dataset.IncompleteDatasetError):  # a reader, straight at the bucket, refuses it
        dataset.read_manifest("s3://lake/ds", direct.meta.endpoint_url)

    relay.open()  # the endpoint is back, on the same address
    result = _run_flow(monkeypatch, capsys, sets)
    assert result["inputs"] == N_IMAGES and result["kept"] == N_IMAGES  # no input lost to the outage
    manifest = dataset.read_manifest("s3://lake/ds", f"http://127.0.0.1:{relay.port}")
    assert manifest.rows["train"] + manifest.rows["val"] == N_IMAGES
    listed = {f"ds/{p}" for split in dataset.SPLITS for p in manifest.files[split]}
    shards = {k for k in _keys(direct, "ds/") if k.endswith(".parquet")}
    assert shards == listed  # the failed run's shards are gone


def test_a_dead_endpoint_is_an_outage_not_a_bad_input(moto_relay):
    """Store errors are sorted: a missing object is the input's problem (dropped, counted); a store
    that does not answer stops the run. A Curator never turns an outage into 'unreadable'."""
    direct, relay = moto_relay
    direct.put_object(Bucket="lake", Key="in/a.jpg", Body=b"x")
    live = Store(f"http://127.0.0.1:{relay.port}")
    assert live.read("s3://lake/in/a.jpg") == b"x"
    with pytest.raises(Exception) as missing:
        live.read("s3://lake/in/missing.jpg")
    assert not isinstance(missing.value, StorageUnavailable)
    curator = Curator(CurateConfig(s3_endpoint_url=f"http://127.0.0.1:{relay.port}"), seed=0)
    record = {"source": "s3://lake/in/missing.jpg", "caption": "c", "sidecar": None, "pwatermark": None,
              "reject": None, "detail": None}
    assert str(curator.process(record).reason) == "unreadable"

    relay.cut()
    dead = Store(f"http://127.0.0.1:{relay.port}")
    for call in (lambda: dead.read("s3://lake/in/a.jpg"), lambda: dead.write("s3://lake/in/b.jpg", b"y"),
                 lambda: list(dead.list("s3://lake/in")), lambda: dead.delete("s3://lake/in/a.jpg"),
                 lambda: dead.read_text_or_none("s3://lake/in/a.txt")):
        with pytest.raises(StorageUnavailable, match=r"^S3 store unavailable: \w+ s3://lake/in"):
            call()
    curator = Curator(CurateConfig(s3_endpoint_url=f"http://127.0.0.1:{relay.port}"), seed=0)
    with pytest.raises(StorageUnavailable):
        curator.process({**record, "source": "s3://lake/in/a.jpg"})
    assert "in/a.jpg" in {o["Key"] for o in direct.list_objects_v2(Bucket="lake")["Contents"]}
