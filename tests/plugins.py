"""Actions used by the tests, loaded like user plugins (CRMFLOW_PLUGINS=["tests.plugins"])."""

from __future__ import annotations

import asyncio
from typing import Any

from psycopg import sql
from pydantic import Field

from engine.actions.base import Action, Params
from engine.runtime import StepContext


class SleepParams(Params):
    seconds: float = Field(0.1, ge=0, le=60)
    label: str = "step"


class Sleep(Action):
    """A database step that takes a while (pg_sleep in the step's transaction) and leaves
    a trace row in test_trace (made by the ``crm`` fixture), so tests see what ran,
    when, and how often."""

    name = "test_sleep"
    Params = SleepParams

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        conn = ctx.require_conn()
        await conn.execute(
            "INSERT INTO public.test_trace (execution_id, step, label) VALUES (%s, %s, %s)",
            [ctx.execution_id, ctx.step_id, ctx.render(params.label)],
        )
        await conn.execute(sql.SQL("SELECT pg_sleep({})").format(sql.Literal(params.seconds)))
        return {"slept": params.seconds}


class AsyncSleep(Action):
    """An external step that sleeps in Python (for timeouts)."""

    name = "test_wait"
    Params = SleepParams
    kind = "external"

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        await asyncio.sleep(params.seconds)
        return {"waited": params.seconds}


ACTIONS = [Sleep(), AsyncSleep()]
