"""Enrollment lifecycle robustness on a real worker: a goal, exit_when or wait_until that
fails (at run time on one row, or no longer compiling) is set apart for its workflow
alone, marked broken with an alert, and every other workflow's goals, exits and waits go
on; wait_until wake-ups are not lost when the round cannot take the execution."""

from __future__ import annotations

from typing import Any

import psycopg

from engine.worker import Worker
from tests.helpers import apply, fetch, value, wait_until
from tests.test_lifecycle import nurture, outcome_of, settled, waiting, waiting_for


async def ids_by_workflow(crm: psycopg.AsyncConnection[Any]) -> dict[tuple[str, str], int]:
    rows = await fetch(
        crm,
        "SELECT x.id, w.name AS workflow, l.name AS lead FROM crmflow.executions AS x"
        " JOIN crmflow.workflows AS w ON w.id = x.workflow_id"
        " JOIN leads AS l ON l.id = (x.entity_pk->>'id')::int",
    )
    return {(r["workflow"], r["lead"]): r["id"] for r in rows}


async def test_a_goal_failing_at_run_time_sets_apart_its_workflow_only(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    bad = nurture(name="bad goal", goal={"sql": "100/(score-7) > 1000"})
    bad["conditions"] = [{"field": "name", "operator": "equals", "value": "Ada"}]
    bad["actions"][1]["delay"] = "4s"
    await apply(crm, bad)
    await apply(
        crm,
        waiting_for(
            {"conditions": [{"field": "score", "operator": "greater_or_equal", "value": 50}]}, "1d"
        ),
    )
    await crm.execute("INSERT INTO leads (name, score) VALUES ('Ada', 10), ('Bob', 10)")
    await waiting(crm, 3)
    ids = await ids_by_workflow(crm)
    # one statement, one batch: Ada's score makes the bad goal divide by zero, Bob meets
    # the other workflow's wait (a lead the bad workflow does not watch)
    await crm.execute("UPDATE leads SET score = CASE name WHEN 'Ada' THEN 7 ELSE 80 END")
    assert await outcome_of(crm, ids[("wait for it", "Bob")]) == ("met", "on_met")

    [wf] = await fetch(
        crm,
        "SELECT id, broken_reason, broken_since_event_id FROM crmflow.workflows"
        " WHERE name = 'bad goal'",
    )
    assert "goal" in wf["broken_reason"] and "division by zero" in wf["broken_reason"]
    assert wf["broken_since_event_id"] is None  # it matched every event: nothing to replay
    [alert] = await fetch(
        crm, "SELECT * FROM crmflow.alerts WHERE kind = 'workflow_broken' AND resolved_at IS NULL"
    )
    assert alert["workflow_id"] == wf["id"] and "division by zero" in alert["message"]
    assert "still enrolls" in alert["message"]

    # the other workflow's waits keep being evaluated after that
    await crm.execute("UPDATE leads SET score = 60 WHERE name = 'Ada'")
    assert await outcome_of(crm, ids[("wait for it", "Ada")]) == ("met", "on_met")

    # the executor's check before the follow-up does not fail the execution either: the
    # goal is left out, the step runs
    await crm.execute("UPDATE leads SET score = 7 WHERE name = 'Ada'")
    done = await settled(crm, ids[("bad goal", "Ada")])
    assert done["status"] == "completed", done["error"]
    assert done["goal_met_at"] is None
    assert await value(crm, "SELECT count(*) FROM tasks WHERE title = 'follow up'") == 1


async def test_a_lifecycle_condition_that_no_longer_compiles_leaves_out_its_workflow_only(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    await apply(crm, nurture(name="bad goal", goal={"sql": "score > 50"}))
    await crm.execute("ALTER TABLE leads ALTER COLUMN score TYPE text")
    # saved after the change: the round is rebuilt against the new column type
    await apply(
        crm,
        waiting_for({"conditions": [{"field": "status", "operator": "equals", "value": "hot"}]}),
    )
    await crm.execute("INSERT INTO leads (name) VALUES ('Ada')")
    await waiting(crm, 2)
    ids = await ids_by_workflow(crm)
    await crm.execute("UPDATE leads SET status = 'hot'")
    assert await outcome_of(crm, ids[("wait for it", "Ada")]) == ("met", "on_met")

    async def marked() -> bool:
        reason = await value(
            crm, "SELECT broken_reason FROM crmflow.workflows WHERE name = 'bad goal'"
        )
        return reason is not None and "operator does not exist" in reason

    await wait_until(marked, timeout=20)
    assert (
        await value(
            crm,
            "SELECT count(*) FROM crmflow.alerts WHERE kind = 'workflow_broken'"
            " AND resolved_at IS NULL",
        )
        == 1
    )
