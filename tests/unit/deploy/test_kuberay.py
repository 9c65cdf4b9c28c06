"""deploy/serve.yaml against Serve's own schema; the KubeRay manifests rendered and checked: their
entrypoints' configs load and dry-run, resources cover the memory plan, no local state path, auth on."""

from __future__ import annotations

import shlex
import warnings

import pytest
import yaml
from pydantic import ValidationError
from ray._common.utils import import_attr
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app as flatten
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from components.cluster import CLUSTER_SERVE_ENV
from components.config import ConfigError, load_config
from components.registry.model import ModelUriError
from components.training.memory.plan import plan_for
from deploy.app import build_app
from tests.fixtures.processes import REPO

SERVE_YAML = REPO / "deploy/serve.yaml"
K8S = REPO / "deploy/kubernetes"


def load(path):
    return yaml.safe_load(path.read_text())


def test_serve_yaml_validates_as_serve_run_would_load_it():
    schema = ServeDeploySchema.model_validate(load(SERVE_YAML))
    assert schema.http_options.host == "127.0.0.1"  # loopback unless a deployment says otherwise
    (app,) = schema.applications
    assert app.import_path == "deploy.app:build_app"
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"Model", "Ingress"}
    model = deployments["Model"]
    scaling = model.autoscaling_config
    assert scaling["min_replicas"] == 1 and scaling["max_replicas"] == 2
    assert {"target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"} <= set(scaling)
    assert model.max_ongoing_requests >= 4 and model.max_queued_requests > 0
    assert model.ray_actor_options.num_cpus == 1 and model.health_check_period_s > 0
    assert model.backpressure_config.retry_after_s  # a full queue tells clients when to come back


def test_serve_yaml_autoscaling_is_accepted_without_deprecation():
    """Serve warns (and will refuse) a look-back period that does not exceed its metrics interval."""
    (app,) = ServeDeploySchema.model_validate(load(SERVE_YAML)).applications
    for deployment in app.deployments:
        if isinstance(deployment.autoscaling_config, dict):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                AutoscalingConfig(**deployment.autoscaling_config)


def test_serve_yaml_args_build_the_application(tmp_path):
    """What `serve run deploy/serve.yaml` does before deploying: import the builder, call it with the
    YAML's args, flatten the app. Its deployments must be the ones the YAML configures."""
    (app,) = load(SERVE_YAML)["applications"]
    args = dict(app["args"])
    args["config"] = str(REPO / args["config"])
    args["overrides"] = [*args["overrides"], f"state_dir={tmp_path}"]  # keep the repo's .state untouched
    application = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), args)
    built = flatten(application, name=app["name"])
    assert built.ingress_deployment_name == "Ingress"
    assert {d.name for d in built.deployments} == {d["name"] for d in app["deployments"]}


def entrypoint_commands(entrypoint: str) -> list[list[str]]:
    """The job's commands (``a && b``), each as its argv."""
    return [shlex.split(part) for part in entrypoint.split("&&")]


def flow_config(argv: list[str]):
    """The config a flow command line loads: its --config and --set values, through load_config."""
    assert argv[:2][0] == "python" and argv[1].startswith("flows/")
    preset = argv[argv.index("--config") + 1]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return load_config(REPO / preset, sets)


@pytest.fixture(scope="module")
def rayjob():
    return load(K8S / "rayjob.yaml")


@pytest.fixture(scope="module")
def train_plan(rayjob):
    (train,) = [c for c in entrypoint_commands(rayjob["spec"]["entrypoint"]) if c[1] == "flows/train.py"]
    cfg = flow_config(train)
    return cfg, plan_for(cfg)  # what `flows/train.py ... --dry-run` prints


