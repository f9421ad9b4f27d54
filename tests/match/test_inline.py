"""Immediate database steps run set-based in the matcher's transaction (engine/inline.py)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from engine.config import Settings
from engine.matcher import Matcher
from engine.worker import Worker
from tests.helpers import SEED_QUALIFY, apply, fetch, value, wait_executions_settled

TASK = {
    "name": "Task per lead",
    "trigger": {"type": "entity_created", "entity_type": "lead"},
    "actions": [{"type": "create_task", "title": "Call {{ lead.name }}"}],
}


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(
        database_url=db_url,
        matcher_poll_interval=0.05,
        heartbeat_interval=0.5,
        stalled_worker_timeout=3.0,
        inline_steps=True,
    )


async def jobs(conn: psycopg.AsyncConnection[Any]) -> int:
    """Executions in the step executor's queue."""
    return await value(conn, "SELECT count(*) FROM crmflow.execution_queue")


async def test_database_steps_complete_in_the_matchers_transaction(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    await apply(crm, TASK)
    await crm.execute(
        "INSERT INTO leads (name, owner_id) SELECT 'lead ' || i, 1 + i % 2 "
        "FROM generate_series(1, 300) i"
    )
    assert (await matcher.drain()).enrolled == 300
    assert await jobs(crm) == 0  # no queue job at all
    rows = await fetch(crm, "SELECT status, started_at, finished_at FROM crmflow.executions")
    assert {r["status"] for r in rows} == {"completed"} and all(r["finished_at"] for r in rows)
    tasks = await fetch(crm, "SELECT title, assignee_id, entity_id FROM tasks ORDER BY id")
    assert len(tasks) == 300 and tasks[0] == {
        "title": "Call lead 1",
        "assignee_id": 2,
        "entity_id": "1",
    }
    steps = await fetch(crm, "SELECT status, attempts, result FROM crmflow.execution_steps")
    assert len(steps) == 300 and all(
        s["status"] == "succeeded" and s["attempts"] == 1 and s["result"]["task_id"] for s in steps
    )
    assert (await matcher.drain()).claimed == 0
    assert await value(crm, "SELECT count(*) FROM tasks") == 300  # nothing twice


async def test_the_rest_of_the_steps_goes_to_the_queue(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    await apply(crm, SEED_QUALIFY)
    await crm.execute(
        "INSERT INTO leads (name, email, company, source) "
        "VALUES ('a', 'a@corp.example', 'Corp', 'website_form')"
    )
    await matcher.drain()
    assert await value(crm, "SELECT status FROM leads") == "qualified"  # qualified at once
    [ex] = await fetch(crm, "SELECT id, status, started_at FROM crmflow.executions")
    assert ex["status"] == "pending" and ex["started_at"] is not None
    steps = await fetch(
        crm, "SELECT step_id, status FROM crmflow.execution_steps ORDER BY position"
    )
    assert steps == [
        {"step_id": "qualify_lead", "status": "succeeded"},
        {"step_id": "enrich_lead", "status": "pending"},
    ]
    assert await jobs(crm) == 1


async def test_an_entity_with_queued_work_keeps_its_order(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    await apply(
        crm,
        {
            "name": "Slow first",
            "trigger": {"type": "field_updated", "entity_type": "lead", "field": "score"},
            "conditions": [{"field": "score", "operator": "equals", "value": 1}],
            "actions": [{"type": "test_sleep", "seconds": 0}],  # a plugin: never inline
        },
    )
    await apply(
        crm,
        {
            "name": "Fast",
            "trigger": {"type": "field_updated", "entity_type": "lead", "field": "score"},
            "actions": [{"type": "update_field", "field": "status", "value": "seen"}],
        },
    )
    await crm.execute("INSERT INTO leads (id, name) VALUES (1, 'x'), (2, 'y')")
    await matcher.drain()
    await crm.execute("UPDATE leads SET score = 1 WHERE id = 1")  # slow + fast, queued
    await crm.execute("UPDATE leads SET score = 2 WHERE id = 1")  # fast: must queue behind
    await crm.execute("UPDATE leads SET score = 2 WHERE id = 2")  # fast: nothing ahead
    await matcher.drain()
    rows = await fetch(
        crm,
        "SELECT x.entity_pk->>'id' AS lead, w.name, x.status "
        "FROM crmflow.executions x JOIN crmflow.workflows w "
        "ON w.id = x.workflow_id ORDER BY x.id",
    )
    assert [(r["lead"], r["name"], r["status"]) for r in rows] == [
        ("1", "Slow first", "pending"),
        ("1", "Fast", "pending"),
        ("1", "Fast", "pending"),
        ("2", "Fast", "completed"),
    ]
    # and a later batch: lead 1 still has queued executions, so it queues again
    await crm.execute("UPDATE leads SET score = 3 WHERE id = 1")
    await matcher.drain()
    assert (
        await value(crm, "SELECT status FROM crmflow.executions ORDER BY id DESC LIMIT 1")
        == "pending"
    )


async def test_a_failing_inline_step_sends_the_batch_to_the_queue(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    await apply(
        crm,
        {
            "name": "Bad value",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [{"type": "update_field", "field": "score", "value": "{{ entity.name }}"}],
        },
    )
    await apply(crm, TASK)
    await crm.execute("INSERT INTO leads (name) VALUES ('42'), ('not a number')")
    assert (await matcher.drain()).enrolled == 4
    assert await value(crm, "SELECT count(*) FROM tasks") == 0  # undone with the rest
    assert await value(crm, "SELECT count(*) FROM crmflow.execution_steps") == 0
    assert await jobs(crm) == 4  # the step runner takes them, with retries


async def test_writes_carry_depth_and_actor(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    await apply(
        crm,
        {
            "name": "Tag",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [{"type": "update_field", "field": "status", "value": "tagged"}],
        },
    )
    # No workflow matches lead updates: keep every row, to read the action's own update.
    from engine import capture

    await capture.watch(crm, "leads", all_rows=True)
    await crm.execute("INSERT INTO leads (name) VALUES ('a')")
    await matcher.drain()
    [update] = await fetch(crm, "SELECT depth, actor FROM crmflow.outbox WHERE op = 'update'")
    assert update["depth"] == 1 and update["actor"].startswith("crmflow:execution")


async def test_end_to_end_with_a_worker(crm: psycopg.AsyncConnection[Any], worker: Worker) -> None:
    await apply(
        crm,
        {
            "name": "Mixed",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [
                {"type": "create_task", "title": "t {{ lead.name }}"},
                {"type": "test_sleep", "seconds": 0, "label": "{{ lead.name }}"},
                {"type": "create_task", "title": "u {{ lead.name }}"},
            ],
        },
    )
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 20) i")
    rows = await wait_executions_settled(crm, expected=20)
    assert {r["status"] for r in rows} == {"completed"}
    assert await value(crm, "SELECT count(*) FROM tasks") == 40
    assert await value(crm, "SELECT count(DISTINCT title) FROM tasks") == 40
