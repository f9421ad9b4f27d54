"""The reproduction of issue 12 item 5 at full size: 20 writer threads for 30 s, each
transaction updating three leads in ascending id order and then a deal, first with
the ``field_updated`` workflows paused, then active (inline ``update_field`` and
``create_task``), against a ``crmflow worker``. The writers never get an error, and
every execution runs exactly once. Prints writer commits and errors in both phases."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from engine import workflows
from tests.chaos.helpers import Figures, Process, report, start_worker
from tests.helpers import apply, value, wait_until
from tests.match.test_host_deadlocks import (
    DEAL_AMOUNT,
    LEAD_SCORE,
    check_every_execution_ran_once,
    run_writers,
    setup_crm,
)

pytestmark = pytest.mark.chaos

WRITERS = 20
SECONDS = 30.0
LEADS = 200
DEALS = 50


async def test_twenty_writers_against_inline_workflows(
    crm: psycopg.AsyncConnection[Any], db_url: str, procs: list[Process], log_dir: Path
) -> None:
    await setup_crm(crm, LEADS, DEALS)
    ids = [
        await apply(crm, {**LEAD_SCORE, "status": "paused"}),
        await apply(crm, {**DEAL_AMOUNT, "status": "paused"}),
    ]
    worker = start_worker(db_url, log_dir, concurrency=10)
    procs.append(worker)

    async def registered() -> bool:
        return await value(crm, "SELECT count(*) FROM crmflow.workers") == 1

    await wait_until(registered, timeout=60)
    paused = await asyncio.to_thread(run_writers, db_url, WRITERS, SECONDS, LEADS, DEALS)

    async def drained() -> bool:
        return not await value(
            crm, "SELECT count(*) FROM crmflow.outbox WHERE processed_at IS NULL"
        )

    await wait_until(drained, timeout=120, interval=0.25)
    for workflow_id in ids:
        await workflows.set_status(crm, workflow_id, "active")
    active = await asyncio.to_thread(run_writers, db_url, WRITERS, SECONDS, LEADS, DEALS)
    started = time.monotonic()
    # Slow: under this contention most executions take the queue (an entity with one
    # execution there sends its later ones after it), ~50-100 executions/s here.
    figures = await check_every_execution_ran_once(crm, timeout=1500)
    drain_s = time.monotonic() - started
    log = worker.log()
    report(
        Figures(
            "concurrent-writers",
            events_captured=figures["events"],
            executions_completed=await value(
                crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'"
            ),
            extra={
                "writers": WRITERS,
                "seconds": SECONDS,
                "paused_commits": paused.commits,
                "paused_errors": len(paused.errors),
                "active_commits": active.commits,
                "active_errors": len(active.errors),
                "active_errors_kinds": sorted(set(active.errors))[:3],
                "drain_after_writes_s": round(drain_s, 1),
                "matcher_conflicts": log.count("matcher batch rolled back"),
                "matcher_lost_db": log.count("matcher lost the database"),
            },
        ),
        [worker],
    )
    assert paused.errors == [] and active.errors == []
