"""A curation task cancelled while its worker imports the curation code for the first time leaves that worker able
to run the next run's tasks, wherever the interrupt lands. Ray Data cancels a failed run's other tasks with a
KeyboardInterrupt in their workers, and Ray gives the next run of the same driver those same workers
(docs/reliability.md). boto3 needed a repair for this (``components.storage.imported_whole``; its own test is in
tests/unit/test_storage.py); this sweep looks for any other module that would. With ``imported_whole`` turned off, 2 of
its 24 points fail with boto3's error (checked)."""

from __future__ import annotations

import json
import subprocess
import sys

from bench.curation import synthetic_photo
from components.environment import snapshot
from tests.fixtures.processes import REPO

POINTS = 24
"""Interrupts tried, spread evenly over the modules that the first task's imports load."""

SWEEP = r"""
import json, os, sys
import numpy, pyarrow, ray, ray.data  # loaded in a Ray Data worker before a task's function is unpickled

IMAGE, OUT, POINTS = sys.argv[1], sys.argv[2], int(sys.argv[3])


class Interrupt:
    # A KeyboardInterrupt as the import of the at-th new module starts (never when at is 0); counts them.
    def __init__(self, at):
        self.at, self.seen = at, 0

    def find_spec(self, name, path=None, target=None):
        self.seen += 1
        if self.seen == self.at:
            raise KeyboardInterrupt(name)
        return None


def first_task():  # what unpickling and starting a curation task imports: its module, then an S3 client
    import components.curation.pipeline
    from components.storage import s3_client

    s3_client("http://127.0.0.1:9")


def next_task(at):  # the next run's task in the same worker: curate a block, write its shard, make a client
    import pyarrow as pa

    from components.config import CurateConfig, FilterConfig
    from components.curation.pipeline import curate_block
    from components.curation.writer import write_shard
    from components.storage import Store, s3_client

    cfg = CurateConfig(source="manifest.jsonl", output=OUT,
                       filters=FilterConfig(require_exif=False, max_luminance=1.0, max_watermark=1.0))
    rows = curate_block(pa.Table.from_pylist([{"source": IMAGE, "caption": "a photo", "fetch": "path"}]), cfg, 0)
    assert rows.column("reason").to_pylist() == [None], rows.to_pylist()
    write_shard(Store(None), OUT, f"part-{at:05d}", rows)
    s3_client("http://127.0.0.1:9")


def forked(run):
    # run() in a fresh fork of this process (the worker's state before its first task); its one line of JSON.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            out = run()
        except BaseException as err:
            out = {"error": f"{type(err).__name__}: {err}"[:300]}
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(text)


def modules():
    finder = Interrupt(0)
    sys.meta_path.insert(0, finder)
    first_task()
    return {"modules": finder.seen}


def trial(at):
    def run():
        finder = Interrupt(at)
        sys.meta_path.insert(0, finder)
        try:
            first_task()
            interrupted = None
        except KeyboardInterrupt as err:
            interrupted = str(err)
        sys.meta_path.remove(finder)
        next_task(at)
        return {"at": at, "interrupted": interrupted}
    return run


n = forked(modules)["modules"]
points = sorted({max(1, round(n * (i + 0.5) / POINTS)) for i in range(POINTS)})
print(json.dumps({"modules": n, "trials": [{"at": at, **forked(trial(at))} for at in points]}))
"""


def test_an_interrupted_first_import_leaves_the_worker_able_to_run_the_next_task(tmp_path):
    image = tmp_path / "photo.jpg"
    image.write_bytes(synthetic_photo(2048, 1536, 1))
    proc = subprocess.run([sys.executable, "-c", SWEEP, str(image), str(tmp_path / "out"), str(POINTS)],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**snapshot(), "AWS_DEFAULT_REGION": "us-east-1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["modules"] > 100, out  # the first task loads hundreds of modules (components, boto3, botocore)
    failed = [t for t in out["trials"] if "error" in t]
    assert not failed, failed
    interrupted = [t["interrupted"] for t in out["trials"]]
    assert len(interrupted) == POINTS and all(interrupted), interrupted  # every trial was cut at a module's import
