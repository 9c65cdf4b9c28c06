"""`make demo` as a new user runs it: a fresh clone of the repository, then
`make demo`, in the environment of a user's shell -- none of the variables by which our dependencies
recognise a test or CI run (``components.environment.TEST_MARKERS``) and no telemetry opt-out -- so
every code path that only users run (MLflow's telemetry thread among them) runs here too.

The clone shares this checkout's virtual environment (set-up is what ``make test`` already did); the
rest is the clone's own code, on its own state directory."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import mlflow
import pytest
from PIL import Image

from components.environment import OPT_OUTS, TEST_MARKERS, without
from tests.fixtures.processes import REPO, free_port, subprocess_env

pytestmark = pytest.mark.slow

SET_BY_THE_TEST_SESSION = ("HF_HUB_OFFLINE", "RAY_DEDUP_LOGS")  # tests/conftest.py; a user's shell has neither
# `make test` runs this; a user's `make demo` is the top one
SET_BY_AN_OUTER_MAKE = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")


def user_environment() -> dict[str, str]:
    env = subprocess_env()
    pytest_own = [k for k in env if k.startswith("PYTEST_")]  # pytest-xdist's workers add more of them
    return without((*TEST_MARKERS, *OPT_OUTS, *SET_BY_THE_TEST_SESSION, *SET_BY_AN_OUTER_MAKE, *pytest_own), env)


def test_the_environment_is_a_users():
    env = user_environment()
    assert not [k for k in env if k in TEST_MARKERS or k.startswith("PYTEST_") or k in SET_BY_AN_OUTER_MAKE]
    code = "from mlflow.telemetry.utils import is_telemetry_disabled; print(is_telemetry_disabled())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]  # MLflow's telemetry runs, as for a user


def test_make_demo_on_a_fresh_clone_as_a_user_runs_it(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    (clone / ".venv").symlink_to(REPO / ".venv")
    port = free_port()
    # The shared environment's editable install points at this checkout; the clone's own packages go first,
    # as its own `make setup` would have installed them (Ray's workers inherit the variable).
    env = {**user_environment(), "PYTHONPATH": str(clone)}
    proc = subprocess.run(
        ["make", "-o", ".venv/.installed", "demo", f"DEMO_ARGS=--set serve.port={port}"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(last) == {"model", "version", "alias", "image", "endpoint", "stages_s"}
    assert last["alias"] == "champion" and last["endpoint"] == f"http://127.0.0.1:{port}/v1/images/generations"
    assert set(last["stages_s"]) == {"curate", "train", "evaluate", "promote", "serve"}
    assert last["image"].startswith(str(clone / ".state"))
    with Image.open(last["image"]) as im:
        assert im.size == (256, 256) and im.format == "PNG"
    for stage in ("1/5 curate", "2/5 train", "3/5 evaluate", "4/5 promote", "5/5 serve", "done: curate"):
        assert stage in proc.stderr  # a banner per stage, and the summary of stage times
    assert "step 60/60" in proc.stderr  # the training progress lines reach the console
    # Nothing a user should worry about, piped: no traceback, no error-level line (Ray's " E " records included),
    # no redrawn progress bars, and no warning but Ray's note that token authentication is on.
    assert "Traceback" not in proc.stderr and "\x1b[A" not in proc.stderr and "it/s]" not in proc.stderr
    assert not re.search(r"\bERROR\b|\] [EF] |\bE \d{4}-", proc.stderr), proc.stderr[-4000:]
    warnings = [line for line in proc.stderr.splitlines() if re.search(r"\bWARNING\b|Warning:", line)]
    assert all("Token authentication is enabled" in line for line in warnings), warnings
    assert "failed" not in proc.stderr.lower(), proc.stderr[-4000:]  # e.g. Serve's controller, killed at the end
    assert "coloured noise" in proc.stderr  # the tiny model's image is said to be noise

    store = f"sqlite:///{clone}/.state/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)  # not this process's globals
    champion = client.get_model_version_by_alias(last["model"], "champion")
    assert str(champion.version) == last["version"]
    run = client.get_run(champion.tags["run_id"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 61))
    assert run.data.tags["precision.effective"] in ("bf16", "fp32")
    assert float(champion.tags["eval.val_loss"]) > 0
