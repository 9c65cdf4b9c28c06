"""Redaction as a property (components/redact.py): a secret of any shape the patterns know, generated, then
embedded in a URL, an HTTP header block, a ``key = value`` config line or a prose sentence, never survives
``redact``, not even a piece of it; the non-secret words around it always do.

Tokens are drawn as real ones are made, from a random source (the bytes of a hash of a drawn seed), so that
each has the entropy of a real token; passwords and passphrases are drawn as text. Only the patterns are the
net here (``Redactor({})``: no environment), since none of these secrets is in the environment.
"""

from __future__ import annotations

import hashlib
import re
import string

from hypothesis import given, settings
from hypothesis import strategies as st

from components.redact import Redactor

REDACT = Redactor({})
MARK = "\x00"
SETTINGS = settings(max_examples=200, deadline=None)
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


def random_chars(seed: int, n: int, alphabet: str = BASE62) -> str:
    """``n`` characters of ``alphabet`` from the bytes of a hash of ``seed``: random, reproducible."""
    out, block = [], 0
    while len(out) < n:
        out += [alphabet[b % len(alphabet)] for b in hashlib.sha256(f"{seed}/{block}".encode()).digest()]
        block += 1
    return "".join(out[:n])


@st.composite
def tokens(draw) -> str:
    """A token in one of the shapes redaction knows: AWS key ids, GitHub, Hugging Face (as short as 8), OpenAI
    (``sk-``, ``sk-proj-``) and Google API keys."""
    seed = draw(st.integers(min_value=0, max_value=2**63))
    n = draw(st.integers(min_value=8, max_value=48))
    digit = str(seed % 10)  # random tokens of this length hold a digit; one is made certain
    return draw(st.sampled_from([
        "AKIA" + random_chars(seed, 16, string.ascii_uppercase + string.digits),
        "ASIA" + random_chars(seed, 16, string.ascii_uppercase + string.digits),
        "ghp_" + random_chars(seed, 36),
        "github_pat_" + random_chars(seed, 60, BASE62 + "_"),
        "hf_" + random_chars(seed, n - 1) + digit,
        "sk-" + random_chars(seed, max(n, 20) - 1, BASE62 + "_-") + digit,
        "sk-proj-" + random_chars(seed, max(n, 20) - 1, BASE62 + "_-") + digit,
        "AIza" + random_chars(seed, 35, BASE62 + "_-"),
    ]))


@st.composite
def user_tokens(draw) -> str:
    """A bare random token (no known prefix), 20 to 40 characters: recognisable only where it stands, as a
    URL's user name or a secret-named key's value."""
    seed = draw(st.integers(min_value=0, max_value=2**63))
    return random_chars(seed, draw(st.integers(min_value=19, max_value=39))) + str(seed % 10)


PASSWORD_CHARS = string.ascii_letters + string.digits + "!#$%^*()_+-=.,~@"
"""What a password may hold here: no spaces or quotes, which end a value, no ``;`` or ``&``, which separate
a connection string's or a query's parts, no ``/`` together with ``@`` (``u:a@b/c@host`` is ambiguous even to
a URL parser)."""
passwords = st.text(PASSWORD_CHARS, min_size=8, max_size=40).filter(lambda p: not p.startswith(("@", "=")))
aws_secrets = st.integers(min_value=0, max_value=2**63).map(lambda s: random_chars(s, 40, BASE62 + "/+"))
words = st.text(string.ascii_lowercase, min_size=4, max_size=10).filter(lambda w: w not in {"redacted"})
passphrases = st.lists(words, min_size=2, max_size=5).map(" ".join)


def check(template: str, secret: str, kept: list[str]) -> None:
    """``template`` with ``secret`` in it, redacted: nothing of the secret is left (the whole, nor any piece of
    4+ characters between the ``@``, spaces and ``/`` it holds, that is not in the template anyway); ``kept``
    all are."""
    text = template.format(secret=secret)
    out = REDACT(text)
    left = out.replace("<redacted>", MARK)
    context = template.format(secret=MARK)
    assert secret not in left, (text, out)
    for piece in re.split(r"[@\s/]", secret):
        if len(piece) >= 4 and piece not in context:
            assert not re.search(rf"(?<![\w.-]){re.escape(piece)}(?![\w.-])", left) and piece not in left, (text, out)
    for word in kept:
        assert word in out, (word, text, out)


