"""``crmflow worker`` restarts procrastinate's worker when it stops on its own.

procrastinate stops its worker when its LISTEN connection cannot reconnect or its
heartbeat fails, which is what a database outage does. The fault here is real and
confined to the test's own database: it refuses connections for a while and every
session on it is terminated."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg import sql

from engine import db
from tests.helpers import apply, value, wait_until


def set_allow_connections(server_url: str, dbname: str, allow: bool) -> None:
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(dbname), sql.Literal(allow)
            )
        )
        if not allow:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                [dbname],
            )


async def test_job_worker_restarts_after_an_outage(
    crm: psycopg.AsyncConnection[Any],
    db_url: str,
    server_url: str,
    worker: Any,
) -> None:
    dbname = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    await apply(
        crm,
        {
            "name": "Needs the job worker",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [{"type": "create_task", "title": "later {{ lead.name }}", "delay": 0.5}],
        },
    )
    assert worker.procrastinate_restarts == 0
    set_allow_connections(server_url, str(dbname), False)
    try:
        # procrastinate's listener cannot reconnect meanwhile: its worker stops (once
        # it notices), and must be started again for the job below to run.
        await asyncio.sleep(3)
    finally:
        set_allow_connections(server_url, str(dbname), True)

    async with await db.connect(db_url, autocommit=True) as conn:
        await conn.execute("INSERT INTO leads (name) VALUES ('after the outage')")

        async def task_created() -> bool:
            return await value(conn, "SELECT count(*) FROM tasks") == 1

        await wait_until(task_created, timeout=60)
        # A back-off, not a tight loop: a handful of restarts for a short outage.
        assert worker.procrastinate_restarts <= 5


async def test_a_job_left_doing_by_a_live_worker_is_run_again(
    crm: psycopg.AsyncConnection[Any], worker: Any
) -> None:
    """procrastinate records a job's end after the task; when that write fails the job
    stays ``doing`` under a worker that lives on. The job here is put in that state by
    hand: the worker must notice it is not running it and give it back to the queue."""
    await apply(
        crm,
        {
            "name": "A step now, a step later",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [
                {"type": "create_task", "title": "now {{ lead.name }}"},
                {"type": "create_task", "title": "later {{ lead.name }}", "delay": 3600},
            ],
        },
    )
    await crm.execute("INSERT INTO leads (name) VALUES ('orphan')")

    async def waiting_for_later() -> bool:
        return await value(crm, "SELECT count(*) FROM tasks") == 1 and bool(
            await value(crm, "SELECT count(*) FROM procrastinate_jobs WHERE status = 'todo'")
        )

    await wait_until(waiting_for_later, timeout=20)
    [worker_id] = worker.jobs.worker_ids
    # The delay is over, and the wake-up job is held by this live worker as if it had
    # run it without its end being recorded.
    await crm.execute(
        "UPDATE crmflow.execution_steps SET scheduled_at = now() - interval '1 second'"
        " WHERE status = 'scheduled'"
    )
    await crm.execute("UPDATE crmflow.execution_queue SET run_at = now() - interval '1 second'")
    await crm.execute(
        "UPDATE procrastinate_jobs SET status = 'doing', worker_id = %s,"
        " scheduled_at = now() WHERE status = 'todo'",
        [worker_id],
    )

    async def completed() -> bool:
        return (
            await value(crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'")
            == 1
        )

    await wait_until(completed, timeout=20)

    async def given_back() -> bool:  # the job too, even if another drainer ran it first
        return bool(worker.orphaned_jobs == 1)

    await wait_until(given_back, timeout=10)
    assert await value(crm, "SELECT count(*) FROM tasks") == 2
