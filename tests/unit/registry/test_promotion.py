"""The promotion gates, the aliases they move, and the lock that keeps racing promotions consistent.

The registry is a real MLflow (SQLite) store; versions point at an empty source and carry the
``eval.*`` tags evaluation would write, so each gate is exercised on exactly the numbers it reads.
(End-to-end paths with genuinely evaluated models: tests/integration/test_registry_promote.py.)
"""

from __future__ import annotations

import itertools
import threading
import time
from contextlib import nullcontext

import mlflow
import pytest

from components.config import GATE_DIRECTIONS, EvaluateConfig
from components.registry import promotion
from components.registry.model import ModelUriError
from components.registry.promotion import PromotionRefused, alias_lock, check_candidate, promote, rollback

_names = itertools.count()
MINIMUM = EvaluateConfig().min_samples
NO_GATE: dict[str, float] = {}
"""For the alias and lock tests: no metric decides, so any version may follow any other."""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow for this module, via the environment as a user would set it; restored after."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('promotion')}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        yield uri
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


class Registry:
    """One registered model per test, with helpers to add versions and their evaluation tags."""

    def __init__(self, source: str):
        self.client = mlflow.MlflowClient()
        self.name = f"model-{next(_names)}"
        self.source = source
        self.client.create_registered_model(self.name)

    def version(self, val_loss: float | None = 0.1, nan: int = 0, blank: int = 0, protocol: str = "p1",
                samples: int | None = None, features: str = "sha256:0123456789abcdef",
                schedule: str = "v_prediction, zero-terminal-SNR", **metrics: float) -> str:
        """A version with the tags evaluation writes: each metric with its sample count (``samples``, default
        each metric's minimum) and, for the feature-model metrics, the weights that computed it."""
        v = self.client.create_model_version(self.name, self.source).version
        if val_loss is not None:
            tags = {"val_loss": val_loss, "nan_images": nan, "blank_images": blank, "protocol": protocol,
                    "schedule": schedule, **metrics}
            for metric in ("val_loss", *metrics):
                tags[f"samples.{metric}"] = MINIMUM.get(metric, 1) if samples is None else samples
                if metric in ("clip_score", "fid", "kid"):
                    tags[f"features.{metric}"] = features
            for key, value in tags.items():
                self.client.set_model_version_tag(self.name, v, f"eval.{key}", str(value))
        return str(v)

    def pair(self, version: str, reference: str, change: float, low: float, high: float,
             metric: str = "val_loss") -> None:
        """The paired evaluation of ``metric`` recorded on ``version`` against ``reference``."""
        tags = {"reference": reference, f"{metric}.change": change, f"{metric}.low": low, f"{metric}.high": high,
                f"{metric}.n": 8, f"{metric}.confidence": 0.95}
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, f"eval.paired.{key}", str(value))

    def alias(self, alias: str) -> str | None:
        return promotion._alias_version(self.client, self.name, alias)

    def tags(self, version: str) -> dict[str, str]:
        return self.client.get_model_version(self.name, version).tags


@pytest.fixture
def reg(store, tmp_path):
    (tmp_path / "model").mkdir()
    return Registry((tmp_path / "model").as_uri())


def test_candidate_without_metrics_is_refused(reg):
    v = reg.version(val_loss=None)
    with pytest.raises(PromotionRefused, match=rf"v{v} has no evaluation metrics: run flows/evaluate.py"):
        promote(reg.name, v)
    assert reg.alias("champion") is None


@pytest.mark.parametrize(("nan", "blank"), [(1, 0), (0, 2)])
def test_candidate_with_nan_or_blank_images_is_refused(reg, nan, blank):
    v = reg.version(nan=nan, blank=blank)
    with pytest.raises(PromotionRefused, match=f"produced {nan} NaN and {blank} blank images"):
        promote(reg.name, v)
    assert reg.alias("champion") is None


def test_non_finite_loss_is_refused_even_without_bad_images(reg):
    v = reg.version(val_loss=float("nan"))
    with pytest.raises(PromotionRefused, match="non-finite held-out loss"):
        check_candidate(reg.name, v, None, {"val_loss": 0.05})


