"""Running scorecards: a set-based scoring statement, then the entity writes in short
chunks; the matcher's hook that queues real-time rescores; the worker's loop that drains
that queue and runs the daily schedules (docs/scorecards.md, "When scoring runs")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from engine import db
from engine.scorecards import store
from engine.scorecards.compile import LoadedScorecard, compile_scoring
from engine.scorecards.entity_writes import write_pending as write_pending
from engine.scorecards.entity_writes import write_rows as write_rows
from engine.scorecards.give_way import ScoringYielded as ScoringYielded
from engine.scorecards.give_way import scoring_statement

log = logging.getLogger(__name__)

# How soon a scheduled run that gave way to a CRM schema change is run again (seconds).
GIVE_WAY_RETRY = 60.0
# How long a due scheduled run is claimed by the worker running it: longer than a full
# run takes (the scoring statement may take up to its 10 min timeout, then the writes).
SCHEDULE_CLAIM_SECONDS = 1800.0
# work_mem of a full run's scoring statement (its transaction only; per hash or sort
# node: the memory is the host's too).
SCORING_WORK_MEM = "32MB"
# Keys rescored per real-time round, and the round's poll interval (seconds).
REALTIME_BATCH = 5000
REALTIME_POLL = 0.5  # a fallback: the matcher's NOTIFY wakes the loop at once
CHANNEL = "crmflow_scores"
SCHEDULE_POLL = 10.0


def _q(name: str) -> str:
    return db.query(name, "scorecards.sql")


@dataclass
class RunResult:
    scorecard: str
    version: int
    scored: int = 0
    updated: int = 0
    history_rows: int = 0
    level_changes: int = 0
    skipped_locked: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ScorecardBusy(Exception):
    """A run that may not wait found the scorecard's run lock taken (a full run)."""


async def score(
    conn: psycopg.AsyncConnection[Any],
    scorecard: str | LoadedScorecard,
    keys: list[dict[str, Any]] | None = None,
    as_of: datetime | None = None,
    wait: bool = True,
) -> RunResult:
    """Score ``scorecard``'s entities (all, or those whose key objects are in ``keys``),
    record the history, then write the entities' columns. One run of a scorecard at a
    time: ``wait=False`` (the real-time rounds) raises :class:`ScorecardBusy` at once
    when another holds its run lock, instead of waiting for it."""
    started = time.perf_counter()
    card = (
        scorecard if isinstance(scorecard, LoadedScorecard) else await store.load(conn, scorecard)
    )
    assert card.id is not None
    result = RunResult(card.definition.name, card.version)
    if keys is not None and not keys:
        return result
    statement = compile_scoring(card, keyed=keys is not None)
    params: dict[str, Any] = {
        "as_of": as_of,
        "scorecard_id": card.id,
        "version": card.version,
        "keys": Jsonb(keys) if keys is not None else None,
    }
    async with conn.transaction():
        # The whole table may take longer than an engine statement's usual bound.
        await conn.execute("SET LOCAL statement_timeout = '10min'")
        if keys is None:
            # The related aggregates hash one group per entity: 100,000 accounts' logins
            # spilled to disk in five batches at the server's default 4 MB.
            await conn.execute(f"SET LOCAL work_mem = '{SCORING_WORK_MEM}'")
        if wait:
            await conn.execute(_q("lock_scorecard_run"), {"id": card.id})
        else:
            got = await (
                await conn.execute(_q("try_lock_scorecard_run"), {"id": card.id})
            ).fetchone()
            if not (got and got["locked"]):
                raise ScorecardBusy(card.definition.name)
        row = await scoring_statement(conn, statement, params, full=keys is None)
        await conn.execute(_q("scorecard_ran"), {"id": card.id})
    result.scored = int(row["scored"])
    result.history_rows = int(row["history_rows"])
    result.level_changes = int(row["level_changes"])
    updated, skipped = await write_rows(conn, card, list(row["to_write"]))
    result.updated, result.skipped_locked = updated, skipped
    result.seconds = time.perf_counter() - started
    return result


# ───────────────────────────── real time ─────────────────────────────

_sources_known: dict[int, bool] = {}  # matcher generation -> any score sources?


async def note_events(conn: psycopg.AsyncConnection[Any], ids: list[int], generation: int) -> None:
    """The matcher's hook, in its claiming transaction: queue the entities the claimed
    events concern for the real-time scorecards (nothing to do, no statement, when no
    scorecard is real-time: score sources bump the generation)."""
    if not ids:
        return
    present = _sources_known.get(generation)
    if present is None:
        row = await (await conn.execute(_q("has_score_sources"), {})).fetchone()
        present = bool(row and row["present"])
        _sources_known.clear()
        _sources_known[generation] = present
    if present:
        await conn.execute(_q("note_score_events"), {"ids": ids})


