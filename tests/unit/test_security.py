"""Security guarantees (docs/reliability.md): credentials are redacted from what we log,
manifest paths cannot escape their root, weights never load through pickle, Ray keeps token auth.

The integration counterpart (a planted credential searched for in a whole curation + training run)
is ``tests/integration/test_faults_credentials.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import subprocess
import sys
from pathlib import Path

import boto3
import grpc
import pyarrow.parquet as pq
import pytest
import ray
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray._private.authentication.authentication_utils import is_token_auth_enabled
from ray._raylet import AuthenticationTokenLoader
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

from components.config import ConfigError, CurateConfig, DiffusionConfig, InferenceConfig, load_config
from components.curation.filters import Reason
from components.curation.process import Curator, Outcome
from components.curation.remote import PROFILE, check_worker_env, worker_args
from components.curation.sources import SourceError, check_output, from_manifest, load_inputs, resolve_path
from components.curation.writer import aggregate, begin, outcomes_table, publish, write_shard
from components.diffusion.parts import ModelLoadError
from components.diffusion.pipelines import build_pipelines
from components.diffusion.sdxl import load_parts, save_pipeline
from components.diffusion.tiny import build_tiny
from components.redact import Redactor, redact, redact_tree
from components.registry.tracking import flatten
from components.storage import StorageRefused, Store
from components.training.checkpointing import COMPLETE, TrainState, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[2]
FAKE_KEY_ID = "AKIAQ7FAKEKEY0000042"  # AKIA + 16: the shape of an AWS access key id, not a real one
FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYFAKESECRET"  # 40 characters, as AWS secret keys are


# --- redaction --------------------------------------------------------------------------------


def test_redact_removes_planted_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    texts = [
        f"key {FAKE_KEY_ID} in a sentence",
        f"http://{FAKE_KEY_ID}:{FAKE_SECRET}@127.0.0.1:9000/bucket",
        f"a pasted secret with no pattern: {FAKE_SECRET}",  # found because the environment holds it
        "aws_secret_access_key = abc123def",
        "Authorization: Bearer abcdef0123456789",
        "ASIAQ7FAKEKEY0000042 is a temporary key id",
        "hf_" + "x" * 34,
    ]
    for text in texts:
        out = redact(text)
        assert "<redacted>" in out, text
        for secret in (FAKE_KEY_ID, FAKE_SECRET, "abc123def", "abcdef0123456789", "ASIAQ7FAKEKEY0000042", "x" * 34):
            assert secret not in out, (text, out)


# Each text holds one credential in a shape an operator pastes; none of them is in the environment, so
# only the patterns can catch it. (secret, text) pairs; the secret must be gone from the redacted text.
_SLASHED = "wJalrXUtnFEMI/K7MDENG+bPxRfi/CYEXAMPLEKEY"  # AWS secret keys hold "/" and "+"
PATTERN_ONLY = {
    "url-password-with-slash": (_SLASHED, f"http://AKIAQ7FAKEKEY0000042:{_SLASHED}@127.0.0.1:9000/bucket"),
    "url-password-in-an-error": (_SLASHED, f'Could not connect to the endpoint URL: "http://u:{_SLASHED}@h:9/b/k"'),
    "azure-sas": ("sp=r&sig=Q7fake%2BSIGNATUREnotREAL%3D", "https://acct.blob.core.windows.net/c/x.jpg?sv=2022-11-02&"
                  "se=2030-01-01&sp=r&sig=Q7fake%2BSIGNATUREnotREAL%3D"),
    "aws-presigned": ("9f2b6c1d0e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c",
                      "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20300101T000000Z"
                      "&X-Amz-Signature=9f2b6c1d0e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c"),
    "aws-presigned-token": ("IQoJb3JpZ2luX2VjEFAKEsessionTOKEN", "https://b.s3.amazonaws.com/k?"
                            "X-Amz-Security-Token=IQoJb3JpZ2luX2VjEFAKEsessionTOKEN&X-Amz-Expires=60"),
    "basic-auth": ("dXNlcjpodW50ZXIy", "request failed: 401 (Authorization: Basic dXNlcjpodW50ZXIy)"),
    "pem-private-key": ("MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "key file: -----BEGIN PRIVATE KEY-----\n"
                        "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nq7fakeLINE\n-----END PRIVATE KEY-----\nend"),
    "pem-cut-short": ("MIIEpAIBAAKCAQEA7fake", "bad key -----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7fake"),
    "github-token": ("ghp_" + "Q7fakeGITHUBtokenNOTreal000000000042", "git clone https://x-access-token:"
                     "ghp_Q7fakeGITHUBtokenNOTreal000000000042 failed"),
    "github-token-bare": ("ghp_" + "Q7fakeGITHUBtokenNOTreal000000000042",
                          "token ghp_Q7fakeGITHUBtokenNOTreal000000000042"),
    "databricks-token": ("dapi0123456789abcdef0123456789abcdef",
                         "DATABRICKS_HOST=x dapi0123456789abcdef0123456789abcdef"),
    "azure-connection-string": ("Zm9vYmFyYmF6+cXV4/cXV1eA==", "DefaultEndpointsProtocol=https;AccountName=acct;"
                                "AccountKey=Zm9vYmFyYmF6+cXV4/cXV1eA==;EndpointSuffix=core.windows.net"),
    "key-named-variable": ("zq8Lr3vNqPw", "STRIPE_KEY=zq8Lr3vNqPw"),
    "pass-named-variable": ("hunter2hunter2", "DB_PASS: hunter2hunter2"),
    "json-secret": ("q7/fake+VALUE", '{"aws_secret_access_key": "q7/fake+VALUE"}'),
    "url-password-with-at": ("ssw0rd!", "fetch https://user:p@ssw0rd!@host.example.com/x.jpg failed"),
    "passphrase": ("battery staple", "password = correct horse battery staple\nnext: line"),
    "quoted-passphrase": ("horse battery", "db_password: 'correct horse battery' # the old one"),
    "google-key-in-a-query": ("AIzaSyQ7fakeGOOGLEkeyNOTreal_0000-00042",
                              "GET https://maps.example.com/api?key=AIzaSyQ7fakeGOOGLEkeyNOTreal_0000-00042&z=1"),
    "google-key-bare": ("AIzaSyQ7fakeGOOGLEkeyNOTreal_0000-00042",
                        "key AIzaSyQ7fakeGOOGLEkeyNOTreal_0000-00042 refused"),
    "x-api-key-header": ("q7FakeHeaderKey42", "X-Api-Key: q7FakeHeaderKey42\r\nAccept: */*"),
    "x-auth-token-header": ("q7FakeAuthToken42", "headers: X-Auth-Token: q7FakeAuthToken42"),
    "api-key-header": ("q7FakeApiKey42", "Api-Key: q7FakeApiKey42"),
    "openai-key": ("sk-Q7fakeOPENAIkeyNOTreal0000000000000042", "using sk-Q7fakeOPENAIkeyNOTreal0000000000000042 now"),
    "openai-project-key": ("sk-proj-Q7fake_OPENAI-project0000000000042",
                           "OpenAIError: Incorrect API key provided: sk-proj-Q7fake_OPENAI-project0000000000042."),
    "token-as-url-user": ("Q7fakeTOKENasUSER0000042x", "git clone https://Q7fakeTOKENasUSER0000042x@git.example.com/o/r"),
    "github-token-as-url-user": ("ghp_Q7fakeGITHUBtokenNOTreal000000000042",
                                 "https://ghp_Q7fakeGITHUBtokenNOTreal000000000042@github.com/o/r.git"),
    "short-hf-token": ("hf_Q7fake42", "token hf_Q7fake42 is too short to be real"),
}


@pytest.mark.parametrize("secret,text", PATTERN_ONLY.values(), ids=PATTERN_ONLY.keys())
def test_redact_patterns_catch_credentials_that_are_not_in_the_environment(monkeypatch, secret, text):
    for name in [k for k in os.environ if secret in os.environ[k]]:
        monkeypatch.delenv(name)
    for out in (Redactor({})(text), redact(text)):  # an empty environment, and this process's
        assert secret not in out and "<redacted>" in out, out


def test_secret_named_variables_are_redacted_wherever_they_turn_up():
    """Values of variables named *_KEY, *_PASS, *_CONNECTION_STRING (as well as SECRET, TOKEN, ...) are
    redacted in any text, whatever their shape."""
    env = {"STRIPE_KEY": "zq8Lr3vNqPw0", "DB_PASS": "correct-horse", "OTHER": "plainvalue1",
           "AZURE_STORAGE_CONNECTION_STRING": "Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=v"}
    out = Redactor(env)("values: zq8Lr3vNqPw0 correct-horse Endpoint=sb://x/;SharedAccessKeyName=k;"
                        "SharedAccessKey=v plainvalue1")
    assert "zq8Lr3vNqPw0" not in out and "correct-horse" not in out and "SharedAccessKey=v" not in out
    assert "plainvalue1" in out


def test_redact_leaves_ordinary_values_alone(monkeypatch):
    monkeypatch.setenv("SOME_TOKEN_FLAG", "1")  # short secret-named values never blank ordinary text
    cfg = load_config(REPO / "flows/configs/tiny.yaml")
    params = flatten(cfg.model_dump(mode="json"))
    assert not [k for k, v in params.items() if "<redacted>" in v]
    assert params["diffusion.prediction_type"] == "v_prediction"
    for text in ("a photograph of an astronaut", "s3://bucket/prefix/x.jpg", "sqlite:////tmp/s/mlflow.db",
                 "http://127.0.0.1:5000", "http://127.0.0.1:9000/bucket/a@b.jpg", "Basic settings",
                 "https://example.com/a.jpg?size=large&signal=1", "the token is refreshed", "password reset",
                 "pip install hf_transfer", "https://git@github.com/o/r.git", "https://deploy-bot-staging@h/x",
                 "tokenizer: openai/clip-vit-large-patch14", "max_tokens: 77", "a task-specific risk-aware sk-learn"):
        assert redact(text) == text
    # A URL password ends at the host, a secret's value at the line's end: what follows them stays.
    assert redact("http://u:p@ss@host/a@b.jpg") == "http://<redacted>@host/a@b.jpg"
    assert redact("token=abc123 user=bob\nnext line") == "token=<redacted> user=bob\nnext line"


def test_params_and_reports_are_redacted(monkeypatch):
    """A credential pasted into a config value never reaches MLflow params (flatten is what every flow
    logs) nor a report (redact_tree is what curation writes)."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    cfg = load_config(REPO / "flows/configs/tiny.yaml",
                      [f"curate.s3_endpoint_url=http://{FAKE_KEY_ID}:{FAKE_SECRET}@127.0.0.1:9000"])
    params = flatten(cfg.model_dump(mode="json"))
    assert params["curate.s3_endpoint_url"] == "http://<redacted>@127.0.0.1:9000"
    report = redact_tree({"examples": {"unreadable": [{"detail": f"EndpointConnectionError: {FAKE_SECRET}"}]},
                          "inputs": 3})
    assert FAKE_SECRET not in repr(report) and report["inputs"] == 3


