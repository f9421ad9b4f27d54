"""The models ``score fit`` learns (``engine.scorecards.fit``) and how they are judged: a
logistic model per segment (scikit-learn, on standardised features, turned back into
weights on the raw features; a segment with too few positives shares the model of every
entity), a Weibull survival model of the days until the outcome (lifelines) and the
engine's formula for its median; AUC, Brier score and the reliability table; a
definition's own scores (the baseline)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

F = npt.NDArray[np.float64]

MIN_SEGMENT_POSITIVES = 15
MAX_DAYS = 3650


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


def roc_auc(y: npt.NDArray[np.int64], p: F) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(set(y.tolist())) < 2:
        return None
    return float(roc_auc_score(y, p))


def quality_of(y: npt.NDArray[np.int64], p: F, probability: bool) -> Quality:
    from sklearn.metrics import brier_score_loss

    brier = float(brier_score_loss(y, p)) if probability and len(y) else None
    return Quality(roc_auc(y, p), brier, len(y), int(y.sum()))


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


def fit_logistic(
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


def reliability_table(y: npt.NDArray[np.int64], p: F, bins: int = 10) -> list[dict[str, float]]:
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


def fit_survival(
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


def segment_models(
    definition: dict[str, Any],
    factors: list[str],
    x: F,
    y: npt.NDArray[np.int64],
    sw: F,
    train: npt.NDArray[np.bool_],
    segments: npt.NDArray[Any],
    seed: int,
) -> dict[str, SegmentModel]:
    """A model per segment (``default`` and the definition's), learnt on the training
    rows: the segment's own where it has ``MIN_SEGMENT_POSITIVES`` of each outcome, else
    the model of every entity."""
    models: dict[str, SegmentModel] = {}
    overall = fit_logistic("default", factors, x[train], y[train], sw[train], seed, own=False)
    named = [s["name"] for s in definition.get("segments") or []]
    for seg_name in ["default", *named]:
        sel = train & (segments == seg_name)
        if y[sel].sum() >= MIN_SEGMENT_POSITIVES and (1 - y[sel]).sum() >= MIN_SEGMENT_POSITIVES:
            models[seg_name] = fit_logistic(
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
    return models
