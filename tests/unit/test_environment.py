"""Reading the environment while other threads change it, and which of our
dependencies behave differently under test or CI detection.

The crash this guards against: MLflow's telemetry thread sets and unsets
``_MLFLOW_TELEMETRY_SESSION_ID`` in ``os.environ`` while ``redact`` iterated ``os.environ`` once per
value, so ``make demo`` died with ``KeyError`` on a user's machine. MLflow switches telemetry off
under pytest and CI, so only a test that churns the environment itself can see the race.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from components.environment import TEST_MARKERS, snapshot, without
from components.redact import Redactor, redact, redact_tree
from components.registry.tracking import flatten

CHURN = "_TERMINUS_CHURN_TOKEN"


@contextmanager
def churning_environment():
    """Another thread sets and unsets a secret-named variable in a tight loop, with the interpreter
    switching threads as often as it can (so the race shows within milliseconds, not by luck)."""
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            os.environ[CHURN] = "churned-secret-value"
            os.environ.pop(CHURN, None)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)


def _hammer(fn, seconds: float = 1.5) -> int:
    calls, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        fn()
        calls += 1
    return calls


def test_redact_survives_concurrent_environment_changes():
    """Failed on 196f67a within a few calls (KeyError: '_TERMINUS_CHURN_TOKEN')."""
    with churning_environment():
        calls = _hammer(lambda: redact("aws_secret_access_key = abc123def and plain text"))
    assert calls > 50


def test_flatten_and_redact_tree_survive_concurrent_environment_changes(tiny_cfg):
    tree = tiny_cfg.model_dump(mode="json")
    with churning_environment():
        _hammer(lambda: flatten(tree), seconds=0.7)
        _hammer(lambda: redact_tree({"a": ["x", {"b": "token=abcdef123"}]}), seconds=0.7)


def test_snapshot_is_consistent_under_churn():
    with churning_environment():
        for _ in range(2000):
            env = snapshot()
            assert env.get(CHURN) in (None, "churned-secret-value")
            assert env["PATH"] == os.environ["PATH"]


def test_redactor_reads_the_environment_once(monkeypatch):
    """One snapshot per call (or per Redactor), not one per value: a value set later is not seen by a
    Redactor made earlier, and the next call sees it."""
    monkeypatch.setenv("MY_SERVICE_TOKEN", "s3cr3t-value-42")
    early = Redactor()
    monkeypatch.setenv("OTHER_API_KEY", "another-secret-99")
    assert early("another-secret-99") == "another-secret-99"
    assert redact("another-secret-99 s3cr3t-value-42") == "<redacted> <redacted>"


def test_without_removes_the_markers():
    env = without(TEST_MARKERS, {"CI": "true", "PYTEST_CURRENT_TEST": "x", "PATH": "/bin"})
    assert env == {"PATH": "/bin"}


# --- which dependencies look for test or CI markers -------------------------------------------

DEPENDENCIES = ("mlflow", "ray", "diffusers", "transformers", "huggingface_hub", "accelerate", "torch",
                "boto3", "botocore", "tqdm", "pyarrow", "fastapi", "starlette", "pydantic", "safetensors")
LITERAL = re.compile(r"""["']([A-Z][A-Z0-9_]+)["']""")
KNOWN_READERS = {
    # telemetry off under any marker (telemetry/utils.py); read-only SQLite sessions enforced under
    # pytest (store/db/utils.py); conda retries under pytest (utils/conda.py)
    "mlflow": {"CI", "PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS",
               "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION",
               "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID"},
    "ray": {"PYTEST_CURRENT_TEST", "BUILDKITE"},  # _private/utils.py is_in_test()
    "transformers": {"CI"},  # utils/logging.py: library loggers propagate to the root logger under CI
    "torch": {"CI"},  # functorch/inductor configs and autotuning choices under CI
    "huggingface_hub": {"GITHUB_ACTIONS"},  # _oidc.py: token exchange inside GitHub Actions
}
"""Dependency -> the test/CI markers (``TEST_MARKERS``) its source names, as found by the scan below,
with what each changes. A difference means a library now behaves differently under the test suite
than for a user: read what it does, then update this table (and ``TEST_MARKERS`` if a new marker
appears). The fresh-clone demo check (tests/integration/test_demo.py) removes them all."""
SKIP_PARTS = {"tests", "test", "testing", "test_utils", "pytest", "_pytest"}


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def scan_markers(package_dir: Path) -> set[str]:
    """The ``TEST_MARKERS`` named as string literals in a package's own (non-test) sources."""
    markers, found = set(TEST_MARKERS), set()
    for path in package_dir.rglob("*.py"):
        if SKIP_PARTS & set(path.relative_to(package_dir).parts) or path.name == "testing_utils.py":
            continue  # a library's own test helpers run only under its own tests
        try:
            text = path.read_text(errors="ignore")
        except OSError:
            continue
        found.update(m for m in LITERAL.findall(text) if m in markers)
    return found


@pytest.mark.slow
def test_dependencies_that_detect_tests_or_ci_are_the_known_ones():
    readers = {}
    for dist in DEPENDENCIES:
        directory = _package_dir(dist)
        if directory is not None:
            markers = scan_markers(directory)
            if markers:
                readers[dist] = markers
    assert readers == KNOWN_READERS
