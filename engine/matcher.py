"""The matcher: pending events x active workflows → executions and their jobs.

Each batch is one transaction (sql/matcher.sql): claim events with ``FOR UPDATE SKIP
LOCKED``, evaluate every active workflow on the whole batch in one statement, insert
executions under the unique key (workflow version, event), defer their procrastinate
jobs, mark the events processed. Several matchers may run at once; a crash anywhere
replays safely.

The loop drains until the outbox is empty, then tells writers it is listening
(``crmflow.matcher_state.listening``) and waits for a NOTIFY or the poll interval,
whichever comes first. NOTIFY is only a hint: the poll alone would do, slower.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from engine import catalog, db, metrics
from engine.config import Settings, get_settings
from engine.inline import run_inline
from engine.runtime import Runner

log = logging.getLogger(__name__)

OUTBOX_CHANNEL = "crmflow_outbox"
WORKFLOWS_CHANNEL = "crmflow_workflows"


def _q(name: str) -> str:
    return db.query(name, "matcher.sql")


def _escape(text: str) -> str:
    """Stored SQL embedded in a statement that takes %(name)s parameters."""
    return text.replace("%", "%%")


@dataclass
class MatchPlan:
    """The match statement for one generation of active workflows."""

    generation: int
    statement: str | None  # None: no active workflow reacts to events
    workflows: int = 0
    entity_types: list[str] = field(default_factory=list)
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)  # id → definition, name
    entities: dict[str, catalog.EntitySchema] = field(default_factory=dict)


async def build_plan(conn: psycopg.AsyncConnection[Any], generation: int) -> MatchPlan:
    rows = await (await conn.execute(_q("active_event_workflows"), {})).fetchall()
    entities = await catalog.load_entities(conn)
    by_entity: dict[str | None, list[dict[str, Any]]] = {}
    for row in rows:
        by_entity.setdefault(row["entity_type"], []).append(row)

    branches: list[sql.Composable] = []
    for entity_type, versions in by_entity.items():
        cases = sql.SQL(", ").join(
            sql.SQL(_q("match_case")).format(
                predicate=sql.SQL(_escape(v["predicate"])), version_id=sql.Literal(v["version_id"])
            )
            for v in versions
        )
        if entity_type is None:
            branches.append(sql.SQL(_q("match_branch_no_entity")).format(cases=cases))
            continue
        entity = entities.get(entity_type)
        if entity is None:
            log.warning("workflows on %r are active but it is not watched", entity_type)
            continue
        branches.append(
            sql.SQL(_q("match_branch")).format(
                table=entity.table, cases=cases, entity_type=sql.Literal(entity_type)
            )
        )
    versions = {r["version_id"]: r for r in rows}
    if not branches:
        return MatchPlan(generation, None, versions=versions, entities=entities)
    cases = [
        sql.SQL(_q("current_row_case")).format(
            entity_type=sql.Literal(e.entity_type),
            table=e.table,
            pk_match=sql.SQL(" AND ").join(
                sql.SQL("{} = {}").format(sql.Identifier("t", c), sql.Identifier("p", c))
                for c in e.pk_columns
            ),
        )
        for name, e in entities.items()
        if name in by_entity
    ]
    current_row = (
        sql.SQL("CASE x.entity_type {} END").format(sql.SQL(" ").join(cases))
        if cases
        else sql.SQL("NULL::jsonb")
    )
    statement = sql.SQL(_q("match_and_enroll")).format(
        branches=sql.SQL("\nUNION ALL\n").join(branches), current_row=current_row
    )
    return MatchPlan(
        generation,
        statement.as_string(conn),
        workflows=len(rows),
        entity_types=sorted(e for e in by_entity if e),
        versions=versions,
        entities=entities,
    )


@dataclass
class BatchResult:
    claimed: int = 0
    enrolled: int = 0
    errors: int = 0


# Rows through the queue tables after which the matcher refreshes their statistics.
ANALYZE_EVERY = 5_000


class Matcher:
    def __init__(self, pool: AsyncConnectionPool, settings: Settings | None = None) -> None:
        self.pool = pool
        self.settings = settings or get_settings()
        self.plan: MatchPlan | None = None
        self.totals = BatchResult()
        self._since_analyze = ANALYZE_EVERY  # analyze on the first busy batch too
        self._analyze_allowed: bool | None = None  # may this role ANALYZE? (asked once)
        self.runner = Runner(pool, self.settings)  # for steps run inline

    async def run_once(self) -> BatchResult:
        """Claim and process one batch; returns what it did (claimed 0: nothing pending)."""
        started = time.perf_counter()
        async with self.pool.connection() as conn:
            try:
                # The common case first, without savepoints: each costs two round trips.
                async with conn.transaction():
                    result = await self._batch(conn, careful=False)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise
            except Exception as exc:
                # Rolled back whole; redo the batch with savepoints, so that a broken
                # predicate or inline step is isolated instead of failing everything.
                log.info("batch failed (%s); redoing it step by step", exc)
                async with conn.transaction():
                    result = await self._batch(conn, careful=True)
            result = self._count(result)
            if result.claimed:
                metrics.EVENTS_MATCHED.inc(result.claimed)
                metrics.EXECUTIONS_ENROLLED.inc(result.enrolled)
                metrics.MATCH_ERRORS.inc(result.errors)
                metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
            self._since_analyze += result.claimed
            if self._since_analyze >= ANALYZE_EVERY and result.claimed >= 100:
                self._since_analyze = 0
                if await self._may_analyze(conn):
                    async with conn.transaction():  # committed, or the statistics roll back
                        await conn.execute(_q("refresh_statistics"), {})
        return result

    async def _may_analyze(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Whether this role may ANALYZE the queue tables (it owns them); asked once."""
        if self._analyze_allowed is None:
            row = await (await conn.execute(_q("may_refresh_statistics"), {})).fetchone()
            self._analyze_allowed = bool(row and row["allowed"])
            if not self._analyze_allowed:
                log.debug(
                    "not refreshing the queue tables' statistics: this role does not own them "
                    "(autovacuum's ANALYZE still runs)"
                )
        return self._analyze_allowed

    async def _claim(self, conn: psycopg.AsyncConnection[Any]) -> list[int]:
        row = await (
            await conn.execute(_q("claim_events"), {"batch_size": self.settings.matcher_batch_size})
        ).fetchone()
        assert row is not None
        if self.plan is None or self.plan.generation != row["generation"]:
            self.plan = await build_plan(conn, row["generation"])
            log.info(
                "matching %d active workflows on %s",
                self.plan.workflows,
                ", ".join(self.plan.entity_types) or "custom events",
            )
        return list(row["ids"])

    def _params(self, ids: list[int]) -> dict[str, Any]:
        return {"ids": ids, "queue": self.settings.queue_name, "max_depth": self.settings.max_depth}

    async def _batch(self, conn: psycopg.AsyncConnection[Any], careful: bool) -> BatchResult:
        ids = await self._claim(conn)
        if not ids:
            return BatchResult()
        assert self.plan is not None
        if self.plan.statement is None:
            await conn.execute(_q("mark_processed"), {"ids": ids, "error": None})
            return BatchResult(claimed=len(ids))
        if not careful:
            enrolled = await (await conn.execute(self.plan.statement, self._params(ids))).fetchall()
            await self._start(conn, enrolled, careful=False)
            return BatchResult(claimed=len(ids), enrolled=len(enrolled))
        try:
            async with conn.transaction():  # a savepoint: a failure keeps the claim's locks
                enrolled = await (
                    await conn.execute(self.plan.statement, self._params(ids))
                ).fetchall()
        except psycopg.OperationalError:
            raise
        except psycopg.DatabaseError as exc:
            # One event or workflow broke the set-based statement (a sql condition dividing
            # by zero, say). Match this batch event by event so the others still enroll
            # and the culprits are recorded instead of blocking the outbox forever.
            log.warning("batch match failed (%s); matching one event at a time", exc)
            return await self._batch_slowly(conn, ids)
        await self._start(conn, enrolled, careful=True)
        return BatchResult(claimed=len(ids), enrolled=len(enrolled))

    async def _start(
        self, conn: psycopg.AsyncConnection[Any], enrolled: list[dict[str, Any]], careful: bool
    ) -> None:
        """Run what can run inline, then defer jobs for everything else, in id order."""
        assert self.plan is not None
        done: set[int] = set()
        if self.settings.inline_steps and enrolled:
            done = await run_inline(
                conn, self.runner, enrolled, self.plan.versions, self.plan.entities, careful
            )
        waiting = [e["id"] for e in enrolled if e["status"] == "pending" and e["id"] not in done]
        if waiting:
            await conn.execute(
                _q("defer_jobs"), {"ids": waiting, "queue": self.settings.queue_name}
            )

    async def _batch_slowly(
        self, conn: psycopg.AsyncConnection[Any], ids: list[int]
    ) -> BatchResult:
        result = BatchResult(claimed=len(ids))
        assert self.plan is not None and self.plan.statement is not None
        for event_id in ids:
            try:
                async with conn.transaction():
                    enrolled = await (
                        await conn.execute(self.plan.statement, self._params([event_id]))
                    ).fetchall()
                    await self._start(conn, enrolled, careful=True)
                result.enrolled += len(enrolled)
                continue
            except psycopg.OperationalError:
                raise
            except psycopg.DatabaseError as exc:
                error = await self._per_workflow(conn, event_id, exc)
            result.errors += 1
            await conn.execute(_q("mark_processed"), {"ids": [event_id], "error": error})
        return result

    async def _per_workflow(
        self, conn: psycopg.AsyncConnection[Any], event_id: int, exc: psycopg.Error
    ) -> str:
        """Name the workflows whose predicate fails on this event."""
        rows = await (await conn.execute(_q("active_event_workflows"), {})).fetchall()
        failing = []
        for row in rows:
            probe = sql.SQL(
                "SELECT 1 FROM crmflow.outbox AS ev"
                " CROSS JOIN LATERAL"
                " jsonb_populate_record(NULL::{t}, coalesce(ev.new_row, ev.old_row)) AS n"
                " CROSS JOIN LATERAL jsonb_populate_record(NULL::{t}, ev.old_row) AS o"
                " WHERE ev.id = {id} AND ev.entity_type = {et} AND ({p})"
            )
            entity = (
                await catalog.load_entity(conn, row["entity_type"]) if row["entity_type"] else None
            )
            if entity is None:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(
                        probe.format(
                            t=entity.table,
                            id=sql.Literal(event_id),
                            et=sql.Literal(row["entity_type"]),
                            p=sql.SQL(row["predicate"]),
                        )
                    )
            except psycopg.Error as wf_exc:
                failing.append(
                    f"workflow {row['workflow_id']} ({row['name']}): "
                    f"{wf_exc.diag.message_primary or wf_exc}"
                )
        return "; ".join(failing) or (exc.diag.message_primary or str(exc))

    def _count(self, result: BatchResult) -> BatchResult:  # running totals for metrics
        self.totals.claimed += result.claimed
        self.totals.enrolled += result.enrolled
        self.totals.errors += result.errors
        return result

    async def drain(self) -> BatchResult:
        """Process batches until nothing is pending (used by tests and `crmflow demo`)."""
        total = BatchResult()
        while True:
            r = await self.run_once()
            total.claimed += r.claimed
            total.enrolled += r.enrolled
            total.errors += r.errors
            if r.claimed == 0:
                return total

    async def _set_listening(self, listening: bool) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(_q("set_listening"), {"listening": listening})

    async def run(self, stop: asyncio.Event, url: str) -> None:
        """Drain, then wait for a hint or the poll interval; until ``stop`` is set."""
        listener = _Listener(url, [OUTBOX_CHANNEL, WORKFLOWS_CHANNEL])
        conflicts = 0  # in a row
        try:
            while not stop.is_set():
                try:
                    # A claim that finds work also tells writers to stop hinting, in the
                    # same transaction: a wake-up costs one commit, not two.
                    await self.drain()
                    conflicts = 0
                    await self._set_listening(True)
                    # Writers that checked the flag just before it flipped did not notify:
                    # one more look closes that window (the poll covers what is left).
                    if (await self.run_once()).claimed:
                        continue
                    await listener.wait(self.settings.matcher_poll_interval, stop)
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    kind = conflict_kind(exc)
                    if kind is None:
                        log.warning("matcher lost the database (%s); retrying", exc)
                        await _sleep_or_stop(stop, 1.0)
                        continue
                    # The batch was rolled back whole (nothing of it happened): redo it
                    # at once, after a short jittered pause so two colliding matchers
                    # do not collide again.
                    conflicts += 1
                    metrics.MATCHER_CONFLICTS.labels(kind).inc()
                    delay = conflict_backoff(conflicts)
                    log.warning(
                        "matcher batch rolled back by a %s (%s); retrying in %.0f ms",
                        kind.replace("_", " "),
                        (exc.diag.message_primary if isinstance(exc, psycopg.Error) else None)
                        or exc,
                        delay * 1000,
                    )
                    await _sleep_or_stop(stop, delay)
                except Exception:
                    log.exception("matcher batch failed; retrying")
                    await _sleep_or_stop(stop, 1.0)
        finally:
            await listener.close()


