"""The step runner: one procrastinate job runs an execution's ready steps.

Jobs and locks
    A job that runs steps holds the execution's lock: the entity's
    (``crmflow:<entity>:<pk>``), or the execution's own when it is about no entity.
    procrastinate runs one job per lock at a time, in defer order, so one entity's
    executions start in event order and never run side by side.

    procrastinate skips a job while an earlier job with the same lock is still
    ``todo``, even one scheduled days ahead. So nothing that waits holds the lock:
    delays, debounced starts, rate-limited starts and retry back-offs are *wake-up*
    jobs without the entity's lock, and a wake-up only re-defers the locked job when
    it is due.

Steps
    Steps run in order, or as a DAG when they name ``depends_on``. A database action
    runs inside the transaction that records its step, so its effect commits exactly
    once. An external action runs between two transactions and is retried on a
    crash: at-least-once, with an idempotency key the receiver sees.

Retries use procrastinate's retry machinery: a failed attempt with attempts left
raises :class:`StepRetryLater`; :class:`StepRetryStrategy` turns it into a retry of
the job at the back-off time, with a wake-up lock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from procrastinate import RetryDecision
from procrastinate.jobs import Job
from procrastinate.retry import BaseRetryStrategy
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from engine import catalog, db, metrics, templates
from engine.actions import PermanentError, Skip, registry
from engine.actions.base import Action
from engine.catalog import EntitySchema
from engine.conditions import NEW, Compiler
from engine.config import Settings, get_settings
from engine.model import (
    DelayUntil,
    RetryPolicy,
    Step,
    WorkflowDefinition,
    dependencies,
    parse_definition,
    step_ids,
)

log = logging.getLogger(__name__)

LIVE = ("pending", "running", "waiting")
DONE_STEP = ("succeeded", "skipped", "compensated")
TASK_NAME = "crmflow.run_execution"


def _q(name: str) -> str:
    return db.query(name, "runtime.sql")


def _t(name: str) -> sql.SQL:
    return db.template(name, "runtime.sql")


def now() -> datetime:
    return datetime.now(UTC)


class StepRetryLater(Exception):
    def __init__(self, execution_id: int, retry_at: datetime) -> None:
        super().__init__(f"execution {execution_id}: step retry at {retry_at.isoformat()}")
        self.execution_id = execution_id
        self.retry_at = retry_at


class RetryAfter(Exception):
    """Raised by an action asked to come back later (HTTP 429/503 Retry-After)."""

    def __init__(self, message: str, seconds: float | None) -> None:
        super().__init__(message)
        self.seconds = seconds


class StepRetryStrategy(BaseRetryStrategy):
    """Retries only what the runner asked to retry, when it asked, without the entity lock."""

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        if isinstance(exception, StepRetryLater):
            return RetryDecision(
                retry_at=exception.retry_at, lock=f"crmflow:wake:{exception.execution_id}"
            )
        return None


@dataclass
class StepContext:
    """What an action sees while it runs."""

    runner: Runner
    execution: dict[str, Any]
    step_id: str
    step: Step
    attempt: int
    entity: EntitySchema | None
    row: dict[str, Any] | None
    steps: dict[str, dict[str, Any]]
    settings: Settings
    conn: psycopg.AsyncConnection[Any] | None = None

    @property
    def execution_id(self) -> int:
        return int(self.execution["id"])

    @property
    def workflow_id(self) -> int:
        return int(self.execution["workflow_id"])

    @property
    def idempotency_key(self) -> str:
        """Stable across attempts of this step, unique across steps and executions."""
        return f"crmflow-{self.execution['id']}-{self.step_id}"

    @property
    def entity_pk(self) -> dict[str, Any] | None:
        return self.execution.get("entity_pk")

    @property
    def entity_id(self) -> Any:
        pk = self.entity_pk
        if isinstance(pk, dict) and len(pk) == 1:
            return next(iter(pk.values()))
        return json.dumps(pk, sort_keys=True) if pk is not None else None

    def template_context(self) -> dict[str, Any]:
        ex = self.execution
        event = {
            "op": ex.get("event_op"),
            "name": ex.get("event_name"),
            "changed": ex.get("event_changed") or [],
            "new": ex.get("event_new_row"),
            "old": ex.get("event_old_row"),
            "payload": ex.get("event_payload"),
        }
        context: dict[str, Any] = {
            "entity": self.row or {},
            "event": event,
            "input": ex.get("input") or {},
            "steps": self.steps,
            "execution": {
                "id": ex["id"],
                "workflow_id": ex["workflow_id"],
                "workflow_name": ex.get("workflow_name"),
                "workflow_version": ex["workflow_version"],
                "triggered_at": ex["triggered_at"],
                "entity_type": ex.get("entity_type"),
                "entity_id": self.entity_id,
            },
            "workflow": {"id": ex["workflow_id"], "name": ex.get("workflow_name")},
            "now": now(),
        }
        entity_type = ex.get("entity_type")
        if entity_type and entity_type not in context:
            context[entity_type] = self.row or {}
        return context

    def render(self, text: str | None) -> str | None:
        if text is None:
            return None
        return templates.render(text, self.template_context())

    def render_value(self, value: Any) -> Any:
        return templates.render_value(value, self.template_context())

    def require_conn(self) -> psycopg.AsyncConnection[Any]:
        if self.conn is None:
            raise RuntimeError("this action needs the step's transaction")
        return self.conn

    def require_entity(self) -> EntitySchema:
        if self.entity is None or self.entity_pk is None:
            raise PermanentError("this action needs an entity")
        return self.entity

    async def matches(self, raw_conditions: Any) -> bool:
        """Evaluate a condition tree (JSON) on the entity as it is now."""
        from engine.conditions import parse_conditions

        compiler = Compiler(with_steps(self.entity), allow_transitions=False)
        predicate = compiler.compile(parse_conditions(raw_conditions, "when"), NEW)
        if compiler.issues:
            raise PermanentError("; ".join(f"{p}: {m}" for p, m in compiler.issues))
        if self.conn is not None:
            return await self.runner.evaluate(
                self.conn, self.entity, self.row, self.steps, predicate.as_string(self.conn)
            )
        async with self.runner.pool.connection() as conn:
            return await self.runner.evaluate(
                conn, self.entity, self.row, self.steps, predicate.as_string(conn)
            )

    async def lock_entity_row(self) -> dict[str, Any] | None:
        """The entity's row, locked for the rest of the step's transaction."""
        entity = self.require_entity()
        query = sql.SQL(_q("entity_row") + " FOR UPDATE OF t").format(
            table=entity.table, pk_match=_pk_match(entity)
        )
        row = await (
            await self.require_conn().execute(query, {"pk": Jsonb(self.entity_pk)})
        ).fetchone()
        return row["row"] if row else None

    async def update_entity(self, values: dict[str, Any]) -> dict[str, Any]:
        """Set columns of the entity's row (JSON values converted to the column types
        by PostgreSQL); returns the previous values of those columns."""
        entity = self.require_entity()
        for column in values:
            if column not in entity.columns:
                raise PermanentError(f"{entity.qualified_name} has no column {column!r}")
        before = await self.lock_entity_row()
        if before is None:
            raise PermanentError(f"{entity.entity_type} {self.entity_id} no longer exists")
        columns = list(values)
        query = sql.SQL(
            "UPDATE {table} AS t SET ({cols}) = (SELECT {vcols} FROM "
            "jsonb_populate_record(NULL::{table}, %(values)s::jsonb) AS v) "
            "FROM jsonb_populate_record(NULL::{table}, %(pk)s::jsonb) AS p WHERE {pk_match}"
        ).format(
            table=entity.table,
            cols=sql.SQL(", ").join(sql.Identifier(c) for c in columns),
            vcols=sql.SQL(", ").join(sql.Identifier("v", c) for c in columns),
            pk_match=_pk_match(entity),
        )
        # A 1-column row: "SET (a) = (SELECT ...)" needs ROW() in PostgreSQL.
        if len(columns) == 1:
            query = sql.SQL(
                "UPDATE {table} AS t SET {col} = (SELECT {vcol} FROM "
                "jsonb_populate_record(NULL::{table}, %(values)s::jsonb) AS v) "
                "FROM jsonb_populate_record(NULL::{table}, %(pk)s::jsonb) AS p WHERE {pk_match}"
            ).format(
                table=entity.table,
                col=sql.Identifier(columns[0]),
                vcol=sql.Identifier("v", columns[0]),
                pk_match=_pk_match(entity),
            )
        await self.require_conn().execute(
            query, {"values": Jsonb(values), "pk": Jsonb(self.entity_pk)}
        )
        self.row = {**before, **values}
        return {c: before.get(c) for c in columns}


def _pk_match(entity: EntitySchema) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier("t", c), sql.Identifier("p", c))
        for c in entity.pk_columns
    )


@dataclass
class Plan:
    """A workflow version's steps, parsed once per process."""

    definition: WorkflowDefinition
    ids: list[str]
    deps: dict[str, list[str]]
    steps: dict[str, Step]
    when_sql: dict[str, str] = field(default_factory=dict)
    # The leading steps the matcher may run in its own transaction (engine/inline.py):
    # immediate database actions without a delay or a "when", in order.
    inline_prefix: list[str] = field(default_factory=list)


