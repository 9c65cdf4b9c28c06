"""The Serve overhead breakdown: the ``Server-Timing`` header the ingress writes, read back by the benchmark, and
each request's own split (not timed)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import ray.serve._private.constants as constants
from fastapi.responses import JSONResponse

from bench.report import figures
from bench.serving import _paired, server_timing
from components.cluster import SERVE_ENV, _environ
from components.diffusion.request import GenerationResult
from deploy.app import server_timing as write


def test_the_ingress_header_reads_back_in_seconds():
    out = GenerationResult("m", "1", 0, [b"png"], model_s=0.0405, work_s=0.0312)
    since = time.perf_counter() - 0.05  # the route started 50 ms ago
    header = write(JSONResponse({}), out, since).headers["server-timing"]
    timing = server_timing(header)
    assert timing.keys() == {"ingress", "model", "work"}
    assert timing["model"] == pytest.approx(0.0405, abs=1e-6) and timing["work"] == pytest.approx(0.0312, abs=1e-6)
    assert 0.05 <= timing["ingress"] < 5.0


def test_a_refusal_without_model_timings_names_the_ingress_only():
    header = write(JSONResponse({}), GenerationResult("m", "1", 0, []), time.perf_counter()).headers["server-timing"]
    assert server_timing(header).keys() == {"ingress"}
    assert server_timing(None) == {} and server_timing("") == {}


def test_paired_split_is_per_request_medians():
    latencies = [0.100, 0.200, 0.300]
    timings = [{"ingress": 0.090, "model": 0.085, "work": 0.080},
               {"ingress": 0.150, "model": 0.140, "work": 0.120},
               {"ingress": 0.280, "model": 0.279, "work": 0.270}]
    split = _paired(latencies, timings)
    assert math.isclose(split["overhead_s"], 0.030)  # 0.020, 0.080, 0.030
    assert math.isclose(split["client_and_proxy_s"], 0.020)  # 0.010, 0.050, 0.020
    assert math.isclose(split["ingress_to_model_hop_s"], 0.005)  # 0.005, 0.010, 0.001
    assert math.isclose(split["model_queue_and_thread_s"], 0.009)  # 0.005, 0.020, 0.009
    assert math.isclose(split["work_s"], 0.120) and split["count"] == 3


def test_paired_split_skips_requests_without_the_header():
    assert _paired([0.1], [{}]) == {}
    split = _paired([0.1, 0.2], [{}, {"ingress": 0.15, "model": 0.12, "work": 0.1}])
    assert split["count"] == 1 and math.isclose(split["overhead_s"], 0.1)


def _serving_report(paired_overhead_s: float) -> dict:
    run = {"p50_s": 0.080, "p99_s": 0.1, "mean_s": 0.08, "throughput_rps": 10.0, "mean_batch_size": 1.0}
    return {
        "size": 64, "steps": 4, "concurrency": 8, "batch_wait_timeout_s": 0.02, "batching_speedup": 1.5,
        "direct": {"p50_s": 0.090, "p99_s": 0.1}, "direct_drift": 0.8, "serial_unbatched": run,
        "serial_batched": run, "unbatched": run, "batched": {**run, "max_batch_size": 4},
        "serve_overhead_p50_s": -0.010, "serve_overhead_paired_s": paired_overhead_s, "replica_work_p50_s": 0.07,
        "overhead_breakdown_s": {"client_and_proxy_s": 0.006, "ingress_to_model_hop_s": 0.004,
                                 "model_queue_and_thread_s": 0.001},
        "healthz": {"p50_s": 0.005},
    }


@pytest.mark.parametrize(("paired_s", "status"), [(0.012, "MISS"), (0.004, "PASS")])
def test_a_load_drift_cannot_pass_the_target_alone(paired_s, status):
    """The direct side ran 80 % slower after Serve than before it: HTTP p50 - direct p50 came out negative; the
    paired figure, which the drift does not enter, carries the verdict too."""
    rows = {f.name: f for f in figures({"serving": _serving_report(paired_s)})}
    paired = rows["Serve overhead, paired per request (latency - the replica's own work, median)"]
    assert paired.target == ("<=", 5.0) and paired.status == status
    assert rows["direct call p50 drift, after / before Serve"].value == pytest.approx(80.0)
    assert any(name.strip().startswith("of which client + HTTP proxy") for name in rows)


def test_serve_latency_settings_fill_in_never_override_and_leave_this_process_as_it_was(monkeypatch):
    assert SERVE_ENV["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"  # no HAProxy here: direct ingress would route nowhere
    for name in SERVE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")  # a user's choice
    with _environ(SERVE_ENV):
        assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"  # stands
        assert os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"  # filled in
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    assert "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in os.environ  # the driver keeps its own environment


def test_the_serve_settings_are_ones_this_ray_reads():
    """Each variable is a setting of the installed Ray Serve (a renamed one would be set and silently ignored)."""
    text = Path(constants.__file__).read_text()
    for name in SERVE_ENV:
        assert f'"{name}"' in text, name
