"""The database actions against a real database: create_task, update_field,
send_notification, assign_owner, qualify_lead; compensation; exactly-once effects;
templates that try to leave the sandbox.

External actions (send_email, http_request, enrich_lead) are in test_actions_external.py.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from engine import db
from engine.actions.create_task import CreateTask
from engine.config import Settings
from engine.matcher import Matcher
from engine.model import DefinitionError
from engine.runtime import Runner
from engine.worker import running_worker
from tests.helpers import (
    apply,
    drive,
    execution_ids,
    fetch,
    run_job,
    steps,
    value,
    wait_executions_settled,
)

Conn = psycopg.AsyncConnection[Any]

LEAD_CREATED = {"type": "entity_created", "entity_type": "lead"}


async def new_lead(conn: Conn, **columns: Any) -> int:
    columns = {"name": "Bob Lead", **columns}
    names = ", ".join(columns)
    marks = ", ".join(["%s"] * len(columns))
    return await value(
        conn, f"INSERT INTO leads ({names}) VALUES ({marks}) RETURNING id", *columns.values()
    )


async def run_one(conn: Conn, matcher: Matcher, runner: Runner) -> tuple[dict[str, Any], list]:
    """Enroll what was written and run the single execution to its end."""
    await matcher.drain()
    [execution_id] = await execution_ids(conn)
    ex = await drive(runner, conn, execution_id)
    return ex, await steps(conn, execution_id)


async def lead(conn: Conn, lead_id: int) -> dict[str, Any]:
    [row] = await fetch(conn, "SELECT * FROM leads WHERE id = %s", lead_id)
    return row


def refused(exc: pytest.ExceptionInfo[DefinitionError]) -> dict[str, str]:
    return {i.path: i.message for i in exc.value.issues}


# ───────────────────────────── create_task ─────────────────────────────


async def test_create_task_renders_title_and_assigns_the_owner(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    await apply(
        crm,
        {
            "name": "Follow up",
            "trigger": LEAD_CREATED,
            "actions": [
                {
                    "type": "create_task",
                    "title": "Call {{ lead.name }} at {{ entity.company }}",
                    "description": "Came from {{ entity.source }}",
                    "priority": "high",
                    "due": "2d",
                }
            ],
        },
    )
    lead_id = await new_lead(crm, name="Eve", company="Acme", source="referral", owner_id=1)
    before = datetime.now(UTC)
    ex, [step] = await run_one(crm, matcher, runner)
    assert ex["status"] == "completed"
    assert step["status"] == "succeeded" and step["attempts"] == 1
    [task] = await fetch(crm, "SELECT * FROM tasks")
    assert task["title"] == "Call Eve at Acme"
    assert task["description"] == "Came from referral"
    assert task["priority"] == "high"
    assert (task["entity_type"], task["entity_id"]) == ("lead", str(lead_id))
    assert task["assignee_id"] == 1
    due = task["due_at"] - before
    assert timedelta(days=2) - timedelta(seconds=5) < due < timedelta(days=2, seconds=30)
    assert step["result"] == {"task_id": task["id"], "assignee_id": 1}


async def test_create_task_explicit_assignee_role_and_none(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    await apply(
        crm,
        {
            "name": "Tasks for everyone",
            "trigger": LEAD_CREATED,
            "actions": [
                {"id": "to_carl", "type": "create_task", "title": "A", "assignee": 2},
                {"id": "to_mgr", "type": "create_task", "title": "B", "assignee": "role:manager"},
                {"id": "nobody", "type": "create_task", "title": "C", "assignee": None},
                {"id": "no_owner", "type": "create_task", "title": "D"},
            ],
        },
    )
    await new_lead(crm)  # no owner
    ex, _ = await run_one(crm, matcher, runner)
    assert ex["status"] == "completed"
    tasks = await fetch(crm, "SELECT title, assignee_id, priority FROM tasks ORDER BY title")
    assert tasks == [
        {"title": "A", "assignee_id": 2, "priority": "normal"},
        {"title": "B", "assignee_id": 3, "priority": "normal"},
        {"title": "C", "assignee_id": None, "priority": "normal"},
        {"title": "D", "assignee_id": None, "priority": "normal"},
    ]


async def test_create_task_refuses_bad_parameters_at_save(crm: Conn) -> None:
    base = {"name": "Bad task", "trigger": LEAD_CREATED}
    with pytest.raises(DefinitionError) as exc:
        await apply(crm, {**base, "actions": [{"type": "create_task", "title": "{{ oops"}]})
    assert "actions[0].title" in refused(exc)
    with pytest.raises(DefinitionError) as exc:
        await apply(
            crm, {**base, "actions": [{"type": "create_task", "title": "x", "priority": "meh"}]}
        )
    assert "actions[0].priority" in refused(exc)
    with pytest.raises(DefinitionError) as exc:
        await apply(
            crm, {**base, "actions": [{"type": "create_task", "title": "x", "assignee": "bob"}]}
        )
    assert "actions[0].assignee" in refused(exc)
    with pytest.raises(DefinitionError) as exc:
        await apply(
            crm,
            {
                **base,
                "actions": [{"type": "create_task", "title": "x", "owner_field": "nope"}],
            },
        )
    assert "actions[0].assignee" in refused(exc)


FAIL_NEXT = {
    # A step that always fails: "Bob" is not an integer (no retries, then compensate).
    "type": "update_field",
    "field": "employees",
    "value": "{{ entity.name }}",
    "retry": 1,
    "on_failure": "compensate",
}


async def test_create_task_compensation_deletes_the_task(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    await apply(
        crm,
        {
            "name": "Task then failure",
            "trigger": LEAD_CREATED,
            "actions": [{"type": "create_task", "title": "Call {{ entity.name }}"}, FAIL_NEXT],
        },
    )
    await new_lead(crm, owner_id=1)
    ex, [task_step, failing] = await run_one(crm, matcher, runner)
    assert ex["status"] == "failed"
    assert failing["status"] == "failed" and failing["attempts"] == 1
    assert "integer" in failing["error"]
    assert task_step["status"] == "compensated"
    assert await value(crm, "SELECT count(*) FROM tasks") == 0
    assert "step update_field failed" in ex["error"]


# ───────────────────────────── update_field ─────────────────────────────


async def test_update_field_writes_the_value_and_keeps_the_old_one(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    await apply(
        crm,
        {
            "name": "Mark contacted",
            "trigger": LEAD_CREATED,
            "actions": [
                {"id": "status", "type": "update_field", "field": "status", "value": "contacted"},
                {"id": "score", "type": "update_field", "field": "score", "value": 42},
                {
                    "id": "employees",
                    "type": "update_field",
                    "field": "employees",
                    "value": "{{ entity.score + 1 }}",
                },
                {"id": "tags", "type": "update_field", "field": "tags", "value": ["hot", "eu"]},
                {"id": "company", "type": "update_field", "field": "company", "value": None},
            ],
        },
    )
    lead_id = await new_lead(crm, company="Acme")
    ex, results = await run_one(crm, matcher, runner)
    assert ex["status"] == "completed", ex["error"]
    row = await lead(crm, lead_id)
    assert (row["status"], row["score"], row["employees"]) == ("contacted", 42, 43)
    assert row["tags"] == ["hot", "eu"] and row["company"] is None
    by_id = {s["step_id"]: s["result"] for s in results}
    assert by_id["status"] == {"field": "status", "old": "new", "new": "contacted"}
    assert by_id["score"] == {"field": "score", "old": None, "new": 42}
    assert by_id["company"]["old"] == "Acme"


async def test_update_field_type_checked_at_save(crm: Conn) -> None:
    base = {"name": "Bad update", "trigger": LEAD_CREATED}
    with pytest.raises(DefinitionError) as exc:
        await apply(
            crm, {**base, "actions": [{"type": "update_field", "field": "score", "value": "high"}]}
        )
    issues = refused(exc)
    assert list(issues) == ["actions[0].value"]
    assert "integer" in issues["actions[0].value"]
    for action, path in [
        ({"type": "update_field", "field": "nope", "value": 1}, "actions[0].field"),
        ({"type": "update_field", "field": "id", "value": 1}, "actions[0].field"),
        ({"type": "update_field", "field": "name", "value": None}, "actions[0].value"),
        ({"type": "update_field", "field": "score", "value": True}, "actions[0].value"),
        ({"type": "update_field", "field": "owner_id", "value": 1.5}, "actions[0].value"),
        ({"type": "update_field", "field": "status", "value": "{{ x"}, "actions[0].value"),
    ]:
        with pytest.raises(DefinitionError) as exc:
            await apply(crm, {**base, "actions": [action]})
        assert path in refused(exc), action
    # Nothing was saved.
    assert await value(crm, "SELECT count(*) FROM crmflow.workflows") == 0
    # A value of the right type is accepted.
    await apply(crm, {**base, "actions": [{"type": "update_field", "field": "score", "value": 7}]})


async def test_update_field_compensation_restores_the_old_value(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    await apply(
        crm,
        {
            "name": "Update then failure",
            "trigger": LEAD_CREATED,
            "actions": [
                {"type": "update_field", "field": "status", "value": "working"},
                {"id": "score", "type": "update_field", "field": "score", "value": 99},
                FAIL_NEXT,
            ],
        },
    )
    lead_id = await new_lead(crm, score=5)
    ex, [status_step, score_step, _] = await run_one(crm, matcher, runner)
    assert ex["status"] == "failed"
    assert status_step["status"] == score_step["status"] == "compensated"
    row = await lead(crm, lead_id)
    assert (row["status"], row["score"]) == ("new", 5)


# ───────────────────────────── send_notification ─────────────────────────────


async def test_send_notification_rows_and_notify_after_commit(
    crm: Conn, db_url: str, matcher: Matcher, runner: Runner
) -> None:
    await apply(
        crm,
        {
            "name": "Notify",
            "trigger": LEAD_CREATED,
            "actions": [
                {"id": "owner", "type": "send_notification", "message": "New: {{ entity.name }}"},
                {"id": "carl", "type": "send_notification", "message": "FYI", "recipient": 2},
                {
                    "id": "managers",
                    "type": "send_notification",
                    "message": "Watch {{ entity.company }}",
                    "recipient": "role:manager",
                },
                {"id": "both", "type": "send_notification", "message": "x", "recipient": [1, 2]},
            ],
        },
    )
    await crm.execute(
        "INSERT INTO users (id, name, email, role) VALUES (4, 'Max', 'max@acme.test', 'manager')"
    )
    lead_id = await new_lead(crm, name="Zoe", company="Initech", owner_id=1)
    async with await db.connect(db_url, autocommit=True) as listener:
        await listener.execute("LISTEN crmflow_notifications")
        ex, results = await run_one(crm, matcher, runner)
        assert ex["status"] == "completed", ex["error"]
        payloads = []
        async for note in listener.notifies(timeout=5.0, stop_after=4):
            assert note.channel == "crmflow_notifications"
            payload = json.loads(note.payload)
            # Sent when the step committed: its rows are visible to anyone by now.
            visible = await value(
                crm,
                "SELECT count(*) FROM notifications WHERE id = ANY(%s)",
                payload["notification_ids"],
            )
            assert visible == len(payload["notification_ids"])
            payloads.append(payload)
    assert [p["recipient_ids"] for p in payloads] == [[1], [2], [3, 4], [1, 2]]
    assert payloads[0]["message"] == "New: Zoe"
    assert payloads[2]["message"] == "Watch Initech"
    assert all(p["entity_type"] == "lead" and p["entity_id"] == lead_id for p in payloads)
    rows = await fetch(
        crm,
        "SELECT recipient_id, message, entity_type, entity_id FROM notifications ORDER BY id",
    )
    assert rows == [
        {"recipient_id": 1, "message": "New: Zoe", "entity_type": "lead", "entity_id": "1"},
        {"recipient_id": 2, "message": "FYI", "entity_type": "lead", "entity_id": "1"},
        {"recipient_id": 3, "message": "Watch Initech", "entity_type": "lead", "entity_id": "1"},
        {"recipient_id": 4, "message": "Watch Initech", "entity_type": "lead", "entity_id": "1"},
        {"recipient_id": 1, "message": "x", "entity_type": "lead", "entity_id": "1"},
        {"recipient_id": 2, "message": "x", "entity_type": "lead", "entity_id": "1"},
    ]
    by_id = {s["step_id"]: s["result"] for s in results}
    assert by_id["managers"]["recipient_ids"] == [3, 4]


async def test_send_notification_to_a_large_role_fits_in_a_notify(
    crm: Conn, db_url: str, matcher: Matcher, runner: Runner
) -> None:
    """PostgreSQL refuses NOTIFY payloads of 8000 bytes: a role of 1,500 users gets its
    rows, and a payload cut down to fit."""
    await crm.execute(
        "INSERT INTO users (id, name, email, role)"
        " SELECT i, 'csm ' || i, NULL, 'csm' FROM generate_series(100, 1599) AS i"
    )
    await apply(
        crm,
        {
            "name": "Notify all CSMs",
            "trigger": LEAD_CREATED,
            "actions": [
                {"type": "send_notification", "message": "é" * 3000, "recipient": "role:csm"}
            ],
        },
    )
    await new_lead(crm)
    async with await db.connect(db_url, autocommit=True) as listener:
        await listener.execute("LISTEN crmflow_notifications")
        ex, [step] = await run_one(crm, matcher, runner)
        assert ex["status"] == "completed", ex["error"]
        [note] = [n async for n in listener.notifies(timeout=5.0, stop_after=1)]
    payload = json.loads(note.payload)
    assert len(note.payload.encode()) < 8000
    assert payload["truncated"] is True and payload["count"] == 1501
    assert len(payload["notification_ids"]) == 100
    assert await value(crm, "SELECT count(*) FROM notifications") == 1501
    assert len(step["result"]["notification_ids"]) == 1501


async def test_send_notification_without_recipient_is_skipped(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    await apply(
        crm,
        {
            "name": "Notify owner",
            "trigger": LEAD_CREATED,
            "actions": [{"type": "send_notification", "message": "hi"}],
        },
    )
    await new_lead(crm)  # no owner
    ex, [step] = await run_one(crm, matcher, runner)
    assert ex["status"] == "completed"
    assert step["status"] == "skipped"
    assert "recipient" in step["result"]["reason"]
    assert await value(crm, "SELECT count(*) FROM notifications") == 0


async def test_send_notification_refuses_bad_recipients_at_save(crm: Conn) -> None:
    for recipient in ("everyone", "role:"):
        with pytest.raises(DefinitionError) as exc:
            await apply(
                crm,
                {
                    "name": "Bad notify",
                    "trigger": LEAD_CREATED,
                    "actions": [
                        {"type": "send_notification", "message": "m", "recipient": recipient}
                    ],
                },
            )
        assert "actions[0].recipient" in refused(exc)


# ───────────────────────────── assign_owner ─────────────────────────────


async def more_reps(conn: Conn) -> None:
    """Sales reps 1 Ann, 4 Bo, 6 Di active; 5 Cy inactive."""
    await conn.execute(
        "INSERT INTO users (id, name, email, role, active) VALUES "
        "(4, 'Bo', 'bo@acme.test', 'sales_rep', true),"
        "(5, 'Cy', 'cy@acme.test', 'sales_rep', false),"
        "(6, 'Di', 'di@acme.test', 'sales_rep', true)"
    )


async def test_assign_owner_round_robin_cycles_in_id_order(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    await more_reps(crm)
    await apply(
        crm,
        {
            "name": "Round robin",
            "trigger": LEAD_CREATED,
            "actions": [{"type": "assign_owner", "role": "sales_rep"}],
        },
    )
    leads = [await new_lead(crm, name=f"L{i}") for i in range(7)]
    await matcher.drain()
    for execution_id in await execution_ids(crm):
        ex = await drive(runner, crm, execution_id)
        assert ex["status"] == "completed", ex["error"]
    owners = [(await lead(crm, i))["owner_id"] for i in leads]
    assert owners == [1, 4, 6, 1, 4, 6, 1]
    [step] = await steps(crm, (await execution_ids(crm))[0])
    assert step["result"] == {"field": "owner_id", "user_id": 1, "old": None, "by": "round robin"}


async def test_assign_owner_round_robin_under_a_real_worker(
    crm: Conn, db_url: str, settings: Settings
) -> None:
    """Concurrent assignments take turns on the cursor: each rep gets the same share."""
    await more_reps(crm)
    await apply(
        crm,
        {
            "name": "Round robin",
            "trigger": LEAD_CREATED,
            "actions": [{"type": "assign_owner", "role": "sales_rep"}],
        },
    )
    for i in range(9):
        await new_lead(crm, name=f"L{i}")
    async with running_worker(db_url, settings=settings, concurrency=4):
        executions = await wait_executions_settled(crm, expected=9)
    assert {e["status"] for e in executions} == {"completed"}
    counts = await fetch(
        crm, "SELECT owner_id, count(*) AS n FROM leads GROUP BY owner_id ORDER BY owner_id"
    )
    assert counts == [{"owner_id": u, "n": 3} for u in (1, 4, 6)]


async def test_assign_owner_by_rules(crm: Conn, matcher: Matcher, runner: Runner) -> None:
    await apply(
        crm,
        {
            "name": "Territories",
            "trigger": LEAD_CREATED,
            "actions": [
                {
                    "type": "assign_owner",
                    "strategy": "rule",
                    "rules": [
                        {
                            "when": [{"field": "country", "operator": "equals", "value": "DE"}],
                            "user_id": 2,
                        },
                        {
                            "when": {
                                "any": [
                                    {
                                        "field": "employees",
                                        "operator": "greater_than",
                                        "value": 999,
                                    },
                                    {"field": "company", "operator": "contains", "value": "Corp"},
                                ]
                            },
                            "user_id": 3,
                        },
                    ],
                    "fallback": "none",
                }
            ],
        },
    )
    german = await new_lead(crm, country="DE", employees=5000)
    big = await new_lead(crm, country="FR", employees=5000)
    corp = await new_lead(crm, company="Mega Corp")
    nobody = await new_lead(crm, country="US")
    await matcher.drain()
    results = [await drive(runner, crm, e) for e in await execution_ids(crm)]
    assert [r["status"] for r in results] == ["completed", "completed", "completed", "failed"]
    assert [(await lead(crm, i))["owner_id"] for i in (german, big, corp, nobody)] == [
        2,
        3,
        3,
        None,
    ]
    [step] = await steps(crm, results[0]["id"])
    assert step["result"]["by"] == "rule 0"
    [failed] = await steps(crm, results[3]["id"])
    assert failed["attempts"] == 1 and "no rule matched" in failed["error"]


async def test_assign_owner_rule_falls_back_to_round_robin(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    await apply(
        crm,
        {
            "name": "Territories with fallback",
            "trigger": LEAD_CREATED,
            "actions": [
                {
                    "type": "assign_owner",
                    "strategy": "rule",
                    "role": "csm",
                    "rules": [
                        {
                            "when": [{"field": "country", "operator": "equals", "value": "DE"}],
                            "user_id": 3,
                        }
                    ],
                }
            ],
        },
    )
    lead_id = await new_lead(crm, country="US")
    ex, [step] = await run_one(crm, matcher, runner)
    assert ex["status"] == "completed"
    assert (await lead(crm, lead_id))["owner_id"] == 2
    assert step["result"]["by"] == "round robin"


async def test_assign_owner_only_if_unassigned_skips(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    await apply(
        crm,
        {
            "name": "Assign if nobody",
            "trigger": LEAD_CREATED,
            "actions": [{"type": "assign_owner", "role": "manager", "only_if_unassigned": True}],
        },
    )
    taken = await new_lead(crm, owner_id=2)
    free = await new_lead(crm)
    await matcher.drain()
    first, second = await execution_ids(crm)
    assert (await drive(runner, crm, first))["status"] == "completed"
    assert (await drive(runner, crm, second))["status"] == "completed"
    [skipped] = await steps(crm, first)
    assert skipped["status"] == "skipped"
    assert skipped["result"] == {"reason": "already assigned to 2"}
    assert (await lead(crm, taken))["owner_id"] == 2
    assert (await lead(crm, free))["owner_id"] == 3


async def test_assign_owner_checks_rules_at_save(crm: Conn) -> None:
    def definition(**params: Any) -> dict[str, Any]:
        return {
            "name": "Bad rules",
            "trigger": LEAD_CREATED,
            "actions": [{"type": "assign_owner", **params}],
        }

    with pytest.raises(DefinitionError) as exc:
        await apply(crm, definition(strategy="rule"))
    assert "actions[0].rules" in refused(exc)
    with pytest.raises(DefinitionError) as exc:
        await apply(
            crm,
            definition(
                strategy="rule",
                rules=[
                    {"when": [{"field": "nope", "operator": "equals", "value": 1}], "user_id": 2}
                ],
            ),
        )
    assert any(p.startswith("actions[0].rules[0].when") for p in refused(exc))
    # A value that does not fit the column's type is refused when saved, not at run time.
    with pytest.raises(DefinitionError) as exc:
        await apply(
            crm,
            definition(
                strategy="rule",
                rules=[
                    {
                        "when": [{"field": "employees", "operator": "greater_than", "value": "x"}],
                        "user_id": 2,
                    }
                ],
            ),
        )
    assert any(p.startswith("actions[0].rules[0].when") for p in refused(exc))
    with pytest.raises(DefinitionError) as exc:
        await apply(crm, definition(field="nope"))
    assert "actions[0].field" in refused(exc)


async def test_assign_owner_compensation_restores_the_owner(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    await apply(
        crm,
        {
            "name": "Assign then fail",
            "trigger": LEAD_CREATED,
            "actions": [{"type": "assign_owner", "role": "manager"}, FAIL_NEXT],
        },
    )
    lead_id = await new_lead(crm, owner_id=1)
    ex, [assign, _] = await run_one(crm, matcher, runner)
    assert ex["status"] == "failed"
    assert assign["status"] == "compensated"
    assert (await lead(crm, lead_id))["owner_id"] == 1


# ───────────────────────────── qualify_lead ─────────────────────────────


async def qualify(
    crm: Conn, matcher: Matcher, runner: Runner, params: dict[str, Any], **lead: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    await apply(
        crm,
        {
            "name": "Qualify",
            "trigger": LEAD_CREATED,
            "actions": [{"type": "qualify_lead", **params}],
        },
    )
    lead_id = await new_lead(crm, **lead)
    ex, [step] = await run_one(crm, matcher, runner)
    assert ex["status"] == "completed", ex["error"]
    [row] = await fetch(crm, "SELECT score, status FROM leads WHERE id = %s", lead_id)
    return row, step["result"]


async def test_qualify_lead_business_lead_is_qualified(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    row, result = await qualify(
        crm,
        matcher,
        runner,
        {},
        source="website_form",
        email="jane@initech.example",
        company="Initech",
        title="VP of Sales",
    )
    assert row == {"score": 80, "status": "qualified"}
    assert result["qualified"] is True and result["score"] == 80
    assert result["old"] == {"score": None, "status": "new"}
    assert result["reasons"] == [
        "source website_form +25",
        "company +15",
        "business email +20",
        "senior title +20",
    ]


async def test_qualify_lead_webmail_lead_without_company_scores_lower(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    row, result = await qualify(
        crm,
        matcher,
        runner,
        {},
        source="website_form",
        email="jane.doe@gmail.com",
        title="Marketing Coordinator",  # "coo" inside a word is not a senior title
    )
    assert row == {"score": 25, "status": "nurture"}
    assert result["reasons"] == ["source website_form +25"]


@pytest.mark.parametrize(
    ("title", "senior"),
    [
        ("CEO", True),
        ("Co-Founder & CTO", True),
        ("Head of Growth", True),
        ("Vice President, Sales", True),
        ("Sales Director", True),
        ("Contractor", False),
        ("Marketing Coordinator", False),
        ("Partnerships Associate", False),
        ("Product Owner", True),
        ("", False),
    ],
)
def test_qualify_lead_senior_titles(title: str, senior: bool) -> None:
    from engine.actions.qualify_lead import Weights, score_lead

    score, _ = score_lead({"title": title}, Weights())
    assert (score == 20) is senior


async def test_qualify_lead_weights_and_threshold_change_the_outcome(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    lead_fields = {
        "source": "website_form",
        "email": "jane@initech.example",
        "company": "Initech",
        "title": "VP of Sales",
    }
    row, _ = await qualify(crm, matcher, runner, {"threshold": 81}, **lead_fields)
    assert row == {"score": 80, "status": "nurture"}
    await crm.execute("DELETE FROM crmflow.executions")
    row, result = await qualify(
        crm,
        matcher,
        runner,
        {
            "threshold": 30,
            "weights": {"source": {"website_form": 0}, "business_email": 5, "company": 30},
            "qualified_status": "hot",
        },
        **{**lead_fields, "email": "x@gmail.com", "title": "intern"},
    )
    assert row == {"score": 30, "status": "hot"}
    assert result["reasons"] == ["company +30"]


async def test_qualify_lead_caps_at_100_and_counts_employees(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    row, result = await qualify(
        crm,
        matcher,
        runner,
        {"weights": {"senior_title": 60}},
        source="referral",
        email="ceo@big.example",
        company="Big",
        title="CEO",
        employees=500,
    )
    assert row == {"score": 100, "status": "qualified"}
    assert "over 50 employees +10" in result["reasons"]


async def test_qualify_lead_compensation_restores(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    await apply(
        crm,
        {
            "name": "Qualify then fail",
            "trigger": LEAD_CREATED,
            "actions": [{"type": "qualify_lead"}, FAIL_NEXT],
        },
    )
    lead_id = await new_lead(crm, source="referral", company="X", score=3, status="working")
    ex, [qualify_step, _] = await run_one(crm, matcher, runner)
    assert ex["status"] == "failed"
    assert qualify_step["status"] == "compensated"
    assert qualify_step["result"]["score"] == 45
    [row] = await fetch(crm, "SELECT score, status FROM leads WHERE id = %s", lead_id)
    assert row == {"score": 3, "status": "working"}


async def test_qualify_lead_checks_fields_at_save(crm: Conn) -> None:
    with pytest.raises(DefinitionError) as exc:
        await apply(
            crm,
            {
                "name": "Bad qualify",
                "trigger": LEAD_CREATED,
                "actions": [{"type": "qualify_lead", "score_field": "rating", "weights": {"x": 1}}],
            },
        )
    assert "actions[0].weights.x" in refused(exc)
    with pytest.raises(DefinitionError) as exc:
        await apply(
            crm,
            {
                "name": "Bad qualify",
                "trigger": LEAD_CREATED,
                "actions": [{"type": "qualify_lead", "score_field": "rating"}],
            },
        )
    assert "actions[0].score_field" in refused(exc)
    with pytest.raises(DefinitionError) as exc:
        await apply(
            crm,
            {
                "name": "Bad qualify",
                "trigger": {"type": "manual"},
                "actions": [{"type": "qualify_lead"}],
            },
        )
    assert "actions[0].type" in refused(exc)


# ───────────────────────────── templates ─────────────────────────────

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ entity.__class__ }}",
    "{{ ''['__class__'] }}",
    "{{ (entity|attr('__class__')).__base__ }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ self._TemplateReference__context }}",
]


async def test_template_escapes_are_refused_at_save(crm: Conn) -> None:
    for template in ESCAPES:
        with pytest.raises(DefinitionError) as exc:
            await apply(
                crm,
                {
                    "name": "Escape",
                    "trigger": LEAD_CREATED,
                    "actions": [{"type": "create_task", "title": template}],
                },
            )
        assert "actions[0].title" in refused(exc), template
    assert await value(crm, "SELECT count(*) FROM crmflow.workflows") == 0


RUNTIME_ESCAPES = [
    # Names built at run time get past the save-time check; the sandbox stops them.
    "{{ entity['__cla' ~ 'ss__'] }}",
    "{{ entity|attr('__cla' ~ 'ss__') }}",
    "{{ ('{0.__cl' ~ 'ass__}').format(entity) }}",
    "{{ entity.items.__self__ }}",
    "{{ entity.clear() }}",
    "{{ [1, 2].append(3) }}",
    "{{ 9 ** 999999999 }}",
]


async def test_template_escapes_fail_the_step_in_the_sandbox(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    for i, template in enumerate(RUNTIME_ESCAPES):
        await apply(
            crm,
            {
                "name": f"Escape at run time {i}",
                "trigger": LEAD_CREATED,
                "actions": [{"type": "create_task", "title": "placeholder"}],
            },
        )
        # Written straight to the database, as if the save-time check were bypassed.
        await crm.execute(
            "UPDATE crmflow.workflow_versions AS v"
            " SET definition = jsonb_set(definition, '{actions,0,title}', to_jsonb(%s::text))"
            " FROM crmflow.workflows AS w WHERE w.id = v.workflow_id AND w.name = %s",
            [template, f"Escape at run time {i}"],
        )
    await new_lead(crm, owner_id=1)
    await matcher.drain()
    ids = await execution_ids(crm)
    assert len(ids) == len(RUNTIME_ESCAPES)
    for execution_id in ids:
        ex = await drive(runner, crm, execution_id)
        [step] = await steps(crm, execution_id)
        assert ex["status"] == "failed"
        assert step["status"] == "failed" and step["attempts"] == 1  # permanent: no retries
        assert "template" in step["error"]
    assert await value(crm, "SELECT count(*) FROM tasks") == 0


BOMBS = [
    "{{ 9 ** 999999999 }}",
    "{{ 'x' * 1000000000 }}",
    "{{ [0] * 1000000000 }}",
    "{{ 'x' | center(1000000000) }}",
    "{{ '%01000000000d' | format(1) }}",
    "{{ '%01000000000d' % 1 }}",
    "{{ '{:>1000000000}'.format(1) }}",
    "{{ 'ab' | replace('', 'x' * 10000) | replace('x', 'y' * 10000) }}",
    "{% for a in range(1000) %}{% for b in range(1000) %}{% for c in range(1000) %}"
    "{% endfor %}{% endfor %}{% endfor %}",
    "{% set ns = namespace(s='xy') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s | length }}",
    "{% set ns = namespace(s='xy') %}{% for i in range(100) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}{{ ns.s | length }}",
    "{{ lipsum(100000) }}",
    "{{ range(10 ** 9) | list }}",
    "{{ 'x' | indent(1000000000, true) }}",
    "{{ 'x'.ljust(1000000000) }}",
    "{{ 'ab'.replace('', 'x' * 99999) }}",
    "{{ ('x\t' * 9999).expandtabs(1000000) }}",
    "{{ (['x' * 99999] * 99999) | join }}",
    "{{ ('y' * 99999).join(['x'] * 99999) }}",
    "{{ (['x' * 99999] * 99999) | join(attribute='upper') }}",
    "{{ 'x' | wordwrap(1, wrapstring='y' * 99999) }}",
    "{{ [1] | batch(1000000000, 0) | list }}",
    "{{ [1] | slice(1000000000) | list }}",
    "{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "{% for x in [1, 2] recursive %}{{ loop([1, 2]) }}{% endfor %}",
    "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
    "{% endfor %}{{ ns.n }}",
]


@pytest.mark.parametrize("template", BOMBS)
async def test_template_resource_bombs_fail_quickly(template: str) -> None:
    """Templates cannot stall the worker or eat its memory: they fail, fast."""
    from engine import templates

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(templates.TemplateProblem):
        templates.check(template)
        templates.render(template, {"entity": {"name": "x"}})
    assert loop.time() - started < 2.0


def test_templates_still_render_ordinary_things() -> None:
    from engine import templates

    context = {"entity": {"name": "Eve", "amount": 1200.5, "tags": ["a", "b"]}, "n": 3}
    cases = {
        "Hi {{ entity.name }}": "Hi Eve",
        "{{ entity.amount * 2 }}": "2401.0",
        "{{ '%.2f' | format(entity.amount) }}": "1200.50",
        "{{ '%s-%s' % (entity.name, n) }}": "Eve-3",
        "{{ '{}!'.format(entity.name) }}": "Eve!",
        "{{ entity.tags | join(', ') }}": "a, b",
        "{{ entity.name | upper | center(7) }}": "  EVE  ",
        "{% for t in entity.tags %}[{{ t }}]{% endfor %}": "[a][b]",
        "{{ '-' * 3 }}{{ 2 ** 10 }}{{ 7 // 2 }}{{ 7 % 4 }}": "---102433",
        "{{ entity.tags + ['c'] }}": "['a', 'b', 'c']",
        "{{ range(3) | list }}": "[0, 1, 2]",
    }
    for template, expected in cases.items():
        assert templates.render(template, context) == expected, template


def test_template_errors_are_template_problems() -> None:
    from engine import templates

    for template in ("{{ 1 / 0 }}", "{{ entity.missing }}", "{{ 'a' + 1 }}", "{{ range('x') }}"):
        with pytest.raises(templates.TemplateProblem):
            templates.render(template, {"entity": {}})


# ───────────────────────────── exactly once ─────────────────────────────


class Crash(BaseException):
    """The worker dies here (not an error the runner handles)."""


async def test_database_step_effect_commits_with_its_record(
    crm: Conn, matcher: Matcher, runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the task was inserted but before the step's record committed leaves
    no task; the job run again creates it once. Running the finished job again (a
    duplicate delivery) or after a crash between the step and the execution's end does
    not create it again."""
    await apply(
        crm,
        {
            "name": "Exactly once",
            "trigger": LEAD_CREATED,
            "actions": [{"type": "create_task", "title": "Call {{ entity.name }}"}],
        },
    )
    await new_lead(crm, owner_id=1)
    await matcher.drain()
    [execution_id] = await execution_ids(crm)

    original = CreateTask.run

    async def run_then_crash(self: CreateTask, ctx: Any, params: Any) -> dict[str, Any]:
        await original(self, ctx, params)
        raise Crash

    monkeypatch.setattr(CreateTask, "run", run_then_crash)
    with pytest.raises(Crash):
        await run_job(runner, crm, execution_id)
    monkeypatch.undo()
    assert await value(crm, "SELECT count(*) FROM tasks") == 0
    [step] = await steps(crm, execution_id)
    assert (step["status"], step["attempts"]) == ("pending", 0)

    # The job again (procrastinate's stalled-job recovery, or a retry).
    assert await run_job(runner, crm, execution_id) == "completed"
    assert await value(crm, "SELECT count(*) FROM tasks") == 1

    # Delivered twice: nothing to do.
    assert await run_job(runner, crm, execution_id) == "nothing to do"
    # A crash after the step committed, before the execution was marked completed.
    await crm.execute(
        "UPDATE crmflow.executions SET status = 'running', finished_at = NULL WHERE id = %s",
        [execution_id],
    )
    assert await run_job(runner, crm, execution_id) == "completed"
    assert await value(crm, "SELECT count(*) FROM tasks") == 1
    [step] = await steps(crm, execution_id)
    assert (step["status"], step["attempts"]) == ("succeeded", 1)