def test_source_errors_are_redacted_when_made(monkeypatch, tmp_path):
    """A ``SourceError`` quotes the library's error, which may quote the endpoint URL with its password;
    the message is redacted when the error is made, whoever prints it (before: only the flows' ``fail``
    redacted, and only what the environment or the old patterns knew). The secret is not in the environment."""
    password = "q7/NotInTheEnv+" + "x" * 12
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = Store(f"http://{FAKE_KEY_ID}:{password}@127.0.0.1:9")
    for call in (lambda: check_output(store, "s3://bucket/out"),
                 lambda: from_manifest(CurateConfig(source="s3://bucket/m.jsonl"), store)):
        with pytest.raises(SourceError) as err:
            call()
        message = str(err.value)
        assert password not in message and FAKE_KEY_ID not in message and "<redacted>" in message, message


def _without_aws_credentials(monkeypatch, tmp_path):
    """No AWS setting and no credentials anywhere boto3 looks (environment, files, instance metadata)."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # boto3's default session keeps the credentials it resolved for an earlier test of this process
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))


@pytest.mark.parametrize("host", ["my_minio:9000", "127.0.0.1:9"], ids=["endpoint-boto3-rejects", "no-credentials"])
def test_a_refused_listing_is_one_redacted_line(monkeypatch, tmp_path, host):
    """Listing a prefix fails for the whole source when boto3 rejects the endpoint URL (a host name with
    ``_``) or finds no credentials: ``StorageRefused``, one line, redacted. botocore's own error (its
    ``ValueError`` quotes the endpoint URL with its password) must not escape ``Store.list``."""
    password = "p@ss-NotInTheEnv-42"
    _without_aws_credentials(monkeypatch, tmp_path)
    with pytest.raises(StorageRefused) as err:
        list(Store(f"http://{FAKE_KEY_ID}:{password}@{host}/").list("s3://bucket/pre/"))
    message = str(err.value)
    assert "\n" not in message and "list s3://bucket/pre/" in message and f"<redacted>@{host}" in message, message
    for secret in (password, "ss-NotInTheEnv-42", FAKE_KEY_ID):
        assert secret not in message, message


def test_curate_refuses_an_unusable_store_in_one_redacted_line(tmp_path):
    """``flows/curate.py`` with an S3 source whose store cannot be used (an endpoint URL boto3 rejects, with a
    password in it; an endpoint variable with user info that the workers' runtime env would carry): one
    redacted ``error:`` line, exit 2, no traceback, before any cluster starts."""
    password = "p@ss-NotInTheEnv-42"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_MAX_ATTEMPTS="1", AWS_EC2_METADATA_DISABLED="true", RAY_ADDRESS="",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    base = ["--set", f"state_dir={tmp_path / 'state'}", "--set", "curate.source=s3://bucket/pre/",
            "--set", f"curate.output={tmp_path / 'out'}"]
    runs = {
        "endpoint-setting": (["--set", f"curate.s3_endpoint_url=http://user:{password}@my_minio:9000/"], env),
        "endpoint-variable": ([], {**env, "AWS_ENDPOINT_URL_S3": f"http://user:{password}@127.0.0.1:9/"}),
    }
    procs = {name: subprocess.Popen([sys.executable, str(REPO / "flows/curate.py"), *base, *sets], cwd=REPO, env=e,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (sets, e) in runs.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in err, (name, err)
        assert "<redacted>@" in errors[0], (name, errors)
        for secret in (password, "ss-NotInTheEnv-42"):
            assert secret not in out + err, (name, err)


LOGGED = """
import logging
from flows._common import setup_logging
setup_logging()
log = logging.getLogger("x")
log.info("connecting to %s", "http://user:{pw}@host:9/")
try:
    raise RuntimeError("token={pw}")
except RuntimeError:
    log.exception("failed with password = {pw} and more")
raise ValueError("Invalid endpoint: http://user:{pw}@my_minio:9000/")
"""


def test_flow_log_records_and_uncaught_tracebacks_are_redacted():
    """What a flow's ``setup_logging`` sets up redacts every log record (its arguments, its traceback) and
    the traceback of an exception nobody catches; the text around the secrets stays."""
    password = "q7-NotInTheEnv-" + "z" * 8
    proc = subprocess.run([sys.executable, "-c", LOGGED.format(pw=password)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert password not in proc.stderr + proc.stdout, proc.stderr
    for kept in ("connecting to http://<redacted>@host:9/", "failed with password = <redacted>",
                 "RuntimeError: token=<redacted>", "Traceback (most recent call last)",
                 "ValueError: Invalid endpoint: http://<redacted>@my_minio:9000/"):
        assert kept in proc.stderr, proc.stderr


def test_rejects_shards_and_report_carry_no_credentials(tmp_path):
    """A dropped input's source and detail go to the rejects shards (parquet, compressed: a byte search
    of the file would not see them) and the report; both are redacted."""
    password = "q7/NotInTheEnv+" + "y" * 12
    leaky = Outcome(f"s3://b/in/x.jpg?X-Amz-Signature={'ab' * 32}", Reason.UNREADABLE,
                    f"EndpointConnectionError: Could not connect to http://{FAKE_KEY_ID}:{password}@h:9/b/x.jpg")
    store, root = Store(), str(tmp_path / "out")
    begin(store, root)
    agg = aggregate([write_shard(store, root, "run-00000", outcomes_table([leaky], 0.1))])
    report = publish(store, root, "run", agg, 0.1, {"inputs": 1})
    (rejects,) = agg["rejects"]
    text = repr(pq.read_table(f"{root}/{rejects}").to_pylist()) + json.dumps(report)
    for secret in (password, FAKE_KEY_ID, "ab" * 32):
        assert secret not in text, text


def test_s3_credentials_never_travel_in_the_runtime_env(monkeypatch, tmp_path):
    """Curation workers get the driver's S3 settings through the standard credential chain: a 0600
    shared-credentials file under the state directory, named in the runtime env with its profile. The
    keys themselves are not in the runtime env (Ray logs it and lists it with the tasks); before, they were.
    The file works: a boto3 session that sees only the forwarded variables gets the planted keys."""
    secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCY/PLANTED+KEY"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "IQoJb3JpZ2luPLANTEDsessionTOKEN")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    cfg = load_config(REPO / "flows/configs/tiny.yaml", [f"state_dir={tmp_path / 'state'}",
                                                         "curate.source=s3://lake/in", "curate.output=s3://lake/out"])
    args = worker_args(cfg, num_cpus=1)
    env = args["runtime_env"]["env_vars"]
    text = json.dumps(args)
    for planted in (secret, FAKE_KEY_ID, "IQoJb3JpZ2luPLANTEDsessionTOKEN"):
        assert planted not in text, text
    assert env["AWS_PROFILE"] == PROFILE and env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9000"
    path = Path(env["AWS_SHARED_CREDENTIALS_FILE"])
    assert path.parent == cfg.state_path("credentials")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert worker_args(cfg, num_cpus=1) == args  # the same keys reuse the same file

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)  # a worker's view: only what the runtime env forwards
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    creds = boto3.Session().get_credentials().get_frozen_credentials()
    assert (creds.access_key, creds.secret_key, creds.token) == (FAKE_KEY_ID, secret, "IQoJb3JpZ2luPLANTEDsessionTOKEN")


@pytest.mark.parametrize("name", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
@pytest.mark.parametrize("userinfo", ["minio:p@ss-NotInTheEnv-42", "Q7fakeTOKENasUSER0000042x"])
def test_endpoint_user_info_never_travels_in_the_runtime_env(monkeypatch, tmp_path, name, userinfo):
    """An endpoint variable with a user name or password in it is refused (``ConfigError``, one line, the user
    info redacted, naming where keys go) rather than copied into the workers' runtime env, which Ray logs and
    shows; a curation that touches no S3 forwards nothing and refuses nothing."""
    monkeypatch.setenv(name, f"http://{userinfo}@127.0.0.1:9000")
    cfg = load_config(REPO / "flows/configs/tiny.yaml", [f"state_dir={tmp_path / 'state'}",
                                                         "curate.source=s3://lake/in", "curate.output=s3://lake/out"])
    for call in (lambda: worker_args(cfg, num_cpus=1), lambda: check_worker_env(cfg)):
        with pytest.raises(ConfigError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and f"{name}=http://<redacted>@127.0.0.1:9000" in message, message
        assert "AWS_ACCESS_KEY_ID" in message and userinfo.rpartition("@")[2] not in message, message
    local = load_config(REPO / "flows/configs/tiny.yaml", [f"state_dir={tmp_path / 'state'}"])
    check_worker_env(local)
    assert "runtime_env" not in worker_args(local, num_cpus=1)


# --- manifest paths ----------------------------------------------------------------------------


def test_manifest_paths_that_escape_their_root_are_refused(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(b"outside")
    (root / "inside.jpg").write_bytes(b"inside")
    (root / "sub" / "link.jpg").symlink_to(tmp_path / "secret.jpg")  # a symlink out of the root
    (root / "sub" / "ok_link.jpg").symlink_to(root / "inside.jpg")  # a symlink that stays inside
    manifest = root / "manifest.jsonl"
    paths = ["inside.jpg", "sub/../inside.jpg", "sub/ok_link.jpg", "../secret.jpg", "sub/../../secret.jpg",
             str(tmp_path / "secret.jpg"), "sub/link.jpg", "s3://bucket/x.jpg", "/etc/passwd"]
    manifest.write_text("".join(f'{{"path": "{p}", "caption": "c"}}\n' for p in paths))
    records = load_inputs(CurateConfig(source=str(manifest)), Store()).records.to_pylist()
    rejects = {r["source"]: r["reject"] for r in records}
    kept = [r["source"] for r in records if r["reject"] is None]
    assert kept == [str(root / "inside.jpg")] * 3
    assert [rejects[p] for p in paths[3:]] == ["path_escape"] * 6
    for r in records:
        if r["reject"]:
            assert "outside" in r["detail"], r


@pytest.mark.parametrize("raw", ["../other/x.jpg", "a/../../other/x.jpg", "s3://other-bucket/data/x.jpg",
                                 "s3://bucket/data2/x.jpg", "/abs/x.jpg", "s3://bucket/x.jpg", ""])
def test_s3_manifest_paths_that_escape_their_prefix_are_refused(raw):
    full, why = resolve_path("s3://bucket/data", raw)
    assert full is None and why


def test_an_escaping_path_is_never_read(tmp_path):
    """Curation decides on a refused record before any I/O: the store is never asked for it."""
    class NoReads(Store):
        def read(self, uri):
            raise AssertionError(f"read {uri}")

    curator = Curator(CurateConfig(), seed=0)
    curator.store = NoReads()
    outcome = curator.process({"source": "../secret.jpg", "reject": "path_escape", "detail": "outside",
                               "caption": "c", "sidecar": None, "pwatermark": None})
    assert str(outcome.reason) == "path_escape"


SEGMENTS = st.sampled_from(["..", ".", "a", "b", "sub", "", "link", "..."])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(SEGMENTS, min_size=1, max_size=6), absolute=st.booleans())
def test_resolved_paths_always_stay_inside_the_root(tmp_path, parts, absolute):
    """Property: whatever the manifest says, a path is refused or resolves (symlinks followed) inside."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True, exist_ok=True)
    if not (root / "link").exists():
        (root / "link").symlink_to(tmp_path)  # a directory symlink that leads out
    raw = ("/" if absolute else "") + "/".join(parts)
    full, why = resolve_path(str(root), raw)
    base = os.path.realpath(root)
    if full is None:
        assert why
    else:
        assert os.path.commonpath([base, os.path.realpath(full)]) == base, (raw, full)


