"""Enrollment lifecycle robustness on a real worker: a goal, exit_when or wait_until that
fails (at run time on one row, or no longer compiling) is set apart for its workflow
alone, marked broken with an alert, and every other workflow's goals, exits and waits go
on; a goal, exit or wait the round finds met while another transaction holds the
execution (the executor running a step, another round, a session) is kept and settled
once the holder lets go, not lost with the round's events; a change between the
executor's look at the entity and the commit of its new watch is not missed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg

from engine import events
from engine.config import Settings
from engine.executor.batch import BatchExecutor
from engine.executor.runner import Runner
from engine.matcher import Matcher
from engine.worker import Worker
from tests.helpers import apply, fetch, value, wait_until
from tests.lifecycle.test_lifecycle import nurture, outcome_of, settled, waiting, waiting_for


async def ids_by_workflow(crm: psycopg.AsyncConnection[Any]) -> dict[tuple[str, str], int]:
    rows = await fetch(
        crm,
        "SELECT x.id, w.name AS workflow, l.name AS lead FROM crmflow.executions AS x"
        " JOIN crmflow.workflows AS w ON w.id = x.workflow_id"
        " JOIN leads AS l ON l.id = (x.entity_pk->>'id')::int",
    )
    return {(r["workflow"], r["lead"]): r["id"] for r in rows}


async def test_a_goal_failing_at_run_time_sets_apart_its_workflow_only(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    bad = nurture(name="bad goal", goal={"sql": "100/(score-7) > 1000"})
    bad["conditions"] = [{"field": "name", "operator": "equals", "value": "Ada"}]
    bad["actions"][1]["delay"] = "4s"
    await apply(crm, bad)
    await apply(
        crm,
        waiting_for(
            {"conditions": [{"field": "score", "operator": "greater_or_equal", "value": 50}]}, "1d"
        ),
    )
    await crm.execute("INSERT INTO leads (name, score) VALUES ('Ada', 10), ('Bob', 10)")
    await waiting(crm, 3)
    ids = await ids_by_workflow(crm)
    # one statement, one batch: Ada's score makes the bad goal divide by zero, Bob meets
    # the other workflow's wait (a lead the bad workflow does not watch)
    await crm.execute("UPDATE leads SET score = CASE name WHEN 'Ada' THEN 7 ELSE 80 END")
    assert await outcome_of(crm, ids[("wait for it", "Bob")]) == ("met", "on_met")

    [wf] = await fetch(
        crm,
        "SELECT id, broken_reason, broken_since_event_id FROM crmflow.workflows"
        " WHERE name = 'bad goal'",
    )
    assert "goal" in wf["broken_reason"] and "division by zero" in wf["broken_reason"]
    assert wf["broken_since_event_id"] is None  # it matched every event: nothing to replay
    [alert] = await fetch(
        crm, "SELECT * FROM crmflow.alerts WHERE kind = 'workflow_broken' AND resolved_at IS NULL"
    )
    assert alert["workflow_id"] == wf["id"] and "division by zero" in alert["message"]
    assert "still enrolls" in alert["message"]

    # the other workflow's waits keep being evaluated after that
    await crm.execute("UPDATE leads SET score = 60 WHERE name = 'Ada'")
    assert await outcome_of(crm, ids[("wait for it", "Ada")]) == ("met", "on_met")

    # the executor's check before the follow-up does not fail the execution either: the
    # goal is left out, the step runs
    await crm.execute("UPDATE leads SET score = 7 WHERE name = 'Ada'")
    done = await settled(crm, ids[("bad goal", "Ada")])
    assert done["status"] == "completed", done["error"]
    assert done["goal_met_at"] is None
    assert await value(crm, "SELECT count(*) FROM tasks WHERE title = 'follow up'") == 1


async def test_a_lifecycle_condition_that_no_longer_compiles_leaves_out_its_workflow_only(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    await apply(crm, nurture(name="bad goal", goal={"sql": "score > 50"}))
    await crm.execute("ALTER TABLE leads ALTER COLUMN score TYPE text")
    # saved after the change: the round is rebuilt against the new column type
    await apply(
        crm,
        waiting_for({"conditions": [{"field": "status", "operator": "equals", "value": "hot"}]}),
    )
    await crm.execute("INSERT INTO leads (name) VALUES ('Ada')")
    await waiting(crm, 2)
    ids = await ids_by_workflow(crm)
    await crm.execute("UPDATE leads SET status = 'hot'")
    assert await outcome_of(crm, ids[("wait for it", "Ada")]) == ("met", "on_met")

    async def marked() -> bool:
        reason = await value(
            crm, "SELECT broken_reason FROM crmflow.workflows WHERE name = 'bad goal'"
        )
        return reason is not None and "operator does not exist" in reason

    await wait_until(marked, timeout=20)
    assert (
        await value(
            crm,
            "SELECT count(*) FROM crmflow.alerts WHERE kind = 'workflow_broken'"
            " AND resolved_at IS NULL",
        )
        == 1
    )


# ─────────── a hit the round cannot take, a change racing with the watch ───────────


@contextlib.asynccontextmanager
async def holding(db_url: str, query: str, *args: Any) -> AsyncIterator[None]:
    """Another transaction holds the rows ``query`` locks (as the executor running a step,
    another matcher's round or a person's session would) until the block ends."""
    async with await psycopg.AsyncConnection.connect(db_url) as other:
        await other.execute(query, args or None)
        yield
        await other.commit()


async def drained(crm: psycopg.AsyncConnection[Any]) -> None:
    """Every captured change has been through a matcher round (committed with it)."""
    await wait_until(
        lambda: value(crm, "SELECT count(*) = 0 FROM crmflow.outbox WHERE processed_at IS NULL")
    )


async def test_a_wait_met_while_the_executor_runs_a_parallel_step_is_not_lost(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    # the wait and a slow step side by side: while the slow step runs, the executor holds
    # the execution's row (lock_step), so the round cannot take the wait's hit
    definition = waiting_for(
        {"conditions": [{"field": "score", "operator": "greater_or_equal", "value": 50}]}, "1h"
    )
    definition["actions"].insert(
        1, {"id": "slow", "type": "test_sleep", "seconds": 2, "depends_on": []}
    )
    for step in definition["actions"][2:]:
        step["depends_on"] = ["wait"]
    await apply(crm, definition)
    await crm.execute("INSERT INTO leads (name, score) VALUES ('Ada', 10)")
    await wait_until(
        lambda: value(
            crm,
            "SELECT count(*) = 1 FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'SELECT pg_sleep%%'",
        ),
        timeout=20,
    )
    assert await value(crm, "SELECT count(*) FROM crmflow.watches WHERE kind = 'wait'") == 1
    [ex] = await fetch(crm, "SELECT id FROM crmflow.executions")
    await crm.execute("UPDATE leads SET score = 80")
    # met, promptly: not at its timeout an hour from now
    assert await outcome_of(crm, ex["id"]) == ("met", "on_met")


async def test_a_wait_met_while_its_execution_is_locked_resumes_when_released(
    crm: psycopg.AsyncConnection[Any], worker: Worker, db_url: str
) -> None:
    await apply(
        crm,
        waiting_for(
            {"conditions": [{"field": "score", "operator": "greater_or_equal", "value": 50}]}, "1h"
        ),
    )
    await crm.execute("INSERT INTO leads (name, score) VALUES ('Ada', 10), ('Bob', 10)")
    ada, bob = await waiting(crm, 2)
    lock = "SELECT 1 FROM crmflow.executions WHERE id = %s FOR UPDATE"
    async with holding(db_url, lock, ada["id"]):
        await crm.execute("UPDATE leads SET score = 80")
        await drained(crm)
        # Bob's round took him; Ada's could not, and she waits for the lock
        assert await outcome_of(crm, bob["id"]) == ("met", "on_met")
        assert await value(
            crm, "SELECT status FROM crmflow.executions WHERE id = %s", ada["id"]
        ) == ("waiting")
    assert await outcome_of(crm, ada["id"]) == ("met", "on_met")
    assert await value(crm, "SELECT count(*) FROM crmflow.watches") == 0


async def test_an_event_while_the_waiting_step_is_locked_is_kept(
    crm: psycopg.AsyncConnection[Any], worker: Worker, db_url: str
) -> None:
    await apply(crm, waiting_for({"event": "demo_booked"}))
    await crm.execute("INSERT INTO leads (name) VALUES ('Ada')")
    [ex] = await waiting(crm, 1)
    lead_id = await value(crm, "SELECT id FROM leads")
    lock = (
        "SELECT 1 FROM crmflow.execution_steps WHERE execution_id = %s AND step_id = 'wait'"
        " FOR UPDATE"
    )
    async with holding(db_url, lock, ex["id"]):
        await events.ingest(crm, "demo_booked", entity_type="lead", entity_id=lead_id)
        await drained(crm)
    # the event is not there any more to be read again: the hit itself was kept
    assert await outcome_of(crm, ex["id"]) == ("event", "on_event")


async def test_a_goal_met_while_the_execution_is_locked_ends_it_when_released(
    crm: psycopg.AsyncConnection[Any], worker: Worker, db_url: str
) -> None:
    await apply(
        crm,
        nurture(
            goal={"field": "status", "operator": "equals", "value": "customer"},
            exit_when={"field": "status", "operator": "equals", "value": "spam"},
        ),
    )
    await crm.execute("INSERT INTO leads (name) VALUES ('Ada'), ('Bob')")
    ada, bob = await waiting(crm, 2)
    # a step row (as the executor locks them) for Ada, the execution's row for Bob (as
    # another matcher's round does)
    step_lock = (
        "SELECT 1 FROM crmflow.execution_steps WHERE execution_id = %s AND step_id = 'intro'"
        " FOR UPDATE"
    )
    async with (
        holding(db_url, step_lock, ada["id"]),
        holding(
            db_url, "SELECT 1 FROM crmflow.executions WHERE id = %s FOR NO KEY UPDATE", bob["id"]
        ),
    ):
        await crm.execute(
            "UPDATE leads SET status = CASE name WHEN 'Ada' THEN 'customer' ELSE 'spam' END"
        )
        await drained(crm)
    done = await settled(crm, ada["id"])
    assert done["status"] == "completed" and done["goal_met_at"] is not None
    done = await settled(crm, bob["id"])
    assert done["status"] == "cancelled" and done["error"] == "exit criteria"
    assert await value(crm, "SELECT count(*) FROM crmflow.execution_queue") == 0
    assert await value(crm, "SELECT count(*) FROM tasks WHERE title = 'follow up'") == 0


async def test_a_kept_hit_is_due_at_once_and_settled_by_the_next_round(
    crm: psycopg.AsyncConnection[Any], pool: Any, settings: Settings, db_url: str
) -> None:
    # no worker: the matcher and the executor by hand, to see each part
    matcher = Matcher(pool, settings)
    steps = BatchExecutor(pool, Runner(pool, settings), settings, "by hand")
    await apply(
        crm,
        waiting_for(
            {"conditions": [{"field": "score", "operator": "greater_or_equal", "value": 50}]}, "1h"
        ),
    )
    await crm.execute("INSERT INTO leads (name, score) VALUES ('Ada', 10)")
    await matcher.drain()
    await steps.drain(seconds=1)
    [ex] = await waiting(crm, 1)
    due = "SELECT run_at <= now() FROM crmflow.execution_queue WHERE execution_id = %s"
    assert await value(crm, due, ex["id"]) is False  # at its timeout
    lock = "SELECT 1 FROM crmflow.executions WHERE id = %s FOR UPDATE"
    async with holding(db_url, lock, ex["id"]):
        await crm.execute("UPDATE leads SET score = 80")
        await matcher.drain()
        [kept] = await fetch(crm, "SELECT * FROM crmflow.watch_hits")
        assert (kept["execution_id"], kept["kind"], kept["step_id"], kept["outcome"]) == (
            ex["id"],
            "wait",
            "wait",
            "met",
        )
        assert await value(crm, due, ex["id"]) is True  # the executor would take it now
        # another round while it is still held keeps it once
        await crm.execute("UPDATE leads SET score = 90")
        await matcher.drain()
        assert await value(crm, "SELECT count(*) FROM crmflow.watch_hits") == 1
    # released; before the executor gets to it, any other event's round settles it
    await crm.execute("INSERT INTO leads (name, score) VALUES ('Bob', 10)")
    await matcher.drain()
    assert await value(crm, "SELECT count(*) FROM crmflow.watch_hits") == 0
    [step] = await fetch(
        crm,
        "SELECT result FROM crmflow.execution_steps WHERE execution_id = %s AND step_id = 'wait'",
        ex["id"],
    )
    assert step["result"] == {"outcome": "met"}
    await steps.drain(seconds=1)
    assert await outcome_of(crm, ex["id"]) == ("met", "on_met")


@contextlib.asynccontextmanager
async def watches_held_back(
    crm: psycopg.AsyncConnection[Any], db_url: str
) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Until the block ends, a transaction writing a watch waits before it commits (a
    test-only trigger on crmflow.watches takes an advisory lock held here); the block's
    value waits until one does (the executor looked at the entity and writes its watch)."""
    await crm.execute(
        "CREATE FUNCTION public.hold_watches() RETURNS trigger LANGUAGE plpgsql AS"
        " $$BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN NEW; END$$"
    )
    await crm.execute(
        "CREATE TRIGGER hold_watches BEFORE INSERT ON crmflow.watches"
        " FOR EACH ROW EXECUTE FUNCTION public.hold_watches()"
    )

    async def blocked() -> None:
        await wait_until(
            lambda: value(
                crm,
                "SELECT count(*) > 0 FROM pg_locks"
                " WHERE locktype = 'advisory' AND objid = 4242 AND NOT granted",
            ),
            timeout=20,
        )

    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as other:
        await other.execute("SELECT pg_advisory_lock(4242)")
        try:
            yield blocked
        finally:
            await other.execute("SELECT pg_advisory_unlock(4242)")


