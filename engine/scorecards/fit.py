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
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql

from engine import catalog, db

F = npt.NDArray[np.float64]

FEEDBACK_WEIGHT = 3.0
MIN_SEGMENT_POSITIVES = 15
MAX_DAYS = 3650


class FitError(ValueError):
    """The fit cannot be made (a missing extra, no history, no positives...)."""


@dataclass
class SegmentModel:
    """One segment's logistic model, in the scorecard's terms (raw features)."""

    name: str
    intercept: float
    weights: dict[str, float]
    rows: int
    positives: int
    own: bool  # learnt on its own rows (False: the model of every entity)
    # The standardised model (for importance and the tests).
    estimator: Any = None
    mean: F | None = None
    scale: F | None = None

    def predict(self, x: F) -> F:
        w = np.array(list(self.weights.values()), dtype=np.float64)
        lp = self.intercept + x @ w
        return np.asarray(1.0 / (1.0 + np.exp(-lp)), dtype=np.float64)

    def predict_proba(self, x: F) -> F:
        """The sklearn model's own probability (standardised inputs)."""
        assert self.estimator is not None and self.mean is not None and self.scale is not None
        p: F = self.estimator.predict_proba((x - self.mean) / self.scale)[:, 1]
        return p


@dataclass
class Quality:
    auc: float | None
    brier: float | None
    rows: int
    positives: int


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


def _auc(y: npt.NDArray[np.int64], p: F) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(set(y.tolist())) < 2:
        return None
    return float(roc_auc_score(y, p))


def _quality(y: npt.NDArray[np.int64], p: F, probability: bool) -> Quality:
    from sklearn.metrics import brier_score_loss

    brier = float(brier_score_loss(y, p)) if probability and len(y) else None
    return Quality(_auc(y, p), brier, len(y), int(y.sum()))


def definition_scores(definition: dict[str, Any], segments: list[str], x: F) -> F:
    """Score rows with a definition's weights, as the engine does (docs/scorecards.md)."""
    factors = [f["id"] for f in definition["factors"]]
    base_w = {f["id"]: float(f.get("weight", 0)) for f in definition["factors"]}
    base_b = float(definition.get("intercept", 0))
    by_name = {s["name"]: s for s in definition.get("segments") or []}
    out = np.zeros(len(segments))
    segs = np.array(segments)
    for name in set(segments):
        seg = by_name.get(name)
        w = dict(base_w)
        b = base_b
        if seg is not None:
            w.update({k: float(v) for k, v in (seg.get("weights") or {}).items()})
            if seg.get("intercept") is not None:
                b = float(seg["intercept"])
        sel = segs == name
        out[sel] = b + x[sel] @ np.array([w[f] for f in factors])
    if definition.get("model", "logistic") == "logistic":
        return np.asarray(1.0 / (1.0 + np.exp(-out)), dtype=np.float64)
    return out


def _fit_logistic(
    name: str, factors: list[str], x: F, y: npt.NDArray[np.int64], w: F, seed: int, own: bool
) -> SegmentModel:
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    est = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    est.fit((x - mean) / scale, y, sample_weight=w)
    coef = est.coef_[0] / scale
    intercept = float(est.intercept_[0] - float(np.sum(est.coef_[0] * mean / scale)))
    weights = {f: float(c) for f, c in zip(factors, coef, strict=True)}
    return SegmentModel(name, intercept, weights, len(y), int(y.sum()), own, est, mean, scale)


def _reliability(y: npt.NDArray[np.int64], p: F, bins: int = 10) -> list[dict[str, float]]:
    """Held-out rows in bins of predicted probability (deciles of the prediction)."""
    if not len(p):
        return []
    order = np.argsort(p, kind="stable")
    out = []
    for chunk in np.array_split(order, min(bins, len(p))):
        if not len(chunk):
            continue
        out.append(
            {
                "from": float(p[chunk].min()),
                "to": float(p[chunk].max()),
                "rows": len(chunk),
                "predicted": float(p[chunk].mean()),
                "observed": float(y[chunk].mean()),
            }
        )
    return out


