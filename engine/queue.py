"""The procrastinate app: the executor's wake-ups, and the shared pool.

procrastinate carries crmflow's delayed and immediate work as *wake-ups*: a
``crmflow.run_steps`` job per due moment, whose run drains the execution queue
(engine/executor/queue.py) in batches. ``crmflow.run_execution`` jobs, one per
execution, were queued by earlier versions; one still queued only puts its execution
in the execution queue (migration 0019 already moved every live execution there).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Iterator
from typing import Any

import procrastinate
import psycopg
from procrastinate import JobContext, exceptions, jobs, manager

from engine.executor import queue as execution_queue
from engine.executor.batch import BatchExecutor

log = logging.getLogger(__name__)


def create_app() -> procrastinate.App:
    """An app whose connector gets the engine's pool at ``open_async(pool)``."""
    app = procrastinate.App(connector=procrastinate.PsycopgConnector())
    app.job_manager = JobManager(connector=app.connector)
    app.task(name=execution_queue.TASK_NAME, pass_context=True)(run_steps)
    app.task(name=LEGACY_TASK_NAME, pass_context=True)(run_execution)
    return app


LEGACY_TASK_NAME = "crmflow.run_execution"


def _job_gone(exc: exceptions.ConnectorException) -> bool:
    """Whether procrastinate's database refused to end a job because the job is no longer
    this worker's to end: its functions raise "Job was not found or not in "doing"
    status" (procrastinate has no exception class of its own for it)."""
    cause = exc.__cause__
    return isinstance(cause, psycopg.errors.RaiseException) and str(cause).startswith(
        "Job was not found"
    )


class JobManager(manager.JobManager):
    """procrastinate's job manager, quiet when the end of a job cannot be recorded
    because the job was taken away meanwhile.

    A worker frozen for longer than ``stalled_worker_timeout`` (SIGSTOP, a paused VM)
    loses its jobs to the stalled-job recovery; another worker runs them and deletes
    them. Once thawed, the first worker ends its copies, and procrastinate's
    ``finish_job``/``retry_job`` fail: in procrastinate's job task, so the exception
    is never retrieved and asyncio logs "Task exception was never retrieved ... Job was
    not found" once per job. The job is in the hands of the worker that took it: there
    is nothing left to do, so it is logged at debug level. Only the worker's own calls
    are quiet; ``*_by_id_async`` (the recovery's) still raise.
    """

    async def finish_job(self, job: jobs.Job, status: jobs.Status, delete_job: bool) -> None:
        try:
            await super().finish_job(job, status=status, delete_job=delete_job)
        except exceptions.ConnectorException as exc:
            if not _job_gone(exc):
                raise
            log.debug(
                "job %s was not found as this worker's to end (%s): it was recovered and"
                " given to another worker meanwhile",
                job.id,
                status.value,
            )

    async def retry_job(
        self,
        job: jobs.Job,
        retry_at: datetime.datetime | None = None,
        priority: int | None = None,
        queue: str | None = None,
        lock: str | None = None,
    ) -> None:
        try:
            await super().retry_job(
                job, retry_at=retry_at, priority=priority, queue=queue, lock=lock
            )
        except exceptions.ConnectorException as exc:
            if not _job_gone(exc):
                raise
            log.debug(
                "job %s was not found as this worker's to retry: it was recovered and given"
                " to another worker meanwhile",
                job.id,
            )


class JobTracker:
    """The jobs this process is running, and the procrastinate worker ids it ran them as.

    procrastinate records a job's end (``finish_job``/``retry_job``) after the task
    returns; when that write fails (the database went away at that moment) the job
    stays ``doing`` under a worker that lives on, so the stalled-job recovery, which
    looks only at dead workers, never gives it back. The worker compares the jobs the
    database says it is running with these (``Worker.recover_orphaned``).
    """

    def __init__(self) -> None:
        self.running: set[int] = set()
        self.worker_ids: set[int] = set()
        # Orphan candidates of the previous sweep (see Worker.recover_orphaned).
        self.suspects: set[int] = set()

    @contextlib.contextmanager
    def track(self, job: procrastinate.jobs.Job) -> Iterator[None]:
        assert job.id is not None
        self.running.add(job.id)
        if job.worker_id is not None:
            self.worker_ids.add(job.worker_id)
        try:
            yield
        finally:
            self.running.discard(job.id)


async def run_steps(context: JobContext, /, **_: Any) -> int:
    """A wake-up: drain the execution queue (returns how many executions advanced)."""
    executor: BatchExecutor = context.additional_context["executor"]
    tracker: JobTracker | None = context.additional_context.get("jobs")
    if tracker is None:
        return await executor.drain()
    with tracker.track(context.job):
        return await executor.drain()


async def run_execution(context: JobContext, /, execution_id: int, **_: Any) -> str:
    """A job of an earlier version: its execution goes to the execution queue."""
    executor: BatchExecutor = context.additional_context["executor"]
    async with executor.pool.connection() as conn:
        await execution_queue.enqueue(conn, [execution_id], executor.settings.queue_name)
    return "queued"
