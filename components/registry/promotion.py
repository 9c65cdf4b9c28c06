"""Gated promotion in the MLflow registry, by alias (registry stages are deprecated).

A candidate becomes ``champion`` only if it has evaluation metrics, produced no NaN or blank image,
and every metric of the gate (``evaluate.gate``: the held-out loss by default; CLIP score, FID, KID and
the dynamic-range figures on request) is no worse than the champion's beyond its allowed relative
regression, both measured under the same
evaluation protocol. ``--force`` overrides with a recorded reason. The champion it replaces keeps
the ``previous`` alias, so rollback is one call.

MLflow aliases are last-writer-wins (``set_registered_model_alias`` has no compare-and-set), so two
promotions that both read the same champion can lose one another's update or leave ``previous``
equal to ``champion``. Every read-check-write of the aliases therefore runs under ``alias_lock``, a
ticket lock kept in the registry itself (see there).
"""

from __future__ import annotations

import getpass
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
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


HEARTBEAT = "heartbeat"
"""Tag on a lock ticket: a counter its owner bumps while it waits and while it holds the lock."""


def _lock_model(client, lock: str) -> None:
    try:
        client.create_registered_model(lock, description="promotion lock: each version is a ticket (alias_lock)")
    except mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _delete_ticket(client, lock: str, version: int) -> None:
    try:
        client.delete_model_version(lock, str(version))
    except mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":  # deleted already (by a waiter, or twice): fine
            log.warning("could not delete promotion lock ticket %s v%s: %s", lock, version, err.error_code)


def _live_tickets(client, lock: str) -> dict[int, str]:
    """Live tickets of the lock: version -> heartbeat counter (deleted versions are not listed)."""
    return {int(mv.version): mv.tags.get(HEARTBEAT, "") for mv in client.search_model_versions(f"name = '{lock}'")}


class _Heartbeat(threading.Thread):
    """Bumps the ticket's counter every ``interval`` s until stopped: proof of life that needs no clock."""

    def __init__(self, lock: str, version: int, interval: float):
        super().__init__(name=f"promotion-lock-heartbeat-{version}", daemon=True)
        self.lock, self.version, self.interval = lock, version, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        client, beats = mlflow.MlflowClient(), 0
        while not self.stopped.wait(self.interval):
            beats += 1
            try:
                client.set_model_version_tag(self.lock, str(self.version), HEARTBEAT, str(beats))
            except mlflow.exceptions.MlflowException as err:  # a registry blip: the next beat may pass
                log.warning("promotion lock heartbeat of %s v%s failed: %s", self.lock, self.version, err.error_code)


@contextmanager
def alias_lock(name: str, timeout_s: float = 60.0, stale_after_s: float = 30.0) -> Iterator[None]:
    """Serialise alias updates of registered model ``name`` across threads, processes and machines.

    A ticket lock in the registry (any MLflow store: SQLite, a tracking server). A ticket is a version of
    the registered model ``NAME.promotion-lock``, made with ``create_model_version``, which is atomic and
    numbers versions in order, never reusing a number (a deleted version keeps its row). The live ticket
    with the lowest number holds the lock; the others wait their turn, first come first served, and a
    holder deletes its ticket when done.

    A holder that died leaves its ticket behind. Every contender bumps a counter tag on its own ticket
    every ``stale_after_s / 4`` (a thread, while it waits and while it holds); a waiter that sees a lower
    ticket's counter unchanged for ``stale_after_s`` of its own monotonic time deletes that ticket. Two
    waiters that break the same stale ticket delete only that ticket (the second delete finds nothing), so
    they cannot both enter, as they could when breaking meant deleting and re-creating one shared lock;
    and no timestamp is compared with another machine's (a client clock minutes fast used to break every
    live lock). Waiting past ``timeout_s`` is a refusal that says how to clear a ticket by hand.

    Limit (any lease has it): a holder whose whole process stalls for longer than ``stale_after_s`` (its
    heartbeat thread included) may lose its ticket while it still works.
    """
    client = mlflow.MlflowClient()
    lock = f"{name}{LOCK_SUFFIX}"
    holder = f"promotion of {name} by {getpass.getuser()} pid {os.getpid()} on {socket.gethostname()}"
    _lock_model(client, lock)
    # An absolute path after the scheme: a tracking server refuses a relative one as a version source.
    ticket = int(client.create_model_version(lock, f"promotion-lock:/{uuid.uuid4().hex}", description=holder,
                                             tags={HEARTBEAT: "0"}).version)
    beat = _Heartbeat(lock, ticket, max(stale_after_s / 4, 0.05))
    beat.start()
    try:
        _wait_turn(client, name, lock, ticket, timeout_s, stale_after_s)
        yield
    finally:
        beat.stopped.set()
        beat.join(timeout=30)
        _delete_ticket(client, lock, ticket)


def _wait_turn(client, name: str, lock: str, ticket: int, timeout_s: float, stale_after_s: float) -> None:
    """Return once ``ticket`` is the lowest live ticket, deleting tickets ahead whose heartbeat stopped."""
    deadline = time.monotonic() + timeout_s
    seen: dict[int, tuple[str, float]] = {}  # ticket -> (its counter, when we first saw that value)
    delay = 0.05
    while True:
        live = _live_tickets(client, lock)
        if ticket not in live:
            raise PromotionRefused(f"{name}: this promotion's lock ticket v{ticket} of {lock!r} was removed by "
                                   "another promotion that judged it dead (this process stalled?); retry")
        ahead = {v: count for v, count in live.items() if v < ticket}
        if not ahead:
            return
        now = time.monotonic()
        for version, count in ahead.items():
            if seen.get(version, (None,))[0] != count:
                seen[version] = (count, now)
            elif now - seen[version][1] > stale_after_s:
                log.warning("removing promotion lock ticket %s v%s: no heartbeat for %.0f s (its holder died)",
                            lock, version, now - seen[version][1])
                _delete_ticket(client, lock, version)
        if now > deadline:
            first = min(ahead)
            raise PromotionRefused(
                f"{name}: another promotion holds registered model {lock!r} (ticket v{first}, heartbeat "
                f"{ahead[first]}); retry, or delete version {first} of {lock!r} if no promotion is running"
            )
        time.sleep(delay * random.uniform(1.0, 2.0))  # jitter: racing waiters do not poll in lockstep
        delay = max(0.01, min(delay * 2, 0.5, stale_after_s / 4))


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