def _fit_survival(
    factors: list[str], x: F, duration: F, event: F, seed: int
) -> tuple[dict[str, Any], Any, F, F, list[int]]:
    import pandas as pd
    from lifelines import WeibullAFTFitter

    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    keep = [i for i in range(len(factors)) if scale[i] > 1e-12]
    cols = [f"x{i}" for i in keep]
    frame = pd.DataFrame((x[:, keep] - mean[keep]) / scale[keep], columns=cols)
    frame["T"] = np.maximum(duration, 0.5)
    frame["E"] = event
    model = WeibullAFTFitter(penalizer=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(frame, duration_col="T", event_col="E")
    params = model.params_
    coef = {c: float(params[("lambda_", c)]) for c in cols}
    intercept = float(params[("lambda_", "Intercept")])
    intercept_raw = intercept - sum(coef[f"x{i}"] * mean[i] / scale[i] for i in keep)
    coefficients = {factors[i]: coef[f"x{i}"] / float(scale[i]) for i in keep}
    shape = float(math.exp(float(params[("rho_", "Intercept")])))
    survival = {
        "model": "weibull",
        "intercept": float(intercept_raw),
        "coefficients": coefficients,
        "shape": shape,
        "max_days": MAX_DAYS,
    }
    return survival, model, mean, scale, keep


def survival_days(survival: dict[str, Any], factors: list[str], x: F) -> F:
    """The engine's days-to-event formula (docs/scorecards.md, section 4)."""
    beta = np.array([float(survival["coefficients"].get(f, 0.0)) for f in factors])
    lp = float(survival["intercept"]) + x @ beta
    days = np.exp(lp) * math.log(2) ** (1.0 / float(survival["shape"]))
    return np.asarray(np.minimum(float(survival.get("max_days", MAX_DAYS)), days), np.float64)


async def _rows(conn: psycopg.AsyncConnection[Any], query: Any, params: Any) -> list[Any]:
    cursor = await conn.execute(query, params)
    return list(await cursor.fetchall())


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
    from engine.scorecards.compile import compile_features
    from engine.scorecards.model import parse_scorecard

    parsed = parse_scorecard(definition)
    name = parsed.name
    entity = await catalog.load_entity(conn, parsed.entity_type)
    if entity is None:
        raise FitError(f"entity_type: {parsed.entity_type!r} is not watched")
    now = now or datetime.now(UTC)
    horizon = timedelta(days=horizon_days)
    if as_of is None:
        as_of = now - horizon
    if as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    if as_of + horizon > now + timedelta(seconds=1):
        raise FitError(
            f"--as-of {as_of:%Y-%m-%d} + horizon {horizon_days}d is after now: the outcome"
            " is not observed yet for that window; use an earlier --as-of"
        )
    spec = entity.columns.get(outcome)
    if spec is None:
        raise FitError(f"--outcome: {entity.entity_type} has no column {outcome!r}")
    if spec.kind not in ("date", "timestamp"):
        raise FitError(f"--outcome: {outcome} is {spec.type_sql}, not a date or timestamp")
    if len(entity.pk_columns) != 1:
        raise FitError(f"{entity.entity_type} has a composite key: not supported by fit")
    pk = entity.pk_columns[0]
    created = created_column if created_column in entity.columns else None

    factors = [f["id"] for f in definition["factors"]]
    labels = {f["id"]: f.get("label") or f["id"] for f in definition["factors"]}

    outcome_rows = await _rows(
        conn,
        sql.SQL(
            "SELECT jsonb_build_object({pk_name}, {pk}) AS k, {o}::timestamptz AS o, {c} AS c"
            " FROM {t}"
        ).format(
            pk_name=sql.Literal(pk),
            pk=sql.Identifier(pk),
            o=sql.Identifier(outcome),
            c=sql.SQL("{}::timestamptz").format(sql.Identifier(created))
            if created
            else sql.SQL("NULL::timestamptz"),
            t=entity.table,
        ),
        None,
    )
    facts = {json.dumps(r["k"], sort_keys=True): (r["o"], r["c"]) for r in outcome_rows}
    feedback = await _rows(
        conn,
        db.query("fit_feedback", "churn.sql"),
        {"scorecard": name, "entity_type": entity.entity_type},
    )
    false_positive = {
        json.dumps({pk: _key_value(r["entity_id"])}, sort_keys=True)
        for r in feedback
        if r["label"] == "false_positive"
    }

    keys: list[Any] = []
    snapshot: list[int] = []
    segs: list[str] = []
    xs: list[list[float]] = []
    ys: list[int] = []
    durations: list[float] = []
    events: list[float] = []
    weights: list[float] = []
    excluded = {"outcome before as_of": 0, "created after as_of": 0}
    fb_used = 0
    moments = [as_of - i * horizon for i in range(max(1, snapshots))]
    for n_snap, moment in enumerate(moments):
        query, params = await compile_features(conn, parsed, moment)
        end = moment + horizon
        for r in await _rows(conn, query, params):
            k = json.dumps(r["entity_key"], sort_keys=True)
            happened, born = facts.get(k, (None, None))
            if happened is not None and happened <= moment:
                excluded["outcome before as_of"] += 1
                continue
            if born is not None and born > moment:
                excluded["created after as_of"] += 1
                continue
            positive = happened is not None and happened <= end
            keys.append(r["entity_key"])
            snapshot.append(n_snap)
            segs.append(r["segment"] or "default")
            xs.append([float(r[f]) if r[f] is not None else 0.0 for f in factors])
            ys.append(int(positive))
            if happened is not None:
                durations.append((happened - moment).total_seconds() / 86400)
                events.append(1.0)
            else:
                durations.append((now - moment).total_seconds() / 86400)
                events.append(0.0)
            w = 1.0
            if k in false_positive and not positive:
                w = FEEDBACK_WEIGHT
                fb_used += 1
            weights.append(w)
    if not ys:
        raise FitError(f"scorecard {name}: no {entity.entity_type} was live at {as_of:%Y-%m-%d}")
    x = np.array(xs, dtype=np.float64)
    y = np.array(ys, dtype=np.int64)
    sw = np.array(weights, dtype=np.float64)
    held = np.array([_held_out(k, seed, holdout) for k in keys], dtype=bool)
    train = ~held
    if y[train].sum() < 5 or (1 - y[train]).sum() < 5:
        raise FitError(
            f"scorecard {name}: {int(y[train].sum())} positives among {int(train.sum())}"
            f" training rows at {as_of:%Y-%m-%d} (horizon {horizon_days}d): too few to learn"
        )

    segments = np.array(segs)
    models: dict[str, SegmentModel] = {}
    overall = _fit_logistic("default", factors, x[train], y[train], sw[train], seed, own=False)
    named = [s["name"] for s in definition.get("segments") or []]
    for seg_name in ["default", *named]:
        sel = train & (segments == seg_name)
        if y[sel].sum() >= MIN_SEGMENT_POSITIVES and (1 - y[sel]).sum() >= MIN_SEGMENT_POSITIVES:
            models[seg_name] = _fit_logistic(
                seg_name, factors, x[sel], y[sel], sw[sel], seed, own=True
            )
        else:
            models[seg_name] = SegmentModel(
                seg_name,
                overall.intercept,
                dict(overall.weights),
                int(sel.sum()),
                int(y[sel].sum()),
                False,
                overall.estimator,
                overall.mean,
                overall.scale,
            )

    result = FitResult(
        scorecard=name,
        version=version,
        as_of=as_of,
        horizon_days=horizon_days,
        factors=factors,
        labels=labels,
        keys=keys,
        snapshot=snapshot,
        segments=segs,
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
        feedback_labels=fb_used,
        excluded=excluded,
        definition=definition,
    )
    p_fit = result.probabilities(held)
    p_base = definition_scores(
        definition, [s for s, h in zip(segs, held, strict=True) if h], x[held]
    )
    base_is_prob = definition.get("model", "logistic") == "logistic"
    result.fitted = _quality(y[held], p_fit, True)
    result.baseline = _quality(y[held], p_base, base_is_prob)
    for seg_name in sorted(set(segs)):
        sel = segments[held] == seg_name
        result.fitted_by_segment[seg_name] = _quality(y[held][sel], p_fit[sel], True)
        result.baseline_by_segment[seg_name] = _quality(y[held][sel], p_base[sel], base_is_prob)
    result.reliability = _reliability(y[held], p_fit)
    result.importance = _importance(result, seed)

    try:
        survival, s_model, s_mean, s_scale, s_keep = _fit_survival(
            factors, x[train], np.array(durations)[train], np.array(events)[train], seed
        )
    except Exception as exc:  # lifelines' convergence errors: report, keep the rest
        result.survival_quality = {"error": f"{type(exc).__name__}: {exc}"}
    else:
        from lifelines.utils import concordance_index

        result.survival = survival
        result.survival_model = s_model
        result.survival_inputs = (s_mean, s_scale, s_keep)
        days = survival_days(survival, factors, x[held])
        ev = np.array(events)[held]
        du = np.array(durations)[held]
        result.survival_quality = {
            "concordance": float(concordance_index(du, days, ev)) if ev.sum() else None,
            "median_days": float(np.median(days)) if len(days) else None,
            "median_days_positives": float(np.median(days[y[held] == 1]))
            if y[held].sum()
            else None,
        }
    return result


def _key_value(text: str) -> Any:
    """An entity_id as text back to the JSON value a key holds (ids are numbers)."""
    try:
        return int(text)
    except ValueError:
        return text


def _importance(result: FitResult, seed: int) -> list[dict[str, Any]]:
    """Per factor: the standardised coefficient of the default segment (log-odds per
    standard deviation), its odds ratio, and the held-out AUC lost when the factor's
    values are shuffled."""
    rng = np.random.default_rng(seed)
    held = result.held_out
    y = result.y[held]
    base = _auc(y, result.probabilities(held))
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
                    auc = _auc(y, result.probabilities(held))
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