# Scorecards the real-time rounds leave alone until then (monotonic time), their keys
# kept queued: one whose rescore failed (an expression failing on some row, a column
# dropped) for FAILED_BACKOFF; one whose run lock a full run holds (for minutes on a big
# CRM) for BUSY_BACKOFF, so that the rounds do not take and put back its keys at once.
FAILED_BACKOFF = 30.0
# How long the keys a round took stay leased to it: longer than a round of REALTIME_BATCH
# keys takes (well under a second at 5,000; a lease that runs out under a slower round
# only has its keys rescored twice). A killed worker's keys wait this long.
LEASE_SECONDS = 60.0
BUSY_BACKOFF = 1.0
_failing: dict[int, float] = {}


async def rescore_queued(
    conn: psycopg.AsyncConnection[Any], pool: db.Pool | None = None
) -> list[RunResult]:
    """One real-time round: take the queued keys, rescore them, one statement per
    scorecard. It never waits for a full run of a scorecard: that scorecard's keys go
    back to the queue and stay there BUSY_BACKOFF seconds. Keys of a failed rescore go
    back too, whatever the error, and stay there FAILED_BACKOFF seconds; when the
    connection itself is lost, the keys of the round not rescored yet go back through
    another of ``pool``'s connections, and the error is raised (the loop reconnects)."""
    now = time.monotonic()
    for sid in [s for s, until in _failing.items() if until <= now]:
        del _failing[sid]
    round_id = uuid.uuid4()
    async with conn.transaction():
        await conn.execute(_q("requeue_expired_leases"), {})
        rows = await (
            await conn.execute(
                _q("take_score_queue"),
                {
                    "limit": REALTIME_BATCH,
                    "skip": list(_failing),
                    "round_id": round_id,
                    "lease": LEASE_SECONDS,
                },
            )
        ).fetchall()
    by_card: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_card.setdefault(int(r["scorecard_id"]), []).append(r["entity_key"])
    results: list[RunResult] = []
    groups = list(by_card.items())
    for n, (sid, keys) in enumerate(groups):
        try:
            card = await store.load_by_id(conn, sid)
            results.append(await score(conn, card, keys, wait=False))
            await conn.execute(_q("release_score_lease"), {"round_id": round_id, "id": sid})
        except store.ScorecardNotFound:
            continue  # removed: its queue rows went with it
        except asyncio.CancelledError:
            # The worker stopping (it cancels what outlives its grace period): the keys
            # not rescored yet go back first, through another of the pool's connections
            # (this one was cut off mid-statement), shielded from the cancellation.
            await asyncio.shield(_requeue(conn, pool, round_id, groups[n:], fresh=True))
            raise
        except ScorecardBusy:
            _failing[sid] = time.monotonic() + BUSY_BACKOFF
            await _requeue(conn, pool, round_id, groups[n : n + 1])
        except Exception as exc:
            # A timeout or a lock timeout (OperationalErrors) leaves the connection usable:
            # a failure like any other. A lost one fails every statement after it.
            if isinstance(exc, psycopg.InterfaceError) or conn.broken or conn.closed:
                await _requeue(conn, pool, round_id, groups[n:])
                raise
            log.warning(
                "real-time rescore of scorecard %s failed (retried in %gs): %s",
                sid,
                FAILED_BACKOFF,
                exc,
            )
            _failing[sid] = time.monotonic() + FAILED_BACKOFF
            await _requeue(conn, pool, round_id, groups[n : n + 1])
    return results


# Seconds the put-back of a lost connection's keys waits for another connection.
REQUEUE_CONNECT_TIMEOUT = 5.0


async def _requeue(
    conn: psycopg.AsyncConnection[Any],
    pool: db.Pool | None,
    round_id: uuid.UUID,
    groups: list[tuple[int, list[dict[str, Any]]]],
    fresh: bool = False,
) -> None:
    """Put keys a round took back in the queue and end their lease, best-effort, in a
    transaction of their own: on ``conn``, or, that connection lost (or ``fresh``), on one
    of ``pool``'s. Keys that cannot go back are logged: they go back when their lease
    runs out (LEASE_SECONDS)."""

    async def put_back(c: psycopg.AsyncConnection[Any]) -> None:
        async with c.transaction():
            for sid, keys in groups:
                await c.execute(_q("requeue_scores"), {"id": sid, "keys": Jsonb(keys)})
                await c.execute(_q("release_score_lease"), {"round_id": round_id, "id": sid})

    try:
        if not (conn.broken or conn.closed or (fresh and pool is not None)):
            await put_back(conn)
        elif pool is not None:
            async with pool.connection(timeout=REQUEUE_CONNECT_TIMEOUT) as other:
                await put_back(other)
        else:
            raise psycopg.InterfaceError("the connection is lost")
    except psycopg.Error as exc:  # PoolTimeout included
        log.error(
            "real-time rescore: %d queued key(s) of scorecard(s) %s could not go back to "
            "the queue (%s); they go back when their lease runs out",
            sum(len(keys) for _, keys in groups),
            ", ".join(str(sid) for sid, _ in groups),
            exc,
        )


