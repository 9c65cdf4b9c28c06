"""The local cluster a flow starts: its own processes find its state API (Ray Train's controller and its
placement-group cleaner query it), whatever cluster an old ``ray start`` left named in Ray's temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ray.util.state import get_actor

from tests.fixtures.processes import REPO, free_port, subprocess_env


def test_tasks_reach_this_clusters_state_api_past_a_stale_cluster_file(ray_local, tmp_path):
    ray = ray_local
    stale = tmp_path / "ray"
    stale.mkdir()
    (stale / "ray_current_cluster").write_text("127.0.0.1:9")  # a cluster that is long gone

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self) -> bool:
            return True

    @ray.remote(num_cpus=0, max_calls=1)  # its worker exits after it: the planted RAY_TMPDIR goes with it
    def actor_state(actor_id: str, tmpdir: str) -> str:
        os.environ["RAY_TMPDIR"] = tmpdir  # Ray reads ``<tmpdir>/ray/ray_current_cluster`` from here
        return get_actor(actor_id, timeout=10).state  # the stale address: a GCS connection timeout, then an error

    probe = Probe.remote()
    assert ray.get(probe.ping.remote())
    assert ray.get(actor_state.remote(probe._actor_id.hex(), str(tmp_path)), timeout=120) == "ALIVE"
    ray.kill(probe)


TAKEN_PORT_SCRIPT = """
import json, os, socket
import components.cluster as cluster

held = socket.socket()
held.bind(("127.0.0.1", 0))
held.listen()
taken = held.getsockname()[1]
real = cluster.dashboard_port
cluster.dashboard_port = lambda preferred=cluster.DASHBOARD_PORT: taken if preferred else real(0)
with cluster.ray_session(num_cpus=1):
    from ray.util.state import list_nodes
    url = os.environ["RAY_API_SERVER_ADDRESS"]  # what the state API below (and every Ray process) uses
    print(json.dumps({"taken": taken, "url": url, "nodes": len(list_nodes(timeout=30))}))
"""


def test_a_dashboard_port_taken_at_start_up_falls_back_to_a_free_one(tmp_path):
    """Another flow took the dashboard's port between the check and the start: the cluster starts on a
    free port, and the address its processes inherit is that dashboard's."""
    proc = subprocess.run([sys.executable, "-c", TAKEN_PORT_SCRIPT], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["url"].endswith(f":{out['taken']}")
    assert out["nodes"] == 1


SAME_MOMENT_SCRIPT = """
import json, os, sys, time
import components.cluster as cluster

preferred, go = int(sys.argv[1]), float(sys.argv[2])
real = cluster.dashboard_port
cluster.dashboard_port = lambda preferred=preferred: real(preferred)  # both prefer the same free port
time.sleep(max(0.0, go - time.time()))  # imports done: both start at the same moment
with cluster.ray_session(num_cpus=1):
    import ray
    print(json.dumps({"url": os.environ["RAY_API_SERVER_ADDRESS"], "cpus": ray.cluster_resources()["CPU"]}))
"""


def test_two_flows_started_at_the_same_moment_both_get_a_cluster():
    """Two local clusters started together on one machine: both see the preferred dashboard port free, and
    without the start lock the second dashboard failed to bind it (after a minute). Each gets its own."""
    port, go = free_port(), time.time() + 20
    procs = [subprocess.Popen([sys.executable, "-c", SAME_MOMENT_SCRIPT, str(port), str(go)], cwd=REPO,
                              env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()  # a no-op for one that exited
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    urls = [json.loads(out.strip().splitlines()[-1])["url"] for out, _ in outs]
    assert len(set(urls)) == 2 and f"http://127.0.0.1:{port}" in urls
