"""Gated promotion in the MLflow registry, by alias (registry stages are deprecated).

A candidate becomes ``champion`` only if it has evaluation metrics, produced no NaN or blank image,
and every metric of the gate (``evaluate.gate``: the held-out loss by default; CLIP score, FID, KID and
the dynamic-range figures on request) is no worse than the champion's beyond its allowed relative
regression, both measured under the same
evaluation protocol. ``--force`` overrides with a recorded reason. The champion it replaces keeps
the ``previous`` alias, so rollback is one call.

MLflow aliases are last-writer-wins (``set_registered_model_alias`` has no compare-and-set), so two
promotions that both read the same champion can lose one another's update or leave ``previous``
equal to ``champion``. Every read-check-write of the aliases therefore runs under ``alias_lock``.
"""

from __future__ import annotations

import getpass
import logging
import math
import os
import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlflow

from components.config import GATE_DIRECTIONS, EvaluateConfig
from components.registry.model import ModelUriError

log = logging.getLogger(__name__)

EVAL_PREFIX = "eval."
PREVIOUS = "previous"
CHAMPION = "champion"
PROTOCOL = "protocol"
"""``eval.protocol``: hash of what the held-out loss depends on besides the weights (split, timesteps,
rows, batching); losses measured under different protocols are not comparable."""
NON_METRIC = {"run_id", PROTOCOL, "dataset_digest", "model", "version"}
LOCK_SUFFIX = ".promotion-lock"
DEFAULT_GATE = EvaluateConfig().gate


class PromotionRefused(RuntimeError):
    pass


@dataclass
class PromotionResult:
    model: str
    version: str
    alias: str
    previous: str | None
    forced: bool


def previous_alias(alias: str) -> str:
    """Where the replaced version of ``alias`` is kept: ``previous`` for the champion, else ``<alias>-previous``
    (so promoting to a staging alias never disturbs the champion's rollback target)."""
    return PREVIOUS if alias == CHAMPION else f"{alias}-{PREVIOUS}"


def eval_tags(name: str, version: str) -> dict[str, str]:
    """Every ``eval.*`` tag evaluation left on a version, prefix stripped, as strings."""
    tags = mlflow.MlflowClient().get_model_version(name, version).tags
    return {k[len(EVAL_PREFIX):]: v for k, v in tags.items() if k.startswith(EVAL_PREFIX)}


