"""Differential test: the compiled scoring SQL and a Python reference agree on random
accounts, logins and tickets (NULLs, rows on the window boundaries and in the future
included): every factor's value, the segment, the score, the level, the top factors
(ranked in the row up to 12 factors, by a sorted sub-select above) and the days."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import capture, db
from engine.scorecards import relations, run, store
from engine.scorecards.compile import RANKED_FACTORS, compile_features

AS_OF = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
DAY = 86400.0

SCHEMA = """
CREATE TABLE pa (id bigint PRIMARY KEY, created_at timestamptz, arr numeric, csm_id bigint,
                 score double precision, level text, factors jsonb, days numeric);
CREATE TABLE pl (id bigserial PRIMARY KEY, account_id bigint, at timestamptz NOT NULL);
CREATE TABLE pt (id bigserial PRIMARY KEY, account_id bigint, severity integer,
                 at timestamptz NOT NULL);
"""

# (id, aggregate or other kind, details) of the factors; weights are drawn per example.
AGGREGATES: list[tuple[str, dict[str, Any], float]] = [
    ("logins_down", {"relation": "pl", "window": 30 * DAY, "compare_to_previous": True}, 0.0),
    ("logins_ratio", {"relation": "pl", "window": 10 * DAY, "compare_to_previous": "ratio"}, 0.5),
    ("logins_diff", {"relation": "pl", "window": 10 * DAY, "compare_to_previous": "difference"}, 0),
    ("tickets_up", {"relation": "pt", "window": 20 * DAY, "compare_to_previous": "increase"}, 0),
    ("sev_sum", {"relation": "pt", "function": "sum", "column": "severity", "window": 20 * DAY}, 0),
    ("sev_avg", {"relation": "pt", "function": "avg", "column": "severity"}, -1.0),
    (
        "sev_max",
        {
            "relation": "pt",
            "function": "max",
            "column": "severity",
            "window": 20 * DAY,
            "where": [{"field": "severity", "operator": "greater_than", "value": 1}],
        },
        0,
    ),
    (
        "sev_min_diff",
        {
            "relation": "pt",
            "function": "min",
            "column": "severity",
            "window": 15 * DAY,
            "compare_to_previous": "difference",
        },
        0.25,
    ),
    ("sev_count", {"relation": "pt", "column": "severity", "window": 20 * DAY}, 0),
]
ROW_FACTORS: list[tuple[str, dict[str, Any], float]] = [
    ("no_csm", {"condition": [{"field": "csm_id", "operator": "is_empty"}]}, 0),
    ("arr_log", {"expression": {"sql": "ln(1 + coalesce(arr, 0))"}}, 0),
    ("big", {"expression": {"sql": "arr > 5000"}}, 0),
]
BANDS = {"low": 0, "medium": 0.3, "high": 0.6, "critical": 0.8}


def definition(weights: list[float], seg: list[float], model: str, extra: bool) -> dict[str, Any]:
    factors = []
    for (fid, spec, missing), w in zip(AGGREGATES + ROW_FACTORS, weights, strict=True):
        body = {"aggregate": spec} if "relation" in spec else spec
        factors.append({"id": fid, "weight": w, "missing": missing, **body})
    if extra:  # past RANKED_FACTORS: the sorted sub-select ranks the top factors
        factors.append({"id": "zero", "weight": 1.0, "expression": {"sql": "0"}})
    return {
        "name": "prop_sub" if extra else "prop",
        "entity_type": "pa",
        "model": model,
        "intercept": -1.5,
        "factors": factors,
        "segments": [
            {
                "name": "new",
                "when": [{"field": "created_at", "operator": "within_last", "value": "90d"}],
                "intercept": seg[0],
                "weights": {"logins_down": seg[1], "no_csm": seg[2]},
            },
            {
                "name": "large",
                "when": [{"field": "arr", "operator": "greater_than", "value": 100000}],
                "weights": {"arr_log": seg[3]},
            },
        ],
        "bands": BANDS,
        "survival": {
            "intercept": 3.0,
            "coefficients": {"no_csm": -0.5, "logins_down": 0.7, "tickets_up": 40.0},
            "shape": 1.5,
            "max_days": 400,
        },
        "write": {
            "score": "score",
            "level": "level",
            "factors": "factors",
            "days_to_churn": "days",
        },
    }


# ───────────────────────────── the reference ─────────────────────────────


def _in(t: datetime, lo: float | None, hi: float) -> bool:
    """as_of - lo < t <= as_of - hi (lo None: no lower bound)."""
    upper = AS_OF - timedelta(seconds=hi)
    return t <= upper and (lo is None or t > AS_OF - timedelta(seconds=lo))


def _agg(fn: str, column: str | None, rows: list[dict[str, Any]]) -> float | None:
    if column is None:
        return float(len(rows))
    vals = [float(r[column]) for r in rows if r[column] is not None]
    if fn == "count":
        return float(len(vals))
    if not vals:
        return 0.0 if fn == "sum" else None
    if fn == "sum":
        return float(sum(vals))
    if fn == "avg":
        return sum(vals) / len(vals)
    return min(vals) if fn == "min" else max(vals)


def _compare(kind: str, cur: float | None, prev: float | None) -> float | None:
    if kind == "decline":
        return (
            max(0.0, min(1.0, (prev - cur) / prev))
            if prev and prev > 0 and cur is not None
            else 0.0
        )
    if kind == "increase":
        if cur is None or prev is None:
            return 0.0
        return max(0.0, (cur - prev) / max(prev, 1.0))
    if cur is None or prev is None:
        return None
    if kind == "ratio":
        return None if prev == 0 else cur / prev
    return cur - prev


def reference(
    d: dict[str, Any], account: dict[str, Any], signals: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    values: dict[str, float] = {}
    for f in d["factors"]:
        a = f.get("aggregate")
        if a is not None:
            mine = [r for r in signals[a["relation"]] if r["account_id"] == account["id"]]
            if "where" in a:
                mine = [r for r in mine if r["severity"] is not None and r["severity"] > 1]
            fn, col, w = a.get("function", "count"), a.get("column"), a.get("window")
            cur = _agg(fn, col, [r for r in mine if _in(r["at"], w, 0)])
            cmp = a.get("compare_to_previous")
            if cmp is not None:
                kind = "decline" if cmp is True else cmp
                prev = _agg(fn, col, [r for r in mine if _in(r["at"], 2 * w, w)])
                v = _compare(kind, cur, prev)
            else:
                v = cur
        elif "condition" in f:
            v = 1.0 if account["csm_id"] is None else 0.0
        elif f["id"] == "arr_log":
            v = math.log(1 + float(account["arr"] or 0))
        elif f["id"] == "big":
            v = None if account["arr"] is None else float(account["arr"] > 5000)
        else:
            v = 0.0
        values[f["id"]] = f.get("missing", 0.0) if v is None else v
    created, arr = account["created_at"], account["arr"]
    if created is not None and AS_OF - timedelta(days=90) <= created <= AS_OF:
        seg = d["segments"][0]
    elif arr is not None and arr > 100000:
        seg = d["segments"][1]
    else:
        seg = None
    weights = {f["id"]: f["weight"] for f in d["factors"]}
    intercept = d["intercept"]
    if seg is not None:
        weights.update(seg["weights"])
        intercept = seg.get("intercept", intercept)
    contributions = [(f["id"], values[f["id"]] * weights[f["id"]]) for f in d["factors"]]
    lp = intercept
    for _, c in contributions:
        lp += c
    score = 1.0 / (1.0 + math.exp(min(700.0, max(-700.0, -lp)))) if d["model"] == "logistic" else lp
    level = "low"
    for name, bound in BANDS.items():
        if score >= bound:
            level = name
    order = sorted(
        (i for i, (_, c) in enumerate(contributions) if c > 0),
        key=lambda i: (-contributions[i][1], i),
    )[:3]
    sv = d["survival"]
    idx = sv["intercept"]
    for f in d["factors"]:
        if f["id"] in sv["coefficients"]:
            idx += values[f["id"]] * sv["coefficients"][f["id"]]
    days = min(sv["max_days"], math.exp(min(700.0, idx)) * math.log(2) ** (1 / sv["shape"]))
    return {
        "segment": seg["name"] if seg else "default",
        "values": values,
        "score": score,
        "level": level,
        "top": [(contributions[i][0], round(contributions[i][1], 6)) for i in order],
        "days": days,
    }


# ───────────────────────────── the data ─────────────────────────────

offsets = st.one_of(
    st.integers(-2, 70).map(lambda n: n * DAY),  # on the day boundaries of the windows
    st.floats(-2 * DAY, 70 * DAY, allow_nan=False).map(lambda x: float(round(x))),
)
account_rows = st.lists(
    st.fixed_dictionaries(
        {
            "created": st.none() | st.integers(0, 400),
            "arr": st.none()
            | st.sampled_from([Decimal(0), Decimal(5000), Decimal(5001), Decimal(250000)])
            | st.decimals(0, 300000, places=2, allow_nan=False, allow_infinity=False),
            "csm_id": st.none() | st.integers(1, 3),
        }
    ),
    min_size=1,
    max_size=12,
)


def signal_rows(n_accounts: int, with_severity: bool) -> Any:
    account = st.none() | st.integers(1, n_accounts)
    fields: dict[str, Any] = {"account_id": account, "offset": offsets}
    if with_severity:
        fields["severity"] = st.none() | st.integers(0, 4)
    return st.lists(st.fixed_dictionaries(fields), max_size=40)


weight = st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0, 0.3])


@st.composite
def cases(draw: Any) -> dict[str, Any]:
    accounts = draw(account_rows)
    return {
        "accounts": accounts,
        "logins": draw(signal_rows(len(accounts), False)),
        "tickets": draw(signal_rows(len(accounts), True)),
        "weights": draw(st.lists(weight, min_size=12, max_size=12)),
        "segment": draw(st.lists(weight, min_size=4, max_size=4)),
        "model": draw(st.sampled_from(["logistic", "points"])),
    }


@pytest.fixture
def prop_url(db_url: str) -> str:
    async def setup() -> None:
        async with await db.connect(db_url, autocommit=True) as conn:
            await conn.execute(SCHEMA)
            await capture.watch(conn, "pa")
            await relations.add_relation(conn, "pl", "pa", "account_id", "at")
            await relations.add_relation(conn, "pt", "pa", "account_id", "at")

    asyncio.run(setup())
    return db_url


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_scoring_sql_agrees_with_reference(prop_url: str, case: dict[str, Any]) -> None:
    assert len(AGGREGATES) + len(ROW_FACTORS) == RANKED_FACTORS
    accounts = [
        {
            "id": i + 1,
            "created_at": None if a["created"] is None else AS_OF - timedelta(days=a["created"]),
            "arr": a["arr"],
            "csm_id": a["csm_id"],
        }
        for i, a in enumerate(case["accounts"])
    ]
    signals = {
        "pl": [
            {"account_id": r["account_id"], "at": AS_OF - timedelta(seconds=r["offset"])}
            for r in case["logins"]
        ],
        "pt": [
            {
                "account_id": r["account_id"],
                "severity": r["severity"],
                "at": AS_OF - timedelta(seconds=r["offset"]),
            }
            for r in case["tickets"]
        ],
    }
    asyncio.run(_check(prop_url, case, accounts, signals))


async def _check(
    url: str, case: dict[str, Any], accounts: list[dict[str, Any]], signals: dict[str, Any]
) -> None:
    async with await db.connect(url, autocommit=True) as conn:
        await conn.execute("TRUNCATE pa, pl, pt")
        await conn.execute("DELETE FROM crmflow.score_latest")
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO pa (id, created_at, arr, csm_id) VALUES "
                "(%(id)s, %(created_at)s, %(arr)s, %(csm_id)s)",
                accounts,
            )
            await cur.executemany(
                "INSERT INTO pl (account_id, at) VALUES (%(account_id)s, %(at)s)", signals["pl"]
            )
            await cur.executemany(
                "INSERT INTO pt (account_id, severity, at) VALUES "
                "(%(account_id)s, %(severity)s, %(at)s)",
                signals["pt"],
            )
        for extra in (False, True):
            weights = case["weights"]
            d = definition(weights, case["segment"], case["model"], extra)
            await store.apply(conn, d)
            card = await store.load(conn, d["name"])
            query, params = await compile_features(conn, card, AS_OF)
            features = {
                r["entity_key"]["id"]: r
                for r in await (await conn.execute(query, params)).fetchall()
            }
            await conn.execute(
                "UPDATE pa SET score = NULL, level = NULL, factors = NULL, days = NULL"
            )
            await run.score(conn, card, as_of=AS_OF)
            rows = {r["id"]: r for r in await (await conn.execute("SELECT * FROM pa")).fetchall()}
            for a in accounts:
                ref = reference(d, a, signals)
                got, feat = rows[a["id"]], features[a["id"]]
                where = f"account {a} ({'sub-select' if extra else 'ranked'})"
                assert feat["segment"] == ref["segment"], where
                for fid, v in ref["values"].items():
                    assert _close(feat[fid], v), (where, fid, feat[fid], v)
                assert _close(got["score"], ref["score"]), (where, got["score"], ref["score"])
                if all(abs(ref["score"] - b) > 1e-9 for b in BANDS.values()):
                    assert got["level"] == ref["level"], where
                top = [(f["id"], round(f["contribution"], 6)) for f in got["factors"]]
                assert [t[0] for t in top] == [t[0] for t in ref["top"]], (where, top, ref["top"])
                assert all(_close(x[1], y[1]) for x, y in zip(top, ref["top"], strict=True))
                assert math.isclose(float(got["days"]), ref["days"], rel_tol=1e-9), where
