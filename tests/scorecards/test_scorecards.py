"""Scorecards (docs/scorecards.md): validation naming paths, scoring and its history,
segments, versions, writes captured as crmflow's (a level change fires a workflow),
real-time rescoring after a signal-table insert, lead scoring as a scorecard, the API."""

from __future__ import annotations

import asyncio
import copy
import json
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from engine import capture, db
from engine.actions.qualify_lead import Weights, score_lead
from engine.scorecards import relations, run, store
from engine.scorecards.compile import compile_features
from engine.scorecards.model import ScorecardError, parse_scorecard
from tests.helpers import apply, fetch, value, wait_until
from tests.paths import REPO
from tests.scorecards import worker_script

AS_OF = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
EXAMPLES = REPO / "examples" / "scorecards"

SCHEMA = """
CREATE TABLE sc_accounts (
    id bigint PRIMARY KEY, name text, created_at timestamptz NOT NULL DEFAULT now(),
    arr numeric, csm_id bigint, churn_score double precision, churn_risk text,
    churn_factors jsonb, churn_days numeric, employees integer, risk_enum churn_risk_level);
CREATE TABLE sc_logins (id bigserial PRIMARY KEY, account_id bigint,
                        occurred_at timestamptz NOT NULL);
CREATE TABLE sc_tickets (id bigserial PRIMARY KEY, account_id bigint, severity integer,
                         opened_at timestamptz NOT NULL);
"""

CARD: dict[str, Any] = {
    "name": "churn",
    "entity_type": "sc_account",
    "intercept": -2.0,
    "factors": [
        {
            "id": "logins_down",
            "label": "Login frequency down",
            "weight": 1.2,
            "aggregate": {
                "relation": "logins",
                "function": "count",
                "window": "30d",
                "compare_to_previous": True,
            },
        },
        {
            "id": "tickets_up",
            "label": "Support tickets up",
            "weight": 0.9,
            "aggregate": {"relation": "tickets", "function": "count", "window": "30d"},
        },
        {
            "id": "no_csm",
            "label": "No CSM",
            "weight": 0.5,
            "condition": [{"field": "csm_id", "operator": "is_empty"}],
        },
        {"id": "arr_scaled", "weight": -0.1, "expression": {"sql": "ln(1 + coalesce(arr, 0))"}},
    ],
    "bands": {"low": 0, "medium": 0.3, "high": 0.6, "critical": 0.8},
    "write": {"score": "churn_score", "level": "churn_risk", "factors": "churn_factors"},
}


@pytest.fixture
async def sc(conn: psycopg.AsyncConnection[Any]) -> psycopg.AsyncConnection[Any]:
    """Accounts (watched as sc_account) with logins and tickets as relations."""
    await conn.execute(SCHEMA)
    await capture.watch(conn, "sc_accounts", entity="sc_account")
    await relations.add_relation(
        conn, "sc_logins", "sc_account", "account_id", "occurred_at", name="logins"
    )
    await relations.add_relation(
        conn, "sc_tickets", "sc_account", "account_id", "opened_at", name="tickets"
    )
    return conn


def card(**changes: Any) -> dict[str, Any]:
    c = copy.deepcopy(CARD)
    c.update(changes)
    return c


async def issues_of(
    conn: psycopg.AsyncConnection[Any], definition: dict[str, Any]
) -> dict[str, str]:
    with pytest.raises(ScorecardError) as caught:
        await store.apply(conn, definition)
    return {i.path: i.message for i in caught.value.issues}


# ───────────────────────────── validation ─────────────────────────────


def test_parse_errors_name_their_paths() -> None:
    bad = card(
        bands={"low": 0, "high": 0.6, "medium": 0.3},
        segments=[{"name": "new", "when": [], "weights": {"nope": 1}}],
        extra=1,
    )
    bad["factors"][0]["aggregate"]["window"] = "3x"
    with pytest.raises(ScorecardError) as caught:
        parse_scorecard(bad)
    paths = {i.path: i.message for i in caught.value.issues}
    assert (
        "factors[0].aggregate.window" in paths
        and "not a duration" in (paths["factors[0].aggregate.window"])
    )
    assert paths["extra"] == "unknown field"
    bad = card(
        bands={"low": 0, "high": 0.6, "medium": 0.3},
        segments=[{"name": "new", "when": [], "weights": {"nope": 1}}],
    )
    with pytest.raises(ScorecardError) as caught:
        parse_scorecard(bad)
    paths = {i.path: i.message for i in caught.value.issues}
    assert "bounds must increase" in paths["bands.medium"]
    assert paths["segments[0].weights.nope"] == "no factor 'nope'"
    twice = card()
    twice["factors"].append({"id": "no_csm", "condition": []})
    twice["factors"].append({"id": "both", "condition": [], "expression": {"sql": "1"}})
    with pytest.raises(ScorecardError) as caught:
        parse_scorecard(twice)
    paths = {i.path: i.message for i in caught.value.issues}
    assert "factors[5]" in paths and "exactly one of" in paths["factors[5]"]


async def test_catalog_errors_name_their_paths(sc: psycopg.AsyncConnection[Any]) -> None:
    bad = card(write={"score": "nope", "level": "arr", "factors": "name"})
    bad["factors"][0]["aggregate"]["relation"] = "visits"
    bad["factors"][1]["aggregate"]["column"] = "missing_col"
    bad["factors"][1]["aggregate"]["function"] = "sum"
    bad["factors"][2]["condition"] = [{"field": "csm", "operator": "is_empty"}]
    bad["factors"][3]["expression"] = {"sql": "ln(1 + revenue)"}
    paths = await issues_of(sc, bad)
    assert "no relation 'visits'" in paths["factors[0].aggregate.relation"]
    assert "no column 'missing_col'" in paths["factors[1].aggregate.column"]
    assert "no field 'csm'" in paths["factors[2].condition[0].field"]
    assert "revenue" in paths["factors[3].expression.sql"]
    assert "no column 'nope'" in paths["write.score"]
    assert "needs a text or an enum column" in paths["write.level"]
    assert "needs a json/jsonb column" in paths["write.factors"]
    # An enum level column must hold every band.
    paths = await issues_of(sc, card(write={"level": "risk_enum"}, bands={"low": 0, "severe": 1}))
    assert "without the label 'severe'" in paths["write.level"]
    # The entity must be watched; windows need a time column; no reading what is written.
    paths = await issues_of(sc, card(entity_type="nothing"))
    assert "not a watched entity" in paths["entity_type"]
    paths = await issues_of(sc, card(write={"score": "arr"}))
    assert "also read" in paths["write.score"]
    assert await value(sc, "SELECT count(*) FROM crmflow.scorecards") == 0


