"""The batch step executor (engine/executor/): the queue's claims, delays counted from
readiness, flow control after delays, concurrent branches, priority, a crash mid-batch."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from datetime import timedelta
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from engine.config import Settings
from engine.executor import queue
from engine.executor.batch import BatchExecutor
from engine.executor.runner import Runner
from engine.matcher import Matcher
from engine.worker import Worker
from tests.helpers import apply, fetch, value, wait_executions_settled, wait_until


def on_new_lead(actions: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "name": extra.pop("name", "wf"),
        "trigger": {"type": "entity_created", "entity_type": "lead"},
        "actions": actions,
        **extra,
    }


def executor(pool: AsyncConnectionPool, settings: Settings, name: str) -> BatchExecutor:
    return BatchExecutor(pool, Runner(pool, settings), settings, name)


async def test_a_burst_of_delayed_steps_is_due_from_when_each_became_ready(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    await apply(
        crm,
        on_new_lead(
            [
                {"type": "create_task", "title": "call {{ entity.name }}"},
                {"type": "create_task", "title": "again {{ entity.name }}", "delay": "2s"},
            ]
        ),
    )
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 300) i")
    rows = await wait_executions_settled(crm, expected=300, timeout=60)
    assert {r["status"] for r in rows} == {"completed"}
    assert await value(crm, "SELECT count(*) FROM tasks") == 600
    steps = await fetch(
        crm,
        "SELECT a.finished_at AS ready, b.scheduled_at AS due, b.started_at AS ran"
        " FROM crmflow.execution_steps AS a JOIN crmflow.execution_steps AS b"
        " ON b.execution_id = a.execution_id AND b.step_id = 'create_task_2'"
        " WHERE a.step_id = 'create_task_1'",
    )
    assert len(steps) == 300
    for s in steps:
        # the delay counts from the moment the first step finished, not from when a
        # worker got round to the second one; and it never runs early
        assert s["due"] == s["ready"] + timedelta(seconds=2)
        assert s["ran"] >= s["due"]
    assert await value(crm, "SELECT count(*) FROM crmflow.execution_queue") == 0


async def test_max_concurrent_holds_for_steps_after_a_delay(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    await apply(
        crm,
        on_new_lead(
            [{"type": "test_wait", "seconds": 2, "delay": "0.2s"}],
            limits={"max_concurrent": 1},
        ),
    )
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 4) i")
    rows = await wait_executions_settled(crm, expected=4, timeout=40)
    assert [r["status"] for r in rows] == ["completed"] * 4
    spans = sorted(
        (r["started_at"], r["finished_at"])
        for r in await fetch(
            crm, "SELECT started_at, finished_at FROM crmflow.execution_steps ORDER BY 1"
        )
    )
    assert len(spans) == 4
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, "two calls overlapped"


async def test_independent_branches_run_side_by_side(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    await apply(
        crm,
        on_new_lead(
            [
                {"id": "left", "type": "test_wait", "seconds": 1.5},
                {"id": "right", "type": "test_wait", "seconds": 1.5, "depends_on": []},
                {
                    "id": "join",
                    "type": "create_task",
                    "title": "both",
                    "depends_on": ["left", "right"],
                },
            ]
        ),
    )
    await crm.execute("INSERT INTO leads (name) VALUES ('x')")
    [row] = await wait_executions_settled(crm, expected=1, timeout=20)
    assert row["status"] == "completed"
    steps = {
        s["step_id"]: s
        for s in await fetch(
            crm, "SELECT step_id, started_at, finished_at FROM crmflow.execution_steps"
        )
    }
    left, right, join = steps["left"], steps["right"], steps["join"]
    # they overlapped, so both together took about one of them, not two
    assert right["started_at"] < left["finished_at"] and left["started_at"] < right["finished_at"]
    both = max(left["finished_at"], right["finished_at"]) - min(
        left["started_at"], right["started_at"]
    )
    assert both < timedelta(seconds=2)
    # the join waited for both
    assert join["started_at"] >= max(left["finished_at"], right["finished_at"])


async def test_priority_orders_the_whole_queue(
    crm: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool, settings: Settings
) -> None:
    await apply(crm, on_new_lead([{"type": "create_task", "title": "low"}], name="low"))
    await apply(
        crm, on_new_lead([{"type": "create_task", "title": "high"}], name="high", priority=10)
    )
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 3) i")
    await Matcher(pool, settings).drain()
    assert await value(crm, "SELECT count(*) FROM crmflow.execution_queue") == 6
    async with pool.connection() as conn:
        first = await queue.claim(conn, "test", 3, 30)
    claimed = await fetch(
        crm,
        "SELECT w.name FROM crmflow.executions AS x JOIN crmflow.workflows AS w"
        " ON w.id = x.workflow_id WHERE x.id = ANY(%s)",
        [c.execution_id for c in first],
    )
    # one per entity while the others of that entity are leased: the high ones first
    assert [c["name"] for c in claimed] == ["high"] * 3


async def test_one_entity_is_never_claimed_twice_at_once(
    crm: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool, settings: Settings
) -> None:
    await apply(crm, on_new_lead([{"type": "create_task", "title": "a"}], name="a"))
    await apply(crm, on_new_lead([{"type": "create_task", "title": "b"}], name="b"))
    await crm.execute("INSERT INTO leads (name) VALUES ('one')")
    await Matcher(pool, settings).drain()
    async with pool.connection() as conn:
        first = await queue.claim(conn, "w1", 10, 30)
        second = await queue.claim(conn, "w2", 10, 30)
    assert len(first) == 1 and second == []  # the later one waits for the earlier one
    async with pool.connection() as conn:
        await queue.settle(conn, "w1", settings.queue_name, {first[0].execution_id: (None, False)})
        third = await queue.claim(conn, "w2", 10, 30)
    assert [c.execution_id for c in third] == [first[0].execution_id + 1]


async def test_a_worker_dying_mid_batch_loses_and_doubles_no_database_effect(
    crm: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool, settings: Settings
) -> None:
    """A drainer killed while its external calls are in flight: its lease runs out, another
    executor takes the executions over; the external step runs again (at-least-once),
    the database steps around it commit exactly once."""
    await apply(
        crm,
        on_new_lead(
            [
                {"type": "create_task", "title": "before"},
                {"type": "test_wait", "seconds": 0.5},
                {"type": "create_task", "title": "after"},
            ]
        ),
    )
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 20) i")
    await Matcher(pool, settings).drain()
    short = settings.model_copy(update={"executor_lease": 2.0})
    doomed = executor(pool, short, "doomed")
    task = asyncio.create_task(doomed.drain())
    await wait_until(
        lambda: value(
            crm, "SELECT count(*) = 20 FROM crmflow.execution_steps WHERE status = 'running'"
        ),
        timeout=20,
    )
    task.cancel()  # the process dies: nothing recorded, leases left to run out
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert await value(crm, "SELECT count(*) FROM tasks WHERE title = 'before'") == 20
    heir = executor(pool, short, "heir")
    await wait_until(lambda: _drained(heir, crm), timeout=30, interval=0.3)
    rows = await fetch(crm, "SELECT status FROM crmflow.executions")
    assert [r["status"] for r in rows] == ["completed"] * 20
    assert await value(crm, "SELECT count(*) FROM tasks WHERE title = 'before'") == 20
    assert await value(crm, "SELECT count(*) FROM tasks WHERE title = 'after'") == 20
    attempts = await value(
        crm, "SELECT min(attempts) FROM crmflow.execution_steps WHERE step_id = 'test_wait'"
    )
    assert attempts == 2  # the call was made again by the heir


async def _drained(heir: BatchExecutor, crm: psycopg.AsyncConnection[Any]) -> bool:
    await heir.drain(seconds=1)
    return bool(
        await value(
            crm,
            "SELECT count(*) = 0 FROM crmflow.executions"
            " WHERE status IN ('pending', 'running', 'waiting')",
        )
    )


async def test_an_open_circuit_breaker_holds_steps_back_without_using_attempts(
    crm: psycopg.AsyncConnection[Any], db_url: str, settings: Settings, web: Any
) -> None:
    """A host that fails: after breaker_failures consecutive failures its breaker opens,
    the steps calling it wait (scheduled, attempts given back) and the host hears
    nothing more until the open period is over."""
    from engine.worker import running_worker
    from tests.servers import Reply

    web.default = Reply(status=503, body={"down": True})
    await apply(
        crm,
        on_new_lead(
            [
                {
                    "type": "http_request",
                    "url": web.url(),
                    "method": "POST",
                    "retry": {"max_attempts": 20, "backoff": 0.05, "max_backoff": 0.1},
                }
            ]
        ),
    )
    tight = settings.model_copy(update={"breaker_failures": 3, "breaker_open_seconds": 60})
    async with running_worker(db_url, settings=tight, concurrency=4):
        await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 5) i")

        async def held() -> bool:
            rows = await fetch(
                crm,
                "SELECT status, error FROM crmflow.execution_steps WHERE status = 'scheduled'"
                " AND error LIKE '%circuit breaker%'",
            )
            return len(rows) == 5

        await wait_until(held, timeout=30)
        calls = len(web.requests)
        await asyncio.sleep(1.0)
        assert len(web.requests) == calls  # nothing reaches the host while it is open
        assert calls < 5 * 20  # far fewer than every attempt of every step
        state = await value(crm, "SELECT state FROM crmflow.circuit_breakers")
        assert state == "open"
        statuses = {r["status"] for r in await fetch(crm, "SELECT status FROM crmflow.executions")}
        assert statuses == {"waiting"}  # waiting, not failed


async def test_limits_key_limits_per_key(crm: psycopg.AsyncConnection[Any], worker: Worker) -> None:
    """max_concurrent per limits.key: one at a time per source, the two sources side
    by side."""
    await apply(
        crm,
        on_new_lead(
            [{"type": "test_wait", "seconds": 1}],
            limits={"max_concurrent": 1, "key": "{{ entity.source }}"},
        ),
    )
    await crm.execute(
        "INSERT INTO leads (name, source) VALUES ('a1', 'a'), ('b1', 'b'), ('a2', 'a'), ('b2', 'b')"
    )
    rows = await wait_executions_settled(crm, expected=4, timeout=30)
    assert [r["status"] for r in rows] == ["completed"] * 4
    assert sorted(r["flow_key"] for r in rows) == ["a", "a", "b", "b"]
    spans = await fetch(
        crm,
        "SELECT x.flow_key AS key, s.started_at, s.finished_at FROM crmflow.execution_steps AS s"
        " JOIN crmflow.executions AS x ON x.id = s.execution_id ORDER BY s.started_at",
    )
    for key in ("a", "b"):
        mine = [s for s in spans if s["key"] == key]
        assert mine[0]["finished_at"] <= mine[1]["started_at"], f"two of {key} overlapped"
    a, b = (next(s for s in spans if s["key"] == k) for k in ("a", "b"))
    assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]


async def test_limits_key_must_be_a_template(crm: psycopg.AsyncConnection[Any]) -> None:
    import pytest

    from engine.model import DefinitionError

    with pytest.raises(DefinitionError, match=r"limits\.key"):
        await apply(
            crm,
            on_new_lead(
                [{"type": "create_task", "title": "t"}],
                limits={"max_concurrent": 1, "key": "{{ entity.source "},
            ),
        )


async def test_calls_in_flight_to_one_host_are_bounded(
    crm: psycopg.AsyncConnection[Any], db_url: str, settings: Settings, web: Any
) -> None:
    """At most executor_host_concurrency calls to one host at once: six slow webhooks
    with a limit of 2 reach the receiver on at most two connections (64 connects at once
    overflowed a small receiver's listen queue and the resets opened its breaker)."""
    from engine.worker import running_worker
    from tests.servers import Reply

    web.default = Reply(status=200, delay=0.3)
    await apply(crm, on_new_lead([{"type": "http_request", "url": web.url(), "method": "POST"}]))
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 6) i")
    two = settings.model_copy(update={"executor_host_concurrency": 2})
    async with running_worker(db_url, settings=two, concurrency=4):
        rows = await wait_executions_settled(crm, expected=6, timeout=30)
    assert [r["status"] for r in rows] == ["completed"] * 6
    assert len(web.requests) == 6
    assert len({r.peer for r in web.requests}) <= 2, [r.peer for r in web.requests]
