"""The batch loop: many executions' due steps at once, recorded per batch.

A drainer (one procrastinate ``crmflow.run_steps`` job) claims up to
``executor_batch_size`` due executions (engine/executor/queue.py), loads them in one
query, and advances them together in *waves*. Each wave takes every execution's ready
steps:

- a ``delay`` is scheduled at the moment its step became ready plus the delay (one
  statement for the wave): a backlog never pushes delayed steps later;
- database actions run per (workflow version, step) in one transaction with their
  step records, set-based where the action supports it (``Action.run_batch``): the
  effects and the records commit together, exactly once;
- external actions run concurrently on the process's shared clients, between a
  statement that begins their attempts and one that records them (at-least-once, with
  the idempotency key);
- executions whose steps are all done are completed in one statement.

Independent ``depends_on`` branches are ready in the same wave, so they run side by
side. What a wave does not take on goes to the careful path, one execution at a time
(engine/executor/runner.py): start-time limits and ``max_concurrent``, ``when``
conditions, ``delay.until`` a field, failures (retries of database steps,
``on_failure``, compensation), rows another transaction holds. At the end, every
claimed execution's next wake-up is recorded in one statement (``settle``).

Per-entity order: the claim never hands out two executions of one entity at once, and
a batch runs at most one execution per entity (a second one claimed in the same batch
is given back for the next claim).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from engine import catalog, db, metrics
from engine.actions import registry
from engine.actions.base import Action
from engine.catalog import EntitySchema
from engine.config import Settings
from engine.executor import flow, queue
from engine.executor.context import StepContext, now
from engine.executor.errors import Skip, StepRetryLater, describe, jsonable
from engine.executor.plans import Plan, plan_for
from engine.executor.runner import DONE_STEP, LIVE, Runner, ready_moment
from engine.model import DelayUntil

log = logging.getLogger(__name__)

# Waves per batch: enough for any plan's immediate steps; an execution with more is due
# again at once (it keeps its place in its entity's order).
MAX_WAVES = 32
# A drainer that found nothing due waits this long for a due moment this close, rather
# than ending and being woken again (seconds).
LINGER = 1.0
# How long one drainer job goes on before it hands over to a fresh job (seconds).
DRAIN_FOR = 20.0


def _q(name: str) -> str:
    return db.query(name, "executor.sql")


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)


@dataclass
class Item:
    """One claimed execution as the batch advances it."""

    ex: dict[str, Any]
    plan: Plan
    entity: EntitySchema | None
    steps: dict[str, dict[str, Any]]
    row: dict[str, Any] | None = None
    progressed: bool = False
    # steps whose "when" held: they run in the next wave
    when_held: set[str] = field(default_factory=set)

    @property
    def id(self) -> int:
        return int(self.ex["id"])

    def view(self) -> dict[str, dict[str, Any]]:
        """Earlier steps as templates and ``when`` see them."""
        return {
            s: {"status": r["status"], "result": r.get("result")} for s, r in self.steps.items()
        }


@dataclass
class Wave:
    delays: list[tuple[Item, str, datetime]] = field(default_factory=list)
    database: dict[tuple[int, str], list[Item]] = field(default_factory=dict)
    conditions: dict[tuple[int, str], list[Item]] = field(default_factory=dict)
    external: list[tuple[Item, str]] = field(default_factory=list)
    completed: list[Item] = field(default_factory=list)
    waiting: dict[int, datetime] = field(default_factory=dict)
    careful: list[Item] = field(default_factory=list)


class _GroupFallsBack(Exception):
    """A database group could not run set-based: its executions take the careful path."""


class BatchExecutor:
    def __init__(
        self, pool: AsyncConnectionPool, runner: Runner, settings: Settings, worker: str
    ) -> None:
        self.pool = pool
        self.runner = runner
        self.settings = settings
        self.worker = worker
        self.in_flight: set[int] = set()
        self._abandoned: set[int] = set()
        self._calls = asyncio.Semaphore(settings.executor_concurrency)
        self._entities: dict[str, EntitySchema] = {}

    # ───────── draining the queue ─────────

    async def drain(self, seconds: float = DRAIN_FOR) -> int:
        """Claim and run batches until nothing is due; returns executions advanced."""
        deadline = time.monotonic() + seconds
        done = 0
        lingered = False
        while time.monotonic() < deadline:
            async with db.autocommit(self.pool) as conn:
                claimed = await queue.claim(
                    conn,
                    self.worker,
                    self.settings.executor_batch_size,
                    self.settings.executor_lease,
                )
                if not claimed:
                    due = await queue.next_due(conn)
            if claimed:
                lingered = False
                done += await self.run_batch(claimed)
                continue
            wait = (due - now()).total_seconds() if due is not None else None
            if wait is not None and wait <= LINGER:
                await asyncio.sleep(max(wait, 0.005))
                continue
            if lingered:
                return done
            # An execution queued while we claimed: its wake-up found our job still
            # waiting and deferred none. One more look closes that gap.
            lingered = True
            await asyncio.sleep(0.05)
        async with self.pool.connection() as conn:
            await conn.execute(
                "SELECT crmflow.wake_executor(%s, ARRAY[clock_timestamp()])",
                [self.settings.queue_name],
            )
        return done

    async def run_batch(self, claimed: list[queue.Claimed]) -> int:
        ids = [c.execution_id for c in claimed]
        self.in_flight.update(ids)
        try:
            seen: set[str] = set()
            mine: list[int] = []
            later: list[int] = []
            for c in sorted(claimed, key=lambda c: c.execution_id):
                (later if c.entity_key in seen else mine).append(c.execution_id)
                seen.add(c.entity_key)
            if later:
                async with self.pool.connection() as conn:
                    await queue.release(conn, self.worker, later)
            wakes = await self.advance(mine)
            async with self.pool.connection() as conn:
                await queue.settle(conn, self.worker, self.settings.queue_name, wakes)
            return len(mine)
        except asyncio.CancelledError:  # shutdown: release_all gives them back
            self._abandoned.update(ids)
            raise
        finally:
            self.in_flight.difference_update(ids)

    async def renew_leases(self) -> None:
        if self.in_flight:
            async with self.pool.connection() as conn:
                await queue.renew(
                    conn, self.worker, sorted(self.in_flight), self.settings.executor_lease
                )

    async def release_all(self) -> None:
        """Give back what this process holds (shutdown): claimable at once, not after
        the lease runs out."""
        held = self.in_flight | self._abandoned
        if held:
            async with self.pool.connection() as conn:
                await queue.release(conn, self.worker, sorted(held))
            self._abandoned.clear()

    # ───────── one batch ─────────

    async def advance(self, ids: list[int]) -> dict[int, tuple[datetime | None, bool]]:
        """Advance the executions as far as they go now; returns their next wake-ups."""
        wakes: dict[int, tuple[datetime | None, bool]] = {}
        careful: list[int] = []
        items: list[Item] = []
        async with db.autocommit(self.pool) as conn:
            rows = await (await conn.execute(_q("load_batch"), {"ids": ids})).fetchall()
            for ex in rows:
                if ex["status"] not in LIVE:
                    wakes[ex["id"]] = (None, False)
                elif ex["not_before"] is not None and ex["not_before"] > now():
                    wakes[ex["id"]] = (ex["not_before"], False)
                elif self._needs_care(ex):
                    careful.append(ex["id"])
                else:
                    try:
                        items.append(await self._item(conn, ex))
                    except Exception as exc:  # a plan that no longer parses, say
                        log.debug("execution %s goes the careful way: %s", ex["id"], exc)
                        careful.append(ex["id"])
        for missing in set(ids) - {r["id"] for r in rows}:
            wakes[missing] = (None, False)

        starting = [i for i in items if i.ex["started_at"] is None or i.ex["status"] == "pending"]
        if starting:
            await self._start(starting)
        for _ in range(MAX_WAVES):
            if not items:
                break
            wave = self._plan_wave(items)
            await self._run_wave(wave)
            finished = {i.id for i in wave.completed} | {i.id for i in wave.careful}
            for item in wave.completed:
                wakes[item.id] = (None, False)
            for item_id, at in wave.waiting.items():
                wakes[item_id] = (at, False)
            careful.extend(i.id for i in wave.careful)
            items = [
                i
                for i in items
                if i.id not in finished and i.id not in wave.waiting and i.progressed
            ]
            for i in items:
                i.progressed = False
        for item in items:  # still going after MAX_WAVES
            wakes[item.id] = (now(), True)
        if careful:
            wakes.update(await self._carefully(careful))
        return wakes

    def _needs_care(self, ex: dict[str, Any]) -> bool:
        limits = ex["limits"] or {}
        return bool(limits.get("max_per_minute") or flow.limits_steps(ex))

    async def _item(self, conn: psycopg.AsyncConnection[Any], ex: dict[str, Any]) -> Item:
        entity = await self._entity(conn, ex["entity_type"])
        if ex["entity_type"] is not None and entity is None:
            raise LookupError(f"entity {ex['entity_type']!r} is not watched")
        plan = plan_for(int(ex["workflow_version_id"]), ex["definition"], entity)
        steps = {s["step_id"]: s for s in ex["steps"]}
        for s in steps.values():
            for key in ("scheduled_at", "started_at", "finished_at"):
                if s[key] is not None:
                    s[key] = datetime.fromisoformat(s[key])
        for sid in plan.ids:
            steps.setdefault(
                sid,
                {
                    "step_id": sid,
                    "status": "pending",
                    "attempts": 0,
                    "scheduled_at": None,
                    "started_at": None,
                    "finished_at": None,
                    "result": None,
                    "error": None,
                },
            )
        return Item(ex, plan, entity, steps)

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

    async def _start(self, items: list[Item]) -> None:
        """Executions without start-time limits start together, with their step rows."""
        cols: dict[str, list[Any]] = {
            "execution_ids": [],
            "step_ids": [],
            "positions": [],
            "types": [],
        }
        for item in items:
            for position, sid in enumerate(item.plan.ids, start=1):
                cols["execution_ids"].append(item.id)
                cols["step_ids"].append(sid)
                cols["positions"].append(position)
                cols["types"].append(item.plan.steps[sid].type)
        async with self.pool.connection() as conn:
            await conn.execute(_q("start_executions"), {"ids": [i.id for i in items], **cols})
        started = now()
        for item in items:
            item.ex["status"] = "running"
            item.ex["started_at"] = item.ex["started_at"] or started

    # ───────── planning a wave ─────────

    def _plan_wave(self, items: list[Item]) -> Wave:
        wave = Wave()
        actions = registry()
        moment = now()
        for item in items:
            plan, rows = item.plan, item.steps
            if any(rows[s]["status"] == "failed" for s in plan.ids):
                wave.careful.append(item)  # on_failure: the runner decides
                continue
            ready = [
                s
                for s in plan.ids
                if rows[s]["status"] in ("pending", "scheduled", "running")
                and all(rows[d]["status"] in DONE_STEP for d in plan.deps[s])
            ]
            if not ready:
                if all(rows[s]["status"] in DONE_STEP for s in plan.ids):
                    wave.completed.append(item)
                else:
                    wave.careful.append(item)
                continue
            runnable = False
            later: list[datetime] = []
            for sid in ready:
                step, row = plan.steps[sid], rows[sid]
                if row["status"] == "pending" and step.delay is not None:
                    if isinstance(step.delay, DelayUntil):
                        break
                    at = ready_moment(item.ex, plan, sid, rows) + timedelta(
                        seconds=float(step.delay or 0)
                    )
                    wave.delays.append((item, sid, at))
                    row["status"], row["scheduled_at"] = "scheduled", at
                if (
                    row["status"] == "scheduled"
                    and row["scheduled_at"]
                    and row["scheduled_at"] > moment
                ):
                    later.append(row["scheduled_at"])
                    continue
                action = actions.get(step.type)
                if action is None:
                    break
                if sid in plan.when_sql and sid not in item.when_held:
                    key = (int(item.ex["workflow_version_id"]), sid)
                    wave.conditions.setdefault(key, []).append(item)
                    runnable = True
                    continue
                if action.kind == "database":
                    wave.database.setdefault((int(item.ex["workflow_version_id"]), sid), []).append(
                        item
                    )
                else:
                    wave.external.append((item, sid))
                runnable = True
            else:
                if not runnable:
                    wave.waiting[item.id] = min(later)
                continue
            # a step this loop does not take on (delay.until, when, unknown action)
            wave.careful.append(item)
            self._drop(wave, item)
        return wave

    @staticmethod
    def _drop(wave: Wave, item: Item) -> None:
        for key in list(wave.database):
            wave.database[key] = [i for i in wave.database[key] if i is not item]
            if not wave.database[key]:
                del wave.database[key]
        wave.external = [(i, s) for i, s in wave.external if i is not item]
        for key in list(wave.conditions):
            wave.conditions[key] = [i for i in wave.conditions[key] if i is not item]
            if not wave.conditions[key]:
                del wave.conditions[key]
        wave.delays = [(i, s, a) for i, s, a in wave.delays if i is not item]

    # ───────── running a wave ─────────

    async def _run_wave(self, wave: Wave) -> None:
        if wave.delays:
            async with self.pool.connection() as conn:
                await conn.execute(
                    _q("steps_scheduled"),
                    {
                        "execution_ids": [i.id for i, _, _ in wave.delays],
                        "step_ids": [s for _, s, _ in wave.delays],
                        "ats": [a for _, _, a in wave.delays],
                    },
                )
            for item, _, _ in wave.delays:
                item.progressed = True
        for (_, sid), group in wave.conditions.items():
            try:
                await self._check_conditions(sid, group)
            except Exception as exc:  # a predicate failing on these rows: one by one
                log.debug("'when' of step %s for %d executions: %s", sid, len(group), exc)
                wave.careful.extend(i for i in group if i not in wave.careful)
        external = asyncio.create_task(self._run_external(wave.external)) if wave.external else None
        try:
            for (_, sid), group in wave.database.items():
                try:
                    await self._run_database(sid, group)
                except _GroupFallsBack as exc:
                    log.debug(
                        "%d executions of step %s go the careful way: %s", len(group), sid, exc
                    )
                    wave.careful.extend(i for i in group if i not in wave.careful)
        finally:
            if external is not None:
                await external
        if wave.completed:
            async with self.pool.connection() as conn:
                await conn.execute(
                    _q("executions_finished"),
                    {
                        "ids": [i.id for i in wave.completed],
                        "statuses": ["completed"] * len(wave.completed),
                        "errors": [None] * len(wave.completed),
                    },
                )
        if wave.waiting:
            async with self.pool.connection() as conn:
                await conn.execute(_q("executions_waiting"), {"ids": sorted(wave.waiting)})

    async def _check_conditions(self, sid: str, group: list[Item]) -> None:
        """A step's ``when`` for the group in one statement: false skips the step (one
        statement), true lets it run in the next wave."""
        predicate = group[0].plan.when_sql[sid]
        safe = sql.SQL(predicate.replace("%", "%%"))
        entity = group[0].entity
        async with db.autocommit(self.pool) as conn:
            params: dict[str, Any] = {
                "ids": [i.id for i in group],
                "steps": [Jsonb(i.view(), dumps=_dumps) for i in group],
            }
            if entity is None:
                query = sql.SQL(_q("evaluate_batch_no_entity")).format(predicate=safe)
            else:
                found = await self._entity_rows(conn, entity, group, lock=False)
                for i in group:
                    key = json.dumps(i.ex["entity_pk"], sort_keys=True)
                    i.row = found.get(key) or i.ex.get("event_new_row") or i.ex.get("event_old_row")
                params["rows"] = [Jsonb(i.row, dumps=_dumps) for i in group]
                query = sql.SQL(_q("evaluate_batch")).format(predicate=safe, table=entity.table)
            verdict = {
                r["id"]: r["ok"] for r in await (await conn.execute(query, params)).fetchall()
            }
            skipped = [i for i in group if not verdict.get(i.id)]
            if skipped:
                finished = now()
                await self._record(
                    conn,
                    [(i, sid) for i in skipped],
                    [("skipped", {"reason": "'when' was false"})] * len(skipped),
                    finished_at=finished,
                )
        for item in group:
            item.progressed = True
            if verdict.get(item.id):
                item.when_held.add(sid)
            else:
                item.steps[sid].update(
                    status="skipped", result={"reason": "'when' was false"}, finished_at=finished
                )

    async def _entity_rows(
        self,
        conn: psycopg.AsyncConnection[Any],
        entity: EntitySchema,
        items: list[Item],
        lock: bool,
    ) -> dict[str, dict[str, Any]]:
        """The group's entity rows now, by key; with ``lock``, locked without waiting."""
        pks = {json.dumps(i.ex["entity_pk"], sort_keys=True): i.ex["entity_pk"] for i in items}
        columns = [sql.Identifier("t", c) for c in entity.pk_columns]
        query = sql.SQL(_q("entity_rows")).format(
            pairs=sql.SQL(", ").join(
                sql.SQL("{}, {}").format(sql.Literal(c), col)
                for c, col in zip(entity.pk_columns, columns, strict=True)
            ),
            table=entity.table,
            t_cols=sql.SQL(", ").join(columns),
            p_cols=sql.SQL(", ").join(sql.Identifier("p", c) for c in entity.pk_columns),
            lock=sql.SQL("FOR UPDATE OF t SKIP LOCKED" if lock else ""),
        )
        rows = await (
            await conn.execute(query, {"pks": Jsonb(sorted(pks.values(), key=_dumps))})
        ).fetchall()
        return {json.dumps(r["pk"], sort_keys=True): r["row"] for r in rows}

    async def _run_database(self, sid: str, group: list[Item]) -> None:
        """One step of one workflow version for a group of executions: the effects and
        the step records in one transaction (exactly once); any error undoes it all and
        the group takes the careful path, where retries and failures are handled."""
        step = group[0].plan.steps[sid]
        action = registry()[step.type]
        entity = group[0].entity
        timeout = float(step.timeout or self.settings.default_step_timeout)
        try:
            params = action.parse(step.params)
        except Exception as exc:
            raise _GroupFallsBack(f"bad parameters: {exc}") from exc
        try:
            async with self.pool.connection() as conn, conn.transaction():
                keys = sorted((i.id, sid) for i in group)
                locked = await (
                    await conn.execute(
                        _q("lock_steps"),
                        {"execution_ids": [k[0] for k in keys], "step_ids": [k[1] for k in keys]},
                    )
                ).fetchall()
                runnable = {
                    r["execution_id"]
                    for r in locked
                    if r["status"] in ("pending", "scheduled", "running")
                    and r["execution_status"] in LIVE
                }
                members = [i for i in group if i.id in runnable]
                if len(members) < len(group):
                    raise _GroupFallsBack("some steps were done or cancelled meanwhile")
                if entity is not None:
                    found = await self._entity_rows(conn, entity, members, lock=action.needs_entity)
                    for item in members:
                        key = json.dumps(item.ex["entity_pk"], sort_keys=True)
                        row = found.get(key)
                        if row is None and action.needs_entity:
                            raise _GroupFallsBack("an entity row is locked elsewhere or gone")
                        item.row = (
                            row or item.ex.get("event_new_row") or item.ex.get("event_old_row")
                        )
                attempts = await (
                    await conn.execute(
                        _q("steps_running"),
                        {
                            "execution_ids": [i.id for i in members],
                            "step_ids": [sid] * len(members),
                        },
                    )
                ).fetchall()
                attempt_of = {r["execution_id"]: r["attempts"] for r in attempts}
                await self._write_context(conn, members)
                await conn.execute(
                    sql.SQL(
                        "SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}"
                    ).format(ms=sql.Literal(int(timeout * 1000)))
                )
                contexts = [
                    StepContext(
                        self.runner,
                        i.ex,
                        sid,
                        step,
                        attempt_of[i.id],
                        entity,
                        i.row,
                        i.view(),
                        self.settings,
                        conn,
                    )
                    for i in members
                ]
                results = await asyncio.wait_for(action.run_batch(contexts, params), timeout)
                outcome = [
                    ("skipped", {"reason": str(r)})
                    if isinstance(r, Skip)
                    else ("succeeded", r or {})
                    for r in results
                ]
                finished = now()
                await self._record(conn, [(i, sid) for i in members], outcome, finished_at=finished)
        except _GroupFallsBack:
            raise
        except Exception as exc:
            raise _GroupFallsBack(describe(exc)) from exc
        for status, _ in outcome:
            metrics.STEPS_RUN.labels(step.type, status, "queue").inc()
        for item, (status, result) in zip(members, outcome, strict=True):
            item.steps[sid].update(status=status, result=jsonable(result), finished_at=finished)
            item.progressed = True

    async def _write_context(self, conn: psycopg.AsyncConnection[Any], items: list[Item]) -> None:
        """Writes carry depth + 1 and name the executions (one depth per group: a group
        is one workflow version's step, and its executions may differ in depth only
        when chains mix; then the deepest is used, which stops loops no later)."""
        depth = max(int(i.ex["depth"]) for i in items)
        ids = [i.id for i in items]
        actor = (
            f"crmflow:execution:{ids[0]}"
            if len(ids) == 1
            else f"crmflow:executions:{min(ids)}-{max(ids)}"
        )
        await conn.execute(
            db.query("set_write_context", "runtime.sql"), {"depth": str(depth + 1), "actor": actor}
        )

    async def _record(
        self,
        conn: psycopg.AsyncConnection[Any],
        keys: list[tuple[Item, str]],
        outcome: list[tuple[str, Any]],
        errors: list[str | None] | None = None,
        retry_ats: list[datetime | None] | None = None,
        finished_at: datetime | None = None,
    ) -> None:
        await conn.execute(
            _q("steps_finished"),
            {
                "execution_ids": [i.id for i, _ in keys],
                "step_ids": [s for _, s in keys],
                "statuses": [o[0] for o in outcome],
                "results": [None if o[1] is None else Jsonb(o[1], dumps=_dumps) for o in outcome],
                "errors": errors or [None] * len(keys),
                "retry_ats": retry_ats or [None] * len(keys),
                # the batch's moment, which the steps that follow count their delays from
                "finished_at": finished_at,
            },
        )

    async def _run_external(self, work: list[tuple[Item, str]]) -> None:
        """External steps: attempts begun in one statement, calls made concurrently,
        outcomes (and ``Action.commit``) recorded in one transaction."""
        actions = registry()
        async with self.pool.connection() as conn, conn.transaction():
            keys = sorted((i.id, s) for i, s in work)
            locked = await (
                await conn.execute(
                    _q("lock_steps"),
                    {"execution_ids": [k[0] for k in keys], "step_ids": [k[1] for k in keys]},
                )
            ).fetchall()
            runnable = {
                (r["execution_id"], r["step_id"])
                for r in locked
                if r["status"] in ("pending", "scheduled", "running")
                and r["execution_status"] in LIVE
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
                found = await self._entity_rows(conn, items[0].entity, items, lock=False)
                for i in items:
                    key = json.dumps(i.ex["entity_pk"], sort_keys=True)
                    i.row = found.get(key) or i.ex.get("event_new_row") or i.ex.get("event_old_row")

        async def call(item: Item, sid: str) -> tuple[StepContext, Action, Any, Any]:
            step = item.plan.steps[sid]
            action = actions[step.type]
            ctx = StepContext(
                self.runner,
                item.ex,
                sid,
                step,
                attempt_of[(item.id, sid)],
                item.entity,
                item.row,
                item.view(),
                self.settings,
            )
            async with self._calls:
                try:
                    params = action.parse(step.params)
                    timeout = float(step.timeout or self.settings.default_step_timeout)
                    result: Any = await asyncio.wait_for(action.run(ctx, params), timeout)
                except Exception as exc:  # Skip included: recorded below
                    return ctx, action, None, exc
            return ctx, action, params, result

        outcomes = await asyncio.gather(*(call(i, s) for i, s in work))
        await self._record_external(work, outcomes)

    async def _record_external(
        self,
        work: list[tuple[Item, str]],
        outcomes: list[tuple[StepContext, Action, Any, Any]],
    ) -> None:
        statuses: list[tuple[str, Any]] = []
        errors: list[str | None] = []
        retry_ats: list[datetime | None] = []
        async with self.pool.connection() as conn, conn.transaction():
            keys = sorted((i.id, s) for i, s in work)
            locked = await (
                await conn.execute(
                    _q("lock_steps"),
                    {"execution_ids": [k[0] for k in keys], "step_ids": [k[1] for k in keys]},
                )
            ).fetchall()
            still = {(r["execution_id"], r["step_id"]) for r in locked if r["status"] == "running"}
            kept: list[tuple[Item, str]] = []
            for (item, sid), (ctx, action, params, result) in zip(work, outcomes, strict=True):
                if (item.id, sid) not in still:
                    continue  # cancelled, or another worker took it over meanwhile
                kept.append((item, sid))
                error: BaseException | None = result if isinstance(result, BaseException) else None
                if error is None and type(action).commit is not Action.commit:
                    ctx.conn = conn
                    try:
                        async with conn.transaction():
                            await self.runner.write_context(conn, ctx)
                            result = await action.commit(ctx, params, result)
                    except Exception as exc:
                        error = exc
                if isinstance(error, Skip):
                    statuses.append(("skipped", {"reason": str(error)}))
                    errors.append(None)
                    retry_ats.append(None)
                elif error is not None:
                    retry_at = self.runner.retry_at(ctx.step, ctx.attempt, error)
                    statuses.append(("scheduled" if retry_at else "failed", None))
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
                await self._record(conn, kept, statuses, errors, retry_ats, finished)
        for (item, sid), (status, result), error, retry_at in zip(
            kept, statuses, errors, retry_ats, strict=True
        ):
            item.steps[sid].update(
                status=status,
                result=result if status in ("succeeded", "skipped") else item.steps[sid]["result"],
                error=error,
                scheduled_at=retry_at,
                finished_at=None if status == "scheduled" else finished,
            )
            item.progressed = True

    # ───────── the careful path ─────────

    async def _carefully(self, ids: list[int]) -> dict[int, tuple[datetime | None, bool]]:
        """Executions the waves do not take on, one at a time each, side by side."""
        retry: dict[int, datetime] = {}

        async def one(execution_id: int) -> None:
            async with self._calls:
                try:
                    await self.runner.run(execution_id)
                except StepRetryLater as later:
                    retry[execution_id] = later.retry_at

        await asyncio.gather(*(one(i) for i in ids))
        async with db.autocommit(self.pool) as conn:
            rows = await (await conn.execute(_q("next_wake"), {"ids": ids})).fetchall()
        wakes: dict[int, tuple[datetime | None, bool]] = {
            r["id"]: (r["run_at"], r["ordered"]) for r in rows
        }
        for execution_id, at in retry.items():
            wakes[execution_id] = (at, False)
        for missing in set(ids) - set(wakes):
            wakes[missing] = (None, False)
        return wakes


async def keep_leases(executor: BatchExecutor, running: Callable[[float], Awaitable[bool]]) -> None:
    """Renew the leases of what this process runs, a few times per lease."""
    interval = max(1.0, executor.settings.executor_lease / 3)
    while await running(interval):
        with contextlib.suppress(psycopg.Error):
            await executor.renew_leases()