async def test_relation_checks(sc: psycopg.AsyncConnection[Any]) -> None:
    with pytest.raises(ScorecardError, match="no column 'acct'"):
        await relations.add_relation(sc, "sc_logins", "sc_account", "acct")
    with pytest.raises(ScorecardError, match="not a date or timestamp"):
        await relations.add_relation(sc, "sc_tickets", "sc_account", "account_id", "severity")
    with pytest.raises(ScorecardError, match="not a watched entity"):
        await relations.add_relation(sc, "sc_logins", "nobody", "account_id")
    await store.apply(sc, card())
    with pytest.raises(ScorecardError, match="used by churn"):
        await relations.remove_relation(sc, "sc_account", "logins")


# ───────────────────────────── scoring ─────────────────────────────


async def _seed(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute(
        "INSERT INTO sc_accounts (id, name, created_at, arr, csm_id) VALUES "
        "(1, 'quiet', %(old)s, 1000, NULL), (2, 'busy', %(old)s, 50000, 7), "
        "(3, 'fresh', %(new)s, NULL, NULL)",
        {"old": AS_OF - timedelta(days=400), "new": AS_OF - timedelta(days=10)},
    )
    # Account 1: 10 logins in the previous 30 days, 2 in the last 30: logins down 80%.
    # Account 2: 10 and 10. Account 3: none at all.
    rows = [(1, AS_OF - timedelta(days=31 + i)) for i in range(10)]
    rows += [(1, AS_OF - timedelta(days=1 + i)) for i in range(2)]
    rows += [(2, AS_OF - timedelta(days=31 + i)) for i in range(10)]
    rows += [(2, AS_OF - timedelta(days=1 + i)) for i in range(10)]
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO sc_logins (account_id, occurred_at) VALUES (%s, %s)", rows
        )
    await conn.execute(
        "INSERT INTO sc_tickets (account_id, severity, opened_at) VALUES "
        "(1, 3, %(t)s), (1, 1, %(t)s), (1, 2, %(t)s), (2, 1, %(old)s)",
        {"t": AS_OF - timedelta(days=2), "old": AS_OF - timedelta(days=60)},
    )


def _logistic(lp: float) -> float:
    import math

    return 1 / (1 + math.exp(-lp))


async def test_score_history_and_change(sc: psycopg.AsyncConnection[Any]) -> None:
    import math

    await _seed(sc)
    saved = await store.apply(sc, card())
    assert (saved.version, saved.created, saved.changed) == (1, True, True)
    first = await run.score(sc, "churn", as_of=AS_OF)
    assert (first.scored, first.updated, first.history_rows) == (3, 3, 3)
    rows = {r["id"]: r for r in await fetch(sc, "SELECT * FROM sc_accounts ORDER BY id")}
    lp1 = -2.0 + 1.2 * 0.8 + 0.9 * 3 + 0.5 - 0.1 * math.log(1001)
    assert rows[1]["churn_score"] == pytest.approx(_logistic(lp1))
    assert rows[1]["churn_risk"] == "critical"
    assert [f["id"] for f in rows[1]["churn_factors"]] == ["tickets_up", "logins_down", "no_csm"]
    assert rows[1]["churn_factors"][0] == {
        "id": "tickets_up",
        "label": "Support tickets up",
        "value": 3.0,
        "contribution": 2.7,
    }
    lp2 = -2.0 - 0.1 * math.log(50001)
    assert rows[2]["churn_score"] == pytest.approx(_logistic(lp2))
    assert rows[2]["churn_risk"] == "low" and rows[2]["churn_factors"] == []
    # Nothing changed: nothing written, no history.
    again = await run.score(sc, "churn", as_of=AS_OF)
    assert (again.scored, again.updated, again.history_rows) == (3, 0, 0)
    # Account 1 gets a CSM: its score drops; one history row with the change.
    await sc.execute("UPDATE sc_accounts SET csm_id = 9 WHERE id = 1")
    third = await run.score(sc, "churn", as_of=AS_OF)
    assert (third.updated, third.history_rows) == (1, 1)
    hist = await fetch(
        sc,
        "SELECT * FROM crmflow.score_history WHERE entity_key = '{\"id\": 1}' ORDER BY id",
    )
    assert len(hist) == 2
    assert hist[0]["previous_score"] is None and hist[0]["change"] is None
    assert hist[1]["previous_score"] == pytest.approx(_logistic(lp1))
    assert hist[1]["score"] == pytest.approx(_logistic(lp1 - 0.5))
    assert hist[1]["change"] == pytest.approx(_logistic(lp1 - 0.5) - _logistic(lp1))
    assert hist[1]["contributions"]["no_csm"] == 0
    assert hist[1]["contributions"]["tickets_up"] == pytest.approx(2.7)
    assert hist[1]["entity_type"] == "sc_account" and hist[1]["version"] == 1
    # The features as of a date before the logins: all zero but the row factors.
    query, params = await compile_features(
        sc, await store.load(sc, "churn"), AS_OF - timedelta(days=100)
    )
    features = {r["entity_key"]["id"]: r for r in await fetch_q(sc, query, params)}
    assert features[1]["logins_down"] == 0 and features[1]["tickets_up"] == 0
    assert features[1]["no_csm"] == 0 and features[3]["no_csm"] == 1
    assert features[1]["segment"] == "default"
    query, params = await compile_features(sc, await store.load(sc, "churn"), AS_OF)
    features = {r["entity_key"]["id"]: r for r in await fetch_q(sc, query, params)}
    assert features[1]["logins_down"] == pytest.approx(0.8)
    assert features[1]["tickets_up"] == 3 and features[2]["tickets_up"] == 0
    # A deleted account loses its current score (by key, and in a whole-table run), keeps
    # its history.
    await sc.execute("DELETE FROM sc_accounts WHERE id IN (2, 3)")
    await run.score(sc, "churn", keys=[{"id": 2}], as_of=AS_OF)
    latest = "SELECT entity_key ->> 'id' AS id FROM crmflow.score_latest ORDER BY 1"
    assert [r["id"] for r in await fetch(sc, latest)] == ["1", "3"]
    await run.score(sc, "churn", as_of=AS_OF)
    assert [r["id"] for r in await fetch(sc, latest)] == ["1"]
    assert await value(sc, "SELECT count(DISTINCT entity_key) FROM crmflow.score_history") == 3


