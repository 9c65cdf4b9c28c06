"""Fault: a process killed while a checkpoint is being written. Resume never picks up a torn one.

Two layers (docs/reliability.md):
1. ours: ``COMPLETE`` lists every file with its size and is written last; ``load_checkpoint`` refuses
   a directory without it or with a file missing or short (whatever order a copier took the files in);
2. Ray Train's: a checkpoint is resumable only once its upload finished and the controller recorded
   it in ``checkpoint_manager_snapshot.json``; a rerun under the same name resumes from the latest
   checkpoint recorded there, and rewrites a torn directory when it reaches that step again.

The kill is external and deterministic: before the run, the checkpoint directory of step 4 gets a
named pipe (FIFO) where ``unet.safetensors`` will be copied; Ray's upload opens it and blocks there
(no reader), so the test can SIGKILL the driver's whole process group while that checkpoint is
provably half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch

from components.environment import snapshot as environ_snapshot
from components.training.checkpointing import (
    COMPLETE,
    IncompleteCheckpointError,
    TrainState,
    load_checkpoint,
    save_checkpoint,
    verify_complete,
)
from components.training.driver import run_training
from tests.fixtures.processes import REPO
from tests.integration.test_train import history, planned_batch_hashes, small_cfg, values

SNAPSHOT = "checkpoint_manager_snapshot.json"


def _tiny_checkpoint(directory: Path) -> tuple[Path, torch.nn.Module]:
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 64)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(directory, model, opt, sched, TrainState(step=4, samples_seen=8)), model


def test_complete_marker_refuses_torn_checkpoints(tmp_path):
    whole, model = _tiny_checkpoint(tmp_path / "whole")
    assert load_checkpoint(whole, model).step == 4
    assert set(json.loads((whole / COMPLETE).read_text())["files"]) == {
        "unet.safetensors", "optimizer.pt", "lr_scheduler.json", "state.json"}

    # A writer killed before its last write: no marker.
    no_marker = shutil.copytree(whole, tmp_path / "no_marker")
    (no_marker / COMPLETE).unlink()
    # A copy cut short, whichever order it went in: the marker arrived, a weight file did not, or
    # arrived short, or the marker itself was cut.
    missing = shutil.copytree(whole, tmp_path / "missing")
    (missing / "unet.safetensors").unlink()
    short = shutil.copytree(whole, tmp_path / "short")
    data = (short / "unet.safetensors").read_bytes()
    (short / "unet.safetensors").write_bytes(data[: len(data) // 2])
    cut_marker = shutil.copytree(whole, tmp_path / "cut_marker")
    text = (cut_marker / COMPLETE).read_text()
    (cut_marker / COMPLETE).write_text(text[: len(text) // 2])
    # A marker of older checkpoints, without sizes, beside a cut copy of the weights: it was trusted.
    legacy = shutil.copytree(short, tmp_path / "legacy")
    (legacy / COMPLETE).write_text("ok\n")
    for torn, why in ((no_marker, "no COMPLETE"), (missing, "unet.safetensors is missing"),
                      (short, f"unet.safetensors is {len(data) // 2}"), (cut_marker, "unreadable COMPLETE"),
                      (legacy, "without file sizes")):
        with pytest.raises(IncompleteCheckpointError, match=why):
            load_checkpoint(torn, model)


def _recorded(run_dir: Path) -> list[str]:
    """Checkpoints Ray Train has recorded for the run (its controller's snapshot)."""
    try:
        snapshot = json.loads((run_dir / SNAPSHOT).read_text())
    except (FileNotFoundError, ValueError):  # not written yet, or being written
        return []
    return [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]


def _all_but_the_weights_landed(torn: Path) -> bool:
    """Ray's upload of checkpoint 4 has copied everything it can: ``COMPLETE`` is there and readable, and
    every file it lists except the weights (the FIFO, where the copy blocks) is there with its size."""
    try:
        sizes = json.loads((torn / COMPLETE).read_text())["files"]
    except (OSError, ValueError, KeyError):  # not yet copied, or being copied
        return False
    return all((torn / name).is_file() and (torn / name).stat().st_size == size
               for name, size in sizes.items() if name != "unet.safetensors")


def _session_leftovers(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return found


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's process group, then any process of its session that left the group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    deadline = time.time() + 30
    while (left := _session_leftovers(proc.pid)) and time.time() < deadline:
        for p in left:
            try:
                p.kill()  # by its own pid: a child that called setpgid
            except psutil.Error:
                pass
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.cluster  # the flow's whole process group, its local cluster with it, SIGKILLed
def test_kill_during_checkpoint_write_resumes_from_last_complete(tmp_path, ray_local):
    steps = 6
    cfg, overrides = small_cfg(tmp_path, f"train.max_steps={steps}", "train.checkpoint_every=2",
                               "train.run_name=torn", "train.num_to_keep=3")
    run_dir = tmp_path / "ray" / "torn"
    torn = run_dir / "checkpoint_00000004"
    torn.mkdir(parents=True)
    fifo = torn / "unet.safetensors"
    os.mkfifo(fifo)  # Ray's upload of step 4 blocks opening this for writing

    cmd = [sys.executable, "flows/train.py", "--config", "flows/configs/tiny.yaml",
           *[x for o in overrides for x in ("--set", o)]]
    env = {k: v for k, v in environ_snapshot().items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    log = tmp_path / "first_run.log"
    with log.open("wb") as out:
        first = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        try:
            deadline = time.time() + 420
            # Kill on two events, never after a guessed time: the copy of step 4 has landed everything but
            # the weights (it cannot finish), and Ray has recorded step 2, which its controller does a
            # little after the worker reported it (until then a resume would restart from scratch).
            while not (_all_but_the_weights_landed(torn) and _recorded(run_dir) == ["checkpoint_00000002"]):
                assert first.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, (f"checkpoint 4 not copied up to its weights after 2 was recorded: "
                                                f"{_recorded(run_dir)}, {sorted(p.name for p in torn.iterdir())}")
                time.sleep(0.1)
        finally:
            _kill_session(first)
    arrived = sorted(p.name for p in torn.iterdir() if p.is_file())
    assert "unet.safetensors" not in arrived and COMPLETE in arrived
    fifo.unlink()  # what a killed copy leaves: the weights absent (or short)

    # Layer 1: the torn directory is refused by our loader, whatever else arrived (COMPLETE included).
    with pytest.raises(IncompleteCheckpointError):
        verify_complete(torn)
    # Layer 2: Ray recorded step 2 as the latest checkpoint, never step 4.
    snapshot = json.loads((run_dir / SNAPSHOT).read_text())
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_00000002"
    assert [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]] == ["checkpoint_00000002"]

    result = run_training(cfg)  # the same run name: Ray resumes from its snapshot
    assert history(cfg, result.run_id, "loss") == list(range(1, steps + 1))  # every step exactly once
    # The same batches, in the same order, as the uninterrupted run's plan: steps 1-2 (and whatever else the
    # first run logged before the kill) from the first run, the rest from the resumed one.
    assert values(cfg, result.run_id, "data.batch_hash") == planned_batch_hashes(cfg, steps)
    assert history(cfg, result.run_id, "val_loss") == [2, 4, 6]
    final = mlflow.MlflowClient().get_run(result.run_id).data.metrics
    assert final["samples_seen"] == steps * 2  # batch 2 x 6 steps: nothing counted twice
    assert result.checkpoint.endswith("checkpoint_00000006")
    verify_complete(torn)  # step 4 was written again, whole
    snapshot = json.loads((run_dir / SNAPSHOT).read_text())
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_00000006"
    # Resumed from step 2, not restarted: three checkpoint reports in all (2, then 4 and 6), where a
    # restart from scratch would have reported step 2 a second time.
    assert [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]] == [
        "checkpoint_00000002", "checkpoint_00000004", "checkpoint_00000006"]
    assert snapshot["current_report_index"] == 3
