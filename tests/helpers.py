"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
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
