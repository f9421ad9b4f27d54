"""One execution at a time: the executor's careful path, and the operators' commands.

The batch loop (engine/executor/batch.py) runs the common steps of many executions
together; what it does not take on comes here, one execution at a time, in its own
short transactions: starts under flow control (engine/executor/flow.py), ``when``
conditions, ``delay.until`` a field, failures (retries, ``on_failure``, compensation).
Tests and operators drive executions through :meth:`Runner.run` too.

Steps run in order, or as a DAG when they name ``depends_on``. A database action runs
inside the transaction that records its step, so its effect commits exactly once. An
external action runs between two transactions and is retried on a crash:
at-least-once, with an idempotency key the receiver sees.

This module holds the execution's side: admission, picking the next ready step,
delays, and settling the execution (completed, waiting, failed, compensated); running
the one step it picked (``when``, window, the attempt and its record) is
engine/executor/careful_step.py.

Nothing here waits in-process: a step that is not due yet, a retry back-off or a
rate-limited start is recorded (``scheduled_at``, ``not_before``) and the execution
queue wakes the execution when it is due (:func:`next_wake`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from engine import catalog, db, lifecycle, rows, templates, tracing
from engine.breakers import Breakers
from engine.catalog import EntitySchema
from engine.config import Settings, get_settings
from engine.executor import flow
from engine.executor.careful_step import run_step, set_execution_status
from engine.executor.compensation import cancel, compensate, replay
from engine.executor.context import StepContext, now, template_context
from engine.executor.errors import (
    PermanentError,
    RetryAfter,
    StepRetryLater,
    describe,
)
from engine.executor.plans import Plan, plan_for
from engine.model import DelayUntil, RetryPolicy, Step
from engine.statuses import DONE_STEP, LIVE, ExecutionStatus, StepStatus

log = logging.getLogger(__name__)

# A step that may run now or later (not done, not failed for good).
RUNNABLE_STEP: tuple[StepStatus, ...] = (
    StepStatus.PENDING,
    StepStatus.SCHEDULED,
    StepStatus.RUNNING,
)


_q = db.Queries("runtime.sql")


class Runner:
    def __init__(self, pool: db.Pool, settings: Settings | None = None) -> None:
        self.pool = pool
        self.settings = settings or get_settings()
        self._entities: dict[str, EntitySchema] = {}
        # The process's circuit breakers (engine/breakers.py): one per runner, and the
        # worker has one runner, which its batch executor shares.
        self.breakers = Breakers(pool, self.settings)
        # Calls in flight per target host (CRMFLOW_EXECUTOR_HOST_CONCURRENCY): a batch
        # must not open dozens of connections to one receiver at once (a small server's
        # listen queue overflows, the resets open its breaker).
        self._host_slots: dict[str, asyncio.Semaphore] = {}

    # ───────── loading ─────────

    async def entity(self, conn: db.DictConnection, entity_type: str | None) -> EntitySchema | None:
        if entity_type is None:
            return None
        if entity_type not in self._entities:
            entity = await catalog.load_entity(conn, entity_type)
            if entity is None:
                return None
            self._entities[entity_type] = entity
        return self._entities[entity_type]

    async def _plan(self, conn: db.DictConnection, ex: dict[str, Any]) -> Plan:
        entity = await self.entity(conn, ex["entity_type"])
        return plan_for(int(ex["workflow_version_id"]), ex["definition"], entity)

    async def _load(self, conn: db.DictConnection, execution_id: int) -> dict[str, Any] | None:
        return await (await conn.execute(_q("load_execution"), {"id": execution_id})).fetchone()

    async def entity_row(
        self, conn: db.DictConnection, ex: dict[str, Any], entity: EntitySchema | None
    ) -> dict[str, Any] | None:
        """The entity now; after a delete, the last state the event saw."""
        if entity is None or ex["entity_pk"] is None:
            return None
        query = rows.entity_row_query(entity)
        row = await (await conn.execute(query, {"pk": Jsonb(ex["entity_pk"])})).fetchone()
        if row is not None:
            found: dict[str, Any] | None = row["row"]
            return found
        return ex.get("event_new_row") or ex.get("event_old_row")

    # ───────── the job ─────────

    async def run(self, execution_id: int, job_lock: str | None = None) -> str:
        """Run what is ready of the execution; returns what happened (for logs and tests).

        Nothing is left ``running`` by surprise: losing the database raises
        :class:`StepRetryLater` (the queue tries again in a few seconds), and any other
        unexpected error fails the execution with it. ``job_lock`` is what procrastinate
        jobs of earlier versions passed; the execution queue keeps the order now.
        """
        try:
            return await self._run(execution_id)
        except StepRetryLater:
            raise
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            from engine.matcher import conflict_kind  # (engine.matcher imports this module)

            kind = conflict_kind(exc)
            if kind is not None:  # rolled back by a lock conflict: soon again, jittered
                what = kind.replace("_", " ")
                log.warning(
                    "execution %s: rolled back by a %s (%s); retrying", execution_id, what, exc
                )
                at = now() + timedelta(seconds=random.uniform(0.05, 0.5))
                raise StepRetryLater(execution_id, at) from exc
            log.warning("execution %s: database unavailable (%s); retrying", execution_id, exc)
            raise StepRetryLater(execution_id, now() + timedelta(seconds=5)) from exc
        except Exception as exc:
            log.exception("execution %s failed unexpectedly", execution_id)
            async with self.pool.connection() as conn:
                await set_execution_status(
                    conn, execution_id, "failed", f"internal error: {describe(exc)}"
                )
            return "failed"

    async def _run(self, execution_id: int) -> str:
        async with db.autocommit(self.pool) as conn:
            ex = await self._load(conn, execution_id)
        if ex is None or ex["status"] not in LIVE:
            return "nothing to do"
        if ex["not_before"] is not None and ex["not_before"] > now():
            return "not yet"
        if ex["started_at"] is None or ex["status"] == "pending":
            key = ex.get("flow_key")
            if key is None and (ex["limits"] or {}).get("key"):
                key = await self.flow_key(ex)
            async with self.pool.connection() as conn, conn.transaction():
                outcome = await flow.admit_start(conn, ex, key)
                if outcome is None:
                    await self._start(conn, ex)
            if outcome is not None:
                return outcome
        elif ex["status"] == "waiting" and flow.limits_steps(ex):
            async with self.pool.connection() as conn, conn.transaction():
                outcome = await flow.admit_resume(conn, ex)
            if outcome is not None:
                return outcome
        return await self._run_steps(execution_id)

    def host_slot(self, host: str | None) -> contextlib.AbstractAsyncContextManager[Any]:
        """A slot among the calls in flight to ``host`` (none to wait for without a host)."""
        if host is None:
            return contextlib.nullcontext()
        slot = self._host_slots.get(host)
        if slot is None:
            if len(self._host_slots) > 10_000:
                self._host_slots.clear()
            slot = self._host_slots[host] = asyncio.Semaphore(
                self.settings.executor_host_concurrency
            )
        return slot

    async def flow_key(self, ex: dict[str, Any]) -> str:
        """The execution's ``limits.key``, rendered on the entity as it is now; a key that
        cannot be rendered is the template itself (one shared key), with a warning."""
        template = str(ex["limits"]["key"])
        async with db.autocommit(self.pool) as conn:
            entity = await self.entity(conn, ex["entity_type"])
            row = await self.entity_row(conn, ex, entity)
        try:
            return templates.render(template, template_context(ex, row, {}))[:500]
        except Exception as exc:
            log.warning("execution %s: limits.key cannot be rendered: %s", ex["id"], exc)
            return template

    async def _start(self, conn: db.DictConnection, ex: dict[str, Any]) -> None:
        """Mark the execution running and create its step rows (in the admitting
        transaction)."""
        await conn.execute(_q("start_execution"), {"id": ex["id"]})
        plan = await self._plan(conn, ex)
        await conn.execute(
            _q("ensure_steps"),
            {
                "id": ex["id"],
                "step_ids": plan.ids,
                "types": [plan.steps[s].type for s in plan.ids],
            },
        )

    async def _run_steps(self, execution_id: int) -> str:
        while True:
            async with db.autocommit(self.pool) as conn:
                ex = await self._load(conn, execution_id)
                if ex is None or ex["status"] not in LIVE:
                    return "stopped"
                plan = await self._plan(conn, ex)
                rows = {
                    r["step_id"]: r
                    for r in await (
                        await conn.execute(_q("load_steps"), {"id": execution_id})
                    ).fetchall()
                }
            failed = [s for s in plan.ids if rows[s]["status"] == StepStatus.FAILED]
            stopping = [s for s in failed if plan.steps[s].on_failure != "continue"]
            if stopping:
                await self._fail(ex, plan, stopping[0], rows)
                return "failed"
            satisfied = {s for s in plan.ids if rows[s]["status"] in DONE_STEP} | set(failed)
            ready = [
                s
                for s in plan.ids
                if rows[s]["status"] in RUNNABLE_STEP and all(d in satisfied for d in plan.deps[s])
            ]
            if not ready:
                if all(rows[s]["status"] in (*DONE_STEP, StepStatus.FAILED) for s in plan.ids):
                    error = f"continued past failed steps: {', '.join(failed)}" if failed else None
                    async with db.autocommit(self.pool) as conn:
                        await set_execution_status(
                            conn, execution_id, ExecutionStatus.COMPLETED, error
                        )
                    return "completed"
                blocked = [s for s in plan.ids if rows[s]["status"] == "pending"]
                async with db.autocommit(self.pool) as conn:
                    await set_execution_status(
                        conn, execution_id, "failed", f"steps can never run: {', '.join(blocked)}"
                    )
                return "failed"

            if await lifecycle.before_step(self, ex):  # goal met or exit criteria
                return "ended"
            ran = False
            for sid in ready:
                row = rows[sid]
                step = plan.steps[sid]
                if step.wait_until is not None and row["status"] in ("pending", "scheduled"):
                    ready_at = ready_moment(ex, plan, sid, rows)
                    outcome = await lifecycle.wait_step(
                        self, ex, plan, sid, step, row, ready_at, rows
                    )
                    if outcome is None:
                        continue  # still waiting: the matcher or the timeout wakes it
                    if outcome != lifecycle.SKIPPED:  # (a false "when" skips the wait too)
                        await run_step(self, ex, plan, sid, rows, wait_outcome=outcome)
                    ran = True
                    break
                if row["status"] == "pending" and step.delay is not None:
                    if await self._schedule_delay(ex, sid, step, ready_moment(ex, plan, sid, rows)):
                        continue
                    ran = True  # the delay was already over (or skipped): state changed
                    break
                if (
                    row["status"] == "scheduled"
                    and row["scheduled_at"]
                    and row["scheduled_at"] > now()
                ):
                    continue
                await run_step(self, ex, plan, sid, rows)
                ran = True
                break
            if not ran:
                await lifecycle.watch_waiting(self, ex)  # watched before it shows waiting
                async with db.autocommit(self.pool) as conn:
                    await set_execution_status(conn, execution_id, "waiting", None)
                return "waiting"

    async def _schedule_delay(
        self, ex: dict[str, Any], sid: str, step: Step, ready_at: datetime
    ) -> bool:
        """Mark a delayed step scheduled at ``ready_at`` + its delay; False if it is due
        now. The delay counts from the moment the step became ready, not from when a
        worker got to it: a backlog does not push delayed steps later."""
        async with self.pool.connection() as conn, conn.transaction():
            if isinstance(step.delay, DelayUntil):
                entity = await self.entity(conn, ex["entity_type"])
                row = await self.entity_row(conn, ex, entity)
                assert entity is not None
                query = sql.SQL(_q("moment_of_field")).format(
                    field=sql.Identifier(step.delay.until), table=entity.table
                )
                moment = await (
                    await conn.execute(query, {"row": Jsonb(row), "offset": step.delay.offset})
                ).fetchone()
                at = moment["at"] if moment else None
                if at is None:
                    await conn.execute(
                        _q("step_skipped"),
                        {
                            "id": ex["id"],
                            "step_id": sid,
                            "result": Jsonb({"reason": f"{step.delay.until} is empty"}),
                        },
                    )
                    return False
            else:
                at = ready_at + timedelta(seconds=float(step.delay or 0))
            await conn.execute(
                _q("step_scheduled"), {"id": ex["id"], "step_id": sid, "scheduled_at": at}
            )
        tracing.step_waits(ex, sid, step.type, at)
        return at > now()

    # ───────── what a step's attempt uses (here and in the batch) ─────────

    async def evaluate(
        self,
        conn: db.DictConnection,
        entity: EntitySchema | None,
        row: dict[str, Any] | None,
        steps_view: dict[str, Any],
        predicate: str,
    ) -> bool:
        params = {"row": Jsonb(row), "steps": Jsonb(steps_view)}
        safe = db.stored_sql(predicate)
        if entity is None:
            query = sql.SQL(_q("evaluate_no_entity")).format(predicate=safe)
        else:
            query = sql.SQL(_q("evaluate")).format(predicate=safe, table=entity.table)
        result = await (await conn.execute(query, params)).fetchone()
        return bool(result and result["ok"])

    async def write_context(
        self, conn: db.DictConnection, ctx: StepContext, *, undo: bool = False
    ) -> None:
        """Sign the depth and actor of the action's writes. The undo writes of
        compensation say so (``crmflow:compensation:<id>``): the matcher captures them
        but enrolls nothing on them, so an undo cannot trigger its own workflow again."""
        kind = "compensation" if undo else "execution"
        await conn.execute(
            _q("set_write_context"),
            {
                "depth": str(int(ctx.execution["depth"]) + 1),
                "actor": f"crmflow:{kind}:{ctx.execution_id}",
            },
        )

    def retry_at(self, step: Step, attempts: int, exc: BaseException) -> datetime | None:
        if isinstance(exc, PermanentError | templates.TemplateProblem):
            return None
        policy = step.retry or RetryPolicy()
        if attempts >= policy.max_attempts:
            return None
        wait = min(policy.max_backoff, policy.backoff * 2 ** max(attempts - 1, 0))
        if policy.jitter:
            wait = random.uniform(wait / 2, wait)
        if isinstance(exc, RetryAfter) and exc.seconds:
            # The server said when: never earlier (jitter only spreads our own back-off).
            wait = max(wait, min(exc.seconds, policy.max_backoff))
        return now() + timedelta(seconds=wait)

    # ───────── failure and compensation ─────────

    async def _fail(
        self, ex: dict[str, Any], plan: Plan, failed_sid: str, rows: dict[str, dict[str, Any]]
    ) -> None:
        step = plan.steps[failed_sid]
        if step.on_failure == "compensate":
            await compensate(self, ex, plan, rows)
        error = f"step {failed_sid} failed: {rows[failed_sid]['error']}"
        async with self.pool.connection() as conn:
            await set_execution_status(conn, ex["id"], "failed", error)

    # ───────── operator commands ─────────

    async def cancel(self, execution_id: int, reason: str | None = None) -> bool:
        return await cancel(self.pool, execution_id, reason)

    async def replay(self, execution_id: int) -> bool:
        """Replay a failed execution from its failed step(s)."""
        return await replay(self.pool, self.settings, execution_id)


def ready_moment(
    ex: dict[str, Any], plan: Plan, sid: str, rows: dict[str, dict[str, Any]]
) -> datetime:
    """When the step became ready: its inputs' last finish, or the execution's start."""
    finished: list[datetime] = [
        rows[d]["finished_at"] for d in plan.deps[sid] if rows[d].get("finished_at")
    ]
    if finished:
        return max(finished)
    started: datetime | None = ex.get("started_at")
    return started or now()
