"""Enrollment lifecycle (engine/lifecycle.py) on a real worker: a goal and exit criteria
end waiting executions when the entity changes (set-based, in the matcher's round) and
cancel their wake-ups; wait_until ends on its conditions, on a custom event, or on its
timeout, and later steps branch on the outcome; goal conversions in execution_report;
the save-time errors name the path."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from engine import events, workflows
from engine.model import DefinitionError
from engine.worker import Worker
from tests.helpers import apply, fetch, value, wait_until
from tests.paths import REPO


def nurture(**extra: Any) -> dict[str, Any]:
    """A task now, another in an hour: the execution waits in between."""
    return {
        "name": extra.pop("name", "nurture"),
        "trigger": {"type": "entity_created", "entity_type": "lead"},
        "actions": [
            {"id": "intro", "type": "create_task", "title": "intro {{ entity.name }}"},
            {"id": "follow_up", "type": "create_task", "title": "follow up", "delay": "1h"},
        ],
        **extra,
    }


async def waiting(crm: psycopg.AsyncConnection[Any], n: int) -> list[dict[str, Any]]:
    async def ready() -> bool:
        rows = await fetch(crm, "SELECT status FROM crmflow.executions")
        return len(rows) == n and all(r["status"] == "waiting" for r in rows)

    await wait_until(ready, timeout=20)
    return await fetch(crm, "SELECT * FROM crmflow.executions ORDER BY id")


async def settled(crm: psycopg.AsyncConnection[Any], execution_id: int) -> dict[str, Any]:
    async def done() -> bool:
        status = await value(
            crm, "SELECT status FROM crmflow.executions WHERE id = %s", execution_id
        )
        return status not in ("pending", "running", "waiting")

    await wait_until(done, timeout=20)
    [ex] = await fetch(crm, "SELECT * FROM crmflow.executions WHERE id = %s", execution_id)
    return ex


async def step_rows(crm: psycopg.AsyncConnection[Any], execution_id: int) -> dict[str, Any]:
    rows = await fetch(
        crm, "SELECT * FROM crmflow.execution_steps WHERE execution_id = %s", execution_id
    )
    return {r["step_id"]: r for r in rows}


async def test_the_goal_ends_waiting_executions_when_the_entity_meets_it(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    await apply(crm, nurture(goal={"field": "status", "operator": "equals", "value": "customer"}))
    await crm.execute("INSERT INTO leads (name) VALUES ('Ada'), ('Bob'), ('Cy')")
    ada, bob, cy = await waiting(crm, 3)
    # the matcher watches their entities; each waits in the queue for its follow-up
    assert await value(crm, "SELECT count(*) FROM crmflow.watches WHERE kind = 'goal'") == 3
    assert await value(crm, "SELECT count(*) FROM crmflow.execution_queue") == 3

    await crm.execute("UPDATE leads SET status = 'customer' WHERE name IN ('Ada', 'Bob')")
    for ex in (ada, bob):
        done = await settled(crm, ex["id"])
        assert done["status"] == "completed" and done["goal_met_at"] is not None
        steps = await step_rows(crm, ex["id"])
        assert steps["intro"]["status"] == "succeeded"
        assert steps["follow_up"]["status"] == "skipped"
        assert steps["follow_up"]["result"] == {"reason": "goal met"}
    # their wake-ups are gone; Cy still waits, watched
    queued = await fetch(crm, "SELECT execution_id FROM crmflow.execution_queue")
    assert [q["execution_id"] for q in queued] == [cy["id"]]
    watched = await fetch(crm, "SELECT execution_id FROM crmflow.watches")
    assert [w["execution_id"] for w in watched] == [cy["id"]]
    assert await value(crm, "SELECT status FROM crmflow.executions WHERE id = %s", cy["id"]) == (
        "waiting"
    )
    # an unrelated change of Cy is not its goal
    await crm.execute("UPDATE leads SET score = 5 WHERE name = 'Cy'")
    await wait_until(
        lambda: value(crm, "SELECT count(*) = 0 FROM crmflow.outbox WHERE processed_at IS NULL")
    )
    assert await value(crm, "SELECT status FROM crmflow.executions WHERE id = %s", cy["id"]) == (
        "waiting"
    )

    [report] = await fetch(crm, "SELECT * FROM crmflow.execution_report")
    assert report["goal_conversions"] == 2
    assert float(report["goal_conversion_rate"]) == pytest.approx(2 / 3, abs=1e-3)


async def test_exit_when_unenrolls_and_cancels_the_wake_up(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    await apply(
        crm,
        nurture(
            goal={"field": "status", "operator": "equals", "value": "customer"},
            exit_when={"field": "status", "operator": "in", "value": ["lost", "spam"]},
        ),
    )
    await crm.execute("INSERT INTO leads (name) VALUES ('Ada'), ('Bob')")
    ada, bob = await waiting(crm, 2)
    await crm.execute("UPDATE leads SET status = 'spam' WHERE name = 'Ada'")
    done = await settled(crm, ada["id"])
    assert done["status"] == "cancelled" and done["error"] == "exit criteria"
    assert done["goal_met_at"] is None
    assert (await step_rows(crm, ada["id"]))["follow_up"]["result"] == {"reason": "exit criteria"}
    queued = await fetch(crm, "SELECT execution_id FROM crmflow.execution_queue")
    assert [q["execution_id"] for q in queued] == [bob["id"]]
    [report] = await fetch(crm, "SELECT * FROM crmflow.execution_report")
    assert report["goal_conversions"] == 0 and report["cancelled"] == 1


def waiting_for(wait: dict[str, Any], timeout: str = "1h") -> dict[str, Any]:
    """Wait, then one task per outcome, each behind a ``when`` on the wait's result."""

    def on(outcome: str) -> dict[str, Any]:
        return {
            "id": f"on_{outcome}",
            "type": "create_task",
            "title": f"{outcome} {{{{ entity.name }}}}",
            "when": {"field": "steps.wait.result.outcome", "operator": "equals", "value": outcome},
        }

    return {
        "name": "wait for it",
        "trigger": {"type": "entity_created", "entity_type": "lead"},
        "actions": [
            {"id": "wait", "type": "wait", "wait_until": wait, "timeout": timeout},
            on("met"),
            on("event"),
            on("timed_out"),
        ],
    }


