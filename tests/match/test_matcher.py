"""The matcher: set-based matching, exactly-once enrollment, order, crashes, poison."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from engine import db, workflows
from engine.config import Settings
from engine.matcher import Matcher
from tests.helpers import SEED_QUALIFY, apply, fetch, value

NOTIFY_ON_WIN = {
    "name": "Won",
    "trigger": {"type": "field_updated", "entity_type": "deal", "field": "status", "to": "won"},
    "actions": [{"type": "send_notification", "message": "won"}],
}


async def executions(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    return await fetch(conn, "SELECT * FROM crmflow.executions ORDER BY id")


async def test_matching_rows_enroll_once_each(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    await apply(crm, SEED_QUALIFY)
    await crm.execute(
        "INSERT INTO leads (name, source) VALUES ('a', 'website_form'), ('b', 'referral'), "
        "('c', 'website_form'), ('d', NULL)"
    )
    result = await matcher.drain()
    # The two leads that do not match were not captured at all (engine/prefilter.py).
    assert (result.claimed, result.enrolled) == (2, 2)
    rows = await executions(crm)
    assert [(r["entity_pk"], r["status"], r["workflow_version"]) for r in rows] == [
        ({"id": 1}, "pending", 1),
        ({"id": 3}, "pending", 1),
    ]
    assert rows[0]["enrollment_key"] == f"event:{rows[0]['event_id']}"
    # every event is processed, with how many executions it enrolled
    events = await fetch(crm, "SELECT matched, processed_at FROM crmflow.outbox ORDER BY id")
    assert [e["matched"] for e in events] == [1, 1]
    assert all(e["processed_at"] for e in events)
    # queued in the same transaction, keeping their entity's order, and one wake-up
    queued = await fetch(
        crm, "SELECT entity_key, ordered FROM crmflow.execution_queue ORDER BY execution_id"
    )
    assert [q["entity_key"] for q in queued] == ['crmflow:lead:{"id": 1}', 'crmflow:lead:{"id": 3}']
    assert all(q["ordered"] for q in queued)
    wakeups = await fetch(crm, "SELECT task_name, args FROM procrastinate.procrastinate_jobs")
    assert wakeups == [{"task_name": "crmflow.run_steps", "args": {}}]
    assert (await matcher.drain()).claimed == 0  # nothing left, nothing twice
    assert len(await executions(crm)) == 2


async def test_paused_and_new_versions(crm: psycopg.AsyncConnection[Any], matcher: Matcher) -> None:
    wf = await apply(crm, SEED_QUALIFY)
    await workflows.set_status(crm, wf, "paused")
    await crm.execute("INSERT INTO leads (name, source) VALUES ('a', 'website_form')")
    await matcher.drain()
    assert await executions(crm) == []
    await workflows.apply(
        crm,
        {
            **SEED_QUALIFY,
            "conditions": [{"field": "source", "operator": "equals", "value": "referral"}],
        },
    )
    await crm.execute(
        "INSERT INTO leads (name, source) VALUES ('b', 'referral'), ('c', 'website_form')"
    )
    await matcher.drain()  # the matcher notices the new generation and recompiles
    rows = await executions(crm)
    assert [(r["entity_pk"], r["workflow_version"]) for r in rows] == [({"id": 2}, 2)]


async def test_a_workflow_fires_for_writes_committed_after_its_activation(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher, db_url: str
) -> None:
    """Events still pending when a workflow is created or re-activated do not enroll it
    if their writes had committed before (backfill is the explicit way to run it over
    those rows). A write in flight at the activation was captured with the capture
    filter of before: the activation waits for it to commit (crmflow.generate_capture),
    so it is a write from before the activation, and does not fire either."""
    await apply(crm, {**SEED_QUALIFY, "name": "keeps website leads"})
    await crm.execute("INSERT INTO leads (name, source) VALUES ('before', 'website_form')")
    async with await psycopg.AsyncConnection.connect(db_url) as in_flight:
        await in_flight.execute(
            "INSERT INTO leads (name, source) VALUES ('in flight', 'website_form')"
        )

        async def commit_soon() -> None:
            await asyncio.sleep(0.5)
            await in_flight.commit()

        committing = asyncio.create_task(commit_soon())
        wf = await apply(crm, SEED_QUALIFY)  # the first write is still unmatched
        await committing
    await crm.execute("INSERT INTO leads (name, source) VALUES ('after', 'website_form')")
    await matcher.drain()
    names = await fetch(
        crm,
        "SELECT l.name FROM crmflow.executions AS x"
        " JOIN leads AS l ON l.id = (x.entity_pk ->> 'id')::int WHERE x.workflow_id = %s"
        " ORDER BY x.id",
        wf,
    )
    assert [r["name"] for r in names] == ["after"]
    # Paused, written, activated again: the writes made while paused do not fire.
    await workflows.set_status(crm, wf, "paused")
    await crm.execute("INSERT INTO leads (name, source) VALUES ('paused', 'website_form')")
    await workflows.set_status(crm, wf, "active")
    await crm.execute("INSERT INTO leads (name, source) VALUES ('active again', 'website_form')")
    await matcher.drain()
    assert len([r for r in await executions(crm) if r["workflow_id"] == wf]) == 2


async def test_transitions_edges_and_deletes(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    await crm.execute("INSERT INTO deals (name, amount) VALUES ('d1', 10), ('d2', 20)")
    await matcher.drain()
    won = await apply(crm, NOTIFY_ON_WIN)
    big = await apply(
        crm,
        {
            "name": "Became big",
            "edge_triggered": True,
            "trigger": {"type": "entity_updated", "entity_type": "deal"},
            "conditions": [{"field": "amount", "operator": "greater_or_equal", "value": 100}],
            "actions": [{"type": "send_notification", "message": "big"}],
        },
    )
    gone = await apply(
        crm,
        {
            "name": "Lost a big one",
            "trigger": {"type": "entity_deleted", "entity_type": "deal"},
            "conditions": [{"field": "amount", "operator": "greater_than", "value": 15}],
            "actions": [{"type": "send_notification", "message": "deleted"}],
        },
    )
    await crm.execute("UPDATE deals SET status = 'lost' WHERE name = 'd1'")  # not won
    await crm.execute("UPDATE deals SET status = 'won' WHERE name = 'd2'")  # won
    await crm.execute("UPDATE deals SET amount = 150 WHERE name = 'd1'")  # became big
    await crm.execute("UPDATE deals SET amount = 200 WHERE name = 'd1'")  # still big: no edge
    await crm.execute("DELETE FROM deals WHERE name = 'd2'")  # amount 20 > 15
    await matcher.drain()
    rows = await executions(crm)
    assert [(r["workflow_id"], r["entity_pk"]) for r in rows] == [
        (won, {"id": 2}),
        (big, {"id": 1}),
        (gone, {"id": 2}),
    ]


async def test_debounce_and_reenrollment(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    await crm.execute("INSERT INTO leads (name, score) VALUES ('a', 1), ('b', 1)")
    await matcher.drain()
    debounced = await apply(
        crm,
        {
            "name": "Debounced",
            "limits": {"debounce": "5m"},
            "trigger": {"type": "entity_updated", "entity_type": "lead"},
            "actions": [{"type": "send_notification", "message": "x"}],
        },
    )
    once = await apply(
        crm,
        {
            "name": "Once",
            "limits": {"reenrollment": "never"},
            "trigger": {"type": "entity_updated", "entity_type": "lead"},
            "actions": [{"type": "send_notification", "message": "x"}],
        },
    )
    for score in range(2, 6):  # a burst on lead 1, over two batches
        await crm.execute("UPDATE leads SET score = %s WHERE id = 1", [score])
        if score == 3:
            await matcher.drain()
    await crm.execute("UPDATE leads SET score = 9 WHERE id = 2")
    await matcher.drain()
    rows = await executions(crm)
    by_workflow = {}
    for r in rows:
        by_workflow.setdefault(r["workflow_id"], []).append(r)
    # one debounced execution per lead, carrying the newest event, starting later
    assert [r["entity_pk"] for r in by_workflow[debounced]] == [{"id": 1}, {"id": 2}]
    last_event = await value(crm, "SELECT max(id) FROM crmflow.outbox WHERE pk = '{\"id\": 1}'")
    assert by_workflow[debounced][0]["event_id"] == last_event
    assert all(r["not_before"] is not None for r in by_workflow[debounced])
    # "never": once per lead, the first event
    assert [r["entity_pk"] for r in by_workflow[once]] == [{"id": 1}, {"id": 2}]


async def test_loops_stop_at_the_depth_limit(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    await apply(crm, SEED_QUALIFY)
    async with crm.transaction():
        await crm.execute("SELECT crmflow.set_write_context(5, 'crmflow:execution:1')")
        await crm.execute("INSERT INTO leads (name, source) VALUES ('deep', 'website_form')")
    await matcher.drain()
    [row] = await executions(crm)
    assert row["status"] == "failed" and row["depth"] == 5
    assert "loop stopped" in row["error"] and "limit 5" in row["error"]
    assert await value(crm, "SELECT count(*) FROM crmflow.execution_queue") == 0


async def test_a_failing_predicate_does_not_block_the_outbox(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    await apply(crm, SEED_QUALIFY)
    bad_wf = await apply(
        crm,
        {
            "name": "Divides by zero",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "conditions": [{"sql": "100 / score > 1"}],
            "actions": [{"type": "send_notification", "message": "x"}],
        },
    )
    await crm.execute(
        "INSERT INTO leads (name, source, score) VALUES "
        "('ok', 'website_form', 5), ('zero', 'website_form', 0), ('ok2', 'x', 5)"
    )
    result = await matcher.drain()
    assert result.claimed == 3 and result.errors == 1
    rows = await executions(crm)
    assert sorted((r["workflow_id"] == bad_wf, r["entity_pk"]["id"]) for r in rows) == [
        (False, 1),
        (True, 1),
        (True, 3),
    ]
    [poisoned] = await fetch(crm, "SELECT * FROM crmflow.outbox WHERE match_error IS NOT NULL")
    assert poisoned["pk"] == {"id": 2} and "Divides by zero" in poisoned["match_error"]
    assert "division by zero" in poisoned["match_error"]
    assert await value(crm, "SELECT count(*) FROM crmflow.outbox WHERE processed_at IS NULL") == 0


async def test_custom_events(crm: psycopg.AsyncConnection[Any], matcher: Matcher) -> None:
    anywhere = await apply(
        crm,
        {
            "name": "Any demo request",
            "trigger": {"type": "event", "event": "demo_requested"},
            "actions": [{"type": "send_notification", "message": "demo", "recipient": 3}],
        },
    )
    on_lead = await apply(
        crm,
        {
            "name": "Demo on a hot lead",
            "trigger": {"type": "event", "event": "demo_requested", "entity_type": "lead"},
            "conditions": [{"field": "score", "operator": "greater_than", "value": 50}],
            "actions": [{"type": "send_notification", "message": "demo"}],
        },
    )
    await crm.execute("INSERT INTO leads (name, score) VALUES ('hot', 80)")
    await crm.execute(
        "INSERT INTO crmflow.outbox (entity_type, op, pk, new_row, event_name, payload) "
        "SELECT 'lead', 'event', jsonb_build_object('id', id), to_jsonb(l), 'demo_requested', "
        '\'{"when": "friday"}\' FROM leads l'
    )
    await crm.execute(
        "INSERT INTO crmflow.outbox (op, event_name, payload) "
        "VALUES ('event', 'demo_requested', '{}'), ('event', 'other', '{}')"
    )
    await matcher.drain()
    rows = await executions(crm)
    got = sorted((r["workflow_id"], r["entity_type"] or "") for r in rows)
    assert got == sorted([(anywhere, "lead"), (on_lead, "lead"), (anywhere, "")])
    assert {r["input"]["when"] for r in rows if r["entity_type"]} == {"friday"}


async def _hammer(pool: AsyncConnectionPool, settings: Settings, stop: asyncio.Event) -> int:
    # Batches of 2 over 5 entities: a matcher holding a batch leaves other entities'
    # events to the other one (a batch of 7 covered all five, and the other matcher
    # had to wait for one to commit; with fast batches it could miss every turn).
    matcher = Matcher(pool, settings.model_copy(update={"matcher_batch_size": 2}))
    claimed = 0
    while not stop.is_set():
        claimed += (await matcher.run_once()).claimed
        await asyncio.sleep(0)
    return claimed + (await matcher.drain()).claimed


async def test_two_matchers_enroll_each_event_exactly_once_in_entity_order(
    crm: psycopg.AsyncConnection[Any], db_url: str, settings: Settings
) -> None:
    await apply(
        crm,
        {
            "name": "Every lead change",
            "trigger": {"type": "entity_updated", "entity_type": "lead"},
            "actions": [{"type": "send_notification", "message": "x"}],
        },
    )
    await apply(
        crm,
        {
            "name": "Odd scores",
            "trigger": {"type": "entity_updated", "entity_type": "lead"},
            "conditions": [{"sql": "score % 2 = 1"}],
            "actions": [{"type": "send_notification", "message": "x"}],
        },
    )
    await crm.execute(
        "INSERT INTO leads (id, name, score) SELECT i, 'l' || i, 0 FROM generate_series(1, 5) i"
    )
    pools = [db.create_pool(db_url, settings, min_size=1, max_size=2) for _ in range(2)]
    for p in pools:
        await p.open(wait=True)
    async with await db.connect(db_url, autocommit=True) as writer:
        # Updates on 5 leads, one transaction each: a backlog first, so that both matchers
        # find work on their first claim however the machine schedules them, then more
        # while they match.
        for n in range(1, 31):
            await writer.execute("UPDATE leads SET score = %s WHERE id = %s", [n, n % 5 + 1])
        stop = asyncio.Event()
        hammers = [asyncio.create_task(_hammer(p, settings, stop)) for p in pools]
        for n in range(31, 61):
            await writer.execute("UPDATE leads SET score = %s WHERE id = %s", [n, n % 5 + 1])
    stop.set()
    claimed = await asyncio.gather(*hammers)
    for p in pools:
        await p.close()
    # both took part, no event twice (the 5 inserts match no workflow: not captured)
    assert sum(claimed) == 60 and all(claimed), claimed
    rows = await executions(crm)
    assert len(rows) == 60 + 30  # every update, plus the odd scores
    assert len({(r["workflow_version_id"], r["event_id"]) for r in rows}) == len(rows)
    # per entity, executions (and their jobs) were enrolled in event order
    jobs = await fetch(
        crm,
        "SELECT execution_id AS id, entity_key AS lock, execution_id "
        "FROM crmflow.execution_queue ORDER BY execution_id",
    )
    event_of = {r["id"]: r["event_id"] for r in rows}
    per_lock: dict[str, list[int]] = {}
    for j in jobs:
        per_lock.setdefault(j["lock"], []).append(event_of[j["execution_id"]])
    assert len(per_lock) == 5
    for events in per_lock.values():
        assert events == sorted(events)


async def test_a_matcher_killed_mid_batch_replays_without_duplicates(
    crm: psycopg.AsyncConnection[Any], db_url: str, settings: Settings, matcher: Matcher
) -> None:
    await apply(crm, SEED_QUALIFY)
    await crm.execute(
        "INSERT INTO leads (name, source) SELECT 'l' || i, 'website_form' "
        "FROM generate_series(1, 50) i"
    )
    victim_pool = db.create_pool(db_url, settings, min_size=1, max_size=1)
    await victim_pool.open()
    victim = Matcher(victim_pool, settings)
    async with victim_pool.connection() as conn:
        pid = conn.info.backend_pid
        with pytest.raises(psycopg.OperationalError):
            async with conn.transaction():
                # claimed, matched, enrolled: not committed
                done = await victim._batch(conn, careful=False)
                assert done.enrolled == 50
                await crm.execute("SELECT pg_terminate_backend(%s)", [pid])
                await conn.execute("SELECT 1")
    await victim_pool.close()
    assert await executions(crm) == []  # the crash rolled everything back
    result = await matcher.drain()
    assert (result.claimed, result.enrolled) == (50, 50)
    rows = await executions(crm)
    assert len(rows) == 50 == len({r["event_id"] for r in rows})
    assert await value(crm, "SELECT count(*) FROM crmflow.execution_queue") == 50


def crmflow(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CRMFLOW_DATABASE_URL": db_url}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


async def test_a_new_user_table_with_the_seed_workflow(
    conn: psycopg.AsyncConnection[Any], db_url: str, matcher: Matcher, tmp_path: Path
) -> None:
    """As a new user would: their own table, the CLI, the seed's JSON as written."""
    await conn.execute(
        "CREATE SCHEMA marketing; CREATE TABLE marketing.inbound_leads ("
        " lead_uuid uuid PRIMARY KEY DEFAULT gen_random_uuid(), full_name text NOT NULL,"
        " email text, source text, status text, score integer, received_at timestamptz"
        " DEFAULT now())"
    )
    watch = crmflow(db_url, "watch", "marketing.inbound_leads", "--entity", "lead")
    assert watch.returncode == 0, watch.stderr
    assert "key: lead_uuid" in watch.stdout
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps(SEED_QUALIFY))
    applied = crmflow(db_url, "workflow", "apply", str(seed))
    assert applied.returncode == 0, applied.stderr
    await conn.execute(
        "INSERT INTO marketing.inbound_leads (full_name, email, source) VALUES "
        "('Ann', 'ann@corp.example', 'website_form'), ('Bob', 'bob@x.example', 'trade_show'),"
        "('Cid', 'cid@y.example', 'website_form')"
    )
    await conn.execute("UPDATE marketing.inbound_leads SET score = 1")  # updates: no match
    await matcher.drain()
    await matcher.drain()
    listed = json.loads(crmflow(db_url, "executions", "list", "--json").stdout)
    names = await fetch(
        conn, "SELECT lead_uuid::text AS id, full_name FROM marketing.inbound_leads"
    )
    by_id = {n["id"]: n["full_name"] for n in names}
    assert sorted(by_id[e["entity_id"]] for e in listed) == ["Ann", "Cid"]
    assert {e["status"] for e in listed} == {"pending"}
    assert {
        "id",
        "status",
        "triggered_at",
        "actions_count",
        "workflow_id",
        "workflow_name",
        "workflow_version",
        "entity_type",
        "entity_id",
        "event_id",
        "started_at",
        "finished_at",
        "error",
    } <= set(listed[0])
    shown = json.loads(crmflow(db_url, "executions", "show", str(listed[0]["id"]), "--json").stdout)
    assert shown["steps"] == []  # steps are created when the execution starts


async def test_engine_sessions_run_without_jit(db_url: str, pool: AsyncConnectionPool) -> None:
    """The match statement of many workflows is estimated above jit_above_cost; JIT
    compiling it took seconds per batch (engine/db.py configure)."""
    async with await db.connect(db_url) as conn:
        assert await value(conn, "SELECT current_setting('jit')") == "off"
    async with pool.connection() as conn:
        assert await value(conn, "SELECT current_setting('jit')") == "off"
        assert "procrastinate" in await value(conn, "SELECT current_setting('search_path')")
