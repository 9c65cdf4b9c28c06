"""Gated promotion in the MLflow registry, by alias (registry stages are deprecated).

A candidate becomes ``champion`` only if it has evaluation metrics, produced no NaN or blank image,
and its held-out loss is no worse than the champion's beyond a tolerance. ``--force`` overrides with
a recorded reason. The champion it replaces keeps the ``previous`` alias, so rollback is one call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlflow

EVAL_PREFIX = "eval."
PREVIOUS = "previous"


class PromotionRefused(RuntimeError):
    pass


@dataclass
class PromotionResult:
    model: str
    version: str
    alias: str
    previous: str | None
    forced: bool


def eval_metrics(name: str, version: str) -> dict[str, float]:
    """The numeric ``eval.*`` tags evaluation left on a version."""
    out = {}
    for key, value in mlflow.MlflowClient().get_model_version(name, version).tags.items():
        if key.startswith(EVAL_PREFIX):
            try:
                out[key[len(EVAL_PREFIX):]] = float(value)
            except ValueError:
                continue
    return out


def _alias_version(client, name: str, alias: str) -> str | None:
    try:
        return client.get_model_version_by_alias(name, alias).version
    except mlflow.exceptions.MlflowException:
        return None


def check_candidate(name: str, version: str, champion: str | None, tolerance: float) -> None:
    """Raise PromotionRefused with a one-line reason, or return if the candidate may go live."""
    cand = eval_metrics(name, version)
    if "val_loss" not in cand:
        raise PromotionRefused(f"{name} v{version} has no evaluation metrics: run flows/evaluate.py first")
    if cand.get("nan_images", 0) > 0 or cand.get("blank_images", 0) > 0:
        raise PromotionRefused(
            f"{name} v{version} produced {int(cand.get('nan_images', 0))} NaN and "
            f"{int(cand.get('blank_images', 0))} blank images in evaluation"
        )
    if champion is None or champion == version:
        return
    champ = eval_metrics(name, champion)
    if "val_loss" in champ and cand["val_loss"] > champ["val_loss"] * (1 + tolerance):
        raise PromotionRefused(
            f"{name} v{version} val_loss {cand['val_loss']:.5f} is worse than champion v{champion} "
            f"{champ['val_loss']:.5f} beyond the {tolerance:.0%} tolerance"
        )


def promote(
    name: str, version: str, alias: str = "champion", tolerance: float = 0.05, force_reason: str | None = None
) -> PromotionResult:
    client = mlflow.MlflowClient()
    try:
        version = str(client.get_model_version(name, version).version)
    except mlflow.exceptions.MlflowException:
        raise PromotionRefused(f"{name} has no version {version!r}") from None
    current = _alias_version(client, name, alias)
    if force_reason is None:
        check_candidate(name, version, current, tolerance)
    if current is not None and current != version:
        client.set_registered_model_alias(name, PREVIOUS, current)
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "promoted_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if force_reason is not None:
        client.set_model_version_tag(name, version, "forced_promotion_reason", force_reason)
    return PromotionResult(name, version, alias, current if current != version else None, force_reason is not None)


def rollback(name: str, alias: str = "champion") -> PromotionResult:
    """Swap ``alias`` and ``previous``: the former champion is live again."""
    client = mlflow.MlflowClient()
    previous = _alias_version(client, name, PREVIOUS)
    if previous is None:
        raise PromotionRefused(f"{name} has no '{PREVIOUS}' alias to roll back to")
    current = _alias_version(client, name, alias)
    client.set_registered_model_alias(name, alias, previous)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current)
    return PromotionResult(name, previous, alias, current, False)
