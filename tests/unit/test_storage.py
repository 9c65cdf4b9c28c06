"""The storage layer's key rules and its model cache, against moto's in-process S3.

- every key that turns into a local file is checked: one that leaves its prefix (``..``) or is not in
  normal form (``.``, ``//``) is refused, and nothing is written outside the cache;
- S3 operations refuse keys with dot segments (a proxy or an S3-compatible server may resolve them);
- a dataset's ``_SUCCESS`` cannot point readers outside the dataset;
- the model cache is validated by ETag: same-size new weights are downloaded again.
"""

from __future__ import annotations

import json
import subprocess
import sys

import boto3
import pytest
from moto import mock_aws

from components.dataset import IncompleteDatasetError, read_manifest
from components.environment import snapshot
from components.storage import Store, child, fetch_prefix, imported_whole, safe_relative
from tests.fixtures.processes import REPO

BUCKET = "models"


@pytest.fixture
def s3(monkeypatch):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def test_a_key_that_leaves_its_prefix_is_refused_and_nothing_lands_outside_the_cache(s3, tmp_path):
    """Before: ``target / key[len(prefix):]`` turned ``sdxl/../../../X`` into a file anywhere on the node."""
    cache = tmp_path / "deep" / "cache"
    s3.put_object(Bucket=BUCKET, Key="sdxl/unet/w.safetensors", Body=b"weights")
    s3.put_object(Bucket=BUCKET, Key="sdxl/../../../../escaped.txt", Body=b"planted")
    with pytest.raises(ValueError, match="escapes its prefix"):
        fetch_prefix(f"s3://{BUCKET}/sdxl", cache)
    assert not list(tmp_path.rglob("escaped.txt"))


@pytest.mark.parametrize("key", ["sdxl/./unet/w.safetensors", "sdxl/unet//w.safetensors",
                                 "sdxl/a/../unet/w.safetensors"])
def test_two_keys_never_name_one_cached_file(s3, tmp_path, key):
    """``a/./b`` and ``a//b`` normalise to ``a/b``: such a key could replace another object's cached file."""
    s3.put_object(Bucket=BUCKET, Key="sdxl/unet/w.safetensors", Body=b"weights")
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"other")
    with pytest.raises(ValueError, match="normal form"):
        fetch_prefix(f"s3://{BUCKET}/sdxl", tmp_path / "cache")


def test_same_size_new_weights_are_downloaded_again(s3, tmp_path):
    """The cache is keyed by ETag, not size: retrained weights of the same architecture have the same
    size, and were silently ignored before."""
    key, cache = "sdxl/unet/w.safetensors", tmp_path / "cache"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"A" * 64)
    first = fetch_prefix(f"s3://{BUCKET}/sdxl", cache)
    assert (first / "unet/w.safetensors").read_bytes() == b"A" * 64
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"B" * 64)  # same size, new content
    again = fetch_prefix(f"s3://{BUCKET}/sdxl", cache)
    assert again == first and (again / "unet/w.safetensors").read_bytes() == b"B" * 64
    etags = json.loads((again / ".etags.json").read_text())
    assert etags["unet/w.safetensors"] == s3.head_object(Bucket=BUCKET, Key=key)["ETag"]


def test_an_unchanged_object_is_not_downloaded_again(s3, tmp_path, monkeypatch):
    s3.put_object(Bucket=BUCKET, Key="sdxl/w.bin", Body=b"x" * 10)
    fetch_prefix(f"s3://{BUCKET}/sdxl", tmp_path)
    calls = []
    real = Store.client.fget

    def counting(self):
        client = real(self)
        original = client.download_file

        def download_file(*args, **kwargs):
            calls.append(args[1])
            return original(*args, **kwargs)

        client.download_file = download_file
        return client

    monkeypatch.setattr(Store, "client", property(counting))
    fetch_prefix(f"s3://{BUCKET}/sdxl", tmp_path)
    assert calls == []


