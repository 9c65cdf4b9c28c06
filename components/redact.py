"""Credential redaction: everything this platform writes to MLflow params, tags, reports, log records and
error lines passes through :func:`redact` (docs/reliability.md#credentials).

Two nets: the values of secret-named environment variables wherever they turn up (read once per call
from a thread-safe snapshot, ``components.environment.snapshot``), then patterns for credentials that
are not in the environment (AWS key ids, GitHub, Databricks, Hugging Face, OpenAI and Google API keys,
bearer and basic credentials, PEM private keys, signed-URL signatures, ``key=value`` secrets and secret
headers, URL passwords, token-like URL user names).

``RedactFilter`` applies it to every log record a handler emits; ``redact_excepthook`` to the traceback of
an exception nobody caught.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import traceback
from collections import Counter

from components.environment import snapshot

_HOST = r"[\w.:\[\]%-]*(?![\w.:\[\]%@-])"
"""A URL's host and port, up to the character that ends the authority (``/``, ``?``, a quote, a space)."""
_KEY_NAMES = (r"secret|token(?!iz|s\b)|password|passwd|passphrase|pwd|api[_-]?key|access[_-]?key"
              r"|account[_-]?key|private[_-]?key|_key|_pass|connection[_-]?string|sharedaccesssignature")
"""Words that make a ``key=value`` (or a header) secret. ``tokenizer`` and ``tokens`` are not secrets."""
_VALUE_CHAR = r"(?:[^\s;&\"'<>]|[;&](?![\w.-]+=))"
"""A character of an unquoted value: ``;`` and ``&`` end it only where another ``name=`` follows (a
connection string's next part, a query's next parameter)."""
_VALUE = (r"(?:\"[^\"\n]*\"?|'[^'\n]*'?"  # a quoted value ends at its closing quote (or the line's end)
          rf"|{_VALUE_CHAR}+(?:[ \t]+(?![^\s=:]+[ \t]*[=:]){_VALUE_CHAR}+)*)")
"""A secret's value: quoted, up to the closing quote; else every word to the end of the line (a passphrase,
``password = correct horse battery staple``), stopping before a word that starts another ``name=``."""

SECRET_PATTERNS = [
    # PEM private keys, whole or cut short (an error line truncated after the BEGIN line).
    re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)"),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids (long-term and temporary)
    # Hugging Face tokens: any 30+ characters; shorter ones (8+) when they hold a capital or a digit, as
    # random ones do, so that names such as hf_transfer stay.
    re.compile(r"\bhf_(?:[A-Za-z0-9]{30,}|(?=[a-z]*[A-Z0-9])[A-Za-z0-9]{8,29})\b"),
    re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}\b|\bgithub_pat_[A-Za-z0-9_]{30,}"),  # GitHub tokens
    re.compile(r"\bdapi[0-9a-f]{32}(?:-\d+)?\b"),  # Databricks personal access tokens
    # OpenAI-style keys (sk-..., sk-proj-...): 20+ characters after the prefix, a digit among them.
    re.compile(r"\bsk-(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{20,}"),
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])"),  # Google API keys (also as ?key=AIza...)
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),  # Authorization header values
    # Basic credentials (base64 of user:password): capital B as in the header, and not a plain lowercase
    # word, so that prose ("Basic settings") stays as it is.
    re.compile(r"\bBasic\s+(?=[A-Za-z0-9+/]*[A-Z0-9+/])[A-Za-z0-9+/]{8,}={0,2}"),
    # user:password@ in a URL. The password may hold "/" and "+" (AWS secret keys pasted raw do) and "@":
    # the user info ends at the last "@" before the host, the host at the first "/" after an "@" (so that
    # "u:pw@host/a@b.jpg" keeps its path). Not spaces or double quotes. A port followed by a path
    # ("host:9000/a@b.jpg") is not a password.
    re.compile(rf"(?<=://)[^/\s:@\"'\[]*:(?!\d+/)[^\s\"@]*(?:@[^\s\"@/]*)*(?=@{_HOST})"),
    # Signed URLs: Azure SAS signatures, AWS SigV4 query authentication.
    re.compile(r"(?i)(?:^|(?<=[?&;\s]))(?:sig|x-amz-signature|x-amz-credential|x-amz-security-token)=[^&\s\"']+"),
    # key=value, key: value and headers (X-Api-Key:, X-Auth-Token:) where the key names a secret, JSON's
    # "key": "value" and connection strings' AccountKey=...; included. The key stays, its value goes.
    re.compile(rf"(?i)(?P<keep>(?<![\w.-])[\w.-]*(?:{_KEY_NAMES})[\w.-]*[\"']?[ \t]*[=:][ \t]*){_VALUE}"),
]
URL_USER = re.compile(rf"(?<=://)[\w.~+=-]{{16,}}(?=@{_HOST})")
"""A URL's user name with no password (``https://TOKEN@host/``): a secret when it looks like a token."""
SECRET_ENV = re.compile(
    r"(?i)(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY|_KEY$|_PASS$|CONNECTION_STRING)"
)
"""Environment variables whose values are secrets wherever they turn up (AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, MLFLOW_TRACKING_PASSWORD, HF_TOKEN, RAY_AUTH_TOKEN, STRIPE_KEY, DB_PASS,
AZURE_STORAGE_CONNECTION_STRING, ...), with or without a pattern."""
MIN_SECRET_LEN = 8
"""Shorter values (``1``, ``true``) are not treated as secrets: they would blank ordinary text."""
TOKEN_ENTROPY = 3.0
"""Bits per character above which a 16+ character word of letters and digits is taken for a token (a
random token of 16 base64 or hex characters has about 3.5 to 4; a user name like ``deploy-bot-staging``
stays under 3)."""


