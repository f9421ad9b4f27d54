"""Flow control: how many executions of a workflow may run, and how often they start.

``limits.key`` (a template: ``"{{ entity.account_id }}"``, the target host) makes
both limits count per key: at most ``max_concurrent`` executions of one account at
once, say, however many accounts run side by side.

``limits.max_per_minute`` counts starts in a sliding minute (``on_rate_limit: drop``
skips the ones over it, otherwise they wait for the window). ``limits.max_concurrent``
counts executions *running a step*: it is checked when an execution starts and again
whenever it resumes after a wait (a delay, a retry back-off), so steps after a delay
never overlap beyond it, while an execution that only waits holds no slot. Both checks
of a workflow are serialised by a transaction-level advisory lock on the workflow.

An execution held back gets ``not_before``; the execution queue wakes it then. One
held back by ``max_concurrent`` is not polled: a slot that frees wakes the next one in
line (:func:`wake_held_back`, after every batch that ran executions of the workflow);
its ``not_before`` is only a safety net.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from engine import db
from engine.statuses import LIVE, ExecutionStatus

# When an execution held back by max_concurrent looks again if no freed slot woke it
# first (seconds, plus a little spread): a safety net, not a poll.
CONCURRENCY_RETRY = 10.0


_q = db.Queries("runtime.sql")


def limits_steps(ex: dict[str, Any]) -> bool:
    """Whether the workflow limits executions running at once (checked on resume too)."""
    return bool((ex.get("limits") or {}).get("max_concurrent"))


async def _set(
    conn: db.DictConnection,
    execution_id: int,
    status: str,
    error: str | None,
    not_before: datetime | None,
) -> None:
    await conn.execute(
        _q("set_execution_status"),
        {"id": execution_id, "status": status, "error": error, "not_before": not_before},
    )


def _soon() -> datetime:
    return datetime.now(UTC) + timedelta(seconds=CONCURRENCY_RETRY * random.uniform(1, 2))


async def admit_start(
    conn: db.DictConnection, ex: dict[str, Any], key: str | None = None
) -> str | None:
    """In the starting transaction: None if the execution may start now, else what
    happened to it (dropped, or held back with ``not_before``). ``key``: the
    execution's ``limits.key``, rendered; its limits count executions of that key."""
    limits = ex["limits"] or {}
    execution_id = ex["id"]
    if limits.get("max_per_minute") or limits.get("max_concurrent"):
        await conn.execute(_q("lock_workflow_starts"), {"workflow_id": ex["workflow_id"]})
    current = await (await conn.execute(_q("lock_execution"), {"id": execution_id})).fetchone()
    if current is None or current["status"] not in LIVE:
        return "nothing to do"
    if key is not None and key != ex.get("flow_key"):
        await conn.execute(_q("set_flow_key"), {"id": execution_id, "key": key})
    args = {"workflow_id": ex["workflow_id"], "id": execution_id, "key": key}
    if limits.get("max_per_minute"):
        window = await (await conn.execute(_q("started_last_minute"), args)).fetchone()
        assert window is not None
        if window["n"] >= limits["max_per_minute"]:
            if limits.get("on_rate_limit") == "drop":
                reason = f"dropped: over {limits['max_per_minute']}/min"
                await _set(conn, execution_id, ExecutionStatus.SKIPPED, reason, None)
                return "dropped by rate limit"
            # Wait for the oldest start to leave the window (plus a little spread).
            at = window["frees_at"] + timedelta(milliseconds=random.randint(0, 250))
            await _set(conn, execution_id, ExecutionStatus.PENDING, None, at)
            return "rate limited"
    if limits.get("max_concurrent"):
        running = await (await conn.execute(_q("running_count"), args)).fetchone()
        assert running is not None
        if running["n"] >= limits["max_concurrent"]:
            await _set(conn, execution_id, ExecutionStatus.PENDING, None, _soon())
            return "concurrency limited"
    return None


async def admit_resume(conn: db.DictConnection, ex: dict[str, Any]) -> str | None:
    """A waiting execution of a workflow with ``max_concurrent`` takes a slot again
    (status ``running``) or stays waiting a little longer."""
    limits = ex["limits"] or {}
    await conn.execute(_q("lock_workflow_starts"), {"workflow_id": ex["workflow_id"]})
    current = await (await conn.execute(_q("lock_execution"), {"id": ex["id"]})).fetchone()
    if current is None or current["status"] not in LIVE:
        return "nothing to do"
    args = {"workflow_id": ex["workflow_id"], "id": ex["id"], "key": ex.get("flow_key")}
    running = await (await conn.execute(_q("running_count"), args)).fetchone()
    assert running is not None
    if running["n"] >= limits["max_concurrent"]:
        await _set(conn, ex["id"], ExecutionStatus.WAITING, None, _soon())
        return "concurrency limited"
    await _set(conn, ex["id"], ExecutionStatus.RUNNING, None, None)
    return None


async def wake_held_back(conn: db.DictConnection, workflows: dict[int, int]) -> None:
    """For each workflow (id -> max_concurrent), as many of its held-back executions as
    it has free slots now are due at once, in priority then arrival order."""
    if workflows:
        ids = sorted(workflows)
        await conn.execute(
            db.query("wake_held_back", "executor.sql"),
            {"workflow_ids": ids, "limits": [workflows[i] for i in ids]},
        )