async def fetch_q(conn: psycopg.AsyncConnection[Any], query: Any, params: Any) -> list[Any]:
    return await (await conn.execute(query, params)).fetchall()


async def test_segments_and_survival(sc: psycopg.AsyncConnection[Any]) -> None:
    import math

    await _seed(sc)
    await sc.execute("ALTER TABLE sc_accounts ADD COLUMN score_text text")
    definition = card(
        segments=[
            {
                "name": "new_customer",
                "when": [{"field": "created_at", "operator": "within_last", "value": "90d"}],
                "intercept": -1.0,
                "weights": {"no_csm": 2.0},
            },
            {"name": "rest"},
        ],
        survival={"intercept": 5.0, "coefficients": {"no_csm": -1.0}, "shape": 2.0},
        write={"score": "churn_score", "level": "churn_risk", "days_to_churn": "churn_days"},
    )
    await store.apply(sc, definition)
    await run.score(sc, "churn", as_of=AS_OF)
    latest = {
        r["entity_key"]["id"]: r
        for r in await fetch(sc, "SELECT * FROM crmflow.score_latest ORDER BY entity_key")
    }
    assert latest[3]["segment"] == "new_customer" and latest[1]["segment"] == "rest"
    # The new customer: intercept -1, no_csm weighs 2 (others keep theirs; arr is NULL).
    assert latest[3]["lp"] == pytest.approx(-1.0 + 2.0)
    assert latest[1]["lp"] == pytest.approx(-2.0 + 1.2 * 0.8 + 2.7 + 0.5 - 0.1 * math.log(1001))
    days = {
        r["id"]: r["churn_days"] for r in await fetch(sc, "SELECT id, churn_days FROM sc_accounts")
    }
    median = math.log(2) ** (1 / 2.0)
    assert float(days[3]) == pytest.approx(math.exp(5.0 - 1.0) * median)
    assert float(days[2]) == pytest.approx(math.exp(5.0) * median)


async def test_versions(sc: psycopg.AsyncConnection[Any]) -> None:
    await _seed(sc)
    assert (await store.apply(sc, card())).version == 1
    same = await store.apply(sc, card())
    assert (same.version, same.changed, same.created) == (1, False, False)
    changed = card(intercept=-1.0)
    assert (await store.apply(sc, changed)).version == 2
    await run.score(sc, "churn", as_of=AS_OF)
    got = await store.get(sc, "churn")
    assert got["current_version"] == 2 and [v["version"] for v in got["versions"]] == [1, 2]
    assert got["definition"]["intercept"] == -1.0
    assert sorted(got["columns_read"]) == ["arr", "csm_id", "id"]
    assert await value(sc, "SELECT DISTINCT version FROM crmflow.score_history") == 2
    # Status is not part of the version.
    assert (await store.apply(sc, {**changed, "status": "paused"})).version == 2
    assert (await store.get(sc, "churn"))["status"] == "paused"


async def test_level_change_fires_a_field_updated_workflow(
    sc: psycopg.AsyncConnection[Any], matcher: Any
) -> None:
    await _seed(sc)
    await sc.execute("INSERT INTO users (id, name, role) VALUES (1, 'Carl', 'csm')")
    wf = await apply(
        sc,
        {
            "name": "risk went up",
            "trigger": {
                "type": "field_updated",
                "entity_type": "sc_account",
                "field": "churn_risk",
            },
            "actions": [
                {
                    "type": "create_task",
                    "params": {"title": "call {{ entity.name }}", "assignee": 1},
                }
            ],
        },
    )
    await store.apply(sc, card())
    await matcher.drain()
    await run.score(sc, "churn", as_of=AS_OF)
    await matcher.drain()
    enrolled = await fetch(
        sc,
        "SELECT x.entity_pk, x.depth, o.actor FROM crmflow.executions AS x "
        "JOIN crmflow.outbox AS o ON o.id = x.event_id WHERE x.workflow_id = %s "
        "ORDER BY x.entity_pk",
        wf,
    )
    # Every account went from NULL to a level: each is a captured update by crmflow.
    assert [e["entity_pk"]["id"] for e in enrolled] == [1, 2, 3]
    assert {(e["depth"], e["actor"]) for e in enrolled} == {(1, "crmflow:scorecard:churn")}
    # A rescore that changes the score but not the level fires nothing new.
    await sc.execute("UPDATE sc_accounts SET arr = 60000 WHERE id = 2")
    await matcher.drain()
    await run.score(sc, "churn", as_of=AS_OF)
    await matcher.drain()
    assert (
        await value(sc, "SELECT count(*) FROM crmflow.executions WHERE workflow_id = %s", wf) == 3
    )


