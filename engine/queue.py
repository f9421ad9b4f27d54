"""The procrastinate app: crmflow's one task, its retry strategy, and the shared pool."""

from __future__ import annotations

from typing import Any

import procrastinate
from procrastinate import JobContext

from engine.runtime import TASK_NAME, Runner, StepRetryStrategy


def create_app() -> procrastinate.App:
    """An app whose connector gets the engine's pool at ``open_async(pool)``."""
    app = procrastinate.App(connector=procrastinate.PsycopgConnector())
    app.task(name=TASK_NAME, pass_context=True, retry=StepRetryStrategy())(run_execution)
    return app


async def run_execution(context: JobContext, execution_id: int, **_: Any) -> str:
    runner: Runner = context.additional_context["runner"]
    return await runner.run(execution_id, job_lock=context.job.lock)
