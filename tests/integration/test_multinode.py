"""Beyond one node: Ray's ``cluster_utils.Cluster`` on this machine (a head with no CPUs for work and worker
raylets, each its own node), the model in a real ``mlflow server`` whose artifacts live on the loopback S3
server, so no local path carries the model between nodes.

Curation: the user's command (``flows/curate.py``) against the cluster (``RAY_ADDRESS``), reading and writing
S3; its tasks run on both worker nodes and the dataset holds the same rows as a run on one node.

Training: the user's command with DDP, one worker per worker node, checkpoints on S3; the node of one worker
is removed after the first checkpoint and a replacement joins: the run resumes from its latest checkpoint in
the same MLflow run and logs every step once.

Serve: Model replicas on two worker nodes and the ingress on the head; a worker node is removed (not
drained) while a bounded stream of requests runs, and a replacement node joins, as a node pool would replace
it. The clients retry a 503 (Serve's answer for the requests the lost replica held) after its Retry-After; no request
may fail after those retries, and the replica count comes back.

Each scenario runs in its own process: a driver connects to one Ray cluster at a time, and the test session
holds its own local one. Ray maps a loopback address to the host's for its internal services unless told
otherwise (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``): the head lives on 127.0.0.1 and each worker node on an
address of its own in 127.0.0.0/8 (all loopback), so the platform sees nodes on other hosts, as on a real
cluster: it may not hand a worker a file only the driver's disk holds (the S3 credentials file of a local Ray).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.processes import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SERVE_SCENARIO = r"""
import json, sys, threading, time
import httpx, ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from deploy.app import build_app

spec = json.loads(sys.argv[1])
REQUESTS, CLIENTS, RETRIES, BUDGET_S = spec["requests"], spec["clients"], spec["retries"], spec["budget_s"]
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 0, "resources": {"head": 1}, "node_ip_address": "127.0.0.1", "include_dashboard": True,
    "dashboard_host": "127.0.0.1", "dashboard_port": spec["dashboard_port"]})
workers = [cluster.add_node(num_cpus=2, node_ip_address=f"127.0.0.{2 + k}") for k in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address)
out = {"nodes": 1 + len(workers)}
try:
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": spec["port"]})
    model_options = {"num_replicas": 2, "max_ongoing_requests": 4, "health_check_period_s": 2,
                     "health_check_timeout_s": 10, "graceful_shutdown_timeout_s": 1,
                     "ray_actor_options": {"num_cpus": 1}}
    app = build_app({"overrides": spec["overrides"], "model_options": model_options,
                     "ingress_options": {"ray_actor_options": {"num_cpus": 0, "resources": {"head": 0.1}}}})
    serve.run(app, name="multinode", route_prefix="/")

    def replicas():
        alive = list_actors(filters=[("class_name", "=", "ServeReplica:multinode:Model"), ("state", "=", "ALIVE")],
                            timeout=30)
        return {a.actor_id: a.node_id for a in alive}

    def ingress_node():
        (a,) = list_actors(filters=[("class_name", "=", "ServeReplica:multinode:Ingress"), ("state", "=", "ALIVE")],
                           timeout=30)
        return a.node_id

    out["replica_nodes_before"] = sorted(set(replicas().values()))
    out["worker_nodes"] = sorted(w.node_id for w in workers)
    out["head_node"] = cluster.head_node.node_id
    out["ingress_node"] = ingress_node()
    base = f"http://127.0.0.1:{spec['port']}"
    results, lock, sent = [], threading.Lock(), [0]
    start = time.monotonic()

    def client(k):
        with httpx.Client(base_url=base, timeout=60) as c:
            while True:
                with lock:
                    if sent[0] >= REQUESTS or time.monotonic() - start > BUDGET_S:
                        return
                    i = sent[0]
                    sent[0] += 1
                attempts, statuses = 0, []
                while True:
                    try:
                        r = c.post("/v1/images/generations", json={"prompt": f"node loss {i}", "size": "64x64",
                                                                   "steps": 1, "seed": i})
                        statuses.append(r.status_code)
                        wait = float(r.headers.get("retry-after", "1"))
                    except httpx.TransportError as err:
                        statuses.append(type(err).__name__)
                        wait = 1.0
                    if statuses[-1] == 200 or attempts >= RETRIES:
                        break
                    attempts += 1
                    time.sleep(wait)
                with lock:
                    results.append({"i": i, "t": time.monotonic() - start, "statuses": statuses})

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    while len(results) < spec["before_loss"]:
        time.sleep(0.05)
    victim_id = [n for n in out["replica_nodes_before"] if n != out["ingress_node"]][0]
    (victim,) = [w for w in workers if w.node_id == victim_id]
    out["loss_at_s"] = time.monotonic() - start
    cluster.remove_node(victim, allow_graceful=False)
    replacement = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.4")
    deadline = time.monotonic() + BUDGET_S
    while time.monotonic() < deadline:
        status = serve.status().applications["multinode"].deployments["Model"]
        running = status.replica_states.get("RUNNING", 0)
        if running == 2 and victim_id not in replicas().values():
            out["recovered_after_s"] = time.monotonic() - start - out["loss_at_s"]
            break
        time.sleep(0.5)
    for t in threads:
        t.join(BUDGET_S)
    out["replica_nodes_after"] = sorted(set(replicas().values()))
    out["victim"], out["replacement"] = victim_id, replacement.node_id
    out["results"] = sorted(results, key=lambda r: r["i"])