_plans: dict[tuple[int, str], Plan] = {}

# Limits that are checked when an execution starts (engine.runtime.Runner._start):
# a workflow with any of them never runs steps in the matcher.
START_LIMITS = ("max_per_minute", "max_concurrent", "debounce")


def plan_for(version_id: int, definition: dict[str, Any], entity: EntitySchema | None) -> Plan:
    """The parsed steps of a workflow version. Versions are immutable, so they are cached;
    the key holds the definition too, as ids repeat across databases."""
    key = (version_id, json.dumps(definition, sort_keys=True))
    plan = _plans.get(key)
    if plan is not None:
        return plan
    wf = parse_definition(definition)
    ids = step_ids(wf.actions)
    plan = Plan(wf, ids, dependencies(wf.actions, ids), dict(zip(ids, wf.actions, strict=True)))
    for sid, step in plan.steps.items():
        if step.when_condition is not None:
            compiler = Compiler(with_steps(entity), allow_transitions=False)
            predicate = compiler.compile(step.when_condition, NEW)
            if compiler.issues:
                raise PermanentError(
                    f"step {sid}: 'when' no longer compiles: "
                    + "; ".join(m for _, m in compiler.issues)
                )
            plan.when_sql[sid] = predicate.as_string(None)
    actions = registry()
    limits = wf.limits.model_dump(exclude_none=True)
    if not any(limits.get(k) for k in START_LIMITS):
        for sid in ids:
            step, action = plan.steps[sid], actions.get(plan.steps[sid].type)
            if (
                action is None
                or action.kind != "database"
                or not action.inline
                or step.delay is not None
                or step.timeout is not None
                or step.when_condition is not None
                or not set(plan.deps[sid]) <= set(plan.inline_prefix)
            ):
                break
            plan.inline_prefix.append(sid)
    if len(_plans) > 2000:
        _plans.clear()
    _plans[key] = plan
    return plan


