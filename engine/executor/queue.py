"""The execution queue (``crmflow.execution_queue``, migrations/0019): what is due, for whom.

Claims are one statement (``crmflow.claim_executions``: ``FOR UPDATE SKIP LOCKED``
under a short advisory lock) that leases up to a batch of due executions, in priority
then due order, never two of one entity at once and never one ahead of an earlier
execution of its entity that keeps event order. Leases are renewed while a batch runs;
one that runs out (a worker that died or froze) makes its executions claimable again,
which is the stalled-work recovery.

procrastinate wakes executors: a ``crmflow.run_steps`` job per due moment (rounded up to
a quarter second) however many executions are due then, deferred in the transaction
that queued them (``crmflow.wake_executor``). The job claims batches until nothing is
due. Its payload is empty: the queue rows are the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from engine import db

TASK_NAME = "crmflow.run_steps"


_q = db.Queries("executor.sql")


@dataclass(frozen=True)
class Claimed:
    execution_id: int
    entity_key: str
    # the worker whose lease on it ran out (it died or froze), if any
    taken_over: str | None = None


async def enqueue(conn: db.DictConnection, ids: list[int], queue: str) -> None:
    """Queue executions (in the caller's transaction), due at their start time."""
    if ids:
        await conn.execute(_q("enqueue_executions"), {"ids": ids, "queue": queue})


async def claim(conn: db.DictConnection, worker: str, limit: int, lease: float) -> list[Claimed]:
    rows = await (
        await conn.execute(_q("claim"), {"worker": worker, "limit": limit, "lease": lease})
    ).fetchall()
    return [Claimed(r["execution_id"], r["entity_key"], r["taken_over"]) for r in rows]


async def settle(
    conn: db.DictConnection,
    worker: str,
    queue: str,
    wakes: dict[int, tuple[datetime | None, bool]],
) -> None:
    """Record each claimed execution's next wake-up (None: out of the queue) and whether
    it keeps its entity's order then; wakes executors for the moments that need one."""
    if not wakes:
        return
    ids = sorted(wakes)
    await conn.execute(
        _q("settle"),
        {
            "ids": ids,
            "run_ats": [wakes[i][0] for i in ids],
            "ordered": [wakes[i][1] for i in ids],
            "worker": worker,
            "queue": queue,
        },
    )


async def renew(conn: db.DictConnection, worker: str, ids: list[int], lease: float) -> None:
    if ids:
        await conn.execute(_q("renew_leases"), {"ids": ids, "worker": worker, "lease": lease})


async def release(conn: db.DictConnection, worker: str, ids: list[int]) -> None:
    if ids:
        await conn.execute(_q("release_leases"), {"ids": ids, "worker": worker})


async def next_due(conn: db.DictConnection) -> datetime | None:
    row = await (await conn.execute(_q("due_soon"))).fetchone()
    return row["at"] if row else None
