"""`crmflow score fit` on the generated churn history (engine/scorecards/fit.py): the
fitted model ranks churners above non-churners on held-out accounts and beats the
hand-set weights; the engine's SQL computes exactly the fitted model's probability and
days to churn; nothing is saved unless asked; feedback labels reach the next fit."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from tests.conftest import RUN_ID, janitor, with_dbname

pytest.importorskip("sklearn")
pytest.importorskip("lifelines")

ACCOUNTS = 1200
TODAY = datetime.now(UTC).date()
NOW = datetime(TODAY.year, TODAY.month, TODAY.day, tzinfo=UTC)
CARD = "account_churn_risk"


async def _build(url: str) -> None:
    from engine import churn_history, db
    from engine.config import Settings
    from engine.seed import seed

    async with await db.connect(url, autocommit=True) as conn:
        await seed(conn, Settings(database_url=url))
        await churn_history.generate(conn, ACCOUNTS, seed=17, end=TODAY)


@pytest.fixture(scope="module")
def history_db(server_url: str, postgresql_server: Any, template_db: str) -> Iterator[str]:
    """One database for the module: the example CRM seeded, two years of history."""
    name = f"crmflow_fit_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    with janitor(postgresql_server, name, template=template_db):
        url = with_dbname(server_url, name)
        asyncio.run(_build(url))
        yield url


async def _fit(url: str, **options: Any) -> Any:
    from engine import db
    from engine.scorecards import fit

    async with await db.connect(url, autocommit=True) as conn:
        return await fit.fit(conn, CARD, "churned_at", 90, now=NOW, **options)


@pytest.fixture(scope="module")
def fitted(history_db: str) -> Any:
    return asyncio.run(_fit(history_db))


def test_the_fitted_model_ranks_churners_first_and_beats_the_hand_set_weights(
    fitted: Any,
) -> None:
    held = fitted.held_out
    y = fitted.y[held]
    p = fitted.probabilities(held)
    assert 100 < held.sum() < len(held) and y.sum() >= 30
    # Churners rank above non-churners: AUC, and the mean probability of each group.
    assert fitted.fitted.auc > 0.7, fitted.fitted
    assert p[y == 1].mean() > 1.5 * p[y == 0].mean()
    # Better than the scorecard's hand-set version on the same held-out accounts.
    assert fitted.fitted.auc > fitted.baseline.auc + 0.03, (fitted.fitted, fitted.baseline)
    assert fitted.fitted.brier < fitted.baseline.brier
    # New customers get their own model, better on them than the mature accounts' model.
    new = fitted.models["new_customer"]
    assert new.own and fitted.models["default"].own
    assert new.weights != fitted.models["default"].weights
    seg = np.array(fitted.segments)[held] == "new_customer"
    own = fitted.model_for("new_customer").predict_proba(fitted.x[held][seg])
    shared = fitted.model_for("default").predict_proba(fitted.x[held][seg])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y[seg], own) > roc_auc_score(y[seg], shared)
    # Reliability: every decile, predicted and observed rates close on average.
    bins = fitted.reliability
    assert len(bins) == 10 and sum(b["rows"] for b in bins) == held.sum()
    assert bins[-1]["observed"] > 3 * bins[0]["observed"]
    # Importance: every factor reported; the top ones carry signal.
    assert {i["id"] for i in fitted.importance} == set(fitted.factors)
    assert fitted.importance[0]["auc_drop"] > 0.005
    # Survival: concordant with the observed times to churn.
    assert fitted.survival is not None and fitted.survival_quality["concordance"] > 0.65
    print(
        f"\nAUC held out: fitted {fitted.fitted.auc:.3f}, hand-set {fitted.baseline.auc:.3f};"
        f" Brier {fitted.fitted.brier:.4f} vs {fitted.baseline.brier:.4f};"
        f" rows {len(fitted.y)}, held out {held.sum()}, positives {y.sum()}"
    )


async def test_the_sql_score_is_the_models_probability(history_db: str, fitted: Any) -> None:
    from engine import db
    from engine.scorecards import fit, run, store

    rows = fitted.held_out & (np.array(fitted.snapshot) == 0)
    keys = [k for k, m in zip(fitted.keys, rows, strict=True) if m]
    segments = {s for s, m in zip(fitted.segments, rows, strict=True) if m}
    assert segments == {"default", "new_customer"}
    async with await db.connect(history_db, autocommit=True) as conn:
        before = (await store.get(conn, CARD))["current_version"]
        saved = await fit.save(conn, fitted)
        assert saved.version == before + 1
        await run.score(conn, CARD, keys=keys, as_of=fitted.as_of)
        found = await (
            await conn.execute(
                "SELECT id, churn_score, churn_days FROM accounts WHERE id = ANY(%s)",
                [[k["id"] for k in keys]],
            )
        ).fetchall()
        stored = (await store.get(conn, CARD))["definition"]
    by_id = {r["id"]: r for r in found}
    sql_p = np.array([by_id[k["id"]]["churn_score"] for k in keys], dtype=np.float64)
    model_p = fitted.probabilities(rows)
    assert np.max(np.abs(sql_p - model_p)) < 1e-6
    # Days to churn: the lifelines model's median (the column is an integer).
    sql_days = np.array([by_id[k["id"]]["churn_days"] for k in keys], dtype=np.float64)
    assert np.max(np.abs(sql_days - fitted.survival_median(rows))) <= 0.5 + 1e-6
    # The stored version holds the fitted numbers.
    assert stored["intercept"] == pytest.approx(fitted.models["default"].intercept)
    [segment] = stored["segments"]
    assert segment["weights"] == pytest.approx(fitted.models["new_customer"].weights)
    assert stored["survival"]["shape"] == pytest.approx(fitted.survival["shape"])


def test_the_cli_prints_the_quality_and_saves_only_when_asked(
    history_db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.cli import main
    from engine.config import get_settings

    monkeypatch.setenv("CRMFLOW_DATABASE_URL", history_db)
    monkeypatch.setenv("COLUMNS", "160")
    get_settings.cache_clear()
    as_of = (TODAY - timedelta(days=90)).isoformat()
    base = ["score", "fit", CARD, "--outcome", "churned_at", "--snapshots", "1"]
    try:
        assert main([*base, "--horizon", "90d", "--as-of", as_of]) == 0
        out = capsys.readouterr().out
        for text in ("Held-out quality", "AUC fitted", "Reliability", "Factor importance",
                     "Weibull", "not saved"):  # fmt: skip
            assert text in out, out
        assert main(["score", "show", CARD, "--json"]) == 0
        version = json.loads(capsys.readouterr().out)["current_version"]
        assert main([*base, "--as-of", as_of, "--save", "--json"]) == 0
        saved = json.loads(capsys.readouterr().out)
        assert saved["saved_version"] == version + 1
        assert saved["fitted"]["auc"] > 0.6 and saved["current"]["auc"] is not None
        for argv, reason in (
            ([*base[:4], "name"], "not a date or timestamp"),
            ([*base, "--as-of", TODAY.isoformat()], "not observed yet"),
            (["score", "fit", "nope", "--outcome", "churned_at"], "no scorecard named 'nope'"),
            ([*base, "--as-of", "soon"], "--as-of: 'soon' is not a date"),
        ):
            assert main(argv) == 1, argv
            assert reason in capsys.readouterr().err, argv
    finally:
        get_settings.cache_clear()


async def test_false_positive_labels_weigh_in_the_next_fit(history_db: str, fitted: Any) -> None:
    from engine import db

    # Ten held-in accounts that did not churn, marked as false positives.
    train = ~fitted.held_out & (fitted.y == 0) & (np.array(fitted.snapshot) == 0)
    ids = [k["id"] for k, m in zip(fitted.keys, train, strict=True) if m][:10]
    before = await _fit(history_db, snapshots=1)
    assert before.feedback_labels == 0
    async with await db.connect(history_db, autocommit=True) as conn:
        for i in ids:
            await conn.execute(
                "INSERT INTO crmflow.score_feedback (scorecard, entity_type, entity_id, label)"
                " VALUES (%s, 'account', %s, 'false_positive')",
                [CARD, str(i)],
            )
    again = await _fit(history_db, snapshots=1)
    assert again.feedback_labels == 10
    assert again.models["default"].weights != before.models["default"].weights


def test_fit_refuses_bad_input_with_the_reason() -> None:
    from engine.scorecards.fit import parse_as_of

    assert parse_as_of("2026-01-31") == datetime(2026, 1, 31, tzinfo=UTC)
    with pytest.raises(ValueError, match="not a date"):
        parse_as_of("yesterday")
    assert date.fromisoformat(TODAY.isoformat()) == TODAY