def test_s3_operations_refuse_keys_with_dot_segments(s3):
    store = Store()
    s3.put_object(Bucket=BUCKET, Key="data/x.txt", Body=b"x")
    for uri in (f"s3://{BUCKET}/data/../data/x.txt", f"s3://{BUCKET}/data/./x.txt"):
        for op in (store.read, store.read_if_exists, store.exists, store.delete, lambda u: store.write(u, b"y")):
            with pytest.raises(ValueError, match="segments"):
                op(uri)
    assert store.read(f"s3://{BUCKET}/data/x.txt") == b"x"


def test_child_and_safe_relative():
    assert child("s3://b/root", "train/part-0.parquet") == "s3://b/root/train/part-0.parquet"
    assert child("/data/root", "train/part-0.parquet") == "/data/root/train/part-0.parquet"
    for rel in ("../x.parquet", "train/../../x.parquet", "/etc/passwd", "", ".", "train/./x.parquet"):
        with pytest.raises(ValueError):
            child("/data/root", rel)
    assert safe_relative("p/a/b", "p/") == "a/b"
    for key in ("p/../x", "p/a/../../x", "p/", "q/a", "p//a"):
        with pytest.raises(ValueError):
            safe_relative(key, "p/")


def test_a_success_list_that_points_outside_the_dataset_is_refused(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (tmp_path / "elsewhere.parquet").write_bytes(b"not ours")
    (root / "_SUCCESS").write_text(json.dumps({"digest": "d", "rows": {"train": 1, "val": 0},
                                               "files": {"train": ["../elsewhere.parquet"], "val": []}}))
    with pytest.raises(IncompleteDatasetError, match="outside the dataset"):
        read_manifest(str(root))


INTERRUPTED_IMPORT = r"""
import sys

class Cancel:  # a Ray task cancelled while it imports boto3 for the first time: KeyboardInterrupt mid-import
    fired = False

    def find_spec(self, name, path=None, target=None):
        if name == "boto3.resources.factory" and not Cancel.fired:  # boto3.session has loaded boto3.utils by now
            Cancel.fired = True
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Cancel())
try:
    import boto3
except KeyboardInterrupt:
    pass
assert Cancel.fired and "boto3.utils" in sys.modules and "boto3" not in sys.modules
sys.meta_path.pop(0)
from components.storage import s3_client  # the worker's next task, in the same process
print(type(s3_client("http://127.0.0.1:9")).__name__)
"""


def test_a_client_is_made_after_a_cancelled_task_interrupted_the_first_boto3_import():
    """The state a cancelled Ray task leaves in a worker that goes on to run the next run's tasks (a rerun after an
    S3 outage failed this way): without ``imported_whole``, "module 'boto3' has no attribute 'utils'"."""
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT], capture_output=True, text=True, cwd=REPO,
                          env={**snapshot(), "AWS_DEFAULT_REGION": "us-east-1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "S3"


def test_imported_whole_binds_loaded_submodules_and_leaves_a_clean_import_as_it_was(tmp_path, monkeypatch):
    pkg = tmp_path / "half_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from half_pkg.session import S\n")
    (pkg / "session.py").write_text("import half_pkg.utils\n\nclass S:\n    pass\n")
    (pkg / "utils.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("half_pkg")]:
        monkeypatch.delitem(sys.modules, name)
    import half_pkg  # a clean import: everything bound already

    assert imported_whole("half_pkg") is half_pkg and half_pkg.utils.VALUE == 1
    # The package dropped after its submodules loaded (an interrupted import), then imported again:
    for name in ("half_pkg", "half_pkg.session"):
        del sys.modules[name]
    import half_pkg as again

    assert again is not half_pkg and not hasattr(again, "utils")  # the state the worker was left in
    assert imported_whole("half_pkg").utils.VALUE == 1
    for name in [m for m in sys.modules if m.startswith("half_pkg")]:
        del sys.modules[name]
