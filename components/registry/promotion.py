"""Gated promotion in the MLflow registry, by alias (registry stages are deprecated).

A candidate becomes ``champion`` only if it has evaluation metrics, produced no NaN or blank image,
and every metric of the gate (``evaluate.gate``: the held-out loss by default; CLIP score, FID, KID and
the dynamic-range figures on request) is usable evidence on both sides and its paired interval against the
champion (both measured under the same evaluation protocol) stays within the allowed relative regression.
``--force`` overrides with a recorded reason. The champion it replaces keeps
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
SCHEDULE = "schedule"
"""``eval.schedule``: the model's prediction type and schedule in words (``v_prediction, zero-terminal-SNR``)."""
SAMPLES_PREFIX = "samples."
"""``eval.samples.<metric>``: how many samples the metric was computed on."""
FEATURES_PREFIX = "features."
"""``eval.features.<metric>``: which weights of a feature model computed it (``random``: a random network)."""
PAIRED_PREFIX = "paired."
"""``eval.paired.reference``, ``eval.paired.<metric>.{change,low,high,n,confidence}``: the metric paired sample
by sample with the reference version's, and its bootstrap interval."""
PAIRED_METRICS = tuple(GATE_DIRECTIONS)
"""Metrics judged on a paired interval against the reference -- every metric the gate can name: the held-out
loss row by row, the CLIP score image by image (same prompt and seed), FID, KID and the probe's figures on the
same resampled sets."""
RANDOM_FEATURES = "random"
NON_METRIC = {"run_id", PROTOCOL, SCHEDULE, "dataset_digest", "model", "version"}
LOCK_SUFFIX = ".promotion-lock"


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
        if key in NON_METRIC or "." in key:  # samples.*, features.*, paired.*: about a metric, not one
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


@dataclass
class Verdict:
    """One metric's judgement: the figures it rests on and whether it lets the candidate through."""

    metric: str
    candidate: float
    reference: float
    change: float
    """Relative change from the reference (+0.05: 5 % higher); for val_loss the paired estimate."""
    low: float
    high: float
    """The paired interval of ``change`` (NaN where the metric has none)."""
    tolerance: float
    decides: bool
    verdict: str
    """``pass``, ``refuse`` or ``info`` (an informational metric, or one the gate does not name)."""
    reason: str = ""

    @property
    def refused(self) -> bool:
        return self.decides and self.verdict == "refuse"


def _float(tags: dict[str, str], key: str) -> float:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return math.nan


def _usable(metric: str, tags: dict[str, str], evaluate: EvaluateConfig, who: str) -> str:
    """Why ``metric`` of a version's tags is not evidence (missing, not finite, too few samples, a random
    feature model), or ``""``."""
    value = _float(tags, metric)
    if metric not in tags:
        return f"{metric}: {who} was not measured on it (evaluate with this config)"
    if not math.isfinite(value):
        return f"{metric}: {who}'s figure is {tags[metric]}, not a number to decide on"
    need = evaluate.min_samples.get(metric, 1)
    have = _float(tags, f"{SAMPLES_PREFIX}{metric}")
    if not math.isfinite(have) or have < need:
        got = "an unknown number of" if not math.isfinite(have) else f"{int(have)}"
        return f"{metric}: {who}'s figure rests on {got} samples, fewer than the {need} it needs (evaluate.min_samples)"
    if tags.get(f"{FEATURES_PREFIX}{metric}") == RANDOM_FEATURES:
        return f"{metric}: {who}'s figure comes from a randomly initialised feature model, not a quality signal"
    return ""


