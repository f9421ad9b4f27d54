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
from datetime import datetime
from typing import Any

import psycopg

from engine import db, lifecycle, tracing
from engine.config import Settings
from engine.executor import flow, queue
from engine.executor.context import now
from engine.executor.database_steps import (
    GroupFallsBack,
    check_conditions,
    check_windows,
    run_database,
)
from engine.executor.errors import StepRetryLater
from engine.executor.external_steps import run_external
from engine.executor.plans import Plan, plan_for
from engine.executor.runner import Runner
from engine.executor.waves import Item, Wave, plan_wave
from engine.statuses import LIVE, ExecutionStatus

log = logging.getLogger(__name__)

# Waves per batch: enough for any plan's immediate steps; an execution with more is due
# again at once (it keeps its place in its entity's order).
MAX_WAVES = 32
# A drainer that found nothing due waits this long for a due moment this close, rather
# than ending and being woken again (seconds).
LINGER = 1.0
# How long one drainer job goes on before it hands over to a fresh job (seconds).
DRAIN_FOR = 20.0


_q = db.Queries("executor.sql")


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)


class BatchExecutor:
    def __init__(self, pool: db.Pool, runner: Runner, settings: Settings, worker: str) -> None:
        self.pool = pool
        self.runner = runner
        self.settings = settings
        self.worker = worker
        self.in_flight: set[int] = set()
        self._abandoned: set[int] = set()
        self.calls = asyncio.Semaphore(settings.executor_concurrency)
        # this database's versions and their plans (versions are immutable)
        self._version_cache: dict[int, dict[str, Any]] = {}
        self._plan_cache: dict[int, Plan] = {}

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
                taken = sorted({c.taken_over for c in claimed if c.taken_over})
                if taken:
                    log.warning(
                        "took over %d executions whose lease ran out (worker %s died or froze)",
                        sum(1 for c in claimed if c.taken_over),
                        ", ".join(taken),
                    )
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
        async with db.autocommit(self.pool) as conn:  # one statement
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
                async with db.autocommit(self.pool) as conn:  # one statement
                    await queue.release(conn, self.worker, later)
            freed: dict[int, int] = {}
            wakes = await self.advance(mine, freed)
            async with db.autocommit(self.pool) as conn:  # two statements, each on its own
                await queue.settle(conn, self.worker, self.settings.queue_name, wakes)
                # once settled (unleased), the executions max_concurrent held back can
                # take the slots this batch freed
                await flow.wake_held_back(conn, freed)
            return len(mine)
        except asyncio.CancelledError:  # shutdown: release_all gives them back
            self._abandoned.update(ids)
            raise
        finally:
            self.in_flight.difference_update(ids)

    async def renew_leases(self) -> None:
        if self.in_flight:
            async with db.autocommit(self.pool) as conn:  # one statement
                await queue.renew(
                    conn, self.worker, sorted(self.in_flight), self.settings.executor_lease
                )

    async def release_all(self) -> None:
        """Give back what this process holds (shutdown): claimable at once, not after
        the lease runs out."""
        held = self.in_flight | self._abandoned
        if held:
            async with db.autocommit(self.pool) as conn:  # one statement
                await queue.release(conn, self.worker, sorted(held))
            self._abandoned.clear()

    # ───────── one batch ─────────

    async def advance(
        self, ids: list[int], freed: dict[int, int] | None = None
    ) -> dict[int, tuple[datetime | None, bool]]:
        """Advance the executions as far as they go now; returns their next wake-ups.
        ``freed`` gets the workflows with ``max_concurrent`` whose executions ran here
        (id -> limit): slots may have freed."""
        wakes: dict[int, tuple[datetime | None, bool]] = {}
        careful: list[int] = []
        items: list[Item] = []
        async with db.autocommit(self.pool) as conn:
            rows = await (await conn.execute(_q("load_batch"), {"ids": ids})).fetchall()
            await self._versions(conn, {int(r["workflow_version_id"]) for r in rows})
            for ex in rows:
                version = self._version_cache[int(ex["workflow_version_id"])]
                ex["definition"], ex["limits"] = version["definition"], version["limits"]
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
            wave = plan_wave(items)
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
            limited = {  # workflows whose slots these executions may have freed
                int(r["workflow_id"]): int(r["limits"]["max_concurrent"])
                for r in rows
                if r["id"] in set(careful) and (r["limits"] or {}).get("max_concurrent")
            }
            if freed is not None:
                freed.update(limited)
        return wakes

    async def _versions(self, conn: db.DictConnection, ids: set[int]) -> None:
        """Workflow versions never change: each is read once per process."""
        missing = sorted(ids - self._version_cache.keys())
        if missing:
            if len(self._version_cache) > 5000:
                self._version_cache.clear()
                self._plan_cache.clear()
                missing = sorted(ids)
            for v in await (await conn.execute(_q("load_versions"), {"ids": missing})).fetchall():
                self._version_cache[int(v["id"])] = v

    def _needs_care(self, ex: dict[str, Any]) -> bool:
        limits = ex["limits"] or {}
        # goal, exit_when, wait_until (engine/lifecycle.py): checked before each step
        return bool(
            limits.get("max_per_minute")
            or flow.limits_steps(ex)
            or lifecycle.has_lifecycle(ex["definition"])
        )

    async def _item(self, conn: db.DictConnection, ex: dict[str, Any]) -> Item:
        entity = await self.runner.entity(conn, ex["entity_type"])
        if ex["entity_type"] is not None and entity is None:
            raise LookupError(f"entity {ex['entity_type']!r} is not watched")
        version_id = int(ex["workflow_version_id"])
        plan = self._plan_cache.get(version_id)
        if plan is None:
            plan = self._plan_cache[version_id] = plan_for(version_id, ex["definition"], entity)
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
        async with db.autocommit(self.pool) as conn:  # one statement
            await conn.execute(_q("start_executions"), {"ids": [i.id for i in items], **cols})
        started = now()
        for item in items:
            item.ex["status"] = "running"
            item.ex["started_at"] = item.ex["started_at"] or started

    # ───────── planning a wave ─────────

    # ───────── running a wave ─────────

    async def _run_wave(self, wave: Wave) -> None:
        if wave.delays:
            async with db.autocommit(self.pool) as conn:  # one statement
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
            tracing.delays_scheduled(wave.delays)
        for (_, sid), group in wave.windows.items():
            try:
                await check_windows(self, sid, group)
            except Exception as exc:  # the careful path checks it one by one
                log.debug("window of step %s for %d executions: %s", sid, len(group), exc)
                wave.careful.extend(i for i in group if i not in wave.careful)
        for (_, sid), group in wave.conditions.items():
            try:
                await check_conditions(self, sid, group)
            except Exception as exc:  # a predicate failing on these rows: one by one
                log.debug("'when' of step %s for %d executions: %s", sid, len(group), exc)
                wave.careful.extend(i for i in group if i not in wave.careful)
        external = asyncio.create_task(run_external(self, wave.external)) if wave.external else None
        try:
            for (_, sid), group in wave.database.items():
                try:
                    await run_database(self, sid, group)
                except GroupFallsBack as exc:
                    log.debug(
                        "%d executions of step %s go the careful way: %s", len(group), sid, exc
                    )
                    wave.careful.extend(i for i in group if i not in wave.careful)
        finally:
            if external is not None:
                await external
        if wave.completed:
            async with db.autocommit(self.pool) as conn:  # one statement
                await conn.execute(
                    _q("executions_finished"),
                    {
                        "ids": [i.id for i in wave.completed],
                        "statuses": [ExecutionStatus.COMPLETED] * len(wave.completed),
                        "errors": [None] * len(wave.completed),
                    },
                )
        if wave.waiting:
            async with db.autocommit(self.pool) as conn:  # one statement
                await conn.execute(_q("executions_waiting"), {"ids": sorted(wave.waiting)})

    # ───────── the careful path ─────────

    async def _carefully(self, ids: list[int]) -> dict[int, tuple[datetime | None, bool]]:
        """Executions the waves do not take on, one at a time each, side by side."""
        retry: dict[int, datetime] = {}

        async def one(execution_id: int) -> None:
            async with self.calls:
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
