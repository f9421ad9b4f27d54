"""One step of one execution on the careful path: its attempt, from the checks to the record.

:class:`engine.executor.runner.Runner` decides which step of an execution runs next and
settles the execution (started, waiting, completed, failed); what it takes to run that
one step lives here: the ``when`` check and the business-hours window, then a database
attempt (inside the transaction that records it, under a savepoint) or an external
attempt (the call between two transactions, behind the host's circuit breaker and
slot), and the records of success, of a failed attempt (retry or fail for good) and of a
step that cannot run at all (an unknown action, bad parameters).

A module of its own because it is the part an action's author reads and the part the
runner's loop does not need to show; the functions take the runner for its pool,
settings, breakers and the entity cache it keeps.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

from psycopg import sql
from psycopg.types.json import Jsonb

from engine import db, metrics, tracing, windows
from engine.actions import registry
from engine.actions.base import Action
from engine.breakers import verdict
from engine.config import Settings
from engine.executor.context import StepContext, now
from engine.executor.errors import PermanentError, Skip, StepRetryLater, describe, jsonable
from engine.executor.plans import Plan
from engine.model import Step
from engine.statuses import DONE_STEP, LIVE, StepStatus

if TYPE_CHECKING:
    from engine.executor.runner import Runner

# The careful path logs under one name, as before this module was split out of runner.py.
log = logging.getLogger("engine.executor.runner")

_q = db.Queries("runtime.sql")


async def set_execution_status(
    conn: db.DictConnection,
    execution_id: int,
    status: str,
    error: str | None,
    not_before: datetime | None = None,
) -> None:
    await conn.execute(
        _q("set_execution_status"),
        {
            "id": execution_id,
            "status": status,
            "error": error,
            "not_before": not_before,
        },
    )


async def run_step(
    runner: Runner,
    ex: dict[str, Any],
    plan: Plan,
    sid: str,
    rows: dict[str, dict[str, Any]],
    wait_outcome: str | None = None,
) -> None:
    """Run one ready step of the execution: skipped on a false ``when``, deferred
    outside its window, else one attempt (database or external) recorded."""
    step = plan.steps[sid]
    action = registry().get(step.type)
    steps_view = {s: {"status": r["status"], "result": r["result"]} for s, r in rows.items()}
    async with db.autocommit(runner.pool) as conn:  # reads, then at most one write
        entity = await runner.entity(conn, ex["entity_type"])
        row = await runner.entity_row(conn, ex, entity)
        if sid in plan.when_sql and not await runner.evaluate(
            conn, entity, row, steps_view, plan.when_sql[sid]
        ):
            await conn.execute(
                _q("step_skipped"),
                {
                    "id": ex["id"],
                    "step_id": sid,
                    "result": Jsonb({"reason": "'when' was false"}),
                },
            )
            return
    if step.window is not None and await defer_to_window(runner, ex, sid, step, row):
        return  # outside its business hours: scheduled at the next opening
    ctx = StepContext(runner, ex, sid, step, 0, entity, row, steps_view, runner.settings)
    ctx.wait_outcome = wait_outcome
    if action is None:
        await record_failure(runner, ex, step, sid, PermanentError(f"unknown action {step.type!r}"))
        return
    try:
        params = action.parse(step.params)
    except Exception as exc:
        await record_failure(runner, ex, step, sid, PermanentError(f"bad parameters: {exc}"))
        return
    with tracing.step_span(ctx):
        if action.kind == "database":
            await run_database_step(runner, ctx, action, params)
        else:
            await run_external_step(runner, ctx, action, params)


async def defer_to_window(
    runner: Runner, ex: dict[str, Any], sid: str, step: Step, row: dict[str, Any] | None
) -> bool:
    """A windowed step due now, its ``when`` true (engine/windows.py): False when its
    window is open; else it is scheduled at the next opening (True), where its
    ``when`` is read again."""
    window = step.window
    assert window is not None
    async with db.autocommit(runner.pool) as conn:
        decision = windows.decide(window, row, now())
        if decision.zone.note:
            log.warning(
                "execution %s step %s: window %s: %s",
                ex["id"],
                sid,
                window.describe(),
                decision.zone.note,
            )
        if decision.worth_noting:  # deferred, or open in a fallback zone
            await conn.execute(
                db.query("steps_deferred", "executor.sql"),
                {
                    "execution_ids": [ex["id"]],
                    "step_ids": [sid],
                    "ats": [None if decision.open else decision.at],
                    "notes": [Jsonb(decision.note())],
                },
            )
    if decision.open:
        return False
    tracing.step_waits(ex, sid, step.type, decision.at)
    return True


def step_timeout(settings: Settings, step: Step) -> float:
    return float(step.timeout or settings.default_step_timeout)


async def begin_attempt(conn: db.DictConnection, ctx: StepContext) -> bool:
    """Lock the step and its execution and count a new attempt (``ctx.attempt``);
    False when the step is done already, failed for good, or its execution ended."""
    lk = await (
        await conn.execute(_q("lock_step"), {"id": ctx.execution_id, "step_id": ctx.step_id})
    ).fetchone()
    if (
        lk is None
        or lk["status"] in (*DONE_STEP, StepStatus.FAILED)
        or lk["execution_status"] not in LIVE
    ):
        return False
    attempt = await (
        await conn.execute(_q("step_running"), {"id": ctx.execution_id, "step_id": ctx.step_id})
    ).fetchone()
    assert attempt is not None
    ctx.attempt = attempt["attempts"]
    return True


async def run_database_step(runner: Runner, ctx: StepContext, action: Action, params: Any) -> None:
    retry: StepRetryLater | None = None
    timeout = step_timeout(runner.settings, ctx.step)
    async with runner.pool.connection() as conn, conn.transaction():
        if not await begin_attempt(conn, ctx):
            return  # done by an earlier run of this job, or cancelled
        ctx.conn = conn
        await runner.write_context(conn, ctx)
        try:
            async with conn.transaction():  # savepoint: a failure keeps the step record
                # The step's own timeout bounds its statements, and its wait for a
                # CRM row that one of the CRM's transactions holds: the session's 2 s
                # lock_timeout would fail the attempt while the CRM is merely busy.
                await conn.execute(
                    sql.SQL(
                        "SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}"
                    ).format(ms=sql.Literal(int(timeout * 1000)))
                )
                result = await asyncio.wait_for(action.run(ctx, params), timeout)
        except Skip as skip:
            tracing.step_outcome(ctx.execution_id, ctx.step_id, "skipped")
            await conn.execute(
                _q("step_skipped"),
                {
                    "id": ctx.execution_id,
                    "step_id": ctx.step_id,
                    "result": Jsonb({"reason": str(skip)}),
                },
            )
            return
        except Exception as exc:  # the action's effects were rolled back with the savepoint
            retry = await attempt_failed(runner, conn, ctx, exc)
        else:
            await succeeded(conn, ctx, result)
    if retry is not None:
        raise retry


async def run_external_step(runner: Runner, ctx: StepContext, action: Action, params: Any) -> None:
    host = action.target_host(params, ctx)
    held = await runner.breakers.admit(host)
    if held is not None:  # the host's breaker is open: wait for it, no attempt used
        tracing.step_outcome(ctx.execution_id, ctx.step_id, "held", until=held)
        async with runner.pool.connection() as conn, conn.transaction():
            await conn.execute(
                _q("step_held"),
                {"id": ctx.execution_id, "step_id": ctx.step_id, "scheduled_at": held},
            )
            await set_execution_status(conn, ctx.execution_id, "waiting", None)
        raise StepRetryLater(ctx.execution_id, held)
    async with runner.pool.connection() as conn, conn.transaction():
        if not await begin_attempt(conn, ctx):
            await runner.breakers.record(host, None)  # no call: a probe is released
            return
    # Outside any transaction: a crash from here to the commit below repeats the call.
    retry: StepRetryLater | None = None
    try:
        try:
            async with runner.host_slot(host):
                result = await asyncio.wait_for(
                    action.run(ctx, params), step_timeout(runner.settings, ctx.step)
                )
        except BaseException as exc:  # a cancelled probe is released too
            await runner.breakers.record(host, verdict(exc), error=describe(exc))
            raise
        await runner.breakers.record(host, True)
    except Skip as skip:
        tracing.step_outcome(ctx.execution_id, ctx.step_id, "skipped")
        async with runner.pool.connection() as conn:
            await conn.execute(
                _q("step_skipped"),
                {
                    "id": ctx.execution_id,
                    "step_id": ctx.step_id,
                    "result": Jsonb({"reason": str(skip)}),
                },
            )
        return
    except Exception as exc:
        async with runner.pool.connection() as conn, conn.transaction():
            retry = await attempt_failed(runner, conn, ctx, exc)
        if retry is not None:
            raise retry from None
        return
    async with runner.pool.connection() as conn, conn.transaction():
        lk = await (
            await conn.execute(_q("lock_step"), {"id": ctx.execution_id, "step_id": ctx.step_id})
        ).fetchone()
        if lk is None or lk["status"] != "running":
            return
        ctx.conn = conn
        await runner.write_context(conn, ctx)
        try:
            async with conn.transaction():
                result = await action.commit(ctx, params, result)
        except Exception as exc:
            retry = await attempt_failed(runner, conn, ctx, exc)
        else:
            await succeeded(conn, ctx, result)
    if retry is not None:
        raise retry


async def succeeded(conn: db.DictConnection, ctx: StepContext, result: Any) -> None:
    """Record the attempt's success with its result (in the step's transaction)."""
    metrics.STEPS_RUN.labels(ctx.step.type, "succeeded", "queue").inc()
    if ctx.wait_outcome is not None:  # a wait_until step: its result says how it ended
        result = {**(result or {}), "outcome": ctx.wait_outcome}
    await conn.execute(
        _q("step_succeeded"),
        {
            "id": ctx.execution_id,
            "step_id": ctx.step_id,
            "result": Jsonb(jsonable(result or {})),
        },
    )


async def attempt_failed(
    runner: Runner, conn: db.DictConnection, ctx: StepContext, exc: BaseException
) -> StepRetryLater | None:
    error = describe(exc)
    metrics.STEPS_RUN.labels(ctx.step.type, "failed attempt", "queue").inc()
    retry_at = runner.retry_at(ctx.step, ctx.attempt, exc)
    tracing.step_failed(ctx.execution_id, ctx.step_id, error, retry_at)
    await conn.execute(
        _q("step_attempt_failed"),
        {
            "id": ctx.execution_id,
            "step_id": ctx.step_id,
            "error": error,
            "status": StepStatus.SCHEDULED if retry_at else StepStatus.FAILED,
            "retry_at": retry_at,
        },
    )
    log.info(
        "execution %s step %s attempt %s failed: %s",
        ctx.execution_id,
        ctx.step_id,
        ctx.attempt,
        error,
    )
    if retry_at is None:
        return None
    await set_execution_status(conn, ctx.execution_id, "waiting", None)
    return StepRetryLater(ctx.execution_id, retry_at)


async def record_failure(
    runner: Runner, ex: dict[str, Any], step: Step, sid: str, exc: Exception
) -> None:
    async with runner.pool.connection() as conn:
        await conn.execute(_q("step_running"), {"id": ex["id"], "step_id": sid})
        await conn.execute(
            _q("step_attempt_failed"),
            {
                "id": ex["id"],
                "step_id": sid,
                "error": describe(exc),
                "status": "failed",
                "retry_at": None,
            },
        )
