"""``crmflow score fit``: learn a scorecard's weights from history (docs/churn.md).

The features are the scorecard's own (``compile_features`` as of a past date ``as_of``),
so what is learnt is what the engine's SQL computes. The outcome is a date column of
the entity (``churned_at``): an entity is positive when it falls in
``(as_of, as_of + horizon]``; entities for which it fell on or before ``as_of`` (already
gone) or that did not exist yet at ``as_of`` (``created_at`` after it) are left out.

- A logistic model per segment (scikit-learn ``LogisticRegression`` on standardised
  features, L2), turned back into weights on the raw features, so that the scorecard's
  ``1 / (1 + exp(-(intercept + Σ weight·x)))`` is the model's probability. A segment
  with too few positives to learn from keeps the weights learnt on every entity.
- A survival model of the days until the outcome (lifelines ``WeibullAFTFitter``, on
  every entity, censored at the end of the observed history): its median, a closed
  formula the engine computes in SQL, is the scorecard's ``days_to_churn``.
- Quality on held-out entities (split by entity key, deterministic): AUC and Brier score
  of the fitted model and of the scorecard's current version (the baseline), a
  reliability table, the survival model's concordance; factor importance (standardised
  coefficients, odds ratio per standard deviation, AUC lost when the factor is shuffled).
- Feedback labels (``crmflow.score_feedback``): an entity marked ``false_positive`` that
  did not reach the outcome counts ``FEEDBACK_WEIGHT`` times (a confirmed negative).

Nothing is saved unless asked: :func:`save` stores the fitted weights as a new version.

The work is in three modules: ``fit_samples`` (the rows: features, outcomes, weights),
``fit_models`` (the logistic and survival models, the quality measures) and this one
(the fit as a whole, :class:`FitResult`, factor importance, the fitted definition and
:func:`save`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg

from engine.scorecards.fit_models import (
    MAX_DAYS,
    MIN_SEGMENT_POSITIVES,
    Quality,
    SegmentModel,
    definition_scores,
    fit_survival,
    quality_of,
    reliability_table,
    roc_auc,
    segment_models,
    survival_days,
)
from engine.scorecards.fit_samples import (
    FEEDBACK_WEIGHT,
    F,
    FitError,
    Samples,
    checked_entity,
    load_samples,
)

__all__ = [
    "FEEDBACK_WEIGHT",
    "MAX_DAYS",
    "MIN_SEGMENT_POSITIVES",
    "F",
    "FitError",
    "FitResult",
    "Quality",
    "SegmentModel",
    "definition_scores",
    "fit",
    "fit_definition",
    "parse_as_of",
    "save",
    "survival_days",
]


@dataclass
class FitResult:
    scorecard: str
    version: int
    as_of: datetime
    horizon_days: int
    factors: list[str]
    labels: dict[str, str]
    keys: list[Any]  # entity_key per row (as the features query returns it)
    snapshot: list[int]  # per row: 0 for as_of, 1 for as_of - horizon, ...
    segments: list[str]  # per row
    x: F
    y: npt.NDArray[np.int64]
    held_out: npt.NDArray[np.bool_]
    models: dict[str, SegmentModel]
    fitted: Quality
    baseline: Quality
    fitted_by_segment: dict[str, Quality]
    baseline_by_segment: dict[str, Quality]
    reliability: list[dict[str, float]]
    importance: list[dict[str, Any]]
    survival: dict[str, Any] | None
    survival_quality: dict[str, Any] | None
    feedback_labels: int
    excluded: dict[str, int] = field(default_factory=dict)
    definition: dict[str, Any] = field(default_factory=dict)
    # lifelines' fitted model, its standardisation and the factor columns it uses.
    survival_model: Any = None
    survival_inputs: tuple[F, F, list[int]] | None = None

    def survival_median(self, rows: npt.NDArray[np.bool_]) -> F:
        """lifelines' own median prediction for the given rows (capped as the engine)."""
        import pandas as pd

        assert self.survival_model is not None and self.survival_inputs is not None
        mean, scale, keep = self.survival_inputs
        x = self.x[rows]
        frame = pd.DataFrame(
            (x[:, keep] - mean[keep]) / scale[keep], columns=[f"x{i}" for i in keep]
        )
        days = np.asarray(self.survival_model.predict_median(frame), dtype=np.float64).ravel()
        return np.asarray(np.minimum(MAX_DAYS, days), dtype=np.float64)

    def probabilities(self, rows: npt.NDArray[np.bool_] | None = None) -> F:
        """The fitted model's probability for the given rows (all by default)."""
        mask = np.ones(len(self.y), dtype=bool) if rows is None else rows
        out = np.zeros(int(mask.sum()))
        segs = np.array(self.segments)[mask]
        x = self.x[mask]
        for name in set(segs.tolist()):
            sel = segs == name
            out[sel] = self.model_for(name).predict_proba(x[sel])
        return out

    def model_for(self, segment: str) -> SegmentModel:
        return self.models.get(segment) or self.models["default"]

    def fitted_definition(self) -> dict[str, Any]:
        """The scorecard's definition with the fitted intercepts, weights and survival."""
        new: dict[str, Any] = json.loads(json.dumps(self.definition))
        top = self.models["default"]
        new["model"] = "logistic"
        new["intercept"] = top.intercept
        for f in new["factors"]:
            f["weight"] = top.weights[f["id"]]
        for seg in new.get("segments") or []:
            m = self.models.get(seg["name"], top)
            seg["intercept"] = m.intercept
            seg["weights"] = dict(m.weights)
        if self.survival is not None:
            new["survival"] = self.survival
        return new