def test_the_loss_is_judged_on_the_upper_bound_of_its_paired_interval(reg):
    champ, within, beyond = reg.version(0.100), reg.version(0.101), reg.version(0.099)
    reg.pair(within, champ, 0.01, -0.02, 0.04)
    reg.pair(beyond, champ, -0.01, -0.08, 0.06)  # a lower point estimate, but the interval allows +6 %
    promote(reg.name, champ)
    with pytest.raises(PromotionRefused, match=rf"v{beyond}: val_loss: -1.0% against v{champ}, 95% interval "
                                               r"\[-8.0%, \+6.0%\], whose upper bound is above the \+5% tolerance"):
        promote(reg.name, beyond, gate={"val_loss": 0.05})
    assert reg.alias("champion") == champ and reg.alias("previous") is None  # a refusal moves nothing
    result = promote(reg.name, within, gate={"val_loss": 0.05})
    assert (result.version, result.previous, result.forced) == (within, champ, False)
    assert (reg.alias("champion"), reg.alias("previous")) == (within, champ)
    assert reg.tags(within)["promoted_alias"] == "champion"


@pytest.mark.parametrize(("metric", "worse"), [
    ("fid", (0.125, 0.08, 0.17)),  # lower is better: an interval whose upper bound is past +5 % is refused
    ("kid", (0.02, -0.03, 0.09)),  # ... even when the point estimate is inside the tolerance
    ("luminance_range", (-0.5, -0.6, -0.4)),  # higher is better: a fine-tune that lost half its range
    ("dark_spread", (-0.02, -0.08, 0.03)),
    ("bright_spread", (-0.3, -0.4, -0.2)),
])
def test_set_statistics_are_judged_on_their_paired_intervals(reg, metric, worse):
    gate = {"val_loss": 0.05, metric: 0.05}
    champ = reg.version(**{metric: 0.5})
    refused, accepted, unpaired = (reg.version(**{metric: 0.5}) for _ in range(3))
    for v in (refused, accepted, unpaired):
        reg.pair(v, champ, 0.0, -0.01, 0.01)
    reg.pair(refused, champ, *worse, metric=metric)
    reg.pair(accepted, champ, 0.01, -0.02, 0.03, metric=metric)
    promote(reg.name, champ, gate=gate)
    bound = "upper bound is above the \\+5%" if GATE_DIRECTIONS[metric] < 0 else "lower bound is below the -5%"
    with pytest.raises(PromotionRefused, match=rf"v{refused}: {metric}: .* against v{champ}, 95% interval .*{bound}"):
        promote(reg.name, refused, gate=gate)
    with pytest.raises(PromotionRefused, match=rf"{metric}: no paired interval against reference v{champ}"):
        promote(reg.name, unpaired, gate=gate)  # equal point figures are not evidence
    assert reg.alias("champion") == champ
    assert promote(reg.name, accepted, gate=gate).version == accepted


def test_a_metric_the_gate_cannot_judge_blocks(reg):
    v = reg.version(luminance_dark=0.1)
    with pytest.raises(PromotionRefused, match=rf"v{v}: luminance_dark: not a metric the gate can judge "
                                               r"\(known: val_loss"):
        check_candidate(reg.name, v, None, {"val_loss": 0.05, "luminance_dark": 0.1}, EvaluateConfig())


def test_clip_score_is_judged_on_the_lower_bound_of_its_paired_interval(reg):
    gate = {"val_loss": 0.05, "clip_score": 0.05}
    champ = reg.version(clip_score=30.0)
    promote(reg.name, champ, gate=gate)
    lower, wide, close, unpaired = (reg.version(clip_score=x) for x in (27.0, 28.6, 29.7, 31.0))
    for v, (change, low, high) in {lower: (-0.10, -0.12, -0.08), wide: (-0.047, -0.09, 0.0),
                                   close: (-0.01, -0.03, 0.01)}.items():
        reg.pair(v, champ, 0.0, -0.01, 0.01)
        reg.pair(v, champ, change, low, high, metric="clip_score")
    reg.pair(unpaired, champ, 0.0, -0.01, 0.01)  # the loss paired, the CLIP score not
    for v, low in ((lower, "-12.0"), (wide, "-9.0")):  # a point estimate inside the tolerance is not enough
        with pytest.raises(PromotionRefused, match=rf"v{v}: clip_score: .* interval \[{low}%, .*\], whose lower bound "
                                                   r"is below the -5% tolerance"):
            promote(reg.name, v, gate=gate)
    with pytest.raises(PromotionRefused, match=rf"clip_score: no paired interval against reference v{champ}"):
        promote(reg.name, unpaired, gate=gate)
    assert reg.alias("champion") == champ
    assert promote(reg.name, close, gate=gate).version == close


