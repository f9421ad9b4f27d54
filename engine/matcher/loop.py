"""The matcher's loop: run rounds until the outbox is drained, then listen.

Each round claims a batch of events, evaluates the plan on it in one statement, enrolls
and runs leading database steps inline; the round's bodies are in
engine/matcher/rounds.py (:class:`MatchRounds`, a base class of :class:`Matcher`).
This module holds what goes around them: the plain round first, its careful and
one-by-one redos and the environment queue's round after it (:meth:`Matcher.run_once`),
the metrics and running totals, the queue tables' statistics, and the drain-then-listen
loop with its back-off on conflicts and lost connections (:meth:`Matcher.run`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import psycopg

from engine import db, metrics
from engine.config import Settings, get_settings
from engine.executor.runner import Runner
from engine.matcher.plan import catalog_error
from engine.matcher.rounds import BatchResult, MatchRounds
from engine.matcher.signals import (
    OUTBOX_CHANNEL,
    WORKFLOWS_CHANNEL,
    _Listener,
    _sleep_or_stop,
    conflict_backoff,
    conflict_kind,
)

log = logging.getLogger("engine.matcher")


_q = db.Queries("matcher.sql")


# Rows through the queue tables after which the matcher refreshes their statistics.
ANALYZE_EVERY = 5_000


# Seconds between two probes of broken workflows (fixed schema: they compile again).
BROKEN_RECHECK = 10.0


class Matcher(MatchRounds):
    def __init__(self, pool: db.Pool, settings: Settings | None = None) -> None:
        self.pool = pool
        self.settings = settings or get_settings()
        self.plan = None
        self.round = None  # goals, exits, waits (engine/lifecycle.py)
        self.totals = BatchResult()
        self._since_analyze = ANALYZE_EVERY  # analyze on the first busy batch too
        self._analyze_allowed: bool | None = None  # may this role ANALYZE? (asked once)
        self.runner = Runner(pool, self.settings)  # for steps run inline
        self.broken_recheck = BROKEN_RECHECK
        self._built_at = 0.0
        self._batch_started = 0  # the batch's start, for its span (engine/tracing.py)

    async def run_once(self) -> BatchResult:
        """Claim and process one batch; returns what it did (claimed 0: nothing pending)."""
        started = time.perf_counter()
        async with self.pool.connection() as conn:
            try:
                # The common case first, without savepoints: each costs two round trips.
                async with conn.transaction():
                    result = await self._batch(conn, careful=False)
            except psycopg.errors.QueryCanceled as exc:
                # The batch's statement timeout: redo it step by step, where the slow
                # event is matched alone (under the same timeout) and recorded.
                log.info("batch timed out (%s); redoing it one event at a time", exc)
                async with conn.transaction():
                    result = await self._batch(conn, careful=True, one_by_one=True)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise
            except Exception as exc:
                # Rolled back whole; redo the batch with savepoints, so that a broken
                # predicate or inline step is isolated instead of failing everything.
                # A catalog error (a column, table or type gone) means schema drift:
                # rebuild the plan, whose probes leave the broken workflows out.
                if catalog_error(exc):
                    self.plan = None
                log.info("batch failed (%s); redoing it step by step", exc)
                async with conn.transaction():
                    result = await self._batch(conn, careful=True)
            queued = await self._run_environment_batch(conn)
            result.claimed += queued.claimed
            result.enrolled += queued.enrolled
            result.errors += queued.errors
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