def conflict_kind(exc: BaseException) -> str | None:
    """What kind of lock conflict rolled back a transaction: ``deadlock`` (40P01),
    ``serialization`` (the rest of class 40), ``lock_timeout`` (55P03),
    ``statement_timeout`` (57014); None for anything else (a lost connection...)."""
    state = getattr(exc, "sqlstate", None)
    if not state:
        return None
    if state == "40P01":
        return "deadlock"
    if state.startswith("40"):
        return "serialization"
    if state == "55P03":
        return "lock_timeout"
    if state == "57014":
        return "statement_timeout"
    return None


CONFLICT_BACKOFF = 0.01  # s, the first retry after a conflict
CONFLICT_BACKOFF_MAX = 1.0


def conflict_backoff(in_a_row: int) -> float:
    """10 ms, doubling with each conflict in a row up to 1 s, jittered by ±50 %."""
    base = min(CONFLICT_BACKOFF_MAX, CONFLICT_BACKOFF * 2 ** min(in_a_row - 1, 10))
    return base * random.uniform(0.5, 1.5)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class _Listener:
    """A LISTEN connection that reconnects on its own; losing it only slows to the poll."""

    def __init__(self, url: str, channels: list[str]) -> None:
        self.url = url
        self.channels = channels
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.backoff = 0.5

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await db.connect(self.url, autocommit=True)
        for channel in self.channels:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        self.backoff = 0.5
        return conn

    async def wait(self, timeout: float, stop: asyncio.Event) -> None:
        if self.conn is None or self.conn.closed:
            try:
                self.conn = await self._connect()
            except psycopg.Error as exc:
                log.warning("LISTEN connection failed (%s); polling", exc)
                self.conn = None
                await _sleep_or_stop(stop, min(timeout, self.backoff))
                self.backoff = min(self.backoff * 2, 30.0)
                return
        try:
            async for _ in self.conn.notifies(timeout=timeout, stop_after=1):
                break
        except psycopg.Error as exc:
            log.warning("LISTEN connection lost (%s); reconnecting", exc)
            await self.close()

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self.conn.close()
            self.conn = None
