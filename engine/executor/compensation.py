"""Undoing and redoing: compensation on failure, cancel, replay.

Compensation undoes completed steps of a failed execution (``on_failure:
compensate``); its writes say so (actor ``crmflow:compensation:<id>``), so they
enroll nothing. Cancel and replay are the operators' (CLI, API).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from engine import db
from engine.actions import registry
from engine.config import Settings
from engine.executor.context import StepContext
from engine.executor.errors import describe

if TYPE_CHECKING:
    from engine.executor.plans import Plan
    from engine.executor.runner import Runner

log = logging.getLogger(__name__)


_q = db.Queries("runtime.sql")


async def compensate(
    runner: Runner, ex: dict[str, Any], plan: Plan, rows: dict[str, dict[str, Any]]
) -> None:
    """Undo completed steps in the reverse order of their completion (with
    ``depends_on`` a step listed later may have run earlier); each undo commits with
    its record. Steps run one at a time, so finish times order them."""
    actions = registry()
    done = [s for s in plan.ids if rows[s]["status"] == "succeeded"]
    done.sort(key=lambda s: rows[s]["finished_at"])
    for sid in reversed(done):
        step = plan.steps[sid]
        action = actions.get(step.type)
        if action is None or not action.compensable:
            continue
        async with runner.pool.connection() as conn:
            entity = await runner.entity(conn, ex["entity_type"])
            row = await runner.entity_row(conn, ex, entity)
            ctx = StepContext(
                runner, ex, sid, step, rows[sid]["attempts"], entity, row, {}, runner.settings, conn
            )
            error = None
            try:
                async with conn.transaction():
                    await runner.write_context(conn, ctx, undo=True)
                    await action.compensate(
                        ctx, action.parse(step.params), rows[sid]["result"] or {}
                    )
            except Exception as exc:
                error = f"compensation failed: {describe(exc)}"
                log.warning("execution %s: %s", ex["id"], error)
                await conn.execute(
                    "UPDATE crmflow.execution_steps SET error = %(e)s "
                    "WHERE execution_id = %(id)s AND step_id = %(s)s",
                    {"e": error, "id": ex["id"], "s": sid},
                )
                continue
            await conn.execute(
                _q("step_compensated"), {"id": ex["id"], "step_id": sid, "error": None}
            )


async def cancel(pool: db.Pool, execution_id: int, reason: str | None = None) -> bool:
    """Cancel a live execution; a worker running it stops before its next step."""
    async with pool.connection() as conn, conn.transaction():
        row = await (
            await conn.execute(_q("cancel_execution"), {"id": execution_id, "reason": reason})
        ).fetchone()
        if row is None:
            return False
        await conn.execute(db.query("unqueue", "executor.sql"), {"id": execution_id})
    return True


async def replay(pool: db.Pool, settings: Settings, execution_id: int) -> bool:
    """Replay a failed execution from its failed step(s): back in the queue, due now."""
    async with pool.connection() as conn, conn.transaction():
        row = await (await conn.execute(_q("replay_execution"), {"id": execution_id})).fetchone()
        if row is None:
            return False
        await conn.execute(
            db.query("enqueue_executions", "executor.sql"),
            {"ids": [execution_id], "queue": settings.queue_name},
        )
    return True
