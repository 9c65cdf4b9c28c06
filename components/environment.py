"""Reading the process environment safely, and the variables that make libraries act as under test.

``os.environ`` is shared by every thread, and libraries change it from their own threads (MLflow's
telemetry client sets and unsets ``_MLFLOW_TELEMETRY_SESSION_ID``). Iterating it while another thread
deletes a key raises ``KeyError`` (``os._Environ.__iter__`` lists the keys, then each value is looked up
again). :func:`snapshot` is the one way this project reads the whole environment: the key list is taken
in one step, and a key that disappears before its value is read is simply left out.

``TEST_MARKERS`` are the variables whose presence makes a dependency behave differently from a user's
run (docs/recipe.md#facts-and-anchors-the-code-relies-on, "Ray 2.60 and MLflow 3"); the fresh-clone demo
check removes them, and ``OPT_OUTS``, so that the libraries behave as they do for a user.
"""

from __future__ import annotations

import os

TEST_MARKERS = (
    "CI", "PYTEST_CURRENT_TEST", "PYTEST_VERSION", "PYTEST_XDIST_WORKER", "GITHUB_ACTIONS", "GITLAB_CI",
    "CIRCLECI", "JENKINS_URL", "TRAVIS", "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN",
    "BUILDKITE", "TEAMCITY_VERSION", "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME",
    "RUNBOT_WORKER_ID",
)
"""Variables by which a library tells a test or CI run from a user's: pytest's own, and the CI markers
MLflow lists (``mlflow/telemetry/utils.py``, ``_is_ci_env_or_testing``). Which dependency reads which is
listed, with what changes, in ``tests/unit/test_environment.py`` (``KNOWN_READERS``)."""

OPT_OUTS = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")
"""A user's own telemetry opt-outs. The platform never sets them; the demo check clears them so that it
runs the code paths a user who did not opt out runs."""


def snapshot() -> dict[str, str]:
    """A copy of ``os.environ`` that is safe against other threads setting and unsetting variables."""
    out: dict[str, str] = {}
    for key in list(os.environ):  # one atomic copy of the key list
        value = os.environ.get(key)  # None when another thread removed it in between
        if value is not None:
            out[key] = value
    return out


def without(names, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: a snapshot of this process's) with the variables ``names`` removed."""
    env = snapshot() if env is None else dict(env)
    for name in names:
        env.pop(name, None)
    return env
