"""A worker frozen (SIGSTOP) while running steps, for longer than its leases and the
stalled-worker timeout: a live worker takes its executions over and runs them.
Thawed (SIGCONT), the first worker ends its copies: it records nothing over the live
worker's records, and procrastinate cannot record the end of its drainer job (the job
was recovered), which is quiet: no "Task exception was never retrieved ... Job was not
found"."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.chaos.helpers import Process, start_worker
from tests.helpers import apply, value, wait_until

pytestmark = pytest.mark.chaos

JOBS = 4


async def test_a_thawed_worker_ends_recovered_jobs_quietly(
    crm: psycopg.AsyncConnection[Any], db_url: str, procs: list[Process], log_dir: Path
) -> None:
    await apply(
        crm,
        {
            "name": "Slow external step",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [{"type": "test_wait", "seconds": 4}],
        },
    )
    frozen = start_worker(db_url, log_dir, "frozen", concurrency=JOBS)
    procs.append(frozen)
    await crm.execute(
        "INSERT INTO leads (name) SELECT 'lead ' || i FROM generate_series(1, %s) i", [JOBS]
    )

    async def steps_running() -> bool:
        running = await value(
            crm, "SELECT count(*) FROM crmflow.execution_steps WHERE status = 'running'"
        )
        return bool(running == JOBS)

    await wait_until(steps_running, timeout=60, interval=0.05)
    frozen.popen.send_signal(signal.SIGSTOP)
    try:
        live = start_worker(db_url, log_dir, "live", concurrency=JOBS)
        procs.append(live)

        async def recovered_and_completed() -> bool:
            done = await value(
                crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'"
            )
            return bool(done == JOBS)

        await wait_until(recovered_and_completed, timeout=60, interval=0.2)
        assert f"took over {JOBS} executions whose lease ran out" in live.log(), live.log()
    finally:
        frozen.popen.send_signal(signal.SIGCONT)
    await asyncio.sleep(6)  # its steps wake up and end; procrastinate records the ends
    log = frozen.log()
    assert frozen.alive()
    assert "Task exception was never retrieved" not in log, log
    assert "Job was not found" not in log, log
    left = await value(crm, "SELECT count(*) FROM procrastinate.procrastinate_jobs")
    assert left == 0
