"""A worker killed with SIGKILL mid-execution, then a new one: every execution
finishes, no database effect happens twice."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg

from tests.chaos.helpers import processes, start_worker
from tests.helpers import apply, fetch, value, wait_until


async def test_sigkill_mid_execution_then_restart(
    crm: psycopg.AsyncConnection[Any], db_url: str, tmp_path: Path
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
    with processes() as started:
        # Small batches, so the kill lands between two of them (and inside one); short
        # leases, so the killed worker's executions are claimable again soon.
        small = {"CRMFLOW_EXECUTOR_BATCH_SIZE": "4", "CRMFLOW_EXECUTOR_LEASE": "3"}
        first = start_worker(
            db_url, tmp_path, "worker-1", CRMFLOW_STALLED_WORKER_TIMEOUT="2", **small
        )
        started.append(first)

        async def some_done() -> bool:
            done = await value(
                crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'"
            )
            return done >= 8

        await wait_until(some_done, timeout=60)
        first.kill()
        killed_at = time.monotonic()
        unfinished = await value(
            crm, "SELECT count(*) FROM crmflow.executions WHERE status <> 'completed'"
        )
        assert unfinished > 0, "the kill came too late to test anything"

        second = start_worker(
            db_url, tmp_path, "worker-2", CRMFLOW_STALLED_WORKER_TIMEOUT="2", **small
        )
        started.append(second)

        async def all_done() -> bool:
            return (
                await value(
                    crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'"
                )
                == 40
            )

        await wait_until(all_done, timeout=90)
    recovery = time.monotonic() - killed_at
    tasks = await fetch(crm, "SELECT title, count(*) AS n FROM tasks GROUP BY title")
    assert len(tasks) == 80 and all(t["n"] == 1 for t in tasks), "a database effect ran twice"
    traces = await fetch(crm, "SELECT label, count(*) AS n FROM test_trace GROUP BY label")
    assert len(traces) == 40 and all(t["n"] == 1 for t in traces)
    assert recovery < 60
    print(f"recovered {unfinished} unfinished executions in {recovery:.1f}s")