URL_KEPT = ["fetch https://", "@store.example.com/bucket/a.jpg?size=large failed"]
URL = "fetch https://{secret}@store.example.com/bucket/a.jpg?size=large failed"


@SETTINGS
@given(secret=st.one_of(passwords, aws_secrets, tokens(), user_tokens()), user=st.sampled_from(["user", "AKIAQ7"]))
def test_a_url_password_never_survives(secret, user):
    check(URL.replace("{secret}", user + ":{secret}"), secret, URL_KEPT)


@SETTINGS
@given(secret=st.one_of(tokens(), user_tokens()))
def test_a_token_as_a_url_user_name_never_survives(secret):
    check(URL, secret, URL_KEPT)


@SETTINGS
@given(secret=st.one_of(tokens(), user_tokens()), name=st.sampled_from(["key", "api_key", "access_token", "token"]))
def test_a_token_in_a_url_query_never_survives(secret, name):
    if name == "key" and not secret.startswith("AIza"):  # ?key= is not a secret's name by itself
        return
    check(f"GET https://maps.example.com/api?{name}={{secret}}&size=large", secret,
          ["GET https://maps.example.com/api?", "&size=large"])


HEADERS = "GET /v1/images HTTP/1.1\r\nHost: api.example.com\r\n{header}\r\nAccept: application/json\r\n"


@SETTINGS
@given(secret=st.one_of(tokens(), user_tokens()),
       header=st.sampled_from(["X-Api-Key: ", "X-Auth-Token: ", "Api-Key: ", "x-api-key:", "X-Goog-Api-Key: ",
                               "Authorization: Bearer ", "Proxy-Authorization: Bearer "]))
def test_a_secret_header_never_survives(secret, header):
    check(HEADERS.replace("{header}", header + "{secret}"), secret,
          ["GET /v1/images HTTP/1.1\r\nHost: api.example.com\r\n", "\r\nAccept: application/json\r\n",
           header.split(":")[0]])


CONFIG_KEYS = ["password", "db_password", "passwd", "secret", "aws_secret_access_key", "api_key", "api-key",
               "token", "auth_token", "client_secret", "private_key", "STRIPE_KEY", "DB_PASS", "AccountKey"]


@SETTINGS
@given(secret=st.one_of(passwords, aws_secrets, tokens(), user_tokens(), passphrases),
       key=st.sampled_from(CONFIG_KEYS), form=st.sampled_from(["{key} = {{secret}}", "{key}: {{secret}}",
                                                               "{key}={{secret}}", '"{key}": "{{secret}}",',
                                                               "{key}: '{{secret}}'", "export {key}={{secret}}"]))
def test_a_secret_config_value_never_survives(secret, key, form):
    line = form.format(key=key)
    check(f"[store]\nendpoint = https://s3.example.com\n{line}\nregion = us-east-1\n", secret,
          ["[store]\nendpoint = https://s3.example.com\n", "\nregion = us-east-1\n", key])


@SETTINGS
@given(secret=tokens(), before=st.sampled_from(["The run used", "Refused:", "(the key", "auth with"]),
       after=st.sampled_from(["for the request, retry later.", "and nothing else)", "; the token is refreshed"]))
def test_a_token_in_prose_never_survives(secret, before, after):
    check(f"{before} {{secret}} {after}", secret, [before, after])


@SETTINGS
@given(sentence=st.lists(st.sampled_from(
    ["Basic", "settings", "the", "token", "is", "refreshed", "password", "reset", "secret", "santa", "api",
     "key", "hf_transfer", "tokenizer", "sk-learn", "bearer", "of", "news", "git@github.com", "s3://bucket/a@b.jpg",
     "http://127.0.0.1:9000/x", "max_tokens"]), min_size=1, max_size=12).map(" ".join))
def test_prose_without_a_secret_is_left_as_it_is(sentence):
    """Words about secrets are not secrets: a sentence of them (no ``name=value``, no ``name: value``) stays."""
    if re.search(r"(?i)\bbearer (?:[A-Za-z0-9._~+/=-]{8,})", sentence):  # "bearer <8+ chars>" reads as a header
        return
    assert REDACT(sentence) == sentence