@pytest.mark.parametrize("then", ["rerun", "pending_pass"])
async def test_writes_skip_rows_a_writer_holds(
    sc: psycopg.AsyncConnection[Any], db_url: str, then: str
) -> None:
    """Held rows are skipped and marked pending; the next run, or the worker's pending
    pass once the writer lets go, writes them."""
    await _seed(sc)
    await store.apply(sc, card())
    loaded = await store.load(sc, "churn")
    async with await psycopg.AsyncConnection.connect(db_url) as writer:
        await writer.execute("UPDATE sc_accounts SET name = 'held' WHERE id = 2")
        result = await run.score(sc, "churn", as_of=AS_OF)  # does not wait for the writer
        assert (result.updated, result.skipped_locked) == (2, 1)
        if then == "pending_pass":  # still held: skipped again, still pending
            assert await run.write_pending(sc, loaded) == (0, 1)
        await writer.commit()
    assert await value(sc, "SELECT count(*) FROM crmflow.score_latest WHERE pending") == 1
    if then == "rerun":
        result = await run.score(sc, "churn", as_of=AS_OF)
        assert (result.updated, result.skipped_locked) == (1, 0)
    else:
        assert await run.write_pending(sc, loaded) == (1, 0)
    assert await value(sc, "SELECT count(*) FROM crmflow.score_latest WHERE pending") == 0
    assert await value(sc, "SELECT count(*) FROM sc_accounts WHERE churn_risk IS NULL") == 0
    # A pending row whose entity no longer differs (a writer set the same values) is
    # cleared without a write.
    await sc.execute(
        "UPDATE crmflow.score_latest SET pending = true WHERE entity_key = '{\"id\": 1}'"
    )
    assert await run.write_pending(sc, loaded) == (0, 0)
    assert await value(sc, "SELECT count(*) FROM crmflow.score_latest WHERE pending") == 0


async def test_writes_by_row_id_leave_rows_rescored_since_alone(
    sc: psycopg.AsyncConnection[Any],
) -> None:
    """The entity writes fetch the results by row id: a result replaced since (another
    run rescored the entity, and wrote it) is not found at its old id, so an older
    value never overwrites a newer one."""
    await _seed(sc)
    await store.apply(sc, card())
    loaded = await store.load(sc, "churn")
    await run.score(sc, "churn", as_of=AS_OF)
    old = await fetch(
        sc, "SELECT ctid::text AS row_id, score FROM crmflow.score_latest ORDER BY entity_key"
    )
    await sc.execute("UPDATE sc_accounts SET arr = 1 WHERE id = 2")
    await run.score(sc, "churn", as_of=AS_OF)
    newer = await value(sc, "SELECT churn_score FROM sc_accounts WHERE id = 2")
    # The old results' row ids, written again, change nothing (the rescored one is
    # gone from its id; the others do not differ).
    await sc.execute("UPDATE sc_accounts SET churn_score = NULL WHERE id = 2")
    assert await run.write_rows(sc, loaded, [r["row_id"] for r in old]) == (0, 0)
    assert await value(sc, "SELECT churn_score FROM sc_accounts WHERE id = 2") is None
    assert newer != old[1]["score"]  # account 2's result did change


async def test_writes_leave_a_result_another_run_is_replacing_to_that_run(
    sc: psycopg.AsyncConnection[Any], db_url: str
) -> None:
    """A result whose row another run is replacing right now (its scoring statement holds
    the row) is not waited for and not written: that run writes its newer result."""
    await _seed(sc)
    await store.apply(sc, card())
    loaded = await store.load(sc, "churn")
    await run.score(sc, "churn", as_of=AS_OF)
    rows = [
        r["row_id"]
        for r in await fetch(sc, "SELECT ctid::text AS row_id FROM crmflow.score_latest")
    ]
    await sc.execute("UPDATE sc_accounts SET churn_score = NULL WHERE id = 2")
    async with await psycopg.AsyncConnection.connect(db_url) as other_run:
        await other_run.execute(
            "UPDATE crmflow.score_latest SET scored_at = now() WHERE entity_key = '{\"id\": 2}'"
        )
        assert await asyncio.wait_for(run.write_rows(sc, loaded, rows), timeout=5) == (0, 0)
        assert await value(sc, "SELECT churn_score FROM sc_accounts WHERE id = 2") is None
        await other_run.rollback()
    assert await run.write_rows(sc, loaded, rows) == (1, 0)
    assert await value(sc, "SELECT churn_score FROM sc_accounts WHERE id = 2") is not None


async def test_careful_writes_do_not_hold_up_inserts_referencing_the_rows(
    sc: psycopg.AsyncConnection[Any], db_url: str
) -> None:
    """The careful chunk locks the rows it writes as the UPDATE does (FOR NO KEY UPDATE):
    the CRM's insert of a row referencing one of them (its foreign-key check takes KEY
    SHARE) goes on meanwhile; FOR UPDATE made it wait for the chunk."""
    from engine.scorecards.compile import compile_write_chunk

    await _seed(sc)
    await store.apply(sc, card())
    loaded = await store.load(sc, "churn")
    await run.score(sc, "churn", as_of=AS_OF)
    await sc.execute(
        "CREATE TABLE sc_notes (id serial PRIMARY KEY, account_id bigint REFERENCES sc_accounts)"
    )
    await sc.execute("UPDATE sc_accounts SET churn_score = NULL")
    rows = [
        r["row_id"]
        for r in await fetch(sc, "SELECT ctid::text AS row_id FROM crmflow.score_latest")
    ]
    async with sc.transaction():
        cur = await sc.execute(
            compile_write_chunk(loaded), {"scorecard_id": loaded.id, "rows": rows}
        )
        assert (await cur.fetchone() or {})["written"] == 3
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as crm:
            await crm.execute("SET lock_timeout = '1s'")
            await crm.execute("INSERT INTO sc_notes (account_id) VALUES (2)")


async def test_writes_that_fail_leave_their_rows_pending(
    sc: psycopg.AsyncConnection[Any], db_url: str
) -> None:
    """A chunk that cannot be written at all (the CRM table locked against writes past
    the lock timeout) raises, and the rows not written yet are marked pending: the worker's
    pending pass writes them, not only the next run (a day later for a daily batch)."""
    await _seed(sc)
    await store.apply(sc, card())
    loaded = await store.load(sc, "churn")
    async with await psycopg.AsyncConnection.connect(db_url) as ddl:
        # SHARE: reads go on (the scoring statement), writes wait.
        await ddl.execute("LOCK TABLE sc_accounts IN SHARE MODE")
        await sc.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            await run.score(sc, loaded, as_of=AS_OF)
        await sc.execute("RESET lock_timeout")
        await ddl.rollback()
    assert await value(sc, "SELECT count(*) FROM crmflow.score_latest WHERE pending") == 3
    assert await run.write_pending(sc, loaded) == (3, 0)
    assert await value(sc, "SELECT count(*) FROM sc_accounts WHERE churn_risk IS NULL") == 0