def test_a_candidate_not_evaluated_on_a_gated_metric_is_refused(reg):
    v = reg.version()  # val_loss only
    with pytest.raises(PromotionRefused, match=r"fid: the candidate was not measured on it"):
        promote(reg.name, v, gate={"val_loss": 0.05, "fid": 0.1})


def test_force_overrides_a_quality_gate_and_records_why(reg):
    champ, worse = reg.version(clip_score=30.0), reg.version(clip_score=10.0)
    promote(reg.name, champ)
    result = promote(reg.name, worse, gate={"clip_score": 0.05}, force_reason="approved by the art lead")
    assert result.forced and reg.alias("champion") == worse
    tags = reg.tags(worse)
    assert tags["forced_promotion_reason"] == "approved by the art lead" and "clip_score" in tags["forced_over"]


def test_promoting_the_champion_again_keeps_previous_distinct(reg):
    v1, v2 = reg.version(), reg.version()
    reg.pair(v2, v1, 0.0, 0.0, 0.0)
    promote(reg.name, v1)
    promote(reg.name, v2)
    result = promote(reg.name, v2)
    assert result.previous is None
    assert (reg.alias("champion"), reg.alias("previous")) == (v2, v1)


def test_losses_from_different_protocols_are_not_compared(reg):
    champ, cand = reg.version(0.2, protocol="p1"), reg.version(0.1, protocol="p2")
    promote(reg.name, champ)
    with pytest.raises(PromotionRefused, match=f"different protocols .* re-evaluate v{cand} with the config "
                                               f"v{champ} was measured under"):
        promote(reg.name, cand)


def test_force_records_the_reason_and_what_it_overrode(reg):
    champ, bad = reg.version(0.1), reg.version(0.1, nan=3)
    promote(reg.name, champ)
    with pytest.raises(PromotionRefused, match="needs a reason"):
        promote(reg.name, bad, force_reason="  ")
    result = promote(reg.name, bad, force_reason="incident 42: known-good on prod prompts")
    assert result.forced and result.previous == champ
    tags = reg.tags(bad)
    assert tags["forced_promotion_reason"] == "incident 42: known-good on prod prompts"
    assert "produced 3 NaN and 0 blank images" in tags["forced_over"]
    assert (reg.alias("champion"), reg.alias("previous")) == (bad, champ)


def test_rollback_swaps_champion_and_previous(reg):
    v1, v2 = reg.version(0.1), reg.version(0.1)
    with pytest.raises(PromotionRefused, match="no 'previous' alias to roll back to"):
        rollback(reg.name)
    promote(reg.name, v1)
    promote(reg.name, v2, gate=NO_GATE)
    result = rollback(reg.name)
    assert (result.version, result.previous) == (v1, v2)
    assert (reg.alias("champion"), reg.alias("previous")) == (v1, v2)
    assert "rolled_back_at" in reg.tags(v1)
    rollback(reg.name)  # a second rollback undoes the first
    assert (reg.alias("champion"), reg.alias("previous")) == (v2, v1)


def test_rollback_repairs_previous_equal_to_champion(reg):
    v1 = reg.version()
    reg.client.set_registered_model_alias(reg.name, "champion", v1)
    reg.client.set_registered_model_alias(reg.name, "previous", v1)  # what an unlocked race can leave
    with pytest.raises(PromotionRefused, match="nothing to roll back to"):
        rollback(reg.name)
    assert (reg.alias("champion"), reg.alias("previous")) == (v1, None)


