"""Scenario 3: the worker's LISTEN connections are terminated (``pg_terminate_backend``).
Events keep flowing (the matcher polls, procrastinate polls its queue) and both
listeners reconnect on their own."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.chaos.helpers import Figures, Process, report, start_worker
from tests.chaos.test_worker_kill import DUPLICATES
from tests.helpers import apply, fetch, value, wait_until

pytestmark = pytest.mark.chaos

BEFORE = 10
# Capture to last step, the slowest execution (its second step waits for the job worker).
LATENCY = """
SELECT extract(epoch FROM max(finished_at - triggered_at))::float8 FROM crmflow.executions
"""

LISTENERS = """
SELECT pid FROM pg_stat_activity
 WHERE datname = current_database() AND query ILIKE 'LISTEN%%' AND pid <> pg_backend_pid()
"""


async def test_listen_connection_terminated(
    crm: psycopg.AsyncConnection[Any], db_url: str, procs: list[Process], log_dir: Path
) -> None:
    await apply(
        crm,
        {
            "name": "Matcher then job",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [
                {"type": "create_task", "title": "now {{ lead.name }}"},
                {"type": "create_task", "title": "later {{ lead.name }}", "delay": 0.2},
            ],
        },
    )
    # The production poll interval: a lost LISTEN costs at most this much per event.
    worker = start_worker(db_url, log_dir, CRMFLOW_MATCHER_POLL_INTERVAL="0.5")
    procs.append(worker)

    async def listening() -> bool:
        return len(await fetch(crm, LISTENERS)) >= 2

    await wait_until(listening, timeout=30)
    before = {r["pid"] for r in await fetch(crm, LISTENERS)}
    for i in range(BEFORE):
        await crm.execute("INSERT INTO leads (name) VALUES (%s)", [f"before {i}"])
        await asyncio.sleep(0.1)

    async def before_completed() -> bool:
        n = await value(crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'")
        return n == BEFORE

    await wait_until(before_completed, timeout=30)
    baseline = await value(crm, LATENCY)

    terminated = await value(
        crm, f"SELECT count(pg_terminate_backend(pid)) FROM ({LISTENERS}) AS l"
    )
    killed_at = time.monotonic()
    listeners_back: float | None = None
    written = 0
    while time.monotonic() - killed_at < 4 or listeners_back is None:
        await crm.execute("INSERT INTO leads (name) VALUES (%s)", [f"after {written}"])
        written += 1
        now_listening = {r["pid"] for r in await fetch(crm, LISTENERS)}
        if listeners_back is None and len(now_listening - before) >= 2:
            listeners_back = time.monotonic() - killed_at
        assert time.monotonic() - killed_at < 30, "the listeners did not come back"
        await asyncio.sleep(0.1)
    expected = written + BEFORE

    async def all_completed() -> bool:
        n = await value(crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'")
        return n == expected

    await wait_until(all_completed, timeout=60)
    recovered = time.monotonic() - killed_at
    latency = await value(crm, LATENCY)
    events = await value(crm, "SELECT count(*) FROM crmflow.outbox")
    lost = await value(
        crm,
        "SELECT count(*) FROM leads l WHERE NOT EXISTS (SELECT 1 FROM crmflow.executions x"
        " WHERE x.entity_pk = jsonb_build_object('id', l.id) AND x.status = 'completed')",
    )
    duplicated = await value(crm, DUPLICATES)
    tasks = await value(crm, "SELECT count(*) FROM tasks")
    after = {r["pid"] for r in await fetch(crm, LISTENERS)}
    report(
        Figures(
            "listen-terminated",
            events_captured=events,
            executions_completed=expected,
            duplicated_effects=duplicated,
            lost_events=lost,
            time_to_recover_s=recovered,
            extra={
                "terminated": terminated,
                "listeners_back_s": round(listeners_back, 2),
                "max_latency_s": round(latency, 2),
                "max_latency_before_s": round(baseline, 2),
            },
        ),
        [worker],
    )
    assert terminated >= 2
    assert not before & after and len(after) >= 2, "the listeners did not reconnect"
    assert events == expected and lost == 0 and duplicated == 0 and tasks == 2 * expected
    assert latency < 5, "events stalled without their LISTEN connection"
    assert "LISTEN connection lost" in worker.log()
    assert worker.alive()
