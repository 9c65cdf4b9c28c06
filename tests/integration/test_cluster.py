"""The local cluster a flow starts: its own processes find its state API (Ray Train's controller and its
placement-group cleaner query it), whatever cluster an old ``ray start`` left named in Ray's temp dir."""

from __future__ import annotations

import time


def test_tasks_reach_this_clusters_state_api_past_a_stale_cluster_file(ray_local, tmp_path):
    ray = ray_local
    stale = tmp_path / "ray"
    stale.mkdir()
    (stale / "ray_current_cluster").write_text("127.0.0.1:9")  # a cluster that is long gone

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self) -> bool:
            return True

    @ray.remote(num_cpus=0)
    def actor_state(actor_id: str, tmpdir: str) -> tuple[str, float]:
        import os

        from ray.util.state import get_actor

        os.environ["RAY_TMPDIR"] = tmpdir  # Ray reads ``<tmpdir>/ray/ray_current_cluster`` from here
        start = time.monotonic()
        state = get_actor(actor_id, timeout=5)
        return state.state, time.monotonic() - start

    probe = Probe.remote()
    assert ray.get(probe.ping.remote())
    state, seconds = ray.get(actor_state.remote(probe._actor_id.hex(), str(tmp_path)), timeout=120)
    assert state == "ALIVE"
    assert seconds < 5
    ray.kill(probe)
