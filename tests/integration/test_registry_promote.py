"""Promotion through the real flows, as a user runs them: ``python flows/promote.py`` and
``python flows/evaluate.py`` as processes against versions that went through the trainer's export
and were evaluated for real (the ``evaluated_registry`` fixture).

Refusals exit 3 with one ``error: promotion refused: ...`` line; --force records its reason; the
replaced champion keeps ``previous`` and --rollback restores it in one command; Serve's loader
follows the alias; two promotions started together leave champion and previous as the two candidates.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass

import mlflow
import pytest

from components.config import InferenceConfig
from components.environment import snapshot
from components.registry.promotion import LOCK_SUFFIX, PromotionRefused, promote
from components.registry.tracking import setup_tracking
from deploy.holder import ModelHolder
from tests.fixtures.processes import REPO

pytestmark = pytest.mark.slow


@dataclass
class Done:
    rc: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict:
        return json.loads(self.stdout.strip().splitlines()[-1])

    @property
    def error(self) -> str:
        """The one ``error:`` line a refusal prints (and nothing after it)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], self.stderr[-2000:]
        return errors[0]


def flows(r, *commands: tuple[str, ...]) -> list[Done]:
    """Run flow commands concurrently (each its own process) and wait for all."""
    env = {k: v for k, v in snapshot().items() if not k.startswith("MLFLOW_")}  # config alone says where
    procs = []
    for script, *args in commands:
        cmd = [sys.executable, f"flows/{script}", *args]
        for item in r.overrides:
            cmd += ["--set", item]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        done.append(Done(proc.returncode, out, err))
    return done


def test_accept_refuse_force_rollback_and_race_through_the_flows(evaluated_registry, tmp_path):
    r = evaluated_registry
    v = r.versions
    setup_tracking(r.cfg)
    client = mlflow.MlflowClient()

    def aliases() -> tuple[str | None, str | None]:
        found = {a: str(ver) for a, ver in client.get_registered_model(r.name).aliases.items()}
        return found.get("champion"), found.get("previous")

    # the first champion: nothing to compare with
    assert promote(r.name, v["good"], evaluate=r.cfg.evaluate).version == v["good"]
    holder = ModelHolder(f"models:/{r.name}@champion", tmp_path / "serve-cache", InferenceConfig())
    assert holder.refresh() and holder.current.version == v["good"]

    with pytest.raises(PromotionRefused, match=f"v{v['fresh']} has no evaluation metrics: run flows/evaluate.py"):
        # (the same refusal through the flow: the NaN and worse cases below)
        promote(r.name, v["fresh"], evaluate=r.cfg.evaluate)

    # Refusals through the flow, concurrently (none moves an alias): NaN, worse than the champion, bad usage.
    nan, worse, usage = flows(
        r, ("promote.py", "--model", r.name, "--version", v["nan"]),
        ("promote.py", "--model", r.name, "--version", v["worse"]),
        ("promote.py", "--model", r.name, "--rollback", "--version", v["worse"]),
    )
    assert nan.rc == 3 and nan.error == (
        f"error: promotion refused: {r.name} v{v['nan']} produced 8 NaN and 0 blank images in evaluation")
    # Refused on val_loss against the champion: unpaired if evaluated before there was one, else on its interval
    # (the fixture is shared: test_evaluate.py may have evaluated it beside a champion first).
    assert worse.rc == 3 and re.fullmatch(
        rf"error: promotion refused: {r.name} v{v['worse']}: val_loss: (no paired evaluation against reference "
        rf"v{v['good']} \(the last was against none\): evaluate the candidate again|\+[0-9.]+% against v{v['good']}, "
        rf"95% interval \[.*\], whose upper bound is above the \+5% tolerance)", worse.error), worse.error
    assert usage.rc == 2 and "--rollback takes no --version" in usage.error
    assert aliases() == (v["good"], None)

    # Force the worse one with a reason, while the never-evaluated version is evaluated by the flow.
    forced, evaluated = flows(
        r, ("promote.py", "--model", r.name, "--version", v["worse"], "--force", "INC-7: approved by on-call"),
        ("evaluate.py", "--model-uri", f"models:/{r.name}/{v['fresh']}"),
    )
    assert forced.rc == 0, forced.stderr[-2000:]
    assert forced.result == {"model": r.name, "version": v["worse"], "alias": "champion", "previous": v["good"],
                             "forced": True}
    tags = client.get_model_version(r.name, v["worse"]).tags
    assert tags["forced_promotion_reason"] == "INC-7: approved by on-call"
    assert tags["forced_over"].startswith(f"{r.name} v{v['worse']}: val_loss: ")
    assert aliases() == (v["worse"], v["good"])
    assert holder.refresh() and holder.current.version == v["worse"]
    # Same weights as 'good' (same tiny init), evaluated in another process: the same numbers.
    assert evaluated.rc == 0, evaluated.stderr[-2000:]
    assert evaluated.result["val_loss"] == pytest.approx(r.metrics["good"]["val_loss"], rel=1e-6)
    assert evaluated.result["luminance_dark"] == pytest.approx(r.metrics["good"]["luminance_dark"], rel=1e-6)
    assert evaluated.result["clip_score"] == pytest.approx(r.metrics["good"]["clip_score"], rel=1e-5)
    # The flow measured the champion of the moment beside it (the forced promotion ran concurrently).
    assert evaluated.result["champion"] in (v["good"], v["worse"])
    table = client.download_artifacts(evaluated.result["run_id"], "comparison.json", str(tmp_path))
    assert "champion" in json.loads(open(table).read())["columns"]

    # One command restores the previous champion, and Serve's loader follows the alias back.
    (rolled,) = flows(r, ("promote.py", "--model", r.name, "--rollback"))
    assert rolled.rc == 0, rolled.stderr[-2000:]
    assert (rolled.result["version"], rolled.result["previous"]) == (v["good"], v["worse"])
    assert aliases() == (v["good"], v["worse"])
    assert holder.refresh() and holder.current.version == v["good"]

    # Two promotions started together: 'fresh' (now evaluated) and a second version of the same
    # model artifact with the same lineage and evaluation tags.
    mv = client.get_model_version(r.name, v["fresh"])
    twin = str(client.create_model_version(r.name, mv.source, run_id=mv.run_id, tags=mv.tags).version)
    no_gate = ("--set", "evaluate.gate={}")  # the lock is under test here, not the gate
    first, second = flows(r, ("promote.py", "--model", r.name, "--version", v["fresh"], *no_gate),
                          ("promote.py", "--model", r.name, "--version", twin, *no_gate))
    assert first.rc == 0 and second.rc == 0, first.stderr[-1500:] + second.stderr[-1500:]
    champion, previous = aliases()
    assert {champion, previous} == {v["fresh"], twin}
    assert client.search_model_versions(f"name = '{r.name}{LOCK_SUFFIX}'") == []  # every lock ticket deleted