def test_other_aliases_keep_their_own_previous(reg):
    v1, v2, v3 = reg.version(), reg.version(), reg.version()
    promote(reg.name, v1)
    promote(reg.name, v2, alias="staging", gate=NO_GATE)
    promote(reg.name, v3, alias="staging", gate=NO_GATE)
    assert (reg.alias("staging"), reg.alias("staging-previous")) == (v3, v2)
    assert (reg.alias("champion"), reg.alias("previous")) == (v1, None)
    rollback(reg.name, alias="staging")
    assert (reg.alias("staging"), reg.alias("champion")) == (v2, v1)


def test_unknown_version_is_bad_input_not_a_refusal(reg):
    with pytest.raises(ModelUriError, match=f"{reg.name} has no version '99'"):
        promote(reg.name, "99")


# --- races --------------------------------------------------------------------------------------


def _slow_reads(monkeypatch, delay: float = 0.6) -> None:
    """Widen the read-then-write window: every alias read pauses before returning, so racing
    callers without a lock all read the same state before any of them writes."""
    real = promotion._alias_version

    def slow(client, name, alias):
        value = real(client, name, alias)
        time.sleep(delay)
        return value

    monkeypatch.setattr(promotion, "_alias_version", slow)


def _race(*calls) -> list[BaseException]:
    barrier = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run(call):
        barrier.wait()
        try:
            call()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


def test_racing_promotions_leave_a_consistent_history(reg, monkeypatch):
    v0, a, b = reg.version(0.1), reg.version(0.1), reg.version(0.1)
    promote(reg.name, v0)
    _slow_reads(monkeypatch)
    assert _race(lambda: promote(reg.name, a, gate=NO_GATE), lambda: promote(reg.name, b, gate=NO_GATE)) == []
    champion, previous = reg.alias("champion"), reg.alias("previous")
    # Serialised: the second promotion saw the first as champion, so previous is the other candidate.
    assert {champion, previous} == {a, b}
    assert reg.client.search_model_versions(f"name = '{reg.name}{promotion.LOCK_SUFFIX}'") == []  # no ticket left


def test_racing_rollbacks_never_leave_previous_equal_to_champion(reg, monkeypatch):
    v1, v2 = reg.version(), reg.version()
    promote(reg.name, v1)
    promote(reg.name, v2, gate=NO_GATE)
    _slow_reads(monkeypatch)
    errors = _race(lambda: rollback(reg.name), lambda: rollback(reg.name))
    assert errors == []
    assert (reg.alias("champion"), reg.alias("previous")) == (v2, v1)  # two rollbacks, one after the other


def test_the_race_is_real_without_the_lock(reg, monkeypatch):
    """The two race tests above can fail: with the lock disabled the same schedule loses updates
    (previous is still the old champion; two rollbacks act as one)."""
    v0, a, b = reg.version(0.1), reg.version(0.1), reg.version(0.1)
    promote(reg.name, v0)
    _slow_reads(monkeypatch)
    monkeypatch.setattr(promotion, "alias_lock", lambda name: nullcontext())
    _race(lambda: promote(reg.name, a, gate=NO_GATE), lambda: promote(reg.name, b, gate=NO_GATE))
    champion = reg.alias("champion")
    assert champion in {a, b} and reg.alias("previous") == v0
    _race(lambda: rollback(reg.name), lambda: rollback(reg.name))
    assert (reg.alias("champion"), reg.alias("previous")) == (v0, champion)


def _dead_ticket(reg) -> str:
    """What a promotion that died inside ``alias_lock`` leaves: the lock and one ticket nobody beats."""
    lock = f"{reg.name}{promotion.LOCK_SUFFIX}"
    try:
        reg.client.create_registered_model(lock, description="a promotion that died")
    except mlflow.exceptions.MlflowException:
        pass
    reg.client.create_model_version(lock, "promotion-lock:/dead", description="a promotion that died",
                                    tags={promotion.HEARTBEAT: "0"})
    return lock


