"""The step runner on a real worker: delays, DAGs, branches, retries, replay,
compensation, timeouts, loops, order, flow control, cancel."""

from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from engine.executions import get_execution
from engine.runtime import Runner
from engine.worker import Worker
from tests.helpers import apply, fetch, value, wait_executions_settled, wait_until


async def steps_of(conn: psycopg.AsyncConnection[Any], execution_id: int) -> dict[str, Any]:
    detail = await get_execution(conn, execution_id)
    return {s["id"]: s for s in detail["steps"]}


async def trace(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    return await fetch(conn, "SELECT execution_id, step, label, at FROM test_trace ORDER BY id")


def on_new_lead(actions: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "name": extra.pop("name", "wf"),
        "trigger": {"type": "entity_created", "entity_type": "lead"},
        "actions": actions,
        **extra,
    }


async def test_steps_run_in_order_and_a_delay_waits_without_blocking(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    await apply(
        crm,
        on_new_lead(
            [
                {"type": "test_sleep", "label": "first", "seconds": 0},
                {"type": "test_sleep", "label": "later", "seconds": 0, "delay": "1s"},
            ]
        ),
    )
    await apply(
        crm,
        on_new_lead(
            [{"type": "test_sleep", "label": "other", "seconds": 0}],
            name="other workflow, same lead",
        ),
    )
    await crm.execute("INSERT INTO leads (name) VALUES ('a')")
    await wait_until(lambda: _status_is(crm, 1, "waiting"))
    # the other execution of the same lead is not held back by the delayed step
    await wait_until(lambda: _status_is(crm, 2, "completed"))
    steps = await steps_of(crm, 1)
    assert steps["test_sleep_1"]["status"] == "succeeded"
    assert steps["test_sleep_2"]["status"] == "scheduled" and steps["test_sleep_2"]["scheduled_at"]
    await wait_until(lambda: _status_is(crm, 1, "completed"), timeout=10)
    rows = await trace(crm)
    first, later = (next(r["at"] for r in rows if r["label"] == x) for x in ("first", "later"))
    assert later - first >= timedelta(seconds=0.9)


async def _status_is(conn: psycopg.AsyncConnection[Any], execution_id: int, status: str) -> bool:
    return (
        await value(conn, "SELECT status FROM crmflow.executions WHERE id = %s", execution_id)
        == status
    )


async def test_dag_and_branches(crm: psycopg.AsyncConnection[Any], worker: Worker) -> None:
    await apply(
        crm,
        on_new_lead(
            [
                {"id": "a", "type": "test_sleep", "label": "a", "seconds": 0.05},
                {"id": "b", "type": "test_sleep", "label": "b", "depends_on": ["a"]},
                {
                    "id": "c",
                    "type": "test_sleep",
                    "label": "c",
                    "depends_on": ["a"],
                    "when": {"field": "source", "operator": "equals", "value": "referral"},
                },
                {"id": "d", "type": "test_sleep", "label": "d", "depends_on": ["b", "c"]},
                {
                    "id": "e",
                    "type": "test_sleep",
                    "label": "e",
                    "depends_on": ["a"],
                    "when": {
                        "field": "steps.a.result.slept",
                        "operator": "greater_than",
                        "value": 0.01,
                    },
                },
                {
                    "id": "f",
                    "type": "test_sleep",
                    "label": "f",
                    "depends_on": ["c"],
                    "when": {"field": "steps.c.status", "operator": "equals", "value": "succeeded"},
                },
            ]
        ),
    )
    await crm.execute("INSERT INTO leads (name, source) VALUES ('x', 'website_form')")
    [ex] = await wait_executions_settled(crm, expected=1)
    assert ex["status"] == "completed"
    steps = await steps_of(crm, ex["id"])
    assert {k: s["status"] for k, s in steps.items()} == {
        "a": "succeeded",
        "b": "succeeded",
        "c": "skipped",
        "d": "succeeded",
        "e": "succeeded",
        "f": "skipped",
    }
    assert steps["c"]["result"] == {"reason": "'when' was false"}
    order = [r["label"] for r in await trace(crm)]
    assert order.index("a") < order.index("b") < order.index("d")


async def test_retries_to_exhaustion_then_replay_from_the_failed_step(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    wf = on_new_lead(
        [
            {"type": "test_sleep", "label": "before", "seconds": 0},
            {
                "type": "update_field",
                "field": "score",
                "value": "{{ entity.name }}",
                "retry": {"max_attempts": 3, "backoff": "0.1s", "jitter": False},
            },
            {"type": "test_sleep", "label": "after", "seconds": 0},
        ]
    )
    await apply(crm, wf)
    await crm.execute("INSERT INTO leads (name) VALUES ('not a number')")
    [ex] = await wait_executions_settled(crm, expected=1)
    assert ex["status"] == "failed"
    assert "update_field failed" in ex["error"] and "integer" in ex["error"]
    steps = await steps_of(crm, ex["id"])
    assert steps["update_field"]["attempts"] == 3 and steps["update_field"]["status"] == "failed"
    assert steps["test_sleep_2"]["status"] == "pending"
    assert (
        await value(crm, "SELECT count(*) FROM crmflow.execution_steps WHERE status = 'failed'")
        == 1
    )

    await crm.execute("UPDATE leads SET name = '42'")  # the cause is fixed
    assert await Runner(worker.pool, worker.settings).replay(ex["id"])
    await wait_until(lambda: _status_is(crm, ex["id"], "completed"))
    steps = await steps_of(crm, ex["id"])
    assert steps["update_field"]["status"] == "succeeded"
    assert [r["label"] for r in await trace(crm) if r["execution_id"] == ex["id"]] == [
        "before",
        "after",
    ]  # the step before the failure did not run again
    assert await value(crm, "SELECT score FROM leads") == 42


async def test_compensation_undoes_completed_steps_in_reverse(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    await apply(
        crm,
        on_new_lead(
            [
                {"type": "update_field", "field": "status", "value": "contacted"},
                {"type": "create_task", "title": "call {{ lead.name }}"},
                {
                    "type": "update_field",
                    "field": "score",
                    "value": "{{ entity.name }}",
                    "retry": 1,
                    "on_failure": "compensate",
                },
            ]
        ),
    )
    await crm.execute("INSERT INTO leads (name, owner_id) VALUES ('zed', 1)")
    [ex] = await wait_executions_settled(crm, expected=1)
    assert ex["status"] == "failed"
    steps = await steps_of(crm, ex["id"])
    assert [s["status"] for s in steps.values()] == ["compensated", "compensated", "failed"]
    assert await value(crm, "SELECT status FROM leads") == "new"
    assert await value(crm, "SELECT count(*) FROM tasks") == 0


async def test_compensation_follows_completion_order_in_a_dag(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    """ "first" is listed first but depends on "second": undoing in reverse list order
    would restore "new" and then "qualified"; reverse completion order ends at "new"."""
    await apply(
        crm,
        on_new_lead(
            [
                {
                    "id": "first",
                    "type": "update_field",
                    "field": "status",
                    "value": "contacted",
                    "depends_on": ["second"],
                },
                {
                    "id": "second",
                    "type": "update_field",
                    "field": "status",
                    "value": "qualified",
                    "depends_on": [],
                },
                {
                    "id": "boom",
                    "type": "update_field",
                    "field": "score",
                    "value": "{{ entity.name }}",
                    "retry": 1,
                    "on_failure": "compensate",
                    "depends_on": ["first"],
                },
            ]
        ),
    )
    await crm.execute("INSERT INTO leads (name) VALUES ('zed')")
    [ex] = await wait_executions_settled(crm, expected=1)
    assert ex["status"] == "failed"
    steps = await steps_of(crm, ex["id"])
    assert {k: s["status"] for k, s in steps.items()} == {
        "first": "compensated",
        "second": "compensated",
        "boom": "failed",
    }
    assert await value(crm, "SELECT status FROM leads") == "new"


async def test_continue_past_a_failure(crm: psycopg.AsyncConnection[Any], worker: Worker) -> None:
    await apply(
        crm,
        on_new_lead(
            [
                {
                    "type": "update_field",
                    "field": "score",
                    "value": "{{ entity.name }}",
                    "retry": 1,
                    "on_failure": "continue",
                },
                {"type": "update_field", "field": "status", "value": "reached"},
            ]
        ),
    )
    await crm.execute("INSERT INTO leads (name) VALUES ('n/a')")
    [ex] = await wait_executions_settled(crm, expected=1)
    assert ex["status"] == "completed" and "update_field" in ex["error"]
    assert await value(crm, "SELECT status FROM leads") == "reached"


async def test_timeouts(crm: psycopg.AsyncConnection[Any], worker: Worker) -> None:
    await apply(
        crm,
        on_new_lead(
            [
                {"type": "test_sleep", "seconds": 5, "timeout": "0.3s", "retry": 1},
            ],
            name="database step",
        ),
    )
    await apply(
        crm,
        on_new_lead(
            [
                {"type": "test_wait", "seconds": 5, "timeout": 0.3, "retry": 1},
            ],
            name="external step",
        ),
    )
    await crm.execute("INSERT INTO leads (name) VALUES ('slow')")
    rows = await wait_executions_settled(crm, expected=2, timeout=10)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    errors = [r["error"] for r in rows]
    assert "statement timeout" in errors[0] or "timed out" in errors[0]
    assert "timed out" in errors[1]


async def test_a_ping_pong_loop_stops_at_the_depth_limit(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    await apply(
        crm,
        {
            "name": "ping",
            "trigger": {"type": "field_updated", "entity_type": "lead", "field": "status"},
            "actions": [
                {"type": "update_field", "field": "score", "value": "{{ (entity.score or 0) + 1 }}"}
            ],
        },
    )
    await apply(
        crm,
        {
            "name": "pong",
            "trigger": {"type": "field_updated", "entity_type": "lead", "field": "score"},
            "actions": [
                {"type": "update_field", "field": "status", "value": "s{{ entity.score }}"}
            ],
        },
    )
    await crm.execute("INSERT INTO leads (name) VALUES ('ball')")
    await crm.execute("UPDATE leads SET status = 'serve'")
    rows = await wait_executions_settled(crm, expected=6, timeout=15)
    await asyncio.sleep(0.5)
    rows = await wait_executions_settled(crm)
    assert [r["depth"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["status"] for r in rows] == ["completed"] * 5 + ["failed"]
    assert "loop stopped" in rows[-1]["error"]
    actors = await fetch(crm, "SELECT DISTINCT actor FROM crmflow.outbox WHERE depth > 0")
    assert all(a["actor"].startswith("crmflow:execution") for a in actors)


async def test_one_entity_runs_in_event_order(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    await apply(
        crm,
        {
            "name": "trace updates",
            "trigger": {"type": "entity_updated", "entity_type": "lead"},
            "actions": [{"type": "test_sleep", "seconds": 0.02, "label": "{{ event.new.score }}"}],
        },
    )
    await crm.execute("INSERT INTO leads (id, name) VALUES (1, 'one'), (2, 'two')")
    for n in range(1, 21):
        await crm.execute("UPDATE leads SET score = %s WHERE id = %s", [n, 1 + n % 2])
    await wait_executions_settled(crm, expected=20)
    rows = await fetch(
        crm,
        "SELECT x.entity_pk, t.label, t.at, x.started_at, x.finished_at "
        "FROM test_trace t JOIN crmflow.executions x ON x.id = t.execution_id "
        "ORDER BY t.at",
    )
    for lead in (1, 2):
        mine = [r for r in rows if r["entity_pk"] == {"id": lead}]
        assert [int(r["label"]) for r in mine] == sorted(int(r["label"]) for r in mine)
        for before, after in itertools.pairwise(mine):
            assert before["finished_at"] <= after["started_at"]  # never side by side
    # A job queued behind another of the same entity starts as soon as the lock frees
    # (crmflow.wake_lock_successor), not at the next poll.
    span = rows[-1]["finished_at"] - rows[0]["started_at"]
    assert span < timedelta(seconds=worker.settings.matcher_poll_interval + 3), span


async def test_rate_limit_waits_or_drops(crm: psycopg.AsyncConnection[Any], worker: Worker) -> None:
    await apply(
        crm,
        on_new_lead(
            [{"type": "test_sleep", "seconds": 0}], name="waits", limits={"max_per_minute": 2}
        ),
    )
    await apply(
        crm,
        on_new_lead(
            [{"type": "test_sleep", "seconds": 0}],
            name="drops",
            limits={"max_per_minute": 2, "on_rate_limit": "drop"},
        ),
    )
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 4) i")

    async def settled() -> bool:
        rows = await fetch(crm, "SELECT status, not_before FROM crmflow.executions")
        done = [r for r in rows if r["status"] in ("completed", "skipped")]
        waiting = [r for r in rows if r["status"] == "pending" and r["not_before"]]
        return len(rows) == 8 and len(done) == 6 and len(waiting) == 2

    await wait_until(settled)
    rows = await fetch(
        crm,
        "SELECT w.name, x.status, x.not_before, x.error FROM crmflow.executions x"
        " JOIN crmflow.workflows w ON w.id = x.workflow_id ORDER BY x.id",
    )
    waits = [r for r in rows if r["name"] == "waits"]
    drops = [r for r in rows if r["name"] == "drops"]
    assert sorted(r["status"] for r in waits) == ["completed", "completed", "pending", "pending"]
    assert sorted(r["status"] for r in drops) == ["completed", "completed", "skipped", "skipped"]
    assert all("over 2/min" in r["error"] for r in drops if r["status"] == "skipped")


async def test_max_concurrent(crm: psycopg.AsyncConnection[Any], worker: Worker) -> None:
    await apply(
        crm, on_new_lead([{"type": "test_sleep", "seconds": 0.3}], limits={"max_concurrent": 1})
    )
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 3) i")
    rows = await wait_executions_settled(crm, expected=3, timeout=20)
    assert [r["status"] for r in rows] == ["completed"] * 3
    spans = sorted((r["started_at"], r["finished_at"]) for r in rows)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start


async def test_debounce_runs_once_on_the_last_state(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    await crm.execute("INSERT INTO leads (name, score) VALUES ('x', 0)")
    await apply(
        crm,
        {
            "name": "settle",
            "limits": {"debounce": "1s"},
            "trigger": {"type": "entity_updated", "entity_type": "lead"},
            "actions": [{"type": "test_sleep", "seconds": 0, "label": "{{ entity.score }}"}],
        },
    )
    for n in range(1, 6):
        await crm.execute("UPDATE leads SET score = %s", [n])
        await asyncio.sleep(0.1)
    [ex] = await wait_executions_settled(crm, expected=1)
    assert ex["status"] == "completed"
    assert [r["label"] for r in await trace(crm)] == ["5"]


async def test_cancel_a_waiting_execution(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    await apply(crm, on_new_lead([{"type": "test_sleep", "seconds": 0, "delay": "1h"}]))
    await crm.execute("INSERT INTO leads (name) VALUES ('x')")
    await wait_until(lambda: _status_is(crm, 1, "waiting"))
    runner = Runner(worker.pool, worker.settings)
    assert await runner.cancel(1, "changed my mind")
    assert not await runner.cancel(1)
    assert await _status_is(crm, 1, "cancelled")
    # Out of the execution queue: nothing will run it (the wake-up job for that hour
    # stays; it finds nothing due then).
    assert await value(crm, "SELECT count(*) FROM crmflow.execution_queue") == 0


@pytest.mark.parametrize("delay", [{"until": "close_date", "offset": "-1d"}])
async def test_delay_until_a_date_field(
    crm: psycopg.AsyncConnection[Any], worker: Worker, delay: dict[str, Any]
) -> None:
    await apply(
        crm,
        {
            "name": "before close",
            "trigger": {"type": "entity_created", "entity_type": "deal"},
            "actions": [
                {"type": "create_task", "title": "prep", "delay": delay},
                {
                    "type": "create_task",
                    "title": "no date",
                    "delay": {"until": "close_date"},
                    "depends_on": [],
                },
            ],
        },
    )
    await crm.execute("INSERT INTO deals (name, close_date) VALUES ('d', current_date + 10)")
    [ex] = await wait_executions_settled(crm, expected=1, allow_waiting=True)
    steps = await steps_of(crm, ex["id"])
    scheduled = steps["create_task_1"]["scheduled_at"]
    expected = await value(crm, "SELECT (current_date + 9)::timestamptz")
    assert steps["create_task_1"]["status"] == "scheduled" and scheduled == expected


async def test_compensation_does_not_re_trigger_its_own_workflow(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    """A failure with on_failure compensate gives one failed execution (issue 13, item 8).
    The undo puts the trigger field back ("working" → "contacted"), a change the
    workflow's trigger matches; it used to enroll the workflow again, which failed and
    compensated again, to the depth limit, repeating every step before the failure."""
    await apply(
        crm,
        {
            "name": "Work contacted leads",
            "trigger": {
                "type": "field_updated",
                "entity_type": "lead",
                "field": "status",
                "to": "contacted",
            },
            "actions": [
                {"type": "test_sleep", "label": "call made", "seconds": 0},
                {"type": "update_field", "field": "status", "value": "working"},
                {
                    "type": "update_field",
                    "field": "score",
                    "value": "{{ entity.name }}",
                    "retry": 1,
                    "on_failure": "compensate",
                },
            ],
        },
    )
    await crm.execute("INSERT INTO leads (name) VALUES ('zed')")
    await crm.execute("UPDATE leads SET status = 'contacted'")

    async def drained() -> bool:
        return not await value(
            crm, "SELECT count(*) FROM crmflow.outbox WHERE processed_at IS NULL"
        )

    await wait_executions_settled(crm, expected=1)
    await wait_until(drained)
    await asyncio.sleep(3 * worker.settings.matcher_poll_interval + 0.5)
    await wait_until(drained)
    executions = await wait_executions_settled(crm)
    assert [(x["status"], x["depth"]) for x in executions] == [("failed", 0)], executions
    [ex] = executions
    assert "step update_field_2 failed" in ex["error"], ex
    steps = await steps_of(crm, ex["id"])
    # test_sleep has no undo; the status is put back.
    assert [s["status"] for s in steps.values()] == ["succeeded", "compensated", "failed"]
    assert await value(crm, "SELECT status FROM leads") == "contacted"
    assert [r["label"] for r in await trace(crm)] == ["call made"]  # done once
    # The undo is captured (history), says who made it, and enrolled nothing.
    undo = await fetch(
        crm,
        "SELECT actor, depth, matched FROM crmflow.outbox WHERE new_row->>'status' = 'contacted'"
        " AND old_row->>'status' = 'working'",
    )
    assert undo == [{"actor": f"crmflow:compensation:{ex['id']}", "depth": 1, "matched": 0}]