finally:
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
print("RESULT " + json.dumps(out))
"""


CURATE_SCENARIO = r"""
import json, os, subprocess, sys
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_tasks

spec = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": True, "dashboard_host": "127.0.0.1",
    "dashboard_port": spec["dashboard_port"]})
workers = [cluster.add_node(num_cpus=1, node_ip_address=f"127.0.0.{2 + k}", env_vars=spec["worker_env"])
           for k in range(2)]
cluster.wait_for_nodes()
try:
    env = dict(os.environ, RAY_ADDRESS=cluster.address,
               RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{spec['dashboard_port']}")
    flow = subprocess.run([sys.executable, "flows/curate.py", *spec["args"]], env=env, capture_output=True,
                          text=True, timeout=spec["timeout_s"])
    ray.init(address=cluster.address)

    @ray.remote(num_cpus=1)
    def touch_driver_only(path):  # the guard's own check: a worker node cannot read the driver's state folder
        try:
            os.listdir(path)
            return "read"
        except PermissionError as err:
            return str(err)

    guard = ray.get(touch_driver_only.remote(spec["worker_env"]["TERMINUS_DRIVER_ONLY"]))
    tasks = list_tasks(filters=[("type", "=", "NORMAL_TASK")], limit=10000, timeout=30, raise_on_missing_output=False)
    actors = list_tasks(filters=[("type", "=", "ACTOR_TASK")], limit=10000, timeout=30, raise_on_missing_output=False)
    out = {"rc": flow.returncode, "stderr": flow.stderr[-3000:], "stdout": flow.stdout[-2000:],
           "head": cluster.head_node.node_id, "workers": sorted(w.node_id for w in workers),
           "curate_nodes": sorted({t.node_id for t in tasks if "curate_block" in t.name and t.node_id}),
           "tasks": len(tasks) + len(actors), "guard": guard}
finally:
    ray.shutdown()
    cluster.shutdown()
print("RESULT " + json.dumps(out))
"""


TRAIN_SCENARIO = r"""
import json, os, subprocess, sys, time
import boto3, ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

spec = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": True, "dashboard_host": "127.0.0.1",
    "dashboard_port": spec["dashboard_port"]})
workers = [cluster.add_node(num_cpus=2, node_ip_address=f"127.0.0.{2 + k}", env_vars=spec["worker_env"])
           for k in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address)
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
bucket, prefix = spec["checkpoints"]
out = {"workers": sorted(w.node_id for w in workers)}
try:
    env = dict(os.environ, RAY_ADDRESS=cluster.address,
               RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{spec['dashboard_port']}")
    flow = subprocess.Popen([sys.executable, "flows/train.py", *spec["args"]], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + spec["timeout_s"]
    while time.monotonic() < deadline and flow.poll() is None:
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        if any(o["Key"].endswith("/COMPLETE") for o in listed):
            break
        time.sleep(0.5)
    if flow.poll() is not None:  # finished (or failed) before its first checkpoint: nothing to remove
        stdout, stderr = flow.communicate()
        out.update(rc=flow.returncode, stdout=stdout[-4000:], stderr=stderr[-8000:], train_nodes=[])
        raise SystemExit(0)
    nodes = {a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                                      ("state", "=", "ALIVE")], timeout=30)}
    out["train_nodes"] = sorted(nodes)
    (victim,) = [w for w in workers if w.node_id == sorted(nodes)[0]]
    out["victim"] = victim.node_id
    cluster.remove_node(victim, allow_graceful=False)
    out["replacement"] = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.4", env_vars=spec["worker_env"]).node_id
    stdout, stderr = flow.communicate(timeout=max(1, deadline - time.monotonic()))
    out.update(rc=flow.returncode, stdout=stdout[-4000:], stderr=stderr[-8000:],
               resumed=[line[-300:] for line in stderr.splitlines() if "resuming from the latest checkpoint" in line])
    open(spec["log"], "w").write(stderr)
