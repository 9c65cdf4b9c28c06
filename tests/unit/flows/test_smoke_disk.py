"""The full-size smoke's disk: the need it checks before any cluster starts, and what it measures."""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import psutil
import pytest

from components.config import Config
from flows import smoke

REPO = Path(__file__).resolve().parents[3]
SDXL = 3_469_000_000  # SDXL base's four models: the memory plan's count, to a thousand


def test_the_need_is_three_copies_of_the_base_at_its_stored_precision():
    sdxl = Config(model={"source": "sdxl-random"})
    tiny = Config()
    assert smoke.stored_bytes(sdxl, SDXL) == 2 * SDXL  # fp16 numbers, stored in fp16
    assert smoke.stored_bytes(tiny, 1000) == 4000
    assert smoke.disk_needed(2 * SDXL) == 3 * 2 * SDXL + smoke.DISK_MARGIN
    assert 20e9 < smoke.disk_needed(2 * SDXL) < 24e9


def test_the_sampler_records_the_disk_peak_over_the_start(tmp_path):
    base = smoke.disk_used(tmp_path)
    with smoke.MemorySampler(__import__("os").getpid(), tmp_path, base, interval_s=60) as mem:
        (tmp_path / "blob").write_bytes(b"\0" * 32 * 2**20)
        (tmp_path / "blob").unlink()
        mem.sample()  # the blob is gone; the peak is what the samples saw
        (tmp_path / "kept").write_bytes(b"\1" * 16 * 2**20)
    assert mem.peak_disk >= 15 * 2**20  # the last sample saw the kept 16 MiB (other writers may add)
    assert smoke.disk_used(tmp_path / "not" / "yet") == smoke.disk_used(tmp_path)


def test_too_little_free_disk_is_one_line_and_exit_2_before_any_cluster(tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 * 10**9, 99 * 10**9, 10**9))
    monkeypatch.setattr(sys, "argv", ["smoke.py", "--config", str(REPO / "flows/configs/sdxl_cpu.yaml"),
                                      "--set", f"state_dir={tmp_path}"])

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr("components.cluster.ray_session", no_cluster)
    with pytest.raises(SystemExit) as exit_info:
        smoke.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the smoke needs 22.") and "1.0 GB are" in err[0]
    assert not any(tmp_path.iterdir())


def test_the_smoke_refuses_from_the_command_line_too(tmp_path):
    """A state_dir on this disk with an impossible margin: the real free space, the real process."""
    proc = subprocess.run([sys.executable, "-c", (
        "import sys; sys.argv=['smoke.py','--config','flows/configs/sdxl_cpu.yaml','--set','state_dir=" + str(tmp_path)
        + "']; from flows import smoke; smoke.DISK_MARGIN = 10**15; smoke.main()")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the smoke needs")
    assert "Traceback" not in proc.stderr


def test_memory_no_file_backs_counts_an_allocation_and_not_a_mapped_file(tmp_path):
    """Reading a mapped file raises RSS by page cache the kernel can drop; only anonymous memory is counted
    as memory no file backs."""
    me = psutil.Process(os.getpid())
    size = 128 * 2**20
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * size)
    start_rss, start_anon = me.memory_info().rss, smoke.resident_anon(me)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert sum(mapped[i] for i in range(0, size, 4096)) == size // 4096  # every page touched
        mapped_rss, mapped_anon = me.memory_info().rss, smoke.resident_anon(me)
    with mmap.mmap(-1, size) as block:  # fresh anonymous pages (a heap could reuse freed resident memory)
        for i in range(0, size, 4096):
            block[i] = 2
        anon = smoke.resident_anon(me)
    assert mapped_rss - start_rss > 0.9 * size and mapped_anon - start_anon < 0.25 * size
    assert anon - mapped_anon > 0.9 * size
