"""bench/checkpoint_size.py at the tiny size: a full fine-tune's checkpoint (UNet fp32, 8-bit AdamW state)
written and read back locally and on the loopback S3 server, and a killed write that leaves the previous one
loadable."""

from __future__ import annotations

import json

import pytest

from bench import checkpoint_size
from components.config import OptimizerName
from components.training.checkpointing import IncompleteCheckpointError
from components.training.memory.plan import optimizer_state_bytes


def test_checkpoint_round_trips_and_survives_a_killed_write(s3_env, tmp_path):
    out = tmp_path / "out.json"
    result = checkpoint_size.main(["--size", "tiny", "--target", str(tmp_path / "local"),
                                   "--target", "s3://bench/ckpt", "--s3-endpoint-url", s3_env, "--json", str(out)])
    assert json.loads(out.read_text()) == result
    rows = {r["target"]: r for r in result["targets"]}
    assert set(rows) == {str(tmp_path / "local"), "s3://bench/ckpt"}
    for row in rows.values():
        assert row["verified"] and row["killed_write_refused"] and row["previous_after_kill_verified"], row
    assert rows["s3://bench/ckpt"]["bytes"] == rows[str(tmp_path / "local")]["bytes"] > 0


def test_read_back_refuses_a_changed_tensor(s3_env, tmp_path):
    unet = checkpoint_size.build_unet("tiny")
    state = checkpoint_size.optimizer_state(unet, OptimizerName.ADAMW_8BIT)
    expected = checkpoint_size.digests(unet.state_dict(), state)
    checkpoint_size.write_local(tmp_path / "c", unet, state)
    assert checkpoint_size.read_back(str(tmp_path / "c"), None, expected)
    key = next(iter(expected))
    assert not checkpoint_size.read_back(str(tmp_path / "c"), None, {**expected, key: "0" * 64})
    (tmp_path / "c" / "optimizer.pt").write_bytes(b"cut")
    with pytest.raises(IncompleteCheckpointError):
        checkpoint_size.read_back(str(tmp_path / "c"), None, expected)


def test_the_optimizer_state_has_the_bytes_the_memory_plan_counts():
    unet = checkpoint_size.build_unet("tiny")
    state = checkpoint_size.optimizer_state(unet, OptimizerName.ADAMW_8BIT)
    stored = sum(t.nbytes for entry in state["state"].values() for k, t in entry.items() if k != "step")
    assert stored == optimizer_state_bytes([p.shape for p in unet.parameters()], OptimizerName.ADAMW_8BIT)


def test_largest_block_is_the_real_unets_under_its_own_names():
    from components.diffusion.sdxl_base import empty_component

    unet = empty_component("unet")
    keys = set(unet.state_dict())
    block = checkpoint_size.largest_block(OptimizerName.ADAMW_8BIT, int(0.5e9))
    names = set(block.state_dict())
    assert names and names <= keys
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in names} == {"down_blocks.1"}  # 0.36 GB; up_blocks.1: 0.64
    assert names == {k for k in keys if k.startswith("down_blocks.1.")}
    assert checkpoint_size.checkpoint_bytes(block, OptimizerName.ADAMW_8BIT) <= 0.5e9
    with pytest.raises(SystemExit, match="no block"):
        checkpoint_size.largest_block(OptimizerName.ADAMW_8BIT, 10)


def test_block_reader_reads_what_the_file_holds(tmp_path):
    import io
    import random

    import pyarrow.fs

    data = random.Random(0).randbytes(10_000)
    (tmp_path / "f").write_bytes(data)
    raw = pyarrow.fs.LocalFileSystem().open_input_file(str(tmp_path / "f"))
    reader = io.BufferedReader(checkpoint_size.BlockReader(raw, block=1000), buffer_size=64)
    rng = random.Random(1)
    for _ in range(200):
        start, n = rng.randrange(0, 10_500), rng.randrange(0, 3000)
        reader.seek(start)
        assert reader.read(n) == data[start:start + n]
    reader.seek(-5, io.SEEK_END)
    assert reader.read() == data[-5:]