finally:
    ray.shutdown()
    cluster.shutdown()
    print("RESULT " + json.dumps(out))
"""


GUARD = REPO / "tests/fixtures/driver_only"


def worker_env(driver_only: Path) -> dict[str, str]:
    """The environment of a worker node's raylet: every Python process on it fails to touch ``driver_only``
    (tests/fixtures/driver_only/sitecustomize.py), as on a cluster where that folder is only on the driver's disk."""
    driver_only.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (str(GUARD), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "TERMINUS_DRIVER_ONLY": str(driver_only)}


def run_scenario(script: str, spec: dict, env: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(spec)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.returncode, proc.stdout[-3000:], proc.stderr[-6000:])
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def served_model(mlflow_server, tmp_path_factory):
    """The tiny pipeline registered as @champion in the MLflow server (artifacts on S3), and the client
    environment that reaches both (only the server URL and S3 credentials)."""
    import mlflow

    from components.config import load_config
    from components.diffusion.sdxl import save_pipeline
    from components.diffusion.tiny import build_tiny
    from components.environment import snapshot
    from components.registry.model import log_pipeline_model
    from components.registry.tracking import setup_tracking

    state = tmp_path_factory.mktemp("multinode")
    overrides = [f"state_dir={state / 'driver'}", f"tracking.tracking_uri={mlflow_server.url}",
                 "tracking.registered_model=terminus-multinode"]
    cfg = load_config(REPO / "flows/configs/tiny.yaml", overrides)
    env = {k: v for k, v in snapshot().items() if not k.startswith(("MLFLOW_", "AWS_", "RAY_"))}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               MLFLOW_S3_ENDPOINT_URL=mlflow_server.s3_endpoint, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    previous = mlflow.get_tracking_uri()
    try:
        experiment = setup_tracking(cfg)
        pipeline_dir = save_pipeline(build_tiny(cfg.model.tiny), cfg.diffusion, state / "pipeline")
        with mlflow.start_run(experiment_id=experiment):
            info = log_pipeline_model(pipeline_dir, cfg.tracking.registered_model, cfg.inference)
        mlflow.MlflowClient().set_registered_model_alias(cfg.tracking.registered_model, "champion",
                                                         str(info.registered_model_version))
    finally:
        mlflow.set_tracking_uri(previous)
    return {"overrides": overrides, "env": env, "state": state, "tracking_uri": mlflow_server.url}


def _jpeg(w: int, h: int, seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 160, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _rows(s3, bucket: str, prefix: str) -> list[tuple]:
    """Every curated row of the dataset at ``s3://bucket/prefix``, as the fields that make it (order-free)."""
    import hashlib
    import io

    import pyarrow.parquet as pq

    from components import dataset

    manifest = dataset.read_manifest(f"s3://{bucket}/{prefix}")
    rows = []
    for split in dataset.SPLITS:
        for path in manifest.paths(split):
            body = s3.get_object(Bucket=bucket, Key=path[len(f"s3://{bucket}/"):])["Body"].read()
            for r in pq.read_table(io.BytesIO(body)).to_pylist():
                rows.append((split, r["source"], r["caption"], r["bucket"], r["crop_top"], r["crop_left"],
                             hashlib.sha256(r["image"]).hexdigest()))
    return sorted(rows)


def test_curation_runs_on_several_nodes_and_writes_what_one_node_writes(ray_local, s3_env, served_model, tmp_path):
    import boto3

    from components.config import load_config
    from components.curation.pipeline import curate

    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket="cluster-lake")
    for i in range(16):
        s3.put_object(Bucket="cluster-lake", Key=f"in/{i:02d}/photo_{i}.jpg", Body=_jpeg(400 - 8 * i, 300 + 4 * i, i))
    common = ["curate.source=s3://cluster-lake/in/", "curate.track=false", "curate.rows_per_shard=2"]
    one = load_config(REPO / "flows/configs/tiny.yaml", [*common, "curate.output=s3://cluster-lake/one",
                                                          f"state_dir={tmp_path / 'one'}"])
    curate(one)  # on the session's one-node Ray
    env = dict(served_model["env"], AWS_ENDPOINT_URL_S3=s3_env)
    args = ["--config", "flows/configs/tiny.yaml", *(x for o in common for x in ("--set", o)),
            "--set", "curate.output=s3://cluster-lake/many", "--set", f"state_dir={tmp_path / 'many'}"]
    spec = {"args": args, "dashboard_port": free_port(), "timeout_s": 300, "worker_env": worker_env(tmp_path / "many")}
    out = run_scenario(CURATE_SCENARIO, spec, env, timeout=420)
    assert out["guard"].startswith("a worker node touched"), out["guard"]  # the driver's folder is not theirs
    assert out["rc"] == 0, out
    assert out["curate_nodes"] == out["workers"], out  # every worker node curated, the head none
    # Nothing the workers need lives only on the driver's disk: no credentials file written for them.
    assert not (tmp_path / "many" / "credentials").exists()
    many = _rows(s3, "cluster-lake", "many")
    assert len(many) >= 12 and many == _rows(s3, "cluster-lake", "one")