async def test_a_change_between_the_wait_check_and_its_watch_is_not_missed(
    crm: psycopg.AsyncConnection[Any], worker: Worker, db_url: str
) -> None:
    await apply(
        crm,
        waiting_for(
            {"conditions": [{"field": "score", "operator": "greater_or_equal", "value": 50}]}, "1h"
        ),
    )
    async with watches_held_back(crm, db_url) as blocked:
        await crm.execute("INSERT INTO leads (name, score) VALUES ('Ada', 10)")
        await blocked()  # the executor found the wait not met; its watch is not visible yet
        await crm.execute("UPDATE leads SET score = 80")
        await drained(crm)  # the round ran on the change without the watch
    [ex] = await fetch(crm, "SELECT id FROM crmflow.executions")
    assert await outcome_of(crm, ex["id"]) == ("met", "on_met")


async def test_a_goal_met_between_the_check_and_a_wait_until_watch_is_not_missed(
    crm: psycopg.AsyncConnection[Any], worker: Worker, db_url: str
) -> None:
    """The goal and exit watches written with a wait_until step's: a change meeting the
    goal after the executor's look and before those watches commit was seen by no round,
    and only the wait's own condition was looked at again (the goal waited an hour)."""
    definition = waiting_for({"event": "demo_booked"})
    definition["goal"] = {"field": "status", "operator": "equals", "value": "customer"}
    await apply(crm, definition)
    async with watches_held_back(crm, db_url) as blocked:
        await crm.execute("INSERT INTO leads (name) VALUES ('Ada')")
        await blocked()  # the wait is starting; its watches (goal, wait) not visible yet
        await crm.execute("UPDATE leads SET status = 'customer'")
        await drained(crm)
    [ex] = await fetch(crm, "SELECT id FROM crmflow.executions")
    done = await settled(crm, ex["id"])  # at once, not at the wait's timeout in an hour
    assert done["status"] == "completed" and done["goal_met_at"] is not None
    assert await value(crm, "SELECT count(*) FROM tasks") == 0


