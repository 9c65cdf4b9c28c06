"""The errors a configuration raises, and how to find one inside what wrapped it."""

from __future__ import annotations

from collections.abc import Callable


class ConfigError(ValueError):
    pass


class RecurringError(RuntimeError):
    """An error that would happen again on every attempt (a config, a dataset, a model or an optimizer
    that cannot work here): reported at once in one line, never retried by the training driver."""


def find_cause(err: BaseException, match: Callable[[BaseException], bool]) -> BaseException | None:
    """The first exception ``match`` accepts among ``err`` and what it wraps: ``__cause__`` and
    ``__context__``, Ray's task errors' ``cause``, and Ray Train's per-rank ``worker_failures``."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if match(e):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
        stack += list((getattr(e, "worker_failures", None) or {}).values())
    return None
