"""Credential redaction: everything this platform writes to MLflow params, tags, reports and error
lines passes through :func:`redact` (docs/reliability.md#credentials).

Two nets: the values of secret-named environment variables wherever they turn up (read once per call
from a thread-safe snapshot, ``components.environment.snapshot``), then patterns for credentials that
are not in the environment (AWS key ids, GitHub, Databricks and Hugging Face tokens, bearer and basic
credentials, PEM private keys, signed-URL signatures, ``key=value`` secrets, URL passwords).
"""

from __future__ import annotations

import re

from components.environment import snapshot

SECRET_PATTERNS = [
    # PEM private keys, whole or cut short (an error line truncated after the BEGIN line).
    re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)"),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids (long-term and temporary)
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face tokens
    re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}\b|\bgithub_pat_[A-Za-z0-9_]{30,}"),  # GitHub tokens
    re.compile(r"\bdapi[0-9a-f]{32}(?:-\d+)?\b"),  # Databricks personal access tokens
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),  # Authorization header values
    # Basic credentials (base64 of user:password): capital B as in the header, and not a plain lowercase
    # word, so that prose ("Basic settings") stays as it is.
    re.compile(r"\bBasic\s+(?=[A-Za-z0-9+/]*[A-Z0-9+/])[A-Za-z0-9+/]{8,}={0,2}"),
    # user:password@ in a URL; the password may hold "/" and "+" (AWS secret keys pasted raw do), not "@" or
    # spaces. A port followed by a path ("host:9000/a@b.jpg") is not a password.
    re.compile(r"(?<=://)[^/\s:@]+:(?!\d+/)[^\s@]+(?=@)"),
    # Signed URLs: Azure SAS signatures, AWS SigV4 query authentication.
    re.compile(r"(?i)(?:^|(?<=[?&;\s]))(?:sig|x-amz-signature|x-amz-credential|x-amz-security-token)=[^&\s\"']+"),
    # key=value or key: value where the key names a secret (connection strings: AccountKey=...;).
    re.compile(r"(?i)[\w.-]*(?:secret|token|password|passwd|pwd|api_?key|access_?key|account_?key|private_?key"
               r"|_key|_pass|connection_?string|sharedaccesssignature)[\w.-]*[\"']?\s*[=:]\s*[^\s;,]+"),
]
SECRET_ENV = re.compile(
    r"(?i)(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY|_KEY$|_PASS$|CONNECTION_STRING)"
)
"""Environment variables whose values are secrets wherever they turn up (AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, MLFLOW_TRACKING_PASSWORD, HF_TOKEN, RAY_AUTH_TOKEN, STRIPE_KEY, DB_PASS,
AZURE_STORAGE_CONNECTION_STRING, ...), with or without a pattern."""
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