def test_ddp_training_resumes_after_losing_a_workers_node(ray_local, s3_env, served_model, tmp_path):
    import boto3
    import mlflow

    from components.config import load_config
    from components.curation.pipeline import curate

    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket="cluster-train")
    for i in range(12):
        s3.put_object(Bucket="cluster-train", Key=f"in/photo_{i}.jpg", Body=_jpeg(320, 320, 100 + i))
    curate(load_config(REPO / "flows/configs/tiny.yaml", [
        "curate.source=s3://cluster-train/in/", "curate.output=s3://cluster-train/curated", "curate.track=false",
        f"state_dir={tmp_path / 'curate'}"]))
    steps, every = 8, 2
    settings = [*served_model["overrides"], f"state_dir={tmp_path / 'driver'}", "train.data=s3://cluster-train/curated",
                "train.storage_path=s3://cluster-train/ray-results", "train.run_name=multinode", "train.num_workers=2",
                "train.cpus_per_worker=1.5", f"train.max_steps={steps}", f"train.checkpoint_every={every}",
                f"train.val_every={every}", "train.max_failures=2", "train.batch_size=1", "train.grad_accum=1"]
    args = ["--config", "flows/configs/tiny.yaml", *(x for o in settings for x in ("--set", o))]
    env = dict(served_model["env"], AWS_ENDPOINT_URL_S3=s3_env)
    spec = {"args": args, "dashboard_port": free_port(), "timeout_s": 480, "log": str(tmp_path / "train.log"),
            "checkpoints": ["cluster-train", "ray-results/multinode/"], "worker_env": worker_env(tmp_path / "driver")}
    out = run_scenario(TRAIN_SCENARIO, spec, env, timeout=600)
    assert out["rc"] == 0, out["stderr"]
    assert out["train_nodes"] == out["workers"], out  # one DDP worker on each worker node
    # The loss costs an attempt; a retry may meet the dying node once more before the cluster notices it.
    assert 1 <= len(out["resumed"]) <= 2, out["resumed"]
    result = json.loads(out["stdout"][out["stdout"].index("{"):])
    previous = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(served_model["tracking_uri"])
        runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`mlflow.runName` = 'multinode'",
                                  output_format="list")
        logged = [m.step for m in mlflow.MlflowClient().get_metric_history(result["run_id"], "loss")]
    finally:
        mlflow.set_tracking_uri(previous)
    assert [r.info.run_id for r in runs] == [result["run_id"]]  # the same MLflow run continued
    assert sorted(logged) == list(range(1, steps + 1)), logged  # every step once: none lost, none twice


def test_serve_survives_the_loss_of_a_replicas_node(served_model):
    overrides = [*served_model["overrides"], f"state_dir={served_model['state'] / 'serve'}",
                 "serve.default_steps=1", "serve.default_size=64", "serve.max_steps=2", "serve.max_side=128"]
    spec = {"overrides": overrides, "port": free_port(), "dashboard_port": free_port(), "requests": 60,
            "clients": 4, "retries": 3, "budget_s": 120, "before_loss": 12}
    out = run_scenario(SERVE_SCENARIO, spec, served_model["env"], timeout=420)
    print({k: v for k, v in out.items() if k != "results"})
    assert len(out["replica_nodes_before"]) == 2 and set(out["replica_nodes_before"]) <= set(out["worker_nodes"])
    assert out["ingress_node"] == out["head_node"]
    assert "recovered_after_s" in out, out
    assert out["victim"] not in out["replica_nodes_after"] and len(out["replica_nodes_after"]) >= 1
    results = out["results"]
    assert len(results) == spec["requests"]
    failed = [r for r in results if r["statuses"][-1] != 200]
    retried = [r for r in results if len(r["statuses"]) > 1]
    print(f"{len(results)} requests, {len(retried)} retried, {len(failed)} failed after retries; "
          f"recovered {out['recovered_after_s']:.1f} s after the loss")
    assert failed == [], failed
    for r in retried:  # what a client sees from a lost replica: a retryable 503, never a 500
        assert all(s in (503, 200) for s in r["statuses"]), r