async def test_a_scorecard_deleted_by_hand_takes_its_scores_with_it(
    sc: psycopg.AsyncConnection[Any],
) -> None:
    await _seed(sc)
    await store.apply(sc, card())
    await run.score(sc, "churn", as_of=AS_OF)
    assert await value(sc, "SELECT count(*) FROM crmflow.score_history") == 3
    await sc.execute("DELETE FROM crmflow.scorecards WHERE name = 'churn'")
    assert await value(sc, "SELECT count(*) FROM crmflow.score_latest") == 0
    assert await value(sc, "SELECT count(*) FROM crmflow.score_history") == 0


async def test_realtime_rescore_after_a_signal_insert(
    sc: psycopg.AsyncConnection[Any], worker: Any
) -> None:
    await _seed(sc)
    await store.apply(sc, card(realtime=True))
    await run.score(sc, "churn")
    before = await value(sc, "SELECT churn_score FROM sc_accounts WHERE id = 2")
    # Five new tickets for account 2: the worker's matcher queues it, its scorecard loop
    # rescores it.
    await sc.execute(
        "INSERT INTO sc_tickets (account_id, severity, opened_at) "
        "SELECT 2, 1, now() FROM generate_series(1, 5)"
    )

    async def rescored() -> bool:
        now = await value(sc, "SELECT churn_score FROM sc_accounts WHERE id = 2")
        return bool(now is not None and now > before)

    await wait_until(rescored, timeout=15)
    hist = await fetch(
        sc,
        "SELECT * FROM crmflow.score_history WHERE entity_key = '{\"id\": 2}' ORDER BY id",
    )
    assert hist[-1]["previous_score"] == pytest.approx(before)
    assert hist[-1]["contributions"]["tickets_up"] == pytest.approx(0.9 * 5)
    # An update of a column the scorecard reads rescores the account too.
    await sc.execute("UPDATE sc_accounts SET csm_id = NULL WHERE id = 2")

    async def no_csm() -> bool:
        return bool(
            await value(
                sc,
                "SELECT contributions ->> 'no_csm' FROM crmflow.score_history "
                "WHERE entity_key = '{\"id\": 2}' ORDER BY id DESC LIMIT 1",
            )
            == "0.5"
        )

    await wait_until(no_csm, timeout=15)


# ───────────────────────────── lead scoring ─────────────────────────────


def _lead_rows(n: int) -> list[dict[str, Any]]:
    rng = random.Random(17)
    sources = ["referral", "website_form", "partner", "event", "webinar", "cold_call", None, "x"]
    emails = ["a@gmail.com", "b@acme.io", "c@Yahoo.com", "nobody", None, "d@big.co.uk", "@"]
    titles = ["CEO", "Coordinator", "VP Sales", "head of ops", "Contractor", None, "Director"]
    return [
        {
            "id": i + 1,
            "name": f"lead {i}",
            "source": rng.choice(sources),
            "company": rng.choice(["Acme", "", "  ", None, "Big"]),
            "email": rng.choice(emails),
            "title": rng.choice(titles),
            "employees": rng.choice([None, 10, 50, 51, 500]),
        }
        for i in range(n)
    ]


async def test_lead_scoring_as_a_scorecard(conn: psycopg.AsyncConnection[Any]) -> None:
    """examples/scorecards/lead_score.yaml gives the score qualify_lead gives, and the
    status it sets, on varied leads."""
    import yaml

    from engine.seed import install_example_crm  # noqa: F401 (the template has the CRM)

    await capture.watch(conn, "leads")
    leads = _lead_rows(60)
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO leads (id, name, source, company, email, title, employees) "
            "VALUES (%(id)s, %(name)s, %(source)s, %(company)s, %(email)s, %(title)s, "
            "%(employees)s)",
            leads,
        )
    definition = yaml.safe_load((EXAMPLES / "lead_score.yaml").read_text())
    await store.apply(conn, definition)
    await run.score(conn, "lead_score")
    got = {r["id"]: r for r in await fetch(conn, "SELECT id, score, status FROM leads")}
    for lead in leads:
        expected, _ = score_lead(lead, Weights())
        assert got[lead["id"]]["score"] == expected, lead
        assert got[lead["id"]]["status"] == ("qualified" if expected >= 50 else "nurture")


# ───────────────────────────── API ─────────────────────────────