async def outcome_of(crm: psycopg.AsyncConnection[Any], execution_id: int) -> tuple[str, str]:
    done = await settled(crm, execution_id)
    assert done["status"] == "completed"
    steps = await step_rows(crm, execution_id)
    ran = [s for s in ("on_met", "on_event", "on_timed_out") if steps[s]["status"] == "succeeded"]
    assert len(ran) == 1, steps
    return steps["wait"]["result"]["outcome"], ran[0]


async def test_wait_until_conditions_met_and_timed_out_branch_on_the_outcome(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    await apply(
        crm,
        waiting_for(
            {"conditions": [{"field": "score", "operator": "greater_or_equal", "value": 50}]},
            timeout="3s",
        ),
    )
    await crm.execute("INSERT INTO leads (name, score) VALUES ('Ada', 10), ('Bob', 20)")
    ada, bob = await waiting(crm, 2)
    assert await value(crm, "SELECT count(*) FROM crmflow.watches WHERE kind = 'wait'") == 2
    await crm.execute("UPDATE leads SET score = 80 WHERE name = 'Ada'")
    assert await outcome_of(crm, ada["id"]) == ("met", "on_met")
    # Bob never gets there: his wait times out, the other branch runs
    assert await outcome_of(crm, bob["id"]) == ("timed_out", "on_timed_out")
    assert await value(crm, "SELECT count(*) FROM crmflow.watches") == 0
    titles = {r["title"] for r in await fetch(crm, "SELECT title FROM tasks")}
    assert titles == {"met Ada", "timed_out Bob"}


async def test_wait_until_a_met_condition_goes_on_at_once(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    await apply(crm, waiting_for({"conditions": [{"field": "score", "operator": "is_not_empty"}]}))
    await crm.execute("INSERT INTO leads (name, score) VALUES ('Ada', 10)")
    await wait_until(lambda: value(crm, "SELECT count(*) = 1 FROM crmflow.executions"))
    [ex] = await fetch(crm, "SELECT id FROM crmflow.executions")
    assert await outcome_of(crm, ex["id"]) == ("met", "on_met")


async def test_wait_until_an_event_about_the_entity(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    await apply(crm, waiting_for({"event": "demo_booked"}))
    await crm.execute("INSERT INTO leads (name) VALUES ('Ada'), ('Bob')")
    ada, bob = await waiting(crm, 2)
    ada_id = await value(crm, "SELECT id FROM leads WHERE name = 'Ada'")
    bob_id = await value(crm, "SELECT id FROM leads WHERE name = 'Bob'")
    # another event, and a change, do not end it
    await events.ingest(crm, "newsletter_opened", entity_type="lead", entity_id=ada_id)
    await crm.execute("UPDATE leads SET score = 1 WHERE name = 'Ada'")
    await events.ingest(crm, "demo_booked", entity_type="lead", entity_id=bob_id)
    assert await outcome_of(crm, bob["id"]) == ("event", "on_event")
    assert await value(crm, "SELECT status FROM crmflow.executions WHERE id = %s", ada["id"]) == (
        "waiting"
    )
    await events.ingest(crm, "demo_booked", entity_type="lead", entity_id=ada_id)
    assert await outcome_of(crm, ada["id"]) == ("event", "on_event")


BAD_DEFINITIONS: list[tuple[dict[str, Any], str, str]] = [
    (
        {"goal": {"field": "stauts", "operator": "equals", "value": "x"}},
        "goal.field",
        "did you mean 'status'",
    ),
    (
        {"exit_when": [{"field": "score", "operator": "greater_than", "value": "lots"}]},
        "exit_when[0].value",
        "not a valid",
    ),
    (
        {
            "actions": [
                {
                    "type": "wait",
                    "wait_until": {"conditions": {"field": "nope"}},
                    "timeout": "1d",
                }
            ]
        },
        "actions[0].wait_until.conditions",
        "",
    ),
    (
        {"actions": [{"type": "wait", "wait_until": {"event": "demo"}}]},
        "actions[0].wait_until.timeout",
        "required",
    ),
    (
        {"actions": [{"type": "wait", "wait_until": {"timeout": "1d"}}]},
        "actions[0].wait_until",
        "either 'conditions' or 'event'",
    ),
    (
        {
            "actions": [
                {"type": "wait", "delay": "1h", "wait_until": {"event": "x"}, "timeout": "1d"}
            ]
        },
        "actions[0].wait_until",
        "not both",
    ),
]


async def test_bad_lifecycle_definitions_name_the_path(crm: psycopg.AsyncConnection[Any]) -> None:
    for change, path, message in BAD_DEFINITIONS:
        definition = {
            "name": "bad",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [{"type": "wait"}],
            **change,
        }
        with pytest.raises(DefinitionError) as info:
            await workflows.apply(crm, definition)
        found = {i.path: i.message for i in info.value.issues}
        assert any(p.startswith(path) and message in m for p, m in found.items()), found
    assert await value(crm, "SELECT count(*) FROM crmflow.workflows") == 0


async def test_the_enrollments_view_and_endpoint(
    crm: psycopg.AsyncConnection[Any], worker: Worker, client: Any
) -> None:
    workflow_id = await apply(
        crm,
        nurture(
            goal={"field": "status", "operator": "equals", "value": "customer"},
            exit_when={"field": "status", "operator": "equals", "value": "spam"},
        ),
    )
    names = ["Ada", "Bob", "Cy", "Dee", "Eve"]
    await crm.execute("INSERT INTO leads (name) SELECT unnest(%s::text[])", [names])
    ada, bob, cy, dee, eve = await waiting(crm, 5)
    await crm.execute("UPDATE leads SET status = 'customer' WHERE name = 'Ada'")
    await crm.execute("UPDATE leads SET status = 'spam' WHERE name = 'Bob'")
    await settled(crm, ada["id"])
    await settled(crm, bob["id"])
    # one completes its steps, one fails, one is being run (active)
    await crm.execute(
        "UPDATE crmflow.executions SET status = 'completed', finished_at = now() WHERE id = %s",
        [cy["id"]],
    )
    await crm.execute(
        "UPDATE crmflow.executions SET status = 'failed', finished_at = now() WHERE id = %s",
        [dee["id"]],
    )
    rows = await fetch(
        crm,
        "SELECT execution_id, state, current_step, waiting_until, reason"
        " FROM crmflow.enrollments ORDER BY execution_id",
    )
    states = {r["execution_id"]: r for r in rows}
    assert states[ada["id"]]["state"] == "goal_met"
    assert states[bob["id"]]["state"] == "exited"
    assert states[bob["id"]]["reason"] == "exit criteria"
    assert states[cy["id"]]["state"] == "completed"
    assert states[dee["id"]]["state"] == "failed"
    assert states[eve["id"]]["state"] == "waiting"
    assert states[eve["id"]]["current_step"] == "follow_up"
    assert states[eve["id"]]["waiting_until"] is not None
    assert states[ada["id"]]["current_step"] is None

    response = await client.get(f"/workflows/{workflow_id}/enrollments")
    assert response.status_code == 200, response.text
    page = response.json()
    assert [i["execution_id"] for i in page["items"]] == [x["id"] for x in (eve, dee, cy, bob, ada)]
    assert page["counts"] == {
        "active": 0,
        "waiting": 1,
        "completed": 1,
        "goal_met": 1,
        "exited": 1,
        "failed": 1,
    }
    assert page["next_cursor"] is None
    lead_id = await value(crm, "SELECT id FROM leads WHERE name = 'Ada'")
    response = await client.get(
        f"/workflows/{workflow_id}/enrollments", params={"state": "goal_met"}
    )
    [item] = response.json()["items"]
    assert item["execution_id"] == ada["id"] and item["entity_id"] == lead_id
    assert item["goal_met_at"] is not None
    # pagination: a page of two, then the rest from its cursor
    first = (await client.get(f"/workflows/{workflow_id}/enrollments?limit=2")).json()
    assert len(first["items"]) == 2 and first["next_cursor"] == dee["id"]
    rest = (
        await client.get(
            f"/workflows/{workflow_id}/enrollments",
            params={"limit": 10, "before_id": first["next_cursor"]},
        )
    ).json()
    assert [i["execution_id"] for i in rest["items"]] == [cy["id"], bob["id"], ada["id"]]
    # a state that is not one is a problem naming the parameter
    response = await client.get(f"/workflows/{workflow_id}/enrollments?state=done")
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    assert [e["path"] for e in response.json()["errors"]] == ["query.state"]
    response = await client.get("/workflows/999999/enrollments")
    assert response.status_code == 404
    assert (
        "/workflows/{workflow_id}/enrollments"
        in (await client.get("/openapi.json")).json()["paths"]
    )


def doc_example(name: str) -> dict[str, Any]:
    """The example of docs/workflows.md named ``name``, as written there."""
    import json
    import re

    text = (REPO / "docs" / "workflows.md").read_text()
    for block in re.findall(r"```json\n(.*?)```", text, re.DOTALL):
        if f'"name": "{name}"' in block:
            found: dict[str, Any] = json.loads(block)
            return found
    raise AssertionError(f"no example {name!r} in docs/workflows.md")


async def test_the_docs_examples_run_a_false_when_skips_a_wait(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    nurture_doc = doc_example("Onboarding nurture")
    await workflows.apply(crm, {**nurture_doc, "status": "paused"})
    demo = doc_example("Demo follow-up")
    # the same flow without the email (no mail server here)
    demo["actions"] = demo["actions"][1:]
    await apply(crm, demo)
    await crm.execute("INSERT INTO leads (name) VALUES ('Ada')")
    [ex] = await waiting(crm, 1)
    lead_id = await value(crm, "SELECT id FROM leads")
    await events.ingest(crm, "demo_booked", entity_type="lead", entity_id=lead_id)
    done = await settled(crm, ex["id"])
    assert done["status"] == "completed"
    steps = await step_rows(crm, ex["id"])
    assert steps["booked"]["result"] == {"outcome": "event"}
    # the second wait's "when" is false: skipped at once, not after its 7 days
    assert steps["engaged"]["status"] == "skipped"
    assert [r["title"] for r in await fetch(crm, "SELECT title FROM tasks")] == [
        "Prepare the demo for Ada"
    ]


async def test_the_executor_checks_the_goal_before_a_step(
    crm: psycopg.AsyncConnection[Any], worker: Worker
) -> None:
    definition = nurture(goal={"field": "status", "operator": "equals", "value": "customer"})
    definition["actions"][1]["delay"] = "2s"
    await apply(crm, definition)
    await crm.execute("INSERT INTO leads (name) VALUES ('Ada')")
    [ex] = await waiting(crm, 1)
    # nothing watches it any more (as for a change that came before its watch): the
    # executor's check before the follow-up finds the goal met
    await crm.execute("DELETE FROM crmflow.watches")
    await crm.execute("UPDATE leads SET status = 'customer'")
    done = await settled(crm, ex["id"])
    assert done["status"] == "completed" and done["goal_met_at"] is not None
    assert (await step_rows(crm, ex["id"]))["follow_up"]["result"] == {"reason": "goal met"}
    assert await value(crm, "SELECT count(*) FROM tasks") == 1


async def test_the_enrollments_command(
    crm: psycopg.AsyncConnection[Any], worker: Worker, db_url: str
) -> None:
    import json
    import os
    import subprocess
    import sys

    await apply(crm, nurture(goal={"field": "status", "operator": "equals", "value": "customer"}))
    await crm.execute("INSERT INTO leads (name) VALUES ('Ada'), ('Bob')")
    ada, _ = await waiting(crm, 2)
    await crm.execute("UPDATE leads SET status = 'customer' WHERE name = 'Ada'")
    await settled(crm, ada["id"])
    env = {**os.environ, "CRMFLOW_DATABASE_URL": db_url}
    command = [sys.executable, "-m", "engine.cli", "workflow", "enrollments", "nurture"]
    out = subprocess.run(
        [*command, "--state", "goal_met", "--json"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    page = json.loads(out.stdout)
    assert [i["execution_id"] for i in page["items"]] == [ada["id"]]
    assert page["counts"]["waiting"] == 1 and page["counts"]["goal_met"] == 1
    table = subprocess.run(command, env=env, capture_output=True, text=True)
    assert table.returncode == 0 and "goal_met" in table.stdout and "follow_up" in table.stdout
    bad = subprocess.run([*command, "--state", "done"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--state" in bad.stderr