async def test_same_job_run_concurrently_creates_one_task(
    crm: Conn, matcher: Matcher, runner: Runner, pool: Any, settings: Settings
) -> None:
    """Two runners on the same execution at once (a recovered job whose worker was only
    slow): the step's row lock lets one of them do it."""
    await apply(
        crm,
        {
            "name": "Exactly once, concurrently",
            "trigger": LEAD_CREATED,
            "actions": [
                {"id": "a", "type": "create_task", "title": "A"},
                {"id": "b", "type": "create_task", "title": "B"},
                {"id": "c", "type": "send_notification", "message": "m", "recipient": 1},
            ],
        },
    )
    await new_lead(crm, owner_id=1)
    await matcher.drain()
    [execution_id] = await execution_ids(crm)
    other = Runner(pool, settings)
    await asyncio.gather(run_job(runner, crm, execution_id), run_job(other, crm, execution_id))
    assert await fetch(crm, "SELECT title FROM tasks ORDER BY title") == [
        {"title": "A"},
        {"title": "B"},
    ]
    assert await value(crm, "SELECT count(*) FROM notifications") == 1
    assert await value(crm, "SELECT status FROM crmflow.executions") == "completed"


async def test_database_actions_end_to_end_with_a_worker(
    crm: Conn, db_url: str, settings: Settings
) -> None:
    await apply(
        crm,
        {
            "name": "Website leads",
            "trigger": LEAD_CREATED,
            "conditions": [{"field": "source", "operator": "equals", "value": "website_form"}],
            "actions": [
                {"type": "qualify_lead"},
                {"type": "assign_owner", "role": "sales_rep", "only_if_unassigned": True},
                {"type": "create_task", "title": "Call {{ entity.name }} ({{ entity.score }})"},
                {"type": "send_notification", "message": "{{ entity.name }} is yours"},
            ],
        },
    )
    for i in range(5):
        await new_lead(crm, name=f"W{i}", source="website_form", company="Acme")
    await new_lead(crm, name="Other", source="cold_call")
    async with running_worker(db_url, settings=settings, concurrency=4):
        executions = await wait_executions_settled(crm, expected=5)
    assert [e["status"] for e in executions] == ["completed"] * 5
    tasks = await fetch(crm, "SELECT title, assignee_id FROM tasks ORDER BY title")
    assert tasks == [{"title": f"Call W{i} (40)", "assignee_id": 1} for i in range(5)]
    assert await value(crm, "SELECT count(*) FROM notifications WHERE recipient_id = 1") == 5
    assert await value(crm, "SELECT count(*) FROM leads WHERE status = 'nurture'") == 5
