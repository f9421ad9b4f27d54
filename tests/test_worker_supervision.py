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
    crm: psycopg.AsyncConnection[Any], db_url: str, server_url: str, worker: Any
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
        # procrastinate's listener fails to reconnect at once; its worker then stops,
        # once its shutdown gets a connection again.
        await asyncio.sleep(2)
    finally:
        set_allow_connections(server_url, str(dbname), True)

    async def job_worker_restarted() -> bool:
        return worker.procrastinate_restarts >= 1

    await wait_until(job_worker_restarted, timeout=40)

    async with await db.connect(db_url, autocommit=True) as conn:
        await conn.execute("INSERT INTO leads (name) VALUES ('after the outage')")

        async def task_created() -> bool:
            return await value(conn, "SELECT count(*) FROM tasks") == 1

        await wait_until(task_created, timeout=30)
        # A back-off, not a tight loop: a handful of restarts for a short outage.
        assert worker.procrastinate_restarts <= 5