async def run_due(conn: psycopg.AsyncConnection[Any]) -> list[RunResult]:
    """The scheduled runs that are due, one after the other, the whole table each. Each
    is claimed (one worker runs it) for SCHEDULE_CLAIM_SECONDS when it starts, and moved
    to its next time once it has run or failed: a worker killed during it leaves it due
    again when the claim is over, instead of skipping it until its next time."""
    results: list[RunResult] = []
    while True:
        async with conn.transaction():
            r = await (await conn.execute(_q("due_scorecards"), {})).fetchone()
            if r is None:
                return results
            claim = datetime.now(UTC) + timedelta(seconds=SCHEDULE_CLAIM_SECONDS)
            await conn.execute(_q("set_next_run"), {"id": r["id"], "next_run_at": claim})
        result = await _run_claimed(conn, dict(r))
        if result is not None:
            results.append(result)


async def _run_claimed(conn: psycopg.AsyncConnection[Any], r: dict[str, Any]) -> RunResult | None:
    """Run the claimed scheduled scorecard ``r``, then move it to its next time (or, when
    it gave way to a CRM schema change, GIVE_WAY_RETRY seconds later)."""
    result = None
    next_run = _next(r)
    try:
        card = await store.load_by_id(conn, int(r["id"]))
        result = await score(conn, card)
        log.info(
            "scorecard %s: scored %d, wrote %d, %d level changes (%.1fs)",
            r["name"],
            result.scored,
            result.updated,
            result.level_changes,
            result.seconds,
        )
    except ScoringYielded:  # (logged) again soon, not at its next time
        next_run = datetime.now(UTC) + timedelta(seconds=GIVE_WAY_RETRY)
    except Exception as exc:
        if isinstance(exc, psycopg.InterfaceError) or conn.broken or conn.closed:
            raise  # the connection lost: the claim running out retries it
        # A failure of the run's own (an expression failing on a row, its statement
        # timeout, a lock timeout): not retried before its next time, which a failing
        # run would only load the host with.
        log.error("scheduled run of scorecard %s failed: %s", r["name"], exc)
    await conn.execute(_q("set_next_run"), {"id": r["id"], "next_run_at": next_run})
    return result


def _next(r: dict[str, Any]) -> datetime:
    from croniter import croniter

    nxt: datetime = croniter(r["schedule"], datetime.now(UTC)).get_next(datetime)
    return nxt


class _Wakeups:
    """A LISTEN connection on the matcher's "keys queued" notifications; losing it only
    slows the loop to its poll."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def wait(self, timeout: float, stop: asyncio.Event) -> None:
        if self.conn is None or self.conn.closed:
            try:
                self.conn = await db.connect(self.url, autocommit=True)
                await self.conn.execute("LISTEN crmflow_scores")  # CHANNEL
            except psycopg.Error as exc:
                log.debug("scorecards: LISTEN failed (%s); polling", exc)
                self.conn = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout)
                return
        try:
            async for _ in self.conn.notifies(timeout=timeout, stop_after=1):
                break
        except psycopg.Error as exc:
            log.debug("scorecards: LISTEN connection lost (%s)", exc)
            await self.close()

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self.conn.close()
            self.conn = None


async def run_loop(pool: db.Pool, stop: asyncio.Event) -> None:
    """The worker's scorecard loops, side by side on connections of their own: a
    real-time round whenever the matcher queues keys (its NOTIFY, or every REALTIME_POLL
    seconds); due schedules and left-over pending writes every SCHEDULE_POLL seconds. A
    daily run takes minutes on a big CRM; the real-time rounds go on meanwhile."""
    wakeups = _Wakeups(db.pool_conninfo(pool))
    try:
        await asyncio.gather(_realtime_loop(pool, stop, wakeups), _schedule_loop(pool, stop))
    finally:
        await wakeups.close()


async def _realtime_loop(pool: db.Pool, stop: asyncio.Event, wakeups: _Wakeups) -> None:
    while not stop.is_set():
        try:
            async with db.autocommit(pool) as conn:
                busy = True
                while busy and not stop.is_set():
                    busy = bool(await rescore_queued(conn, pool))
        except (psycopg.Error, store.ScorecardNotFound) as exc:
            log.warning("scorecard loop: %s", exc)
        except Exception as exc:
            log.error("scorecard loop failed: %s", exc)
        if not stop.is_set():
            await wakeups.wait(REALTIME_POLL, stop)


async def _schedule_loop(pool: db.Pool, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            async with db.autocommit(pool) as conn:
                await run_due(conn)
                for r in await (await conn.execute(_q("pending_scorecards"), {})).fetchall():
                    try:
                        card = await store.load_by_id(conn, int(r["scorecard_id"]))
                    except store.ScorecardNotFound:
                        continue  # deleted by hand (its rows go with it): the others go on
                    await write_pending(conn, card)
        except (psycopg.Error, store.ScorecardNotFound) as exc:
            log.warning("scorecard schedules: %s", exc)
        except Exception as exc:
            log.error("scorecard schedules failed: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SCHEDULE_POLL)
