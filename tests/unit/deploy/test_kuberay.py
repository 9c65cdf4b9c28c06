"""deploy/serve.yaml against Serve's own schema, and the KubeRay manifests against the fields KubeRay reads."""

from __future__ import annotations

import yaml
from ray.serve.schema import ServeDeploySchema

from tests.conftest import REPO

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
    assert "num_gpus: 1" in SERVE_YAML.read_text()  # the GPU-host line, commented
    assert model.backpressure_config.retry_after_s  # a full queue tells clients when to come back


def test_serve_yaml_args_build_the_application(tmp_path):
    """What `serve run deploy/serve.yaml` does before deploying: import the builder, call it with the
    YAML's args, flatten the app. Its deployments must be the ones the YAML configures."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app as flatten

    (app,) = load(SERVE_YAML)["applications"]
    args = dict(app["args"])
    args["config"] = str(REPO / args["config"])
    args["overrides"] = [*args["overrides"], f"state_dir={tmp_path}"]  # keep the repo's .state untouched
    application = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), args)
    built = flatten(application, name=app["name"])
    assert built.ingress_deployment_name == "Ingress"
    assert {d.name for d in built.deployments} == {d["name"] for d in app["deployments"]}


def test_rayjob_runs_the_training_flow_on_a_gpu_worker_group():
    job = load(K8S / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"] == "python flows/train.py --config flows/configs/terminus_v2.yaml"
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster(spec["rayClusterSpec"])


def test_rayservice_serves_exactly_the_serve_yaml_apps():
    svc = load(K8S / "rayservice.yaml")
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    spec = svc["spec"]
    assert isinstance(spec["serveConfigV2"], str)  # KubeRay takes it as a YAML string
    served = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    local = ServeDeploySchema.model_validate(load(SERVE_YAML))
    assert served.model_dump()["applications"] == local.model_dump()["applications"]
    assert yaml.safe_load(spec["serveConfigV2"])["applications"] == load(SERVE_YAML)["applications"]
    assert served.http_options.host == "0.0.0.0"  # reachable from the pod's Service
    _check_cluster(spec["rayClusterConfig"])


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
    import pytest
    from pydantic import ValidationError

    from components.registry.model import ModelUriError
    from deploy.app import build_app

    with pytest.raises(ValidationError):
        build_app({"confg": "flows/configs/tiny.yaml"})  # a typo is an error, not a silent default
    with pytest.raises(ModelUriError):
        build_app({"model_uri": "runs:/abc/model", "overrides": [f"state_dir={tmp_path}"]})
