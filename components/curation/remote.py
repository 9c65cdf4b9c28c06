"""How curation's Ray tasks and actors are launched: the resources they ask for, and how they reach S3.

S3 credentials never travel in a runtime env: Ray logs the runtime env it sets up (its runtime-env
agent, at INFO, into the session's logs) and shows it in task listings. Workers find credentials
through the standard chain of boto3 and of pyarrow's AWS SDK: their own environment or instance role
(a cluster's nodes: the Secret the KubeRay manifests mount on every pod), else a shared-credentials file.
When every node of the Ray cluster runs on the driver's machine (a local Ray, a `ray start` cluster on
one host) and the driver holds keys in its environment, they are written once to such a file, readable by
the user only (0600, in a 0700 folder under the state directory), and the workers get its path and
profile name. On a cluster with nodes elsewhere nothing is written: that file would exist on the driver's
disk only, and a worker told to read a profile it cannot find fails even where its own credentials would
do. Settings that are not secret (endpoint, region) travel as they are, and only when redaction leaves
them as they are: an endpoint URL with a user name or password in it (``http://user:pass@host``) is refused
with one line before any cluster work (``check_worker_env``). S3 never reads credentials from the endpoint
URL, and the runtime env would show them in clear; the keys belong in ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``, which reach the workers through the credentials file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import ray

from components.config import Config, ConfigError
from components.environment import snapshot
from components.redact import Redactor

FORWARDED = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
             "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
"""boto3's standard settings that may travel to workers: where to look for credentials, never the keys."""
ENDPOINTS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
"""The forwarded settings that are URLs: refused with a user name or password in them."""
PROFILE = "terminus-curation"
"""The profile of the credentials file written from the driver's environment keys."""


def write_credentials(folder: Path, key_id: str, secret: str, token: str | None) -> Path:
    """A shared-credentials file holding one profile, ``PROFILE``; 0600 in a 0700 folder. Named by a hash
    of its content, so every run with the same keys reuses one file and a rotated key gets a new one."""
    body = f"[{PROFILE}]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"
    if token:
        body += f"aws_session_token = {token}\n"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask, and the folder may exist already
    path = folder / f"aws-{hashlib.sha256(body.encode()).hexdigest()[:16]}"
    if not path.is_file():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")  # created 0600
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(body)
            os.replace(tmp, path)  # whole or absent, for a worker reading it at the same moment
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return path


def nodes_on_this_machine() -> bool:
    """Whether every live node of the connected Ray cluster has the driver's node address (True without
    a connected Ray: the local one a flow starts is on this machine)."""
    if not ray.is_initialized():
        return True
    here = ray.util.get_node_ip_address()
    return all(node["NodeManagerAddress"] == here for node in ray.nodes() if node["Alive"])


def forwarded_settings(env: dict[str, str]) -> dict[str, str]:
    """The ``FORWARDED`` settings of ``env`` that are set. ``ConfigError`` (one line, the value redacted)
    for an endpoint URL with user info, or any value with a credential in it (redaction's patterns change
    it): a runtime env is logged and shown as it is, so what goes into it must be what redaction would let
    through. (The values of secret-named variables are not the net here: AWS_SHARED_CREDENTIALS_FILE is one,
    and its value is a path.)"""
    patterns = Redactor({})
    out = {k: env[k] for k in FORWARDED if env.get(k)}
    for name, value in out.items():
        if name in ENDPOINTS and "@" in urlsplit(value).netloc:
            parts = urlsplit(value)
            shown = parts._replace(netloc="<redacted>@" + parts.netloc.rpartition("@")[2]).geturl()
            raise ConfigError(
                f"{name}={shown} has user info in it, which S3 never reads and curation's workers would get "
                f"in clear in their runtime env (Ray logs it and shows it). Set {name} without it and put the "
                f"keys in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile of "
                f"AWS_SHARED_CREDENTIALS_FILE)")
        if patterns(value) != value:
            raise ConfigError(f"{name}={patterns(value)} holds a credential, which curation's workers would get in "
                              f"clear in their runtime env (Ray logs it and shows it). Put keys in "
                              f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead")
    return out


def uses_s3(cfg: Config) -> bool:
    """Whether curation's tasks read or write S3 (its output, latent cache or a source is on S3)."""
    c = cfg.curate
    places = [c.output or "", c.cache_output or ""]
    places += [p or "" for s in c.resolved_sources() for p in (s.location, s.root)]
    return any(p.startswith("s3://") for p in places)


def check_worker_env(cfg: Config) -> None:
    """``ConfigError`` now, before any cluster work, for a setting ``worker_args`` would refuse to forward."""
    if uses_s3(cfg):
        forwarded_settings(snapshot())


def s3_worker_env(cfg: Config) -> dict[str, str]:
    """Environment variables for workers that read or write S3: the driver's standard settings
    (``forwarded_settings``), and, when the driver's keys are in its environment and every node is on this
    machine, a credentials file's path and profile instead of them."""
    env = snapshot()
    out = forwarded_settings(env)
    key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key_id and secret and nodes_on_this_machine():
        path = write_credentials(cfg.state_path("credentials"), key_id, secret, env.get("AWS_SESSION_TOKEN"))
        out.update(AWS_SHARED_CREDENTIALS_FILE=str(path), AWS_PROFILE=PROFILE)
    return out


def worker_args(cfg: Config, num_cpus: float) -> dict:
    """``ray_remote_args`` for the curation tasks, encoding actors and write tasks."""
    args: dict = {"num_cpus": num_cpus}
    if uses_s3(cfg):
        env = s3_worker_env(cfg)
        if env:
            args["runtime_env"] = {"env_vars": env}
    return args


def write_to(ds, sink, cfg: Config) -> None:
    """Run an actor pool's output ``ds`` into ``sink`` (the latent cache). Write tasks ask for no
    CPU, capped at one per actor instead: the actor pool may hold every CPU of a small machine, and
    a write task that waited for a core would stall the stream (outputs pile up, backpressure idles
    the actors, nothing frees a CPU). They only serialise parquet and upload."""
    ds.write_datasink(sink, ray_remote_args=worker_args(cfg, num_cpus=0), concurrency=cfg.curate.cache_workers)