# --- weights: safetensors only ------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _tiny_pipeline_with_pickled_unet(tmp_path: Path) -> tuple[Path, Path]:
    cfg = load_config(REPO / "flows/configs/tiny.yaml")
    directory = save_pipeline(build_tiny(cfg.model.tiny), cfg.diffusion, tmp_path / "pipe")
    marker = tmp_path / "pickle-ran"
    for weights in (directory / "unet").glob("*.safetensors"):
        weights.unlink()
    torch.save({"weight": _Payload(marker)}, directory / "unet" / "diffusion_pytorch_model.bin")
    return directory, marker


def test_pickle_weights_are_refused_and_never_unpickled(tmp_path):
    directory, marker = _tiny_pipeline_with_pickled_unet(tmp_path)
    cfg = load_config(REPO / "flows/configs/tiny.yaml", [f"model.source={directory}"])
    with pytest.raises(ModelLoadError) as err:
        load_parts(cfg.model, cfg.state_path("cache"))  # training and export
    message = str(err.value)
    assert "\n" not in message and "safetensors" in message, message
    with pytest.raises(OSError):
        build_pipelines(str(directory), DiffusionConfig(), InferenceConfig())  # evaluation and Serve
    assert not marker.exists(), "a pickle in the model directory was executed"


def test_checkpoint_pickles_are_not_executed(tmp_path):
    """Optimizer state goes through ``torch.load(weights_only=True)``: a crafted optimizer.pt (with a
    COMPLETE marker that vouches for it) is refused without running; the same file does run when
    loaded the unsafe way, so the payload is live."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    directory = save_checkpoint(tmp_path / "ckpt", model, opt, sched, TrainState(step=1))
    marker = tmp_path / "pickle-ran"
    torch.save({"state": _Payload(marker)}, directory / "optimizer.pt")
    sizes = json.loads((directory / COMPLETE).read_text())["files"]
    sizes["optimizer.pt"] = (directory / "optimizer.pt").stat().st_size
    (directory / COMPLETE).write_text(json.dumps({"files": sizes}))
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(directory, model, opt, sched)
    assert not marker.exists()
    torch.load(directory / "optimizer.pt", weights_only=False)  # the unsafe way, for contrast
    assert marker.exists()


# --- Ray token authentication -----------------------------------------------------------------


def test_local_ray_cluster_keeps_token_auth(ray_local):
    """The cluster ``components.cluster.ray_session`` starts (the session's ``ray_local``) answers no
    gRPC call without the token, and answers with it."""
    assert os.environ.get("RAY_AUTH_MODE", "token") != "disabled"
    assert is_token_auth_enabled()
    loader = AuthenticationTokenLoader.instance()
    assert loader.has_token()
    channel = grpc.insecure_channel(ray.get_runtime_context().gcs_address)
    stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
    request = gcs_service_pb2.GetClusterIdRequest()
    for metadata in ((), (("authorization", "Bearer not-the-token"),)):
        with pytest.raises(grpc.RpcError) as err:
            stub.GetClusterId(request, timeout=30, metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    token = tuple(loader.get_token_for_http_header().items())
    assert stub.GetClusterId(request, timeout=30, metadata=token).cluster_id
    channel.close()


def test_no_code_turns_ray_auth_off():
    """Nothing we ship sets RAY_AUTH_MODE=disabled (an env var, a runtime_env, a manifest)."""
    offenders = []
    for folder in ("components", "flows", "deploy"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in {".py", ".yaml", ".yml", ".json", ".sh"} and path.is_file():
                text = path.read_text(errors="replace")
                if re.search(r"RAY_AUTH_MODE\W{1,6}disabled", text) or re.search(r"mode:\s*disabled", text):
                    offenders.append(str(path.relative_to(REPO)))
    assert not offenders
