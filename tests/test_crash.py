"""A worker killed with SIGKILL mid-execution, then a new one: every execution
finishes, no database effect happens twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import psycopg

from tests.helpers import apply, fetch, value, wait_until


def start_worker(db_url: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CRMFLOW_DATABASE_URL": db_url,
        "CRMFLOW_STALLED_WORKER_TIMEOUT": "2",
        "CRMFLOW_HEARTBEAT_INTERVAL": "0.5",
        "CRMFLOW_MATCHER_POLL_INTERVAL": "0.1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "worker", "--concurrency", "4"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def test_sigkill_mid_execution_then_restart(
    crm: psycopg.AsyncConnection[Any], db_url: str
) -> None:
    await apply(
        crm,
        {
            "name": "Three effects",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [
                {"type": "create_task", "title": "first {{ lead.name }}"},
                {"type": "test_sleep", "seconds": 0.15, "label": "{{ lead.name }}"},
                {"type": "create_task", "title": "second {{ lead.name }}"},
            ],
        },
    )
    await crm.execute("INSERT INTO leads (name) SELECT 'lead ' || i FROM generate_series(1, 40) i")
    first = start_worker(db_url)
    try:

        async def some_done() -> bool:
            done = await value(
                crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'"
            )
            return done >= 8

        await wait_until(some_done, timeout=60)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    killed_at = time.monotonic()
    unfinished = await value(
        crm, "SELECT count(*) FROM crmflow.executions WHERE status <> 'completed'"
    )
    assert unfinished > 0, "the kill came too late to test anything"

    second = start_worker(db_url)
    try:

        async def all_done() -> bool:
            return (
                await value(
                    crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'"
                )
                == 40
            )

        await wait_until(all_done, timeout=90)
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(timeout=15)
        except subprocess.TimeoutExpired:
            second.kill()
    recovery = time.monotonic() - killed_at
    tasks = await fetch(crm, "SELECT title, count(*) AS n FROM tasks GROUP BY title")
    assert len(tasks) == 80 and all(t["n"] == 1 for t in tasks), "a database effect ran twice"
    traces = await fetch(crm, "SELECT label, count(*) AS n FROM test_trace GROUP BY label")
    assert len(traces) == 40 and all(t["n"] == 1 for t in traces)
    assert recovery < 60
    print(f"recovered {unfinished} unfinished executions in {recovery:.1f}s")
    await asyncio.sleep(0)
