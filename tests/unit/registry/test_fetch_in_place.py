"""A registered version in a local artifact store is read where it is: no second copy in the cache."""

from __future__ import annotations

from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

from components.registry.model import fetch_model, local_artifacts
from components.registry.tracking import setup_tracking


def test_a_local_artifact_store_is_read_in_place_and_nothing_is_copied(registered_model, tmp_path):
    r = registered_model
    setup_tracking(r.cfg)
    cache = tmp_path / "cache"
    resolved = fetch_model(f"models:/{r.name}/{r.version}", cache)
    artifacts = local_artifacts(r.name, r.version)
    assert artifacts is not None and resolved.pipeline_dir.is_relative_to(artifacts)
    assert (resolved.pipeline_dir / "model_index.json").is_file()
    assert not cache.exists()  # nothing downloaded


def test_a_remote_artifact_store_is_not_taken_for_a_local_folder(registered_model, monkeypatch):
    r = registered_model
    setup_tracking(r.cfg)
    for remote in ("s3://bucket/mlartifacts/1/models/m-1/artifacts", "mlflow-artifacts:/1/models/m-1/artifacts"):
        monkeypatch.setattr(ModelsArtifactRepository, "get_underlying_uri",
                            staticmethod(lambda uri, remote=remote: remote))
        assert local_artifacts(r.name, r.version) is None