def secret_env_values(env: dict[str, str] | None = None) -> list[str]:
    """Values of secret-named variables of ``env`` (default: a snapshot of the environment), longest first."""
    env = snapshot() if env is None else env
    values = {v for k, v in env.items() if SECRET_ENV.search(k) and len(v) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def looks_like_token(word: str) -> bool:
    """Whether ``word`` reads as a random token: letters and digits both, and high entropy per character."""
    if not (any(c.isdigit() for c in word) and any(c.isalpha() for c in word)):
        return False
    counts = Counter(word)
    entropy = -sum(n / len(word) * math.log2(n / len(word)) for n in counts.values())
    return entropy >= TOKEN_ENTROPY


def _replace(match: re.Match) -> str:
    """``<redacted>`` for the match, after its ``keep`` group (a secret's key name) where it has one."""
    return (match.group("keep") if "keep" in match.re.groupindex else "") + "<redacted>"


def _url_user(match: re.Match) -> str:
    return "<redacted>" if looks_like_token(match.group(0)) else match.group(0)


class Redactor:
    """``redact`` with the secret values read once, for redacting many strings (a config, a report)."""

    def __init__(self, env: dict[str, str] | None = None):
        self.values = secret_env_values(env)

    def __call__(self, text: str) -> str:
        for value in self.values:
            text = text.replace(value, "<redacted>")
        for pattern in SECRET_PATTERNS:
            text = pattern.sub(_replace, text)
        return URL_USER.sub(_url_user, text)

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


class RedactFilter(logging.Filter):
    """A handler filter that redacts each record it passes: the formatted message (its arguments merged in),
    the traceback of ``exc_info`` and the stack of ``stack_info``. Records are changed in place, so every
    handler after it sees the redacted text."""

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = Redactor()
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the format: keep both, as logging would report them
            message = f"{record.msg} (arguments: {record.args!r})"
        record.msg, record.args = redactor(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = redactor(record.exc_text)
        if record.stack_info:
            record.stack_info = redactor(record.stack_info)
        return True


def redact_excepthook(kind, value, tb) -> None:
    """A ``sys.excepthook`` that prints an uncaught exception's traceback redacted."""
    sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))
    sys.stderr.flush()
