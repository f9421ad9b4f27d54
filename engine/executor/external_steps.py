"""A wave's external steps: begun in one statement, called concurrently, recorded in one.

The calls go out on the process's shared clients (engine/http.py, engine/smtp.py),
at most ``executor_concurrency`` at a time, each behind its host's circuit breaker
(engine/breakers.py): an open breaker holds the step back (``held``: scheduled for when
it may probe, the attempt given back) instead of failing it. A crash between the call
and the record repeats the call (at-least-once, with the step's idempotency key).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from engine import db, metrics, tracing
from engine.actions import registry
from engine.actions.base import Action
from engine.breakers import verdict
from engine.executor.context import StepContext, now
from engine.executor.database_steps import entity_rows, lock_steps, record
from engine.executor.errors import Skip, describe, jsonable
from engine.executor.runner import RUNNABLE_STEP
from engine.executor.waves import Item
from engine.statuses import LIVE, StepStatus

if TYPE_CHECKING:
    from engine.executor.batch import BatchExecutor

log = logging.getLogger(__name__)


_q = db.Queries("executor.sql")


@dataclass
class Held:
    """The call was not made: its host's circuit breaker is open until ``until``."""

    until: datetime


async def run_external(x: BatchExecutor, work: list[tuple[Item, str]]) -> None:
    """External steps: attempts begun in one statement, calls made concurrently,
    outcomes (and ``Action.commit``) recorded in one transaction."""
    actions = registry()
    async with x.pool.connection() as conn, conn.transaction():
        locked = await lock_steps(conn, [(i.id, s) for i, s in work])
        runnable = {
            (r["execution_id"], r["step_id"])
            for r in locked
            if r["status"] in RUNNABLE_STEP and r["execution_status"] in LIVE
        }
        work = [(i, s) for i, s in work if (i.id, s) in runnable]
        if not work:
            return
        attempts = await (
            await conn.execute(
                _q("steps_running"),
                {"execution_ids": [i.id for i, _ in work], "step_ids": [s for _, s in work]},
            )
        ).fetchall()
        attempt_of = {(r["execution_id"], r["step_id"]): r["attempts"] for r in attempts}
        need_rows = [i for i, _ in work if i.entity is not None and i.row is None]
        by_type: dict[str, list[Item]] = {}
        for i in need_rows:
            by_type.setdefault(i.ex["entity_type"], []).append(i)
        for items in by_type.values():
            assert items[0].entity is not None
            found = await entity_rows(x, conn, items[0].entity, items, lock=False)
            for i in items:
                key = json.dumps(i.ex["entity_pk"], sort_keys=True)
                i.row = found.get(key) or i.ex.get("event_new_row") or i.ex.get("event_old_row")

    async def call(item: Item, sid: str) -> tuple[StepContext, Action, Any, Any]:
        step = item.plan.steps[sid]
        action = actions[step.type]
        ctx = StepContext(
            x.runner,
            item.ex,
            sid,
            step,
            attempt_of[(item.id, sid)],
            item.entity,
            item.row,
            item.view(),
            x.settings,
        )
        breakers = x.runner.breakers
        async with x.calls:
            try:
                params = action.parse(step.params)
                host = action.target_host(params, ctx)
            except Exception as exc:  # bad parameters: recorded below, no call made
                return ctx, action, None, exc
            held = await breakers.admit(host)
            if held is not None:
                return ctx, action, params, Held(held)
            try:
                timeout = float(step.timeout or x.settings.default_step_timeout)
                async with x.runner.host_slot(host):  # at most N calls in flight per host
                    with tracing.step_span(ctx, keep_open=True):  # ended by record_external
                        result: Any = await asyncio.wait_for(action.run(ctx, params), timeout)
            except BaseException as exc:  # a cancelled probe is released too
                await breakers.record(host, verdict(exc), error=describe(exc))
                if not isinstance(exc, Exception):
                    raise
                return ctx, action, None, exc  # Skip included: recorded below
            await breakers.record(host, True)
        return ctx, action, params, result

    outcomes = await asyncio.gather(*(call(i, s) for i, s in work))
    await record_external(x, work, outcomes)


async def record_external(
    x: BatchExecutor,
    work: list[tuple[Item, str]],
    outcomes: list[tuple[StepContext, Action, Any, Any]],
) -> None:
    statuses: list[tuple[str, Any]] = []
    errors: list[str | None] = []
    retry_ats: list[datetime | None] = []
    async with x.pool.connection() as conn, conn.transaction():
        locked = await lock_steps(conn, [(i.id, s) for i, s in work])
        still = {(r["execution_id"], r["step_id"]) for r in locked if r["status"] == "running"}
        kept: list[tuple[Item, str]] = []
        for (item, sid), (ctx, action, params, result) in zip(work, outcomes, strict=True):
            if (item.id, sid) not in still:
                continue  # cancelled, or another worker took it over meanwhile
            kept.append((item, sid))
            if isinstance(result, Held):  # waits for the breaker, attempt given back
                statuses.append(("held", None))
                errors.append("waiting: the circuit breaker of its host is open")
                retry_ats.append(result.until)
                continue
            error: BaseException | None = result if isinstance(result, BaseException) else None
            if error is None and type(action).commit is not Action.commit:
                ctx.conn = conn
                try:
                    async with conn.transaction():
                        await x.runner.write_context(conn, ctx)
                        result = await action.commit(ctx, params, result)
                except Exception as exc:
                    error = exc
            if isinstance(error, Skip):
                statuses.append(("skipped", {"reason": str(error)}))
                errors.append(None)
                retry_ats.append(None)
            elif error is not None:
                retry_at = x.runner.retry_at(ctx.step, ctx.attempt, error)
                statuses.append((StepStatus.SCHEDULED if retry_at else StepStatus.FAILED, None))
                errors.append(describe(error))
                retry_ats.append(retry_at)
                metrics.STEPS_RUN.labels(ctx.step.type, "failed attempt", "queue").inc()
                log.info(
                    "execution %s step %s attempt %s failed: %s",
                    item.id,
                    sid,
                    ctx.attempt,
                    describe(error),
                )
            else:
                statuses.append(("succeeded", jsonable(result or {})))
                errors.append(None)
                retry_ats.append(None)
                metrics.STEPS_RUN.labels(ctx.step.type, "succeeded", "queue").inc()
        finished = now()
        if kept:
            await record(x, conn, kept, statuses, errors, retry_ats, finished)
    for (item, sid), (status, result), message, retry_at in zip(
        kept, statuses, errors, retry_ats, strict=True
    ):
        tracing.step_end(item.id, sid, status, message, retry_at)
        waits = status in ("scheduled", "held")
        item.steps[sid].update(
            status="scheduled" if waits else status,
            result=result if status in ("succeeded", "skipped") else item.steps[sid]["result"],
            error=message,
            scheduled_at=retry_at,
            finished_at=None if waits else finished,
        )
        item.progressed = True