def eval_metrics(name: str, version: str) -> dict[str, float]:
    """The numeric ``eval.*`` tags evaluation left on a version (``nan`` parses to NaN)."""
    out = {}
    for key, value in eval_tags(name, version).items():
        if key in NON_METRIC:
            continue
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def _alias_version(client, name: str, alias: str) -> str | None:
    """The version ``alias`` points at, as a string (the SQL store gives ints, REST strings: comparing
    them raw made re-promoting the champion set ``previous`` to the champion itself)."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def check_candidate(name: str, version: str, champion: str | None, gate: dict[str, float]) -> None:
    """Raise PromotionRefused with a one-line reason, or return if the candidate may go live.

    ``gate``: metric -> the relative regression allowed against the champion; each metric's better
    direction is ``config.GATE_DIRECTIONS``'s (a lower FID, a higher CLIP score).
    """
    tags = eval_tags(name, version)
    cand = eval_metrics(name, version)
    if "val_loss" not in cand:
        raise PromotionRefused(
            f"{name} v{version} has no evaluation metrics: run flows/evaluate.py --model-uri models:/{name}/{version}"
        )
    nan, blank = int(cand.get("nan_images", 0)), int(cand.get("blank_images", 0))
    if nan > 0 or blank > 0:
        raise PromotionRefused(f"{name} v{version} produced {nan} NaN and {blank} blank images in evaluation")
    if not math.isfinite(cand["val_loss"]):
        raise PromotionRefused(f"{name} v{version} has a non-finite held-out loss ({cand['val_loss']})")
    missing = sorted(m for m in gate if m not in cand)
    if missing:
        raise PromotionRefused(f"{name} v{version} was not evaluated on gated metric(s) {missing}: evaluate it "
                               "with this config")
    if champion is None or champion == version:
        return
    champ = eval_metrics(name, champion)
    theirs = eval_tags(name, champion).get(PROTOCOL)
    if tags.get(PROTOCOL) and theirs and tags[PROTOCOL] != theirs:
        raise PromotionRefused(
            f"{name} v{version} and champion v{champion} were evaluated under different protocols "
            f"({tags[PROTOCOL]} vs {theirs}): re-evaluate v{champion} with the same config"
        )
    for metric, allowed in gate.items():
        mine, best = cand[metric], champ.get(metric, math.nan)
        if not math.isfinite(best):
            log.warning("champion %s v%s has no finite %s to compare with; gating v%s on its own checks only",
                        name, champion, metric, version)
            continue
        higher_is_better = GATE_DIRECTIONS[metric] > 0
        worse = mine < best - allowed * abs(best) if higher_is_better else mine > best + allowed * abs(best)
        if worse or not math.isfinite(mine):
            raise PromotionRefused(
                f"{name} v{version} {metric} {mine:.5f} is worse than champion v{champion} {best:.5f} "
                f"beyond the {allowed:.0%} tolerance"
            )


def _lock_age_s(client, lock: str) -> float | None:
    try:
        created = client.get_registered_model(lock).creation_timestamp
    except mlflow.exceptions.MlflowException:
        return None  # released in between
    return max(0.0, time.time() - created / 1000.0)


def _release(client, lock: str) -> None:
    try:
        client.delete_registered_model(lock)
    except mlflow.exceptions.MlflowException as err:
        log.warning("could not release promotion lock %s: %s", lock, err.error_code)


@contextmanager
def alias_lock(name: str, timeout_s: float = 60.0, stale_after_s: float = 300.0) -> Iterator[None]:
    """Serialise alias updates of registered model ``name`` across threads, processes and machines.

    The one atomic primitive every MLflow store offers (SQLite, a tracking server) is the unique
    name of a registered model: ``create_registered_model`` fails with RESOURCE_ALREADY_EXISTS.
    The lock is a registered model ``NAME.promotion-lock`` that exists only while a promotion runs.
    A holder that died leaves it behind: one older than ``stale_after_s`` (by the store's clock vs
    ours) is removed. Waiting past ``timeout_s`` is a refusal that says how to clear the lock.
    """
    client = mlflow.MlflowClient()
    lock = f"{name}{LOCK_SUFFIX}"
    holder = f"promotion of {name} by {getpass.getuser()} pid {os.getpid()} on {socket.gethostname()}"
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            client.create_registered_model(lock, description=holder)
            break
        except mlflow.exceptions.MlflowException as err:
            # RESOURCE_DOES_NOT_EXIST: the holder released it between our insert and the store's re-read.
            if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        age = _lock_age_s(client, lock)
        if age is not None and age > stale_after_s:
            log.warning("removing stale promotion lock %s (held %.0f s)", lock, age)
            _release(client, lock)
            continue
        if time.monotonic() > deadline:
            raise PromotionRefused(
                f"{name}: another promotion holds registered model {lock!r} ({age or 0:.0f} s); retry, or delete "
                "that registered model if no promotion is running"
            )
        time.sleep(delay * random.uniform(1.0, 2.0))  # jitter: racing waiters do not retry in lockstep
        delay = min(delay * 2, 1.0)
    try:
        yield
    finally:
        _release(client, lock)


def promote(
    name: str, version: str, alias: str = CHAMPION, gate: dict[str, float] | None = None,
    force_reason: str | None = None,
) -> PromotionResult:
    """Point ``alias`` at ``version`` if it passes ``check_candidate`` (or ``force_reason`` is given);
    the version it replaces gets ``previous_alias(alias)``."""
    if force_reason is not None and not force_reason.strip():
        raise PromotionRefused("--force needs a reason (it is recorded on the version)")
    client = mlflow.MlflowClient()
    try:
        version = str(client.get_model_version(name, version).version)
    except mlflow.exceptions.MlflowException:
        raise ModelUriError(f"{name} has no version {version!r}: check the name and version "
                            "(a promotion of a model that does not exist is bad input, not a refusal)") from None
    overridden = None
    with alias_lock(name):
        current = _alias_version(client, name, alias)
        try:
            check_candidate(name, version, current, DEFAULT_GATE if gate is None else gate)
        except PromotionRefused as err:
            if force_reason is None:
                raise
            overridden = str(err)
        replaced = current if current not in (None, version) else None
        if replaced is not None:
            client.set_registered_model_alias(name, previous_alias(alias), replaced)
        client.set_registered_model_alias(name, alias, version)
    tags = {
        "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "promoted_by": getpass.getuser(),
        "promoted_alias": alias,
    }
    if force_reason is not None:
        tags["forced_promotion_reason"] = force_reason
        tags["forced_over"] = overridden or "nothing: the checks passed"
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if overridden:
        log.warning("forced %s v%s to @%s over: %s (reason: %s)", name, version, alias, overridden, force_reason)
    return PromotionResult(name, version, alias, replaced, force_reason is not None)


def rollback(name: str, alias: str = CHAMPION) -> PromotionResult:
    """Swap ``alias`` and its previous alias: the former champion is live again (no gates: this is
    the emergency path, and the version it restores already served)."""
    client = mlflow.MlflowClient()
    prev_alias = previous_alias(alias)
    with alias_lock(name):
        previous = _alias_version(client, name, prev_alias)
        if previous is None:
            raise PromotionRefused(f"{name} has no '{prev_alias}' alias to roll back to")
        current = _alias_version(client, name, alias)
        if previous == current:  # left by an unlocked writer: no distinct version to go back to
            client.delete_registered_model_alias(name, prev_alias)
            raise PromotionRefused(f"{name} @{prev_alias} was v{current}, the live version itself: removed it; "
                                   "nothing to roll back to")
        client.set_registered_model_alias(name, alias, previous)
        if current is not None:
            client.set_registered_model_alias(name, prev_alias, current)
    client.set_model_version_tag(name, previous, "rolled_back_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return PromotionResult(name, previous, alias, current, False)