def _require_extras() -> None:
    try:
        import lifelines  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise FitError(
            f"score fit needs scikit-learn and lifelines ({exc.name} is missing):"
            " pip install 'crmflow[fit]'"
        ) from None


def _held_out(key: Any, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{json.dumps(key, sort_keys=True)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


async def fit(
    conn: psycopg.AsyncConnection[Any],
    name: str,
    outcome: str,
    horizon_days: int = 90,
    as_of: datetime | None = None,
    **options: Any,
) -> FitResult:
    """Fit the current version of the stored scorecard ``name``; nothing is stored."""
    _require_extras()
    from engine.scorecards import store

    current = await store.get(conn, name)
    return await fit_definition(
        conn,
        dict(current["definition"]),
        outcome,
        horizon_days,
        as_of,
        version=int(current["current_version"]),
        **options,
    )


async def fit_definition(
    conn: psycopg.AsyncConnection[Any],
    definition: dict[str, Any],
    outcome: str,
    horizon_days: int = 90,
    as_of: datetime | None = None,
    *,
    version: int = 0,
    holdout: float = 0.3,
    seed: int = 17,
    created_column: str | None = "created_at",
    now: datetime | None = None,
    snapshots: int = 3,
) -> FitResult:
    """Fit a scorecard definition (raw, as stored) on its entities' history."""
    _require_extras()
    from engine.scorecards.model import parse_scorecard

    parsed = parse_scorecard(definition)
    name = parsed.name
    now = now or datetime.now(UTC)
    entity, as_of = await checked_entity(conn, parsed, outcome, horizon_days, as_of, now)
    factors = [f["id"] for f in definition["factors"]]
    labels = {f["id"]: f.get("label") or f["id"] for f in definition["factors"]}
    s = await load_samples(
        conn, parsed, factors, entity, outcome, horizon_days, as_of, now, created_column, snapshots
    )
    x, y = s.x, s.y
    held = np.array([_held_out(k, seed, holdout) for k in s.keys], dtype=bool)
    train = ~held
    if y[train].sum() < 5 or (1 - y[train]).sum() < 5:
        raise FitError(
            f"scorecard {name}: {int(y[train].sum())} positives among {int(train.sum())}"
            f" training rows at {as_of:%Y-%m-%d} (horizon {horizon_days}d): too few to learn"
        )
    models = segment_models(definition, factors, x, y, s.weights, train, np.array(s.segments), seed)
    result = FitResult(
        scorecard=name,
        version=version,
        as_of=as_of,
        horizon_days=horizon_days,
        factors=factors,
        labels=labels,
        keys=s.keys,
        snapshot=s.snapshot,
        segments=s.segments,
        x=x,
        y=y,
        held_out=held,
        models=models,
        fitted=Quality(None, None, 0, 0),
        baseline=Quality(None, None, 0, 0),
        fitted_by_segment={},
        baseline_by_segment={},
        reliability=[],
        importance=[],
        survival=None,
        survival_quality=None,
        feedback_labels=s.feedback_labels,
        excluded=s.excluded,
        definition=definition,
    )
    _held_out_quality(result, seed)
    _survival(result, s, train, seed)
    return result


def _held_out_quality(result: FitResult, seed: int) -> None:
    """The fitted model's and the definition's (the baseline's) quality on the held-out
    rows, overall and per segment; the reliability table; factor importance."""
    held, y, definition = result.held_out, result.y, result.definition
    segs = result.segments
    segments = np.array(segs)
    p_fit = result.probabilities(held)
    p_base = definition_scores(
        definition, [s for s, h in zip(segs, held, strict=True) if h], result.x[held]
    )
    base_is_prob = definition.get("model", "logistic") == "logistic"
    result.fitted = quality_of(y[held], p_fit, True)
    result.baseline = quality_of(y[held], p_base, base_is_prob)
    for seg_name in sorted(set(segs)):
        sel = segments[held] == seg_name
        result.fitted_by_segment[seg_name] = quality_of(y[held][sel], p_fit[sel], True)
        result.baseline_by_segment[seg_name] = quality_of(y[held][sel], p_base[sel], base_is_prob)
    result.reliability = reliability_table(y[held], p_fit)
    result.importance = _importance(result, seed)


def _survival(result: FitResult, s: Samples, train: npt.NDArray[np.bool_], seed: int) -> None:
    """The survival model, fitted on the training rows, and its held-out quality (or the
    error lifelines gave: the rest of the fit stands without it)."""
    held, y, x = result.held_out, result.y, result.x
    try:
        survival, s_model, s_mean, s_scale, s_keep = fit_survival(
            result.factors, x[train], s.durations[train], s.events[train], seed
        )
    except Exception as exc:  # lifelines' convergence errors: report, keep the rest
        result.survival_quality = {"error": f"{type(exc).__name__}: {exc}"}
    else:
        from lifelines.utils import concordance_index

        result.survival = survival
        result.survival_model = s_model
        result.survival_inputs = (s_mean, s_scale, s_keep)
        days = survival_days(survival, result.factors, x[held])
        ev = s.events[held]
        du = s.durations[held]
        result.survival_quality = {
            "concordance": float(concordance_index(du, days, ev)) if ev.sum() else None,
            "median_days": float(np.median(days)) if len(days) else None,
            "median_days_positives": float(np.median(days[y[held] == 1]))
            if y[held].sum()
            else None,
        }


def _importance(result: FitResult, seed: int) -> list[dict[str, Any]]:
    """Per factor: the standardised coefficient of the default segment (log-odds per
    standard deviation), its odds ratio, and the held-out AUC lost when the factor's
    values are shuffled."""
    rng = np.random.default_rng(seed)
    held = result.held_out
    y = result.y[held]
    base = roc_auc(y, result.probabilities(held))
    top = result.models["default"]
    out: list[dict[str, Any]] = []
    for j, f in enumerate(result.factors):
        std_coef = float(top.weights[f] * (top.scale[j] if top.scale is not None else 1.0))
        drops = []
        if base is not None:
            for _ in range(5):
                shuffled = result.x.copy()
                idx = np.flatnonzero(held)
                shuffled[idx, j] = shuffled[rng.permutation(idx), j]
                saved = result.x
                result.x = shuffled
                try:
                    auc = roc_auc(y, result.probabilities(held))
                finally:
                    result.x = saved
                drops.append(base - (auc or 0.0))
        out.append(
            {
                "id": f,
                "label": result.labels[f],
                "std_coefficient": std_coef,
                "odds_ratio_per_sd": math.exp(std_coef),
                "auc_drop": float(np.mean(drops)) if drops else None,
            }
        )
    out.sort(key=lambda r: -(r["auc_drop"] or 0.0))
    return out


async def save(conn: psycopg.AsyncConnection[Any], result: FitResult) -> Any:
    """Store the fitted weights as a new version of the scorecard."""
    from engine.scorecards import store

    return await store.apply(conn, result.fitted_definition())


def parse_as_of(text: str) -> datetime:
    """``--as-of``: a date (midnight UTC) or an ISO timestamp."""
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return datetime(d.year, d.month, d.day, tzinfo=UTC)
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a date (YYYY-MM-DD) or an ISO timestamp") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