def test_a_held_lock_times_out_with_a_clear_message_and_a_stale_one_is_broken(reg):
    lock = _dead_ticket(reg)
    with pytest.raises(PromotionRefused, match=f"another promotion holds registered model '{lock}'.*delete version"):
        with alias_lock(reg.name, timeout_s=0.3):
            pass
    start = time.monotonic()
    with alias_lock(reg.name, stale_after_s=0.5):  # unchanged for 0.5 s of our own clock: taken over
        assert time.monotonic() - start >= 0.5
        (mine,) = reg.client.search_model_versions(f"name = '{lock}'")
        assert mine.description.startswith(f"promotion of {reg.name}")
    assert reg.client.search_model_versions(f"name = '{lock}'") == []


def _occupancy(body_s: float):
    """A critical section that records how many callers are inside at once."""
    state = {"inside": 0, "max": 0, "entered": 0}
    guard = threading.Lock()

    def enter(**lock_args):
        with alias_lock(**lock_args):
            with guard:
                state["inside"] += 1
                state["entered"] += 1
                state["max"] = max(state["max"], state["inside"])
            time.sleep(body_s)
            with guard:
                state["inside"] -= 1

    return state, enter


def test_two_waiters_breaking_the_same_stale_lock_never_both_enter(reg, monkeypatch):
    """Two waiters find the same dead holder's lock stale and both break it. The second one's delete is
    held back 0.5 s, the window in which the first has taken the lock. Before: breaking meant deleting
    the one lock model and creating it again, so the late delete removed the first waiter's fresh lock
    and both were inside at once. Now each breaks only the dead ticket, and tickets keep their order."""
    _dead_ticket(reg)
    time.sleep(1.2)  # the dead lock is older than stale_after_s by any clock
    deletes = []
    for method in ("delete_model_version", "delete_registered_model"):
        real = getattr(mlflow.MlflowClient, method)

        def late(self, *args, _real=real, **kwargs):
            deletes.append(args)
            if len(deletes) > 1:
                time.sleep(0.5)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(mlflow.MlflowClient, method, late)
    state, enter = _occupancy(body_s=1.0)
    errors = _race(lambda: enter(name=reg.name, timeout_s=30, stale_after_s=1.0),
                   lambda: enter(name=reg.name, timeout_s=30, stale_after_s=1.0))
    assert errors == [] and state["entered"] == 2
    assert state["max"] == 1, "two promotions were inside the lock at once"


def _hold_while(reg, state, enter, stale_after_s: float, waiter_timeout_s: float) -> None:
    """One holder enters; a second caller waits ``waiter_timeout_s`` for the lock and must be refused."""
    holder = threading.Thread(target=enter, kwargs={"name": reg.name, "stale_after_s": stale_after_s})
    holder.start()
    deadline = time.monotonic() + 30
    while not state["entered"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(PromotionRefused, match="another promotion holds"):
        enter(name=reg.name, timeout_s=waiter_timeout_s, stale_after_s=stale_after_s)
    holder.join(timeout=60)
    assert state["max"] == 1 and state["entered"] == 1


def test_a_client_clock_minutes_fast_never_breaks_a_live_lock(reg, monkeypatch):
    """This process's wall clock runs 10 minutes ahead of the registry's (stale_after_s 60 s). Before: the
    lock's age was the registry's creation time against the local clock, so such a client broke every
    live lock at once. Now no timestamp is compared with another clock: the waiter times out."""
    real = promotion.time
    skewed = type("SkewedTime", (), {"time": staticmethod(lambda: real.time() + 600), "monotonic": real.monotonic,
                                     "sleep": real.sleep, "strftime": real.strftime, "gmtime": real.gmtime})
    monkeypatch.setattr(promotion, "time", skewed)
    state, enter = _occupancy(body_s=3.0)
    _hold_while(reg, state, enter, stale_after_s=60.0, waiter_timeout_s=1.5)


def test_a_live_holder_keeps_the_lock_past_stale_after_s(reg):
    """Staleness is a stopped heartbeat, not an age: a holder busy for 5 x stale_after_s is not broken."""
    state, enter = _occupancy(body_s=2.5)
    _hold_while(reg, state, enter, stale_after_s=0.5, waiter_timeout_s=1.5)


# --- fail closed ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("metric", "value", "reason"), [
    ("fid", "nan", r"fid: the candidate's figure is nan, not a number to decide on"),
    ("kid", "inf", r"kid: the candidate's figure is inf, not a number to decide on"),
])
def test_a_gated_metric_that_is_not_a_number_blocks(reg, metric, value, reason):
    v = reg.version(**{metric: 1.0})
    reg.client.set_model_version_tag(reg.name, v, f"eval.{metric}", value)
    with pytest.raises(PromotionRefused, match=reason):
        promote(reg.name, v, gate={"val_loss": 0.05, metric: 0.1})
    assert reg.alias("champion") is None


