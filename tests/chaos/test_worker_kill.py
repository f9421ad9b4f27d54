"""Scenario 1: a worker killed with SIGKILL in the middle of multi-step executions (a
slow database step, a delayed step), then a new worker: every execution completes, no
database effect happens twice."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.chaos.helpers import Figures, Process, report, start_worker
from tests.helpers import apply, value, wait_until

pytestmark = pytest.mark.chaos

LEADS = 60

# Effects counted per execution: a task before the slow step, a trace row written by
# the slow step, a task after the delay. Each must exist exactly once per lead.
DUPLICATES = """
SELECT coalesce(sum(n - 1), 0) AS n FROM (
    SELECT count(*) AS n FROM tasks GROUP BY title
    UNION ALL SELECT count(*) FROM test_trace GROUP BY label
    UNION ALL SELECT count(*) FROM crmflow.executions GROUP BY event_id, workflow_id
) AS effects
"""


async def test_sigkill_mid_execution(
    crm: psycopg.AsyncConnection[Any], db_url: str, procs: list[Process], log_dir: Path
) -> None:
    await apply(
        crm,
        {
            "name": "Three effects, one slow, one delayed",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [
                {"type": "create_task", "title": "first {{ lead.name }}"},
                {"type": "test_sleep", "seconds": 0.2, "label": "{{ lead.name }}"},
                {"type": "create_task", "title": "second {{ lead.name }}", "delay": 1},
            ],
        },
    )
    await crm.execute(
        "INSERT INTO leads (name) SELECT 'lead ' || i FROM generate_series(1, %s) i", [LEADS]
    )
    # Small batches, so the kill lands between two of them, or inside one.
    first = start_worker(db_url, log_dir, "worker-1", CRMFLOW_EXECUTOR_BATCH_SIZE="4")
    procs.append(first)

    async def some_completed() -> bool:
        n = await value(crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'")
        return n >= 5

    await wait_until(some_completed, timeout=60)
    first.kill()
    killed_at = time.monotonic()
    unfinished = await value(
        crm, "SELECT count(*) FROM crmflow.executions WHERE status <> 'completed'"
    )
    in_flight = await value(
        crm,
        "SELECT count(*) FROM crmflow.executions WHERE status IN ('running', 'waiting')",
    )
    assert unfinished > 0, "the kill came too late to test anything"

    second = start_worker(db_url, log_dir, "worker-2", CRMFLOW_EXECUTOR_BATCH_SIZE="4")
    procs.append(second)

    async def all_completed() -> bool:
        n = await value(crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'")
        return n == LEADS

    await wait_until(all_completed, timeout=90, interval=0.1)
    recovery = time.monotonic() - killed_at
    report_workers = [first, second]
    second.sample_rss()

    events = await value(crm, "SELECT count(*) FROM crmflow.outbox WHERE entity_type = 'lead'")
    completed = await value(
        crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'"
    )
    lost = await value(
        crm,
        "SELECT count(*) FROM leads l WHERE NOT EXISTS (SELECT 1 FROM crmflow.executions x"
        " WHERE x.entity_pk = jsonb_build_object('id', l.id) AND x.status = 'completed')",
    )
    duplicated = await value(crm, DUPLICATES)
    tasks = await value(crm, "SELECT count(*) FROM tasks")
    traces = await value(crm, "SELECT count(*) FROM test_trace")
    report(
        Figures(
            "sigkill-worker",
            events_captured=events,
            executions_completed=completed,
            duplicated_effects=duplicated,
            lost_events=lost,
            time_to_recover_s=recovery,
            extra={"unfinished_at_kill": unfinished, "in_flight_at_kill": in_flight},
        ),
        report_workers,
    )
    assert events == LEADS
    assert completed == LEADS
    assert lost == 0
    assert duplicated == 0
    assert tasks == 2 * LEADS and traces == LEADS
    assert recovery < 30
    assert second.alive()
