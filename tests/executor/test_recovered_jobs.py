"""A worker that comes back (SIGCONT after a freeze, a VM resumed) finishes jobs that
the stalled-job recovery meanwhile gave to another worker, which may have run and
deleted them. procrastinate's record of the end then fails ("Job was not found"):
that is handled quietly (a debug line), not left as an exception of a job task nobody
retrieves ("Task exception was never retrieved ... Job was not found", one per job).
Other database errors are not hidden."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import psycopg
import pytest
from procrastinate import exceptions, jobs

from engine.queue import create_app
from engine.runtime import TASK_NAME
from tests.helpers import apply, value, wait_until

Conn = psycopg.AsyncConnection[Any]


async def doing_job(app: Any, queue: str) -> tuple[jobs.Job, int]:
    """A real job, deferred and fetched (``doing``) by a registered worker."""
    await app.configure_task(TASK_NAME, queue=queue).defer_async(execution_id=0)
    worker_id = await app.job_manager.register_worker()
    job = await app.job_manager.fetch_job(queues=[queue], worker_id=worker_id)
    assert job is not None and job.status == "doing"
    return job, worker_id


async def test_ending_a_job_someone_else_recovered_is_quiet(
    conn: Conn, pool: Any, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app()
    await app.open_async(pool)
    queue = settings.queue_name
    caplog.set_level(logging.DEBUG, logger="engine.queue")

    # Recovered (back to todo), run by another worker and deleted on success.
    job, _ = await doing_job(app, queue)
    assert job.id is not None
    await app.job_manager.retry_job_by_id_async(job.id, retry_at=job.scheduled_at)
    other = await app.job_manager.register_worker()
    again = await app.job_manager.fetch_job(queues=[queue], worker_id=other)
    assert again is not None and again.id == job.id
    await app.job_manager.finish_job(again, jobs.Status.SUCCEEDED, delete_job=True)
    await app.job_manager.finish_job(job, jobs.Status.SUCCEEDED, delete_job=True)
    await app.job_manager.finish_job(job, jobs.Status.FAILED, delete_job=False)
    await app.job_manager.retry_job(job)

    # Recovered and now run by another worker (todo, then doing elsewhere): a retry
    # of ours must not take it back.
    job, _ = await doing_job(app, queue)
    assert job.id is not None
    await app.job_manager.retry_job_by_id_async(job.id, retry_at=job.scheduled_at)
    again = await app.job_manager.fetch_job(queues=[queue], worker_id=other)
    assert again is not None and again.id == job.id
    await conn.execute(
        "UPDATE procrastinate.procrastinate_jobs SET status = 'succeeded' WHERE id = %s",
        [job.id],
    )
    await app.job_manager.retry_job(job)

    quiet = [r for r in caplog.records if "was not found" in r.getMessage()]
    assert len(quiet) == 4 and all(r.levelno == logging.DEBUG for r in quiet), quiet
    assert all(r.levelno < logging.WARNING for r in caplog.records if r.name == "engine.queue")

    # Any other refusal of the database still raises.
    job, _ = await doing_job(app, queue)
    with pytest.raises(exceptions.ConnectorException):
        await app.job_manager.finish_job(job, jobs.Status.DOING, delete_job=False)


async def test_a_worker_ending_a_job_that_was_taken_from_it(
    crm: Conn, worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A real worker runs a job; meanwhile the job is taken from it and finished
    elsewhere (deleted). When the step ends, procrastinate's end record fails: no
    unretrieved task exception, no warning, and the worker goes on running jobs."""
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    caplog.set_level(logging.DEBUG)
    try:
        await apply(
            crm,
            {
                "name": "Slow external step",
                "trigger": {"type": "entity_created", "entity_type": "lead"},
                "actions": [{"type": "test_wait", "seconds": 1.5}],
            },
        )
        await crm.execute("INSERT INTO leads (name) VALUES ('first')")

        async def doing() -> bool:
            return bool(
                await value(
                    crm,
                    "SELECT count(*) FROM procrastinate.procrastinate_jobs WHERE status = 'doing'",
                )
            )

        await wait_until(doing, timeout=30, interval=0.02)
        await crm.execute("DELETE FROM procrastinate.procrastinate_jobs WHERE status = 'doing'")

        async def completed(n: int) -> bool:
            done = await value(
                crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'"
            )
            return bool(done == n)

        await wait_until(lambda: completed(1), timeout=30)
        await asyncio.sleep(0.5)  # procrastinate records the end after the task
        gc.collect()
        await crm.execute("INSERT INTO leads (name) VALUES ('second')")
        await wait_until(lambda: completed(2), timeout=30)
    finally:
        loop.set_exception_handler(previous)
    assert unhandled == []
    assert worker.procrastinate_restarts == 0
    loud = [
        r
        for r in caplog.records
        if "not found" in r.getMessage().lower() and r.levelno >= logging.INFO
    ]
    assert loud == []
    assert any(
        "was not found" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records
    )