async def test_api_put_get_run(sc: psycopg.AsyncConnection[Any], client: Any) -> None:
    await _seed(sc)
    body = card()
    del body["name"]
    r = await client.put("/scorecards/churn", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["current_version"] == 1
    r = await client.post("/scorecards/churn/run", json={"keys": [{"id": 1}]})
    assert r.status_code == 200, r.text
    assert r.json()["scored"] == 1
    r = await client.get("/scorecards")
    assert [s["name"] for s in r.json()] == ["churn"] and r.json()[0]["scored"] == 1
    bad = copy.deepcopy(body)
    bad["factors"][0]["aggregate"]["window"] = "soon"
    r = await client.put("/scorecards/churn", json=bad)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    assert [e["path"] for e in r.json()["errors"]] == ["factors[0].aggregate.window"]
    assert (await client.get("/scorecards/nope")).status_code == 404
    spec = (await client.get("/openapi.json")).json()
    assert "/scorecards/{name}/run" in spec["paths"]
    assert json.dumps(spec["paths"]["/scorecards/{name}"]["put"]).count("Create or update") == 1


# ───────────────────────────── bench ─────────────────────────────


async def test_bench_sc1_at_a_tiny_size(server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import harness
    from bench.targets import sc1

    monkeypatch.setattr(harness, "server_url", lambda: server_url)
    result = await sc1(True, accounts=300)
    assert result.id == "SC1" and result.value > 0
    assert result.detail["accounts"] == 300 and result.detail["history_rows"] == 300
    assert sum(result.detail["levels"].values()) == 300


async def test_own_writes_do_not_queue_a_rescore(
    sc: psycopg.AsyncConnection[Any], matcher: Any
) -> None:
    """A real-time scorecard's writes of its columns are captured (workflows may react)
    but queue no rescore of the same entities: they change nothing it reads."""
    await _seed(sc)
    await store.apply(sc, card(realtime=True))
    await matcher.drain()
    await sc.execute("DELETE FROM crmflow.score_queue")
    result = await run.score(sc, "churn", as_of=AS_OF)
    assert result.updated == 3
    await matcher.drain()
    assert await value(sc, "SELECT count(*) FROM crmflow.score_queue") == 0
    # A person's write of a column it reads does.
    await sc.execute("UPDATE sc_accounts SET arr = 1 WHERE id = 3")
    await matcher.drain()
    assert [r["entity_key"] for r in await fetch(sc, "SELECT * FROM crmflow.score_queue")] == [
        {"id": 3}
    ]


async def test_a_failing_realtime_rescore_keeps_its_keys_and_backs_off(
    sc: psycopg.AsyncConnection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ln(arr) fails on an ARR of 0: the keys stay queued, the scorecard is left alone
    for a while (no retry storm), then retried; other scorecards go on."""
    await _seed(sc)
    failing = card(realtime=True)
    failing["factors"][3]["expression"] = {"sql": "ln(arr)"}
    await store.apply(sc, failing)
    await sc.execute("UPDATE sc_accounts SET arr = 0 WHERE id = 1")
    sid = await value(sc, "SELECT id FROM crmflow.scorecards WHERE name = 'churn'")
    await sc.execute(
        "INSERT INTO crmflow.score_queue (scorecard_id, entity_key) VALUES (%s, '{\"id\": 1}')",
        [sid],
    )
    monkeypatch.setattr(run, "_failing", {})
    assert await run.rescore_queued(sc) == []
    assert await value(sc, "SELECT count(*) FROM crmflow.score_queue") == 1
    assert sid in run._failing
    assert await run.rescore_queued(sc) == []  # backing off: not even taken
    assert await value(sc, "SELECT count(*) FROM crmflow.score_queue") == 1
    # Fixed, and the back-off over: rescored.
    await sc.execute("UPDATE sc_accounts SET arr = 10 WHERE id = 1")
    run._failing[sid] = 0.0
    [result] = await run.rescore_queued(sc)
    assert result.scored == 1
    assert await value(sc, "SELECT count(*) FROM crmflow.score_queue") == 0


# ───────────────────────────── real time beside the full run ─────────────────────────────


async def _queue(conn: psycopg.AsyncConnection[Any], name: str, *ids: int) -> int:
    sid = int(await value(conn, "SELECT id FROM crmflow.scorecards WHERE name = %s", name))
    for i in ids:
        await conn.execute(
            "INSERT INTO crmflow.score_queue (scorecard_id, entity_key) "
            "VALUES (%s, jsonb_build_object('id', %s::bigint))",
            [sid, i],
        )
    return sid


async def _queued(conn: psycopg.AsyncConnection[Any]) -> list[Any]:
    return [
        r["entity_key"]
        for r in await fetch(conn, "SELECT entity_key FROM crmflow.score_queue ORDER BY 1")
    ]


async def _hold_run_lock(db_url: str, sid: int) -> psycopg.AsyncConnection[Any]:
    """A session holding the scorecard's run lock, as a long full run does (its
    transaction open until it is rolled back)."""
    holder = await psycopg.AsyncConnection.connect(db_url)
    await holder.execute(db.query("lock_scorecard_run", "scorecards.sql"), {"id": sid})
    return holder


async def test_a_realtime_rescore_does_not_wait_for_a_full_run(
    sc: psycopg.AsyncConnection[Any], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full run holds the scorecard's lock: the real-time round does not wait for it
    (here with no lock_timeout at all, as a full run of minutes would look), it puts the
    keys back and leaves the scorecard alone briefly; once the lock is free they are
    rescored."""
    await _seed(sc)
    await store.apply(sc, card(realtime=True))
    sid = await _queue(sc, "churn", 1, 2)
    monkeypatch.setattr(run, "_failing", {})
    await sc.execute("SET lock_timeout = 0")
    holder = await _hold_run_lock(db_url, sid)
    try:
        started = time.monotonic()
        assert await asyncio.wait_for(run.rescore_queued(sc), timeout=5) == []
        assert time.monotonic() - started < 2
        assert await _queued(sc) == [{"id": 1}, {"id": 2}]
        assert 0 < run._failing[sid] - time.monotonic() <= run.BUSY_BACKOFF
        assert await run.rescore_queued(sc) == []  # backing off: not taken
    finally:
        await holder.close()
    run._failing[sid] = 0.0
    [result] = await run.rescore_queued(sc)
    assert result.scored == 2 and await _queued(sc) == []


async def _worker_scene(sc: psycopg.AsyncConnection[Any]) -> tuple[int, int]:
    """Accounts scored by two real-time scorecards: churn (writing the account's columns)
    and shadow (writing nothing); a workflow on new accounts. Returns their ids."""
    await _seed(sc)
    await sc.execute("INSERT INTO users (id, name, role) VALUES (1, 'Carl', 'csm')")
    wf = await apply(
        sc,
        {
            "name": "new account",
            "trigger": {"type": "entity_created", "entity_type": "sc_account"},
            "actions": [{"type": "create_task", "params": {"title": "hi", "assignee": 1}}],
        },
    )
    await store.apply(sc, card(realtime=True, schedule="0 3 * * *"))
    await store.apply(sc, card(name="shadow", realtime=True, write={}))
    await run.score(sc, "churn")
    await run.score(sc, "shadow")
    sid = int(await value(sc, "SELECT id FROM crmflow.scorecards WHERE name = 'churn'"))
    return sid, wf


async def _signal_and_new_account(sc: psycopg.AsyncConnection[Any]) -> None:
    await sc.execute(
        "INSERT INTO sc_tickets (account_id, severity, opened_at) "
        "SELECT 2, 1, now() FROM generate_series(1, 5)"
    )
    await sc.execute("INSERT INTO sc_accounts (id, name) VALUES (4, 'new')")


async def _history_of(sc: psycopg.AsyncConnection[Any], name: str, account: int) -> int:
    return int(
        await value(
            sc,
            "SELECT count(*) FROM crmflow.score_history AS h "
            "JOIN crmflow.scorecards AS s ON s.id = h.scorecard_id "
            "WHERE s.name = %s AND h.entity_key = jsonb_build_object('id', %s::bigint)",
            name,
            account,
        )
    )


async def _rescored_after_release(sc: psycopg.AsyncConnection[Any], before: Any) -> None:
    async def rescored() -> bool:
        now = await value(sc, "SELECT churn_score FROM sc_accounts WHERE id = 2")
        return bool(now is not None and now > before) and await _history_of(sc, "churn", 4) == 1

    await wait_until(rescored, timeout=20)


async def test_matcher_and_realtime_rescores_go_on_while_another_session_runs_the_scorecard(
    sc: psycopg.AsyncConnection[Any], db_url: str, worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full run of churn elsewhere (a hand run, another worker's daily run) holds its
    lock: the matcher goes on (a new account enrolls at once), the other real-time
    scorecard rescores at once, and churn's keys, kept queued, are rescored once the
    lock is free."""
    monkeypatch.setattr(run, "_failing", {})
    sid, wf = await _worker_scene(sc)
    before = await value(sc, "SELECT churn_score FROM sc_accounts WHERE id = 2")
    shadow_before = await _history_of(sc, "shadow", 2)
    holder = await _hold_run_lock(db_url, sid)
    try:
        await _signal_and_new_account(sc)

        async def enrolled() -> bool:
            n = await value(
                sc, "SELECT count(*) FROM crmflow.executions WHERE workflow_id = %s", wf
            )
            return bool(n == 1)

        await wait_until(enrolled, timeout=10)

        async def shadow_rescored() -> bool:
            return await _history_of(sc, "shadow", 2) > shadow_before

        await wait_until(shadow_rescored, timeout=10)
        # Longer than the engine's lock_timeout (2 s): a waiting rescore would have failed.
        await asyncio.sleep(2.5)
        assert await value(sc, "SELECT churn_score FROM sc_accounts WHERE id = 2") == before
    finally:
        await holder.close()
    await _rescored_after_release(sc, before)


async def test_realtime_rescores_go_on_while_the_same_worker_runs_the_daily_batch(
    sc: psycopg.AsyncConnection[Any],
    db_url: str,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One worker: its daily run of churn waits (a run of minutes: no lock_timeout here,
    the test holds the lock); meanwhile its real-time rounds go on."""
    from engine.worker import running_worker

    monkeypatch.setattr(run, "_failing", {})
    sid, _ = await _worker_scene(sc)
    before = await value(sc, "SELECT churn_score FROM sc_accounts WHERE id = 2")
    shadow_before = await _history_of(sc, "shadow", 2)
    await sc.execute(
        "UPDATE crmflow.scorecards SET next_run_at = now() - interval '1 minute' WHERE id = %s",
        [sid],
    )
    holder = await _hold_run_lock(db_url, sid)
    try:
        slow = settings.model_copy(update={"lock_timeout": 0.0})
        async with running_worker(db_url, settings=slow, concurrency=2):

            async def daily_run_waits() -> bool:
                n = await value(
                    sc,
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
                )
                return bool(n == 1)

            await wait_until(daily_run_waits, timeout=10)
            await _signal_and_new_account(sc)

            async def shadow_rescored() -> bool:
                return await _history_of(sc, "shadow", 2) > shadow_before

            await wait_until(shadow_rescored, timeout=10)
            assert await value(sc, "SELECT churn_score FROM sc_accounts WHERE id = 2") == before
            await holder.close()
            await _rescored_after_release(sc, before)
    finally:
        await holder.close()


async def _backend_waits_on_a_lock(conn: psycopg.AsyncConnection[Any], pid: int) -> None:
    async def waiting() -> bool:
        got = await value(conn, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", pid)
        return bool(got == "Lock")

    await wait_until(waiting, timeout=10)


@pytest.mark.parametrize(
    "failure", ["lock_timeout", "canceled", "connection_lost", "task_cancelled"]
)
async def test_a_realtime_rescore_failing_on_the_database_keeps_its_keys(
    sc: psycopg.AsyncConnection[Any],
    db_url: str,
    pool: Any,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    """The keys a round took from the queue go back when the rescore fails with an
    OperationalError (a lock timeout, a statement cancelled as a statement timeout
    cancels it, the session ended), or when the round's task is cancelled (the worker
    stopping after its grace period), and are rescored later."""
    await _seed(sc)
    await store.apply(sc, card(realtime=True))
    await run.score(sc, "churn", as_of=AS_OF)
    await sc.execute("UPDATE sc_accounts SET csm_id = 9 WHERE id = 1")
    sid = await _queue(sc, "churn", 1)
    monkeypatch.setattr(run, "_failing", {})
    rescorer = await db.connect(db_url, autocommit=True)
    pid = rescorer.info.backend_pid
    # The scoring statement upserts score_latest: it waits for this lock.
    async with await psycopg.AsyncConnection.connect(db_url) as blocker:
        await blocker.execute("LOCK TABLE crmflow.score_latest IN EXCLUSIVE MODE")
        if failure == "lock_timeout":
            await rescorer.execute("SET lock_timeout = '100ms'")
            assert await run.rescore_queued(rescorer) == []
            assert sid in run._failing
        else:
            await rescorer.execute("SET lock_timeout = 0")
            # The session lost, the keys go back through another of the pool's connections.
            args = (
                (rescorer, pool)
                if failure in ("connection_lost", "task_cancelled")
                else (rescorer,)
            )
            rescoring = asyncio.create_task(run.rescore_queued(*args))
            await _backend_waits_on_a_lock(sc, pid)
            if failure == "task_cancelled":
                rescoring.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await rescoring
                await blocker.rollback()  # (the cut-off statement may still hold the session)
                await rescorer.close()
                assert await _queued(sc) == [{"id": 1}]
                return
            ender = "pg_cancel_backend" if failure == "canceled" else "pg_terminate_backend"
            await sc.execute(f"SELECT {ender}(%s)", [pid])
            if failure == "canceled":
                assert await rescoring == []
                assert sid in run._failing
            else:
                with pytest.raises(psycopg.OperationalError):
                    await rescoring
        await blocker.rollback()
    await rescorer.close()
    assert await _queued(sc) == [{"id": 1}]
    run._failing[sid] = 0.0
    [result] = await run.rescore_queued(sc)
    assert result.scored == 1 and await _queued(sc) == []
    assert await value(sc, "SELECT csm_id FROM sc_accounts WHERE id = 1") == 9
    assert await _history_of(sc, "churn", 1) == 2


async def test_keys_of_a_worker_killed_mid_round_are_rescored_after_its_lease(
    sc: psycopg.AsyncConnection[Any], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed (SIGKILL) while rescoring puts nothing back: the keys it took stay
    leased to its round, and once the lease is over the next round takes them again."""
    await _seed(sc)
    await store.apply(sc, card(realtime=True))
    await run.score(sc, "churn", as_of=AS_OF)
    await sc.execute("UPDATE sc_accounts SET csm_id = 9 WHERE id = 1")
    await _queue(sc, "churn", 1)
    async with await psycopg.AsyncConnection.connect(db_url) as blocker:
        await blocker.execute("LOCK TABLE crmflow.score_latest IN EXCLUSIVE MODE")
        rescorer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            worker_script.SCRIPT,
            db_url,
            "rescore_queued",
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
        )
        assert rescorer.stdout is not None
        pid = int(await asyncio.wait_for(rescorer.stdout.readline(), timeout=30))
        await _backend_waits_on_a_lock(sc, pid)
        rescorer.kill()
        await rescorer.wait()
        await blocker.rollback()

    async def gone() -> bool:
        return not await value(sc, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", pid)

    await wait_until(gone, timeout=10)
    assert await _queued(sc) == []  # taken by the killed round
    monkeypatch.setattr(run, "_failing", {})
    assert await run.rescore_queued(sc) == []  # still leased: not taken again yet
    await sc.execute("UPDATE crmflow.score_leases SET lease_until = now() - interval '1 second'")
    [result] = await run.rescore_queued(sc)
    assert result.scored == 1 and await _queued(sc) == []
    assert await value(sc, "SELECT count(*) FROM crmflow.score_leases") == 0
    assert await value(sc, "SELECT csm_id FROM sc_accounts WHERE id = 1") == 9
    assert await _history_of(sc, "churn", 1) == 2


@pytest.mark.parametrize("how", ["run", "schedule"])
async def test_a_full_run_gives_way_to_a_schema_change_of_the_crm(
    sc: psycopg.AsyncConnection[Any], db_url: str, how: str
) -> None:
    """A full run reads the CRM's tables for as long as it scores (seconds, minutes on a
    big CRM); an ALTER TABLE of one of them waits for it, and every CRM writer queues
    behind the ALTER. The run gives way instead: it is cancelled and raises
    ScoringYielded (a scheduled run is due again GIVE_WAY_RETRY seconds later), the
    ALTER and the writers behind it go on at once."""
    await _seed(sc)
    await store.apply(sc, card(schedule="0 0 1 1 *"))
    await sc.execute("UPDATE crmflow.scorecards SET next_run_at = now() - interval '1 second'")
    async with await psycopg.AsyncConnection.connect(db_url) as blocker:
        # Holds the run inside its statement (it waits for score_latest), the CRM table
        # read-locked meanwhile, as a long run does while it computes.
        await blocker.execute("LOCK TABLE crmflow.score_latest IN EXCLUSIVE MODE")
        await sc.execute("SET lock_timeout = 0")
        scoring = asyncio.create_task(
            run.score(sc, "churn", as_of=AS_OF) if how == "run" else run.run_due(sc)
        )
        await _backend_waits_on_a_lock(sc_other := await db.connect(db_url), sc.info.backend_pid)
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as ddl:
            started = time.monotonic()
            await asyncio.wait_for(
                ddl.execute("ALTER TABLE sc_accounts ADD COLUMN given_way int"), timeout=5
            )
            waited = time.monotonic() - started
            await asyncio.wait_for(
                ddl.execute("UPDATE sc_accounts SET name = 'after' WHERE id = 1"), timeout=5
            )
        if how == "run":
            with pytest.raises(run.ScoringYielded):
                await scoring
        else:
            assert await scoring == []
            left = await value(
                sc, "SELECT extract(epoch FROM next_run_at - now()) FROM crmflow.scorecards"
            )
            assert 0 < left <= run.GIVE_WAY_RETRY
        await blocker.rollback()
    await sc_other.close()
    await sc.execute("RESET lock_timeout")
    assert waited < 1.5
    # Nothing of the run stayed: it is rerun whole later.
    assert await value(sc, "SELECT count(*) FROM crmflow.score_latest") == 0
    result = await run.score(sc, "churn", as_of=AS_OF)
    assert result.scored == 3


async def test_level_changes_count_first_levels(sc: psycopg.AsyncConnection[Any]) -> None:
    """An entity's first level (it had no score) counts as a level change, as its first
    write of the level column is a change a field_updated workflow sees."""
    await _seed(sc)
    await store.apply(sc, card())
    first = await run.score(sc, "churn", as_of=AS_OF)
    assert (first.scored, first.level_changes) == (3, 3)
    again = await run.score(sc, "churn", as_of=AS_OF)
    assert again.level_changes == 0
    # Account 1 (critical) gets a CSM and a large ARR: its level changes; account 4 is new.
    await sc.execute("UPDATE sc_accounts SET csm_id = 9, arr = 1e12 WHERE id = 1")
    await sc.execute("INSERT INTO sc_accounts (id, name) VALUES (4, 'new')")
    third = await run.score(sc, "churn", as_of=AS_OF)
    assert (third.history_rows, third.level_changes) == (2, 2)
    # A score change within the level is no level change.
    await sc.execute("UPDATE sc_accounts SET arr = 2e12 WHERE id = 1")
    fourth = await run.score(sc, "churn", as_of=AS_OF)
    assert (fourth.history_rows, fourth.level_changes) == (1, 0)
    # By key, too.
    await sc.execute("INSERT INTO sc_accounts (id, name) VALUES (5, 'newer')")
    keyed = await run.score(sc, "churn", keys=[{"id": 5}, {"id": 2}], as_of=AS_OF)
    assert (keyed.scored, keyed.level_changes) == (2, 1)