def test_too_few_samples_block_with_the_minimum_named(reg):
    v = reg.version(samples=2, fid=20.0)
    with pytest.raises(PromotionRefused) as err:
        promote(reg.name, v, gate={"val_loss": 0.05, "fid": 0.1})
    reasons = str(err.value).split(": ", 1)[1].split("; ")  # one clause per metric
    assert reasons == [
        "val_loss: the candidate's figure rests on 2 samples, fewer than the 8 it needs (evaluate.min_samples)",
        "fid: the candidate's figure rests on 2 samples, fewer than the 2048 it needs (evaluate.min_samples)"]


def test_a_metric_of_a_random_feature_model_blocks_and_informational_ones_never_decide(reg):
    v = reg.version(clip_score=30.0, features="random")
    with pytest.raises(PromotionRefused, match="clip_score: the candidate's figure comes from a randomly initialised "
                                               "feature model, not a quality signal"):
        promote(reg.name, v, gate={"val_loss": 0.05, "clip_score": 0.05})
    evaluate = EvaluateConfig(informational=["clip_score"])
    verdicts = check_candidate(reg.name, v, None, {"val_loss": 0.05}, evaluate)
    assert [(x.metric, x.verdict) for x in verdicts] == [("val_loss", "pass"), ("clip_score", "info")]


def test_a_loss_without_paired_evidence_against_the_champion_blocks(reg):
    champ, other, cand = reg.version(), reg.version(), reg.version(0.05)
    promote(reg.name, champ)
    with pytest.raises(PromotionRefused, match=rf"no paired evaluation against reference v{champ} \(the last was "
                                               r"against none\)"):
        promote(reg.name, cand)  # a far lower point estimate is not evidence
    reg.pair(cand, other, -0.5, -0.6, -0.4)
    with pytest.raises(PromotionRefused, match=rf"against reference v{champ} \(the last was against {other}\)"):
        promote(reg.name, cand)
    reg.pair(cand, champ, -0.5, -0.6, -0.4)
    assert promote(reg.name, cand).version == cand


def test_a_new_alias_is_judged_against_the_champion(reg):
    champ, bad, good = reg.version(), reg.version(), reg.version()
    reg.pair(bad, champ, 0.5, 0.3, 0.7)
    reg.pair(good, champ, 0.0, -0.01, 0.01)
    promote(reg.name, champ)
    with pytest.raises(PromotionRefused, match=rf"v{bad}: val_loss: \+50.0% against v{champ}"):
        promote(reg.name, bad, alias="staging-test")
    assert reg.alias("staging-test") is None
    assert promote(reg.name, good, alias="staging-test").version == good
    with pytest.raises(PromotionRefused, match=rf"v{bad}: val_loss: \+50.0% against v{champ}"):
        promote(reg.name, bad, alias="staging-test")  # judged against the champion, not the alias's holder


def test_a_model_trained_under_another_schedule_is_refused_by_name(reg):
    champ = reg.version()
    eps = reg.version(schedule="epsilon, scaled_linear betas without zero terminal SNR")
    promote(reg.name, champ)
    with pytest.raises(PromotionRefused, match=rf"v{eps} was trained as epsilon, scaled_linear betas without zero "
                                               rf"terminal SNR and reference v{champ} as v_prediction, "
                                               r"zero-terminal-SNR: their held-out losses measure different"):
        promote(reg.name, eps)