def judge(candidate: dict[str, str], reference: dict[str, str] | None, reference_version: str | None,
          evaluate: EvaluateConfig, gate: dict[str, float] | None = None) -> list[Verdict]:
    """Each gated and informational metric of ``candidate``'s ``eval.*`` tags (prefix stripped) against the
    reference's (None: the first version, judged on its own figures). Fail closed: a gated metric that is not
    usable evidence (``_usable``) on either side refuses. Against a reference, every gated metric decides on
    the paired interval recorded against that very version: refused when it reaches past the tolerance in the
    worse direction (a lower-is-better metric's upper bound above it, a higher-is-better one's lower bound
    below minus it), or when there is no such interval. An informational metric not in ``PAIRED_METRICS`` is
    shown with its figures' relative change and never decides."""
    gate = evaluate.gate if gate is None else gate
    out = []
    for metric in [*gate, *(m for m in evaluate.informational if m not in gate)]:
        decides = metric in gate and metric not in evaluate.informational
        tolerance = gate.get(metric, math.nan)
        mine = _float(candidate, metric)
        theirs = _float(reference, metric) if reference is not None else math.nan
        change = mine / theirs - 1.0 if math.isfinite(mine) and math.isfinite(theirs) and theirs != 0 else math.nan
        low = high = math.nan
        reason = "" if metric in PAIRED_METRICS or not decides else (
            f"{metric}: not a metric the gate can judge (known: {', '.join(PAIRED_METRICS)})")
        reason = reason or _usable(metric, candidate, evaluate, "the candidate")
        if not reason and reference is not None:
            reason = _usable(metric, reference, evaluate, f"reference v{reference_version}")
        if not reason and reference is not None and metric in PAIRED_METRICS:
            paired_ref = candidate.get(f"{PAIRED_PREFIX}reference")
            if paired_ref != str(reference_version):
                reason = (f"{metric}: no paired evaluation against reference v{reference_version} "
                          f"(the last was against {paired_ref or 'none'}): evaluate the candidate again")
            else:
                change, low, high = (_float(candidate, f"{PAIRED_PREFIX}{metric}.{k}")
                                     for k in ("change", "low", "high"))
                level = _float(candidate, f"{PAIRED_PREFIX}{metric}.confidence")
                higher_is_better = GATE_DIRECTIONS[metric] > 0
                if f"{PAIRED_PREFIX}{metric}.change" not in candidate:
                    reason = (f"{metric}: no paired interval against reference v{reference_version} (the samples did "
                              "not pair, or a figure was not positive)")
                elif not all(math.isfinite(x) for x in (change, low, high)):
                    reason = (f"{metric}: the paired interval is not finite (a resample's reference figure was not "
                              "positive)")
                elif higher_is_better and low < -tolerance:
                    reason = (f"{metric}: {change:+.1%} against v{reference_version}, {level:.0%} interval "
                              f"[{low:+.1%}, {high:+.1%}], whose lower bound is below the {-tolerance:+.0%} "
                              "tolerance")
                elif not higher_is_better and high > tolerance:
                    reason = (f"{metric}: {change:+.1%} against v{reference_version}, {level:.0%} interval "
                              f"[{low:+.1%}, {high:+.1%}], whose upper bound is above the {tolerance:+.0%} "
                              "tolerance")
        verdict = ("refuse" if reason else "pass") if decides else "info"
        out.append(Verdict(metric, mine, theirs, change, low, high, tolerance, decides, verdict, reason))
    return out


def check_candidate(name: str, version: str, reference: str | None, gate: dict[str, float] | None = None,
                    evaluate: EvaluateConfig | None = None) -> list[Verdict]:
    """Raise PromotionRefused with one clause per reason, or return the verdicts if the candidate may go live.

    ``reference``: the version it is judged against (``evaluate.reference_alias``'s holder; None for the
    first). ``gate`` (default ``evaluate.gate``): metric -> the relative regression allowed; each metric's better
    direction is ``config.GATE_DIRECTIONS``'s (a lower FID, a higher CLIP score).
    """
    evaluate = evaluate or EvaluateConfig()
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
    theirs = None
    if reference is not None and reference != version:
        theirs = eval_tags(name, reference)
        if tags.get(SCHEDULE) and theirs.get(SCHEDULE) and tags[SCHEDULE] != theirs[SCHEDULE]:
            raise PromotionRefused(
                f"{name} v{version} was trained as {tags[SCHEDULE]} and reference v{reference} as "
                f"{theirs[SCHEDULE]}: their held-out losses measure different quantities")
        if tags.get(PROTOCOL) != theirs.get(PROTOCOL):
            raise PromotionRefused(
                f"{name} v{version} and reference v{reference} were evaluated under different protocols "
                f"({tags.get(PROTOCOL)} vs {theirs.get(PROTOCOL)}): re-evaluate v{version} with the config "
                f"v{reference} was measured under")
    verdicts = judge(tags, theirs, reference if theirs is not None else None, evaluate, gate)
    reasons = [v.reason for v in verdicts if v.refused]
    if reasons:
        raise PromotionRefused(f"{name} v{version}: " + "; ".join(reasons))
    return verdicts


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
    force_reason: str | None = None, evaluate: EvaluateConfig | None = None,
) -> PromotionResult:
    """Point ``alias`` at ``version`` if it passes ``check_candidate`` against the holder of
    ``evaluate.reference_alias`` (the champion) -- whatever the alias, so a new alias is never a free pass --
    or ``force_reason`` is given; the version it replaces gets ``previous_alias(alias)``."""
    evaluate = evaluate or EvaluateConfig()
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
        reference = (current if alias == evaluate.reference_alias
                     else _alias_version(client, name, evaluate.reference_alias))
        try:
            check_candidate(name, version, reference, gate, evaluate)
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
