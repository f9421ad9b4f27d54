"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from engine import workflows

SEED_QUALIFY = {
    "name": "Auto-qualify new leads from website",
    "trigger": {"type": "entity_created", "entity_type": "lead"},
    "conditions": [{"field": "source", "operator": "equals", "value": "website_form"}],
    "actions": [{"type": "qualify_lead"}, {"type": "enrich_lead", "delay": 60}],
    "status": "active",
}


async def install_test_crm(conn: psycopg.AsyncConnection[Any]) -> None:
    """Watch the example CRM (leads, deals, accounts, contacts), add the ``test_trace``
    table of tests/plugins.py and three users: 1 Ann (sales_rep), 2 Carl (csm), 3 Mia
    (manager). The database must have the example CRM installed."""
    from engine import capture
    from engine.seed import WATCHED

    for table, derived in WATCHED.items():
        await capture.watch(conn, f"public.{table}", derived=derived)
    await conn.execute(
        "CREATE TABLE test_trace (id serial PRIMARY KEY, execution_id bigint, step text,"
        " label text, at timestamptz DEFAULT clock_timestamp())"
    )
    await conn.execute(
        "INSERT INTO users (id, name, email, role) VALUES "
        "(1, 'Ann Rep', 'ann@acme.test', 'sales_rep'), "
        "(2, 'Carl CSM', 'carl@acme.test', 'csm'), "
        "(3, 'Mia Manager', 'mia@acme.test', 'manager')"
    )


async def apply(conn: psycopg.AsyncConnection[Any], definition: dict[str, Any]) -> int:
    definition = {"status": "active", **definition}
    return (await workflows.apply(conn, definition)).id


async def fetch(conn: psycopg.AsyncConnection[Any], query: str, *args: Any) -> list[dict[str, Any]]:
    return await (await conn.execute(query, args or None)).fetchall()


async def value(conn: psycopg.AsyncConnection[Any], query: str, *args: Any) -> Any:
    row = await (await conn.execute(query, args or None)).fetchone()
    return None if row is None else next(iter(row.values()))


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float = 15.0, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def wait_executions_settled(
    conn: psycopg.AsyncConnection[Any],
    expected: int | None = None,
    timeout: float = 20.0,
    allow_waiting: bool = False,
) -> list[dict[str, Any]]:
    """Wait until no execution is pending or running (and ``expected`` exist)."""
    live = ("pending", "running") if allow_waiting else ("pending", "running", "waiting")

    async def settled() -> bool:
        rows = await fetch(conn, "SELECT status FROM crmflow.executions")
        if expected is not None and len(rows) < expected:
            return False
        return all(r["status"] not in live for r in rows)

    await wait_until(settled, timeout)
    return await fetch(conn, "SELECT * FROM crmflow.executions ORDER BY id")


async def execution_lock(conn: psycopg.AsyncConnection[Any], execution_id: int) -> str:
    return await value(
        conn,
        "SELECT crmflow.execution_lock(entity_type, entity_pk, id) FROM crmflow.executions"
        " WHERE id = %s",
        execution_id,
    )


async def run_job(runner: Any, conn: psycopg.AsyncConnection[Any], execution_id: int) -> str:
    """Run the execution's job once, as procrastinate would (holding its lock)."""
    return await runner.run(execution_id, job_lock=await execution_lock(conn, execution_id))


async def drive(
    runner: Any, conn: psycopg.AsyncConnection[Any], execution_id: int, max_runs: int = 20
) -> dict[str, Any]:
    """Run the execution's job until it finishes, skipping retry back-offs and delays
    (each wait is cut short by moving the step's time forward). Returns the execution."""
    from engine.runtime import StepRetryLater

    for _ in range(max_runs):
        with contextlib.suppress(StepRetryLater):
            await run_job(runner, conn, execution_id)
        [ex] = await fetch(conn, "SELECT * FROM crmflow.executions WHERE id = %s", execution_id)
        if ex["status"] not in ("pending", "running", "waiting"):
            return ex
        await conn.execute(
            "UPDATE crmflow.execution_steps SET scheduled_at = now() - interval '1 second'"
            " WHERE execution_id = %s AND status = 'scheduled'",
            [execution_id],
        )
    raise AssertionError(f"execution {execution_id} did not finish in {max_runs} runs")


async def steps(conn: psycopg.AsyncConnection[Any], execution_id: int) -> list[dict[str, Any]]:
    return await fetch(
        conn,
        "SELECT * FROM crmflow.execution_steps WHERE execution_id = %s ORDER BY position",
        execution_id,
    )


async def execution_ids(conn: psycopg.AsyncConnection[Any]) -> list[int]:
    return [r["id"] for r in await fetch(conn, "SELECT id FROM crmflow.executions ORDER BY id")]
