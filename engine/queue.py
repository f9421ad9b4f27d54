"""The procrastinate app: crmflow's one task, its retry strategy, and the shared pool."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import procrastinate
from procrastinate import JobContext

from engine.runtime import TASK_NAME, Runner, StepRetryStrategy


def create_app() -> procrastinate.App:
    """An app whose connector gets the engine's pool at ``open_async(pool)``."""
    app = procrastinate.App(connector=procrastinate.PsycopgConnector())
    app.task(name=TASK_NAME, pass_context=True, retry=StepRetryStrategy())(run_execution)
    return app


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


async def run_execution(context: JobContext, execution_id: int, **_: Any) -> str:
    runner: Runner = context.additional_context["runner"]
    tracker: JobTracker | None = context.additional_context.get("jobs")
    if tracker is None:
        return await runner.run(execution_id, job_lock=context.job.lock)
    with tracker.track(context.job):
        return await runner.run(execution_id, job_lock=context.job.lock)
