"""Retention: ``crmflow prune`` and the worker's automatic retention.

Old processed outbox events, finished executions (with their steps) and procrastinate's
finished jobs are deleted in batches of ``batch_size`` rows, each batch its own short
transaction that skips rows other transactions hold (``FOR UPDATE SKIP LOCKED``): a
prune never holds a lock for long nor waits behind the matcher or the step runner.
Unprocessed events, live executions, and the events that live or failed executions
still read are never deleted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from engine import db
from engine.config import Settings

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 1000


_q = db.Queries("retention.sql")


@dataclass
class PruneCounts:
    outbox: int = 0
    executions: int = 0
    steps: int = 0
    jobs: int = 0
    batches: int = 0
    cutoffs: dict[str, datetime] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.outbox + self.executions + self.jobs


# (what, "outbox" or "history"); the progress callback gets what and the rows so far.
Progress = Callable[[str, int], None]


async def _cutoff(conn: psycopg.AsyncConnection[Any], older_than: float) -> datetime:
    async with conn.transaction():
        row = await (await conn.execute(_q("cutoff"), {"older_than": older_than})).fetchone()
    assert row is not None
    return row["cutoff"]  # type: ignore[no-any-return]


async def _in_batches(
    conn: psycopg.AsyncConnection[Any],
    query: str,
    cutoff: datetime,
    batch_size: int,
    counts: PruneCounts,
    on_batch: Callable[[dict[str, int] | int], None],
    stop: asyncio.Event | None,
) -> None:
    while stop is None or not stop.is_set():
        async with conn.transaction():
            cur = await conn.execute(query, {"cutoff": cutoff, "batch_size": batch_size})
            row = await cur.fetchone() if cur.description else None
            deleted = row if row is not None else cur.rowcount
        counts.batches += 1
        on_batch(deleted)
        rows = deleted["executions"] if isinstance(deleted, dict) else deleted
        if rows < batch_size:
            return
        await asyncio.sleep(0)  # let the worker's other tasks run between batches


async def prune(
    conn: psycopg.AsyncConnection[Any],
    *,
    outbox_older_than: float | None,
    history_older_than: float | None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
) -> PruneCounts:
    """Delete what is older than the given ages (seconds; None keeps that kind)."""
    if batch_size < 1:
        raise ValueError("the batch size is at least 1")
    counts = PruneCounts()
    report = progress or (lambda what, n: None)

    if outbox_older_than is not None:
        cutoff = counts.cutoffs["outbox"] = await _cutoff(conn, outbox_older_than)

        def on_outbox(deleted: dict[str, int] | int) -> None:
            assert isinstance(deleted, int)
            counts.outbox += deleted
            report("outbox", counts.outbox)

        await _in_batches(
            conn, _q("prune_outbox_batch"), cutoff, batch_size, counts, on_outbox, stop
        )

    if history_older_than is not None:
        cutoff = counts.cutoffs["history"] = await _cutoff(conn, history_older_than)

        def on_executions(deleted: dict[str, int] | int) -> None:
            assert isinstance(deleted, dict)
            counts.executions += deleted["executions"]
            counts.steps += deleted["steps"]
            report("executions", counts.executions)

        def on_jobs(deleted: dict[str, int] | int) -> None:
            assert isinstance(deleted, int)
            counts.jobs += deleted
            report("jobs", counts.jobs)

        await _in_batches(
            conn, _q("prune_executions_batch"), cutoff, batch_size, counts, on_executions, stop
        )
        await _in_batches(conn, _q("prune_jobs_batch"), cutoff, batch_size, counts, on_jobs, stop)
    return counts


async def count_prunable(
    conn: psycopg.AsyncConnection[Any],
    *,
    outbox_older_than: float | None,
    history_older_than: float | None,
) -> PruneCounts:
    """What :func:`prune` would delete now (``crmflow prune --dry-run``)."""
    counts = PruneCounts()
    async with conn.transaction():
        if outbox_older_than is not None:
            cutoff = counts.cutoffs["outbox"] = await _cutoff(conn, outbox_older_than)
            row = await (
                await conn.execute(_q("count_prunable_outbox"), {"cutoff": cutoff})
            ).fetchone()
            counts.outbox = row["n"] if row else 0
        if history_older_than is not None:
            cutoff = counts.cutoffs["history"] = await _cutoff(conn, history_older_than)
            row = await (
                await conn.execute(_q("count_prunable_executions"), {"cutoff": cutoff})
            ).fetchone()
            counts.executions, counts.steps = (row["executions"], row["steps"]) if row else (0, 0)
            row = await (
                await conn.execute(_q("count_prunable_jobs"), {"cutoff": cutoff})
            ).fetchone()
            counts.jobs = row["n"] if row else 0
    return counts


async def apply_retention(
    conn: psycopg.AsyncConnection[Any], settings: Settings, stop: asyncio.Event | None = None
) -> PruneCounts | None:
    """The worker's automatic retention: prune by the settings, unless another worker
    is doing it (None then)."""
    if settings.retention_outbox is None and settings.retention_history is None:
        return None
    async with conn.transaction():
        row = await (await conn.execute(_q("lock_retention"), {})).fetchone()
    if not row or not row["mine"]:
        return None
    try:
        counts = await prune(
            conn,
            outbox_older_than=settings.retention_outbox,
            history_older_than=settings.retention_history,
            batch_size=settings.retention_batch_size,
            stop=stop,
        )
    finally:
        async with conn.transaction():
            await conn.execute(_q("unlock_retention"), {})
    if counts.total:
        log.info(
            "retention: deleted %d outbox events, %d executions (%d steps), %d jobs",
            counts.outbox,
            counts.executions,
            counts.steps,
            counts.jobs,
        )
    return counts
