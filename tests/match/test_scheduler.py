"""Scheduled and date-relative workflows, and runs by hand."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from engine import db, workflows
from engine.config import Settings
from engine.model import Scheduled
from engine.scheduler import NotRunnable, Scheduler, next_fire, run_now
from tests.helpers import apply, fetch, value, wait_executions_settled, wait_until

STALE_DEALS = {
    "name": "Follow up on stale deals",
    "trigger": {
        "type": "scheduled",
        "schedule": "0 9 * * *",
        "entity_type": "deal",
        "timezone": "Europe/Paris",
    },
    "conditions": [
        {"field": "status", "operator": "equals", "value": "open"},
        {"field": "last_activity_days_ago", "operator": "greater_than", "value": 7},
    ],
    "actions": [
        {"type": "create_task", "title": "Follow up on {{ deal.name }}", "priority": "high"}
    ],
}


def test_next_fire_follows_the_time_zone() -> None:
    trigger = Scheduled(type="scheduled", schedule="0 9 * * *", timezone="America/New_York")
    after = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)  # 08:00 in New York (EDT)
    assert next_fire(trigger, after) == datetime(2026, 7, 1, 13, 0, tzinfo=UTC)
    seconds = Scheduled(type="scheduled", schedule="30 */5 * * * *")  # seconds first
    assert next_fire(seconds, datetime(2026, 7, 1, 12, 0, 10, tzinfo=UTC)) == datetime(
        2026, 7, 1, 12, 0, 30, tzinfo=UTC
    )
    # A minute field past 23 (it would be an hour with the seconds last) is accepted.
    daily = Scheduled(type="scheduled", schedule="0 30 9 * * *")
    assert next_fire(daily, datetime(2026, 7, 1, 8, 0, tzinfo=UTC)) == datetime(
        2026, 7, 1, 9, 30, tzinfo=UTC
    )
    with pytest.raises(ValueError, match="not a cron expression"):
        Scheduled(type="scheduled", schedule="0 61 9 * * *")


async def make_due(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute("UPDATE crmflow.schedules SET next_run_at = now() - interval '1 second'")


async def test_a_tick_enrolls_matching_rows_once_across_two_workers(
    crm: psycopg.AsyncConnection[Any], db_url: str, settings: Settings
) -> None:
    await crm.execute(
        "INSERT INTO deals (name, status, last_activity_at) VALUES "
        "('stale', 'open', now() - interval '10 days'), ('fresh', 'open', now()),"
        "('stale but won', 'won', now() - interval '30 days'), "
        "('also stale', 'open', now() - interval '8 days')"
    )
    wf = await apply(crm, STALE_DEALS)
    pools = [db.create_pool(db_url, settings, min_size=1, max_size=2) for _ in range(2)]
    for p in pools:
        await p.open()
    schedulers = [Scheduler(p, settings) for p in pools]
    await schedulers[0].sync()
    first = await value(crm, "SELECT next_run_at FROM crmflow.schedules WHERE workflow_id = %s", wf)
    assert first.astimezone(UTC).hour in (7, 8)  # 09:00 in Paris
    await make_due(crm)
    counts = await asyncio.gather(*(s.tick() for s in schedulers for _ in range(3)))
    assert sum(counts) == 2
    rows = await fetch(crm, "SELECT entity_pk, enrollment_key FROM crmflow.executions ORDER BY id")
    assert [r["entity_pk"] for r in rows] == [{"id": 1}, {"id": 4}]
    assert all(r["enrollment_key"].startswith("tick:") for r in rows)
    after = await value(crm, "SELECT next_run_at FROM crmflow.schedules WHERE workflow_id = %s", wf)
    assert after > datetime.now(UTC)
    # the next tick enrolls the still-stale deals again (a new tick, a new key)
    await make_due(crm)
    assert await schedulers[1].tick() == 2
    for p in pools:
        await p.close()


async def test_pausing_removes_the_schedule_and_a_workflow_without_entity_runs_once_per_tick(
    crm: psycopg.AsyncConnection[Any], pool: Any, settings: Settings
) -> None:
    report = await apply(
        crm,
        {
            "name": "Weekly digest",
            "trigger": {"type": "scheduled", "schedule": "0 8 * * 1"},
            "actions": [
                {"type": "send_notification", "recipient": "role:manager", "message": "digest"}
            ],
        },
    )
    scheduler = Scheduler(pool, settings)
    await scheduler.sync()
    await make_due(crm)
    assert await scheduler.tick() == 1
    assert await value(crm, "SELECT entity_type FROM crmflow.executions") is None
    await workflows.set_status(crm, report, "paused")
    await scheduler.sync()
    assert await value(crm, "SELECT count(*) FROM crmflow.schedules") == 0


async def test_date_relative(
    crm: psycopg.AsyncConnection[Any], pool: Any, settings: Settings
) -> None:
    await crm.execute(
        "INSERT INTO accounts (name, renewal_date) VALUES ('due', current_date + 3),"
        "('later', current_date + 20), ('long gone', current_date - 30)"
    )
    await apply(
        crm,
        {
            "name": "Renewal prep",
            "trigger": {
                "type": "date_relative",
                "entity_type": "account",
                "field": "renewal_date",
                "before": "3d",
                "lookback": "2d",
            },
            "actions": [
                {"type": "create_task", "title": "Renewal of {{ account.name }}", "assignee": None}
            ],
        },
    )
    scheduler = Scheduler(pool, settings)
    await scheduler.sync()
    assert await scheduler.tick() == 1
    await make_due(crm)
    assert await scheduler.tick() == 0  # once per date value
    await crm.execute("UPDATE accounts SET renewal_date = current_date + 2 WHERE name = 'due'")
    await make_due(crm)
    assert await scheduler.tick() == 1  # the date moved: a new moment
    keys = [
        r["enrollment_key"]
        for r in await fetch(crm, "SELECT enrollment_key FROM crmflow.executions ORDER BY id")
    ]
    assert all(k.startswith("date:") for k in keys) and len(set(keys)) == 2


async def test_runs_by_hand(crm: psycopg.AsyncConnection[Any], db_url: str) -> None:
    await crm.execute(
        "INSERT INTO deals (name, last_activity_at) VALUES "
        "('a', now() - interval '9 days'), ('b', now() - interval '9 days')"
    )
    stale = await apply(crm, STALE_DEALS)
    assert len(await run_now(crm, stale)) == 2
    assert len(await run_now(crm, stale, entity_id=2)) == 1
    manual = await apply(
        crm,
        {
            "name": "Ping",
            "trigger": {"type": "manual"},
            "actions": [
                {"type": "send_notification", "recipient": 1, "message": "{{ input.text }}"}
            ],
        },
    )
    env = {**os.environ, "CRMFLOW_DATABASE_URL": db_url}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "workflow",
            "run",
            "Ping",
            "--input",
            '{"text": "hello"}',
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    [execution_id] = json.loads(result.stdout)["execution_ids"]
    assert (
        await value(
            crm, "SELECT input->>'text' FROM crmflow.executions WHERE id = %s", execution_id
        )
        == "hello"
    )
    assert (
        await value(crm, "SELECT workflow_id FROM crmflow.executions WHERE id = %s", execution_id)
        == manual
    )
    on_events = await apply(
        crm,
        {
            "name": "On events",
            "trigger": {"type": "entity_created", "entity_type": "deal"},
            "actions": [{"type": "send_notification", "message": "x"}],
        },
    )
    with pytest.raises(NotRunnable, match="runs on events"):
        await run_now(crm, on_events)


# ─────────────── workflows about no entity run to the end (issue 13, item 7) ───────────────


async def test_the_nightly_export_ping_of_the_docs_runs_on_its_tick(
    crm: psycopg.AsyncConnection[Any], worker: Any, web: Any
) -> None:
    """docs/workflows.md's "Nightly export ping" (scheduled, no entity), active, on a
    real worker: each tick's execution completes and makes its request (the tick used to
    enroll an execution whose job was never deferred: `pending` forever, one more per
    tick)."""
    wf = await apply(
        crm,
        {
            "name": "Nightly export ping",
            "trigger": {"type": "scheduled", "schedule": "0 2 * * *"},
            "actions": [
                {
                    "type": "http_request",
                    "url": web.url("/nightly"),
                    "body": {"at": "{{ now.isoformat() }}"},
                }
            ],
        },
    )

    async def scheduled() -> bool:
        n = await value(crm, "SELECT count(*) FROM crmflow.schedules WHERE workflow_id = %s", wf)
        return bool(n)

    for tick in (1, 2):
        await wait_until(scheduled)
        await make_due(crm)
        rows = await wait_executions_settled(crm, expected=tick, timeout=10)
        assert [r["status"] for r in rows] == ["completed"] * tick, rows
        assert all(r["entity_type"] is None and r["error"] is None for r in rows)
        assert len(web.requests) == tick
    assert web.requests[0].path == "/nightly" and "at" in web.requests[0].json()
    steps = await fetch(crm, "SELECT status FROM crmflow.execution_steps ORDER BY id")
    assert [s["status"] for s in steps] == ["succeeded", "succeeded"]


MANUAL_PING = {
    "name": "Ping",
    "trigger": {"type": "manual"},
    "actions": [{"type": "send_notification", "recipient": 1, "message": "{{ input.text }}"}],
}


async def test_a_manual_run_about_no_entity_runs_from_the_cli(
    crm: psycopg.AsyncConnection[Any], db_url: str, worker: Any
) -> None:
    """`crmflow workflow run` of a manual workflow without entity: the execution
    completes and its notification is there."""
    await apply(crm, MANUAL_PING)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "engine.cli", "workflow", "run", "Ping", "--json"),
            *("--input", '{"text": "hello from the cli"}'),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "CRMFLOW_DATABASE_URL": db_url},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    [execution_id] = json.loads(result.stdout)["execution_ids"]
    [ex] = await wait_executions_settled(crm, expected=1, timeout=10)
    assert (ex["id"], ex["status"], ex["entity_type"]) == (execution_id, "completed", None)
    assert await fetch(crm, "SELECT recipient_id, message, entity_type FROM notifications") == [
        {"recipient_id": 1, "message": "hello from the cli", "entity_type": None}
    ]


async def test_a_manual_run_about_no_entity_runs_from_the_api(
    crm: psycopg.AsyncConnection[Any], client: Any, worker: Any
) -> None:
    """`POST /workflows/{id}/run` of a manual workflow without entity: 202, then the
    execution completes and its notification is there."""
    wf = await apply(crm, MANUAL_PING)
    response = await client.post(f"/workflows/{wf}/run", json={"input": {"text": "via api"}})
    assert response.status_code == 202, response.text
    [execution_id] = response.json()["execution_ids"]
    [ex] = await wait_executions_settled(crm, expected=1, timeout=10)
    assert (ex["id"], ex["status"]) == (execution_id, "completed")
    assert await value(crm, "SELECT message FROM notifications") == "via api"