def test_rayjob_curates_then_trains_with_explicit_locations(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    commands = entrypoint_commands(spec["entrypoint"])
    assert [c[1] for c in commands] == ["flows/curate.py", "flows/train.py"]
    curate, train = (flow_config(c) for c in commands)
    assert train.train.data == curate.curate.output and train.train.data.startswith("s3://")
    for cfg in (curate, train):
        assert cfg.state_dir.startswith("/var/lib/terminus") and cfg.curate.output.startswith("s3://")
    assert train.train.storage_path.startswith("s3://") and train.train.run_name
    assert ".state" not in (K8S / "rayjob.yaml").read_text()  # nothing points at a local state folder
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster(spec["rayClusterSpec"])


def test_rayjob_commands_are_accepted_inside_rays_working_dir_copy(rayjob, tmp_path, monkeypatch):
    """A job runs in Ray's temporary copy of the working directory, where relative state paths are
    refused: every state path of the entrypoint is absolute or s3://, so both commands load there."""
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    for argv in entrypoint_commands(rayjob["spec"]["entrypoint"]):
        flow_config(argv)
    with pytest.raises(ConfigError, match="relative inside a Ray job"):
        load_config(REPO / "flows/configs/terminus_v2.yaml", ["state_dir=relative/state"])


def test_rayjob_resources_cover_the_plan(rayjob, train_plan):
    cfg, plan = train_plan
    assert plan.fits and plan.capacity >= plan.total  # the dry run: FITS one A100-80G
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the export cannot land on the head
    (group,) = cluster["workerGroupSpecs"]
    assert "A100" in group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
    assert "80GB" in group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
    (container,) = group["template"]["spec"]["containers"]
    memory_gib = _gib(container["resources"]["requests"]["memory"])
    assert cfg.train.export_memory_gb * 2**30 >= plan.export_peak  # the export task reserves its peak ...
    assert memory_gib >= cfg.train.export_memory_gb  # ... on a worker that has it
    assert int(container["resources"]["requests"]["nvidia.com/gpu"]) >= cfg.train.num_workers


def _gib(quantity: str) -> float:
    units = {"Gi": 1, "Mi": 1 / 1024, "Ti": 1024}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    raise AssertionError(f"unexpected quantity {quantity}")


def serve_yaml_for_the_cluster() -> list[dict]:
    """deploy/serve.yaml's applications with the four documented differences of rayservice.yaml."""
    apps = load(SERVE_YAML)["applications"]
    (app,) = apps
    app["args"]["config"] = "flows/configs/terminus_v2.yaml"
    app["args"]["overrides"] = ["serve.api_key_env=TERMINUS_API_KEY", "state_dir=/var/lib/terminus"]
    model = next(d for d in app["deployments"] if d["name"] == "Model")
    model["ray_actor_options"]["num_gpus"] = 1
    return apps


def test_rayservice_serves_the_terminus_preset_on_gpus_with_auth():
    svc = load(K8S / "rayservice.yaml")
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    spec = svc["spec"]
    assert isinstance(spec["serveConfigV2"], str)  # KubeRay takes it as a YAML string
    served = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(served)
    assert served["applications"] == serve_yaml_for_the_cluster()
    assert served["http_options"]["host"] == "0.0.0.0"  # reachable from the pod's Service
    (app,) = served["applications"]
    cfg = load_config(REPO / app["args"]["config"], app["args"]["overrides"])  # the app's config loads
    assert cfg.serve.api_key_env == "TERMINUS_API_KEY" and cfg.name == "terminus_v2"
    cluster = spec["rayClusterConfig"]
    _check_cluster(cluster)
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]
    for container in containers:  # the key comes from a Secret that must exist: never an open endpoint
        ref = {e["name"]: e for e in container["env"]}["TERMINUS_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "terminus-api" and not ref.get("optional", False)
        # Serve's high-throughput settings with HAProxy ingress, on every pod (direct ingress is not turned off)
        values = {e["name"]: e.get("value") for e in container["env"]}
        assert {name: values.get(name) for name in CLUSTER_SERVE_ENV} == CLUSTER_SERVE_ENV
        assert "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in values
    assert ".state" not in spec["serveConfigV2"]


def _check_cluster(cluster: dict) -> None:
    assert cluster["rayVersion"].startswith("2.60")
    assert cluster["authOptions"]["mode"] == "token"  # Ray token auth stays on
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"] and {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265}
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        env = {e["name"]: e for e in container["env"]}
        for secret in ("MLFLOW_TRACKING_URI", "AWS_SECRET_ACCESS_KEY"):  # from Secrets, never inline
            assert "secretKeyRef" in env[secret]["valueFrom"] and "value" not in env[secret]


def test_builder_refuses_bad_args_before_deploying(tmp_path):
    with pytest.raises(ValidationError):
        build_app({"confg": "flows/configs/tiny.yaml"})  # a typo is an error, not a silent default
    with pytest.raises(ModelUriError):
        build_app({"model_uri": "runs:/abc/model", "overrides": [f"state_dir={tmp_path}"]})