async def test_a_change_between_the_goal_check_and_its_watch_is_not_missed(
    crm: psycopg.AsyncConnection[Any], worker: Worker, db_url: str
) -> None:
    await apply(crm, nurture(goal={"field": "status", "operator": "equals", "value": "customer"}))
    async with watches_held_back(crm, db_url) as blocked:
        await crm.execute("INSERT INTO leads (name) VALUES ('Ada')")
        await blocked()  # checked before the follow-up's delay; its watch not visible yet
        await crm.execute("UPDATE leads SET status = 'customer'")
        await drained(crm)
    [ex] = await fetch(crm, "SELECT id FROM crmflow.executions")
    done = await settled(crm, ex["id"])  # at once, not when the hour's delay is over
    assert done["status"] == "completed" and done["goal_met_at"] is not None
    assert await value(crm, "SELECT count(*) FROM tasks WHERE title = 'follow up'") == 0


async def test_a_kept_hit_left_behind_by_a_settle_is_swept_due(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    """A round that kept a hit and committed after the executor's last look (the executor
    then set the execution waiting with its own timeout, over the round's "due now"):
    with no later event no round takes it again; the worker's queue sweep makes an
    execution with kept hits due, and the executor settles them."""
    await apply(
        crm,
        waiting_for(
            {"conditions": [{"field": "score", "operator": "greater_or_equal", "value": 50}]}, "1h"
        ),
    )
    await crm.execute("INSERT INTO leads (name, score) VALUES ('Ada', 10)")
    [ex] = await waiting(crm, 1)

    async def on_its_timeout() -> bool:
        return bool(
            await value(
                crm,
                "SELECT run_at > now() + interval '50 minutes' FROM crmflow.execution_queue"
                " WHERE execution_id = %s",
                ex["id"],
            )
        )

    # (polled: under a loaded full suite the execution was once seen waiting before its
    # queue row had the wait's timeout)
    await wait_until(on_its_timeout, timeout=20)
    await crm.execute(
        "INSERT INTO crmflow.watch_hits (execution_id, kind, step_id, outcome)"
        " VALUES (%s, 'wait', 'wait', 'met')",
        [ex["id"]],
    )
    assert await outcome_of(crm, ex["id"]) == ("met", "on_met")
    assert await value(crm, "SELECT count(*) FROM crmflow.watch_hits") == 0