class Runner:
    def __init__(self, pool: AsyncConnectionPool, settings: Settings | None = None) -> None:
        self.pool = pool
        self.settings = settings or get_settings()
        self._entities: dict[str, EntitySchema] = {}

    # ───────── loading ─────────

    async def _entity(
        self, conn: psycopg.AsyncConnection[Any], entity_type: str | None
    ) -> EntitySchema | None:
        if entity_type is None:
            return None
        if entity_type not in self._entities:
            entity = await catalog.load_entity(conn, entity_type)
            if entity is None:
                return None
            self._entities[entity_type] = entity
        return self._entities[entity_type]

    async def _plan(self, conn: psycopg.AsyncConnection[Any], ex: dict[str, Any]) -> Plan:
        entity = await self._entity(conn, ex["entity_type"])
        return plan_for(int(ex["workflow_version_id"]), ex["definition"], entity)

    async def _load(
        self, conn: psycopg.AsyncConnection[Any], execution_id: int
    ) -> dict[str, Any] | None:
        return await (await conn.execute(_q("load_execution"), {"id": execution_id})).fetchone()

    async def _entity_row(
        self, conn: psycopg.AsyncConnection[Any], ex: dict[str, Any], entity: EntitySchema | None
    ) -> dict[str, Any] | None:
        """The entity now; after a delete, the last state the event saw."""
        if entity is None or ex["entity_pk"] is None:
            return None
        query = sql.SQL(_q("entity_row")).format(table=entity.table, pk_match=_pk_match(entity))
        row = await (await conn.execute(query, {"pk": Jsonb(ex["entity_pk"])})).fetchone()
        if row is not None:
            return row["row"]
        return ex.get("event_new_row") or ex.get("event_old_row")

    # ───────── the job ─────────

    async def run(self, execution_id: int, job_lock: str | None) -> str:
        """Run what is ready of the execution; returns what happened (for logs and tests).

        Nothing is left ``running`` by surprise: losing the database retries the job in
        a few seconds, and any other unexpected error fails the execution with it.
        """
        try:
            return await self._run(execution_id, job_lock)
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
                await self._set_status(
                    conn, execution_id, "failed", f"internal error: {_describe(exc)}"
                )
            return "failed"

    async def _run(self, execution_id: int, job_lock: str | None) -> str:
        async with db.autocommit(self.pool) as conn:
            ex = await self._load(conn, execution_id)
        if ex is None or ex["status"] not in LIVE:
            return "nothing to do"
        lock = ex["lock"]
        if job_lock != lock:
            # A wake-up: come back as a job holding the lock.
            await self._defer(execution_id, lock=lock)
            return "woke up"
        if ex["not_before"] is not None and ex["not_before"] > now():
            await self._defer(execution_id, lock=None, at=ex["not_before"])
            return "not yet"
        if ex["started_at"] is None or ex["status"] == "pending":
            outcome = await self._start(ex)
            if outcome != "started":
                return outcome
        return await self._run_steps(execution_id)

    async def _defer(
        self,
        execution_id: int,
        *,
        lock: str | None,
        at: datetime | None = None,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> None:
        params = {
            "queue": self.settings.queue_name,
            "lock": lock,
            "id": execution_id,
            "scheduled_at": at,
        }
        if conn is not None:
            await conn.execute(_q("defer_execution_job"), params)
            return
        async with self.pool.connection() as c:
            await c.execute(_q("defer_execution_job"), params)

    async def _start(self, ex: dict[str, Any]) -> str:
        """Flow control, then mark running and create the step rows, in one transaction."""
        limits = ex["limits"] or {}
        execution_id = ex["id"]
        async with self.pool.connection() as conn, conn.transaction():
            if limits.get("max_per_minute") or limits.get("max_concurrent"):
                await conn.execute(_q("lock_workflow_starts"), {"workflow_id": ex["workflow_id"]})
            current = await (
                await conn.execute(_q("lock_execution"), {"id": execution_id})
            ).fetchone()
            if current is None or current["status"] not in LIVE:
                return "nothing to do"
            args = {"workflow_id": ex["workflow_id"], "id": execution_id}
            if limits.get("max_per_minute"):
                window = await (await conn.execute(_q("started_last_minute"), args)).fetchone()
                assert window is not None
                if window["n"] >= limits["max_per_minute"]:
                    if limits.get("on_rate_limit") == "drop":
                        await self._set_status(
                            conn,
                            execution_id,
                            "skipped",
                            f"dropped: over {limits['max_per_minute']}/min",
                        )
                        return "dropped by rate limit"
                    # Wait for the oldest start to leave the window (plus a little spread).
                    at = window["frees_at"] + timedelta(milliseconds=random.randint(0, 250))
                    await self._set_status(conn, execution_id, "pending", None, not_before=at)
                    await self._defer(execution_id, lock=None, at=at, conn=conn)
                    return "rate limited"
            if limits.get("max_concurrent"):
                running = await (await conn.execute(_q("running_count"), args)).fetchone()
                assert running is not None
                if running["n"] >= limits["max_concurrent"]:
                    at = now() + timedelta(seconds=1)
                    await self._set_status(conn, execution_id, "pending", None, not_before=at)
                    await self._defer(execution_id, lock=None, at=at, conn=conn)
                    return "concurrency limited"
            await conn.execute(_q("start_execution"), {"id": execution_id})
            plan = await self._plan(conn, ex)
            await conn.execute(
                _q("ensure_steps"),
                {
                    "id": execution_id,
                    "step_ids": plan.ids,
                    "types": [plan.steps[s].type for s in plan.ids],
                },
            )
        return "started"

    async def _set_status(
        self,
        conn: psycopg.AsyncConnection[Any],
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
            failed = [s for s in plan.ids if rows[s]["status"] == "failed"]
            stopping = [s for s in failed if plan.steps[s].on_failure != "continue"]
            if stopping:
                await self._fail(ex, plan, stopping[0], rows)
                return "failed"
            satisfied = {s for s in plan.ids if rows[s]["status"] in DONE_STEP} | set(failed)
            ready = [
                s
                for s in plan.ids
                if rows[s]["status"] in ("pending", "scheduled", "running")
                and all(d in satisfied for d in plan.deps[s])
            ]
            if not ready:
                if all(rows[s]["status"] in (*DONE_STEP, "failed") for s in plan.ids):
                    error = f"continued past failed steps: {', '.join(failed)}" if failed else None
                    async with db.autocommit(self.pool) as conn:
                        await self._set_status(conn, execution_id, "completed", error)
                    return "completed"
                blocked = [s for s in plan.ids if rows[s]["status"] == "pending"]
                async with db.autocommit(self.pool) as conn:
                    await self._set_status(
                        conn, execution_id, "failed", f"steps can never run: {', '.join(blocked)}"
                    )
                return "failed"

            ran = False
            for sid in ready:
                row = rows[sid]
                step = plan.steps[sid]
                if row["status"] == "pending" and step.delay is not None:
                    if await self._schedule_delay(ex, sid, step):
                        continue
                    ran = True  # the delay was already over (or skipped): state changed
                    break
                if (
                    row["status"] == "scheduled"
                    and row["scheduled_at"]
                    and row["scheduled_at"] > now()
                ):
                    continue
                await self._run_step(ex, plan, sid, rows)
                ran = True
                break
            if not ran:
                async with db.autocommit(self.pool) as conn:
                    await self._set_status(conn, execution_id, "waiting", None)
                return "waiting"

    async def _schedule_delay(self, ex: dict[str, Any], sid: str, step: Step) -> bool:
        """Mark a delayed step scheduled and defer its wake-up; False if it is due now."""
        async with self.pool.connection() as conn, conn.transaction():
            if isinstance(step.delay, DelayUntil):
                entity = await self._entity(conn, ex["entity_type"])
                row = await self._entity_row(conn, ex, entity)
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
                at = now() + timedelta(seconds=float(step.delay or 0))
            await conn.execute(
                _q("step_scheduled"), {"id": ex["id"], "step_id": sid, "scheduled_at": at}
            )
            if at <= now():
                return False
            await self._defer(ex["id"], lock=None, at=at, conn=conn)
        return True

    # ───────── one step ─────────

    async def _run_step(
        self, ex: dict[str, Any], plan: Plan, sid: str, rows: dict[str, dict[str, Any]]
    ) -> None:
        step = plan.steps[sid]
        action = registry().get(step.type)
        steps_view = {s: {"status": r["status"], "result": r["result"]} for s, r in rows.items()}
        async with db.autocommit(self.pool) as conn:  # reads, then at most one write
            entity = await self._entity(conn, ex["entity_type"])
            row = await self._entity_row(conn, ex, entity)
            if sid in plan.when_sql and not await self.evaluate(
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
        ctx = StepContext(self, ex, sid, step, 0, entity, row, steps_view, self.settings)
        if action is None:
            await self._record_failure(
                ex, step, sid, PermanentError(f"unknown action {step.type!r}")
            )
            return
        try:
            params = action.parse(step.params)
        except Exception as exc:
            await self._record_failure(ex, step, sid, PermanentError(f"bad parameters: {exc}"))
            return
        if action.kind == "database":
            await self._run_database_step(ctx, action, params)
        else:
            await self._run_external_step(ctx, action, params)

    async def evaluate(
        self,
        conn: psycopg.AsyncConnection[Any],
        entity: EntitySchema | None,
        row: dict[str, Any] | None,
        steps_view: dict[str, Any],
        predicate: str,
    ) -> bool:
        params = {"row": Jsonb(row), "steps": Jsonb(steps_view)}
        safe = sql.SQL(predicate.replace("%", "%%"))
        if entity is None:
            query = sql.SQL(_q("evaluate_no_entity")).format(predicate=safe)
        else:
            query = sql.SQL(_q("evaluate")).format(predicate=safe, table=entity.table)
        result = await (await conn.execute(query, params)).fetchone()
        return bool(result and result["ok"])

    def _timeout(self, step: Step) -> float:
        return float(step.timeout or self.settings.default_step_timeout)

    async def _write_context(
        self, conn: psycopg.AsyncConnection[Any], ctx: StepContext, *, undo: bool = False
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

    async def _run_database_step(self, ctx: StepContext, action: Action, params: Any) -> None:
        retry: StepRetryLater | None = None
        timeout = self._timeout(ctx.step)
        async with self.pool.connection() as conn, conn.transaction():
            lk = await (
                await conn.execute(
                    _q("lock_step"), {"id": ctx.execution_id, "step_id": ctx.step_id}
                )
            ).fetchone()
            if (
                lk is None
                or lk["status"] in (*DONE_STEP, "failed")
                or lk["execution_status"] not in LIVE
            ):
                return  # done by an earlier run of this job, or cancelled
            attempt = await (
                await conn.execute(
                    _q("step_running"), {"id": ctx.execution_id, "step_id": ctx.step_id}
                )
            ).fetchone()
            assert attempt is not None
            ctx.attempt = attempt["attempts"]
            ctx.conn = conn
            await self._write_context(conn, ctx)
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
                retry = await self._attempt_failed(conn, ctx, exc)
            else:
                metrics.STEPS_RUN.labels(ctx.step.type, "succeeded", "queue").inc()
                await conn.execute(
                    _q("step_succeeded"),
                    {
                        "id": ctx.execution_id,
                        "step_id": ctx.step_id,
                        "result": Jsonb(_jsonable(result or {})),
                    },
                )
        if retry is not None:
            raise retry

    async def _run_external_step(self, ctx: StepContext, action: Action, params: Any) -> None:
        async with self.pool.connection() as conn, conn.transaction():
            lk = await (
                await conn.execute(
                    _q("lock_step"), {"id": ctx.execution_id, "step_id": ctx.step_id}
                )
            ).fetchone()
            if (
                lk is None
                or lk["status"] in (*DONE_STEP, "failed")
                or lk["execution_status"] not in LIVE
            ):
                return
            attempt = await (
                await conn.execute(
                    _q("step_running"), {"id": ctx.execution_id, "step_id": ctx.step_id}
                )
            ).fetchone()
            assert attempt is not None
            ctx.attempt = attempt["attempts"]
        # Outside any transaction: a crash from here to the commit below repeats the call.
        retry: StepRetryLater | None = None
        try:
            result = await asyncio.wait_for(action.run(ctx, params), self._timeout(ctx.step))
        except Skip as skip:
            async with self.pool.connection() as conn:
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
            async with self.pool.connection() as conn, conn.transaction():
                retry = await self._attempt_failed(conn, ctx, exc)
            if retry is not None:
                raise retry from None
            return
        async with self.pool.connection() as conn, conn.transaction():
            lk = await (
                await conn.execute(
                    _q("lock_step"), {"id": ctx.execution_id, "step_id": ctx.step_id}
                )
            ).fetchone()
            if lk is None or lk["status"] != "running":
                return
            ctx.conn = conn
            await self._write_context(conn, ctx)
            try:
                async with conn.transaction():
                    result = await action.commit(ctx, params, result)
            except Exception as exc:
                retry = await self._attempt_failed(conn, ctx, exc)
            else:
                metrics.STEPS_RUN.labels(ctx.step.type, "succeeded", "queue").inc()
                await conn.execute(
                    _q("step_succeeded"),
                    {
                        "id": ctx.execution_id,
                        "step_id": ctx.step_id,
                        "result": Jsonb(_jsonable(result or {})),
                    },
                )
        if retry is not None:
            raise retry

    def _retry_at(self, step: Step, attempts: int, exc: BaseException) -> datetime | None:
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

    async def _attempt_failed(
        self, conn: psycopg.AsyncConnection[Any], ctx: StepContext, exc: BaseException
    ) -> StepRetryLater | None:
        error = _describe(exc)
        metrics.STEPS_RUN.labels(ctx.step.type, "failed attempt", "queue").inc()
        retry_at = self._retry_at(ctx.step, ctx.attempt, exc)
        await conn.execute(
            _q("step_attempt_failed"),
            {
                "id": ctx.execution_id,
                "step_id": ctx.step_id,
                "error": error,
                "status": "scheduled" if retry_at else "failed",
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
        await self._set_status(conn, ctx.execution_id, "waiting", None)
        return StepRetryLater(ctx.execution_id, retry_at)

    async def _record_failure(
        self, ex: dict[str, Any], step: Step, sid: str, exc: Exception
    ) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(_q("step_running"), {"id": ex["id"], "step_id": sid})
            await conn.execute(
                _q("step_attempt_failed"),
                {
                    "id": ex["id"],
                    "step_id": sid,
                    "error": _describe(exc),
                    "status": "failed",
                    "retry_at": None,
                },
            )

    # ───────── failure and compensation ─────────

    async def _fail(
        self, ex: dict[str, Any], plan: Plan, failed_sid: str, rows: dict[str, dict[str, Any]]
    ) -> None:
        step = plan.steps[failed_sid]
        if step.on_failure == "compensate":
            await self._compensate(ex, plan, rows)
        error = f"step {failed_sid} failed: {rows[failed_sid]['error']}"
        async with self.pool.connection() as conn:
            await self._set_status(conn, ex["id"], "failed", error)

    async def _compensate(
        self, ex: dict[str, Any], plan: Plan, rows: dict[str, dict[str, Any]]
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
            async with self.pool.connection() as conn:
                entity = await self._entity(conn, ex["entity_type"])
                row = await self._entity_row(conn, ex, entity)
                ctx = StepContext(
                    self, ex, sid, step, rows[sid]["attempts"], entity, row, {}, self.settings, conn
                )
                error = None
                try:
                    async with conn.transaction():
                        await self._write_context(conn, ctx, undo=True)
                        await action.compensate(
                            ctx, action.parse(step.params), rows[sid]["result"] or {}
                        )
                except Exception as exc:
                    error = f"compensation failed: {_describe(exc)}"
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

    # ───────── operator commands ─────────

    async def cancel(self, execution_id: int, reason: str | None = None) -> bool:
        async with self.pool.connection() as conn, conn.transaction():
            row = await (
                await conn.execute(_q("cancel_execution"), {"id": execution_id, "reason": reason})
            ).fetchone()
            if row is None:
                return False
            await conn.execute(_q("cancel_execution_jobs"), {"id": execution_id})
        return True

    async def replay(self, execution_id: int) -> bool:
        """Replay a failed execution from its failed step(s)."""
        async with self.pool.connection() as conn, conn.transaction():
            row = await (
                await conn.execute(_q("replay_execution"), {"id": execution_id})
            ).fetchone()
            if row is None:
                return False
            lock = await (
                await conn.execute(
                    "SELECT crmflow.execution_lock(entity_type, entity_pk, id) AS lock "
                    "FROM crmflow.executions WHERE id = %s",
                    [execution_id],
                )
            ).fetchone()
            assert lock is not None
            await self._defer(execution_id, lock=lock["lock"], conn=conn)
        return True


def with_steps(entity: EntitySchema | None) -> EntitySchema:
    """The entity plus a ``steps`` JSON field, for ``when`` conditions on earlier results
    (``steps.qualify_lead.result.score``), read from the evaluation's alias ``s``."""
    from engine.catalog import FieldSpec

    steps_field = FieldSpec(
        name="steps",
        kind="json",
        type_sql="pg_catalog.jsonb",
        display_type="jsonb",
        column="steps",
        row_alias="s",
    )
    if entity is None:
        return EntitySchema("", "", "", [], {"steps": steps_field})
    return EntitySchema(
        entity.entity_type,
        entity.table_schema,
        entity.table_name,
        entity.pk_columns,
        {**entity.columns, "steps": steps_field},
        entity.derived,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        return f"{type(exc).__name__}: {exc.diag.message_primary}"
    text = str(exc) or type(exc).__name__
    return text[:2000]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
