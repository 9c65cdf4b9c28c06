"""Credential redaction: everything this platform writes to MLflow params, tags, reports and error
lines passes through :func:`redact` (docs/reliability.md, "No credential published").

Two nets: the values of secret-named environment variables wherever they turn up (read once per call
from a thread-safe snapshot, ``components.environment.snapshot``), then patterns for credentials that
are not in the environment (AWS key ids, tokens, ``key=value`` secrets, URL passwords).
"""

from __future__ import annotations

import re

from components.environment import snapshot

SECRET_PATTERNS = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids (long-term and temporary)
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face tokens
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),  # Authorization header values
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),  # user:password@ in a URL
    re.compile(r"(?i)(secret|token|password|passwd|api_key|apikey)[^=:\s]*\s*[=:]\s*\S+"),
]
SECRET_ENV = re.compile(r"(?i)(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY)")
"""Environment variables whose values are secrets wherever they turn up (AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, MLFLOW_TRACKING_PASSWORD, HF_TOKEN, RAY_AUTH_TOKEN, ...), with or without a pattern."""
MIN_SECRET_LEN = 8
"""Shorter values (``1``, ``true``) are not treated as secrets: they would blank ordinary text."""


def secret_env_values(env: dict[str, str] | None = None) -> list[str]:
    """Values of secret-named variables of ``env`` (default: a snapshot of the environment), longest first."""
    env = snapshot() if env is None else env
    values = {v for k, v in env.items() if SECRET_ENV.search(k) and len(v) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


class Redactor:
    """``redact`` with the secret values read once, for redacting many strings (a config, a report)."""

    def __init__(self, env: dict[str, str] | None = None):
        self.values = secret_env_values(env)

    def __call__(self, text: str) -> str:
        for value in self.values:
            text = text.replace(value, "<redacted>")
        for pattern in SECRET_PATTERNS:
            text = pattern.sub("<redacted>", text)
        return text

    def tree(self, obj):
        """Every string in a JSON-like tree redacted, its structure kept."""
        if isinstance(obj, str):
            return self(obj)
        if isinstance(obj, dict):
            return {k: self.tree(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self.tree(v) for v in obj]
        return obj


def redact(text: str) -> str:
    """``text`` with credentials replaced by ``<redacted>``."""
    return Redactor()(text)


def redact_tree(obj):
    """``redact`` applied to every string in a JSON-like tree (a report), keeping its structure."""
    return Redactor().tree(obj)
