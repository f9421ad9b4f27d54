"""dedupe_key on create_task and send_notification: while an item made under the key is
open, later steps update it instead of adding another; in the step runner, in the
matcher's set-based batch (run_batch), and with executions running at the same time."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from engine.config import Settings
from engine.executor.runner import Runner
from engine.matcher import Matcher
from engine.model import DefinitionError
from engine.worker import running_worker
from tests.helpers import (
    apply,
    drive,
    execution_ids,
    fetch,
    run_job,
    value,
    wait_executions_settled,
)
from tests.paths import REPO

Conn = psycopg.AsyncConnection[Any]

CHURN_TASK = {
    "name": "Churn risk task per account",
    "trigger": {"type": "entity_created", "entity_type": "deal"},
    "actions": [
        {
            "type": "create_task",
            "title": "Churn risk on account {{ entity.account_id }}: {{ entity.name }}",
            "priority": "high",
            "due": "2d",
            "dedupe_key": "{{ entity.account_id }}:churn",
        }
    ],
}


async def tasks(conn: Conn) -> list[dict[str, Any]]:
    return await fetch(conn, "SELECT * FROM tasks ORDER BY id")


async def add_accounts(conn: Conn) -> None:
    await conn.execute("INSERT INTO accounts (id, name) VALUES (1, 'Acme'), (2, 'Globex')")


async def test_an_open_task_is_updated_not_duplicated(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    await add_accounts(crm)
    await apply(crm, CHURN_TASK)
    await crm.execute("INSERT INTO deals (name, account_id) VALUES ('first', 1)")
    await matcher.drain()
    [first] = await execution_ids(crm)
    assert (await drive(runner, crm, first))["status"] == "completed"
    [task] = await tasks(crm)
    assert task["title"] == "Churn risk on account 1: first" and task["priority"] == "high"

    await apply(
        crm, {**CHURN_TASK, "actions": [{**CHURN_TASK["actions"][0], "priority": "urgent"}]}
    )
    await crm.execute("INSERT INTO deals (name, account_id) VALUES ('second', 1), ('other', 2)")
    await matcher.drain()
    for execution in (await execution_ids(crm))[1:]:
        assert (await drive(runner, crm, execution))["status"] == "completed"
    rows = await tasks(crm)
    assert [(t["id"], t["title"], t["priority"]) for t in rows] == [
        (task["id"], "Churn risk on account 1: second", "urgent"),  # updated in place
        (rows[1]["id"], "Churn risk on account 2: other", "urgent"),  # another key
    ]
    assert rows[0]["due_at"] > task["due_at"]  # the due date moves with the update
    results = await fetch(crm, "SELECT result FROM crmflow.execution_steps ORDER BY execution_id")
    assert [r["result"]["deduped"] for r in results] == [False, True, False]
    assert results[1]["result"]["task_id"] == task["id"]
    assert results[1]["result"]["dedupe_key"] == "1:churn"
    # crmflow's own bookkeeping; the CRM's table has no column of ours
    keys = await fetch(
        crm, "SELECT dedupe_key, item_ids, updates FROM crmflow.dedupe_keys ORDER BY 1"
    )
    assert keys == [
        {"dedupe_key": "1:churn", "item_ids": [task["id"]], "updates": 1},
        {"dedupe_key": "2:churn", "item_ids": [rows[1]["id"]], "updates": 0},
    ]

    # Completed, the task is no longer open: the next step adds a new one.
    await crm.execute("UPDATE tasks SET completed_at = now() WHERE id = %s", [task["id"]])
    await crm.execute("INSERT INTO deals (name, account_id) VALUES ('third', 1)")
    await matcher.drain()
    assert (await drive(runner, crm, (await execution_ids(crm))[-1]))["status"] == "completed"
    assert [t["title"] for t in await tasks(crm)][-1] == "Churn risk on account 1: third"
    assert len(await tasks(crm)) == 3


async def test_the_executors_batch_makes_one_task_per_key(
    crm: Conn, pool: AsyncConnectionPool, settings: Settings, db_url: str
) -> None:
    """A deduped create_task is never run inline by the matcher (it locks a CRM row) but
    set-based by the executor (run_batch): five deals of two accounts in one batch make
    one task per account, updated by the later ones of the batch."""
    await add_accounts(crm)
    await apply(crm, CHURN_TASK)
    await crm.execute(
        "INSERT INTO deals (name, account_id) SELECT 'deal ' || g, 1 + (g % 2)"
        " FROM generate_series(1, 5) AS g"
    )
    inline = Matcher(pool, settings.model_copy(update={"inline_steps": True}))
    await inline.drain()
    statuses = await fetch(crm, "SELECT status FROM crmflow.executions")
    assert [s["status"] for s in statuses] == ["pending"] * 5  # none inline
    async with running_worker(db_url, settings=settings, concurrency=4):
        done = await wait_executions_settled(crm, expected=5)
    assert [x["status"] for x in done] == ["completed"] * 5
    rows = await tasks(crm)
    assert sorted(t["title"] for t in rows) == [
        "Churn risk on account 1: deal 4",  # the last of the batch for account 1
        "Churn risk on account 2: deal 5",
    ]
    deduped = await value(
        crm, "SELECT count(*) FROM crmflow.execution_steps WHERE (result ->> 'deduped')::boolean"
    )
    assert deduped == 3


async def test_an_update_keeps_what_the_step_does_not_set(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    """A step without a description updates the open task's title, priority and due date,
    not the description a person wrote on it meanwhile (review finding: it was set NULL)."""
    await add_accounts(crm)
    await apply(crm, CHURN_TASK)
    await crm.execute("INSERT INTO deals (name, account_id) VALUES ('first', 1)")
    await matcher.drain()
    [first] = await execution_ids(crm)
    assert (await drive(runner, crm, first))["status"] == "completed"
    await crm.execute("UPDATE tasks SET description = 'called them, follow up Friday'")
    await crm.execute("INSERT INTO deals (name, account_id) VALUES ('second', 1)")
    await matcher.drain()
    assert (await drive(runner, crm, (await execution_ids(crm))[-1]))["status"] == "completed"
    [task] = await tasks(crm)
    assert task["title"] == "Churn risk on account 1: second"
    assert task["description"] == "called them, follow up Friday"


async def test_a_crm_lock_on_an_open_item_does_not_hold_up_the_matcher(
    crm: Conn, pool: AsyncConnectionPool, settings: Settings, db_url: str, runner: Runner
) -> None:
    """A deduped step locks its open item (a CRM row): it must not do so in the matcher's
    transaction, where a CRM session holding that task would stall matching for every
    workflow (found by review: the matcher rolled back on its lock timeout until the CRM
    committed). Deduped steps run in the executor, not inline."""
    await add_accounts(crm)
    await apply(crm, CHURN_TASK)
    await apply(
        crm,
        {
            "name": "Welcome leads",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [{"type": "update_field", "field": "status", "value": "contacted"}],
        },
    )
    inline = Matcher(pool, settings.model_copy(update={"inline_steps": True}))
    await crm.execute("INSERT INTO deals (name, account_id) VALUES ('first', 1)")
    await inline.drain()
    [first] = await execution_ids(crm)
    if (await value(crm, "SELECT status FROM crmflow.executions WHERE id = %s", first)) != (
        "completed"
    ):
        await drive(runner, crm, first)
    [task] = await tasks(crm)
    async with await psycopg.AsyncConnection.connect(db_url) as holder:
        await holder.execute("BEGIN")
        await holder.execute("UPDATE tasks SET title = title WHERE id = %s", [task["id"]])
        await crm.execute("INSERT INTO deals (name, account_id) VALUES ('second', 1)")
        await crm.execute("INSERT INTO leads (name, email) VALUES ('Ann', 'ann@example.com')")
        # With the CRM's lock held, the matcher still enrolls both (and runs the lead's
        # step inline) within a few lock timeouts at most.
        await asyncio.wait_for(inline.drain(), timeout=3 * settings.lock_timeout + 5)
        lead = await value(crm, "SELECT status FROM leads WHERE name = 'Ann'")
        assert lead == "contacted"
        await holder.execute("ROLLBACK")
    assert await value(crm, "SELECT count(*) FROM crmflow.executions") == 3


async def test_concurrent_executions_with_one_key_make_one_task(
    crm: Conn, pool: AsyncConnectionPool, settings: Settings, matcher: Matcher
) -> None:
    await add_accounts(crm)
    await apply(crm, CHURN_TASK)
    await crm.execute(
        "INSERT INTO deals (name, account_id) SELECT 'deal ' || g, 1 FROM generate_series(1, 6) g"
    )
    await matcher.drain()
    ids = await execution_ids(crm)
    runners = [Runner(pool, settings) for _ in ids]
    # Six step transactions at once, one per deal (different entities: no per-entity
    # order holds them apart); the key's row makes the others wait for the first.
    await asyncio.gather(*(run_job(r, crm, i) for r, i in zip(runners, ids, strict=True)))
    statuses = await fetch(crm, "SELECT status FROM crmflow.executions ORDER BY id")
    assert [s["status"] for s in statuses] == ["completed"] * 6
    assert len(await tasks(crm)) == 1
    deduped = await fetch(
        crm, "SELECT (result ->> 'deduped')::boolean AS d FROM crmflow.execution_steps"
    )
    assert sorted(r["d"] for r in deduped) == [False] + [True] * 5


async def test_a_worker_under_a_burst_keeps_one_task_per_key(
    crm: Conn, db_url: str, settings: Settings
) -> None:
    await add_accounts(crm)
    await apply(crm, CHURN_TASK)
    async with running_worker(db_url, settings=settings, concurrency=4):
        for _ in range(2):  # two writers' transactions, each a burst of deals of both accounts
            await crm.execute(
                "INSERT INTO deals (name, account_id) SELECT 'deal ' || g, 1 + (g % 2)"
                " FROM generate_series(1, 8) AS g"
            )
        done = await wait_executions_settled(crm, expected=16)
    assert {x["status"] for x in done} == {"completed"}
    assert len(await tasks(crm)) == 2


async def test_notifications_dedupe_while_unread(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    await add_accounts(crm)
    await apply(
        crm,
        {
            "name": "Tell the CSMs",
            "trigger": {"type": "entity_created", "entity_type": "deal"},
            "actions": [
                {
                    "type": "send_notification",
                    "recipient": "role:csm",
                    "message": "Deal {{ entity.name }} on account {{ entity.account_id }}",
                    "dedupe_key": "csm:{{ entity.account_id }}",
                }
            ],
        },
    )
    async with await psycopg.AsyncConnection.connect(crm.info.dsn, autocommit=True) as listener:
        await listener.execute("LISTEN crmflow_notifications")
        await crm.execute("INSERT INTO deals (name, account_id) VALUES ('a', 1), ('b', 1)")
        await matcher.drain()
        for execution in await execution_ids(crm):
            assert (await drive(runner, crm, execution))["status"] == "completed"
        heard = [n async for n in listener.notifies(timeout=2.0, stop_after=2)]
    assert len(heard) == 2  # the update is told too
    rows = await fetch(crm, "SELECT id, recipient_id, message FROM notifications ORDER BY id")
    assert [(r["recipient_id"], r["message"]) for r in rows] == [(2, "Deal b on account 1")]
    await crm.execute("UPDATE notifications SET read_at = now()")
    await crm.execute("INSERT INTO deals (name, account_id) VALUES ('c', 1)")
    await matcher.drain()
    assert (await drive(runner, crm, (await execution_ids(crm))[-1]))["status"] == "completed"
    assert await value(crm, "SELECT count(*) FROM notifications") == 2


async def test_a_bad_dedupe_key_is_refused_on_save(crm: Conn) -> None:
    step = {**CHURN_TASK["actions"][0], "dedupe_key": "{{ entity.account_id :churn"}
    with pytest.raises(DefinitionError) as refused:
        await apply(crm, {**CHURN_TASK, "actions": [step]})
    assert [i.path for i in refused.value.issues] == ["actions[0].dedupe_key"]
    with pytest.raises(DefinitionError) as refused:
        await apply(crm, {**CHURN_TASK, "actions": [{**step, "dedupe_key": ""}]})
    assert [i.path for i in refused.value.issues] == ["actions[0].dedupe_key"]
    assert await value(crm, "SELECT count(*) FROM crmflow.workflows") == 0


def docs_example(name: str) -> dict[str, Any]:
    """The JSON example of docs/workflows.md whose "name" is ``name``."""
    text = (REPO / "docs" / "workflows.md").read_text()
    begin = text.rindex("```json\n", 0, text.index(f'{{"name": "{name}"')) + 8
    parsed: dict[str, Any] = json.loads(text[begin : text.index("```", begin)])
    return parsed


async def test_the_docs_examples_dedupe(crm: Conn, matcher: Matcher, runner: Runner) -> None:
    await add_accounts(crm)
    await apply(crm, docs_example("Churn risk task"))
    await apply(crm, docs_example("Tell the CSMs once per account"))
    for level in ("high", "critical", "high"):
        await crm.execute("UPDATE accounts SET churn_risk = %s WHERE id = 1", [level])
    await crm.execute("INSERT INTO deals (name, account_id) VALUES ('d', 1)")
    await crm.execute("UPDATE deals SET status = 'won' WHERE name = 'd'")
    await matcher.drain()
    for execution in await execution_ids(crm):
        assert (await drive(runner, crm, execution))["status"] == "completed"
    assert [(t["title"], t["priority"]) for t in await tasks(crm)] == [
        ("Acme: churn risk high", "urgent")
    ]
    assert await value(crm, "SELECT message FROM notifications") == "Deal d changed (won)"


async def test_compensating_an_update_puts_the_task_back(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    """A later step fails with on_failure: compensate: the update of the open task is
    undone (its previous title and priority back), the task is not deleted."""
    await add_accounts(crm)
    await apply(crm, CHURN_TASK)
    await crm.execute("INSERT INTO deals (name, account_id) VALUES ('first', 1)")
    await matcher.drain()
    assert (await drive(runner, crm, (await execution_ids(crm))[0]))["status"] == "completed"
    failing = {
        **CHURN_TASK,
        "actions": [
            {**CHURN_TASK["actions"][0], "priority": "urgent"},
            {
                "type": "update_field",
                "field": "amount",
                "value": "{{ 'not a number' }}",
                "retry": 1,
                "on_failure": "compensate",
            },
        ],
    }
    await apply(crm, failing)
    await crm.execute("INSERT INTO deals (name, account_id) VALUES ('second', 1)")
    await matcher.drain()
    assert (await drive(runner, crm, (await execution_ids(crm))[-1]))["status"] == "failed"
    [task] = await tasks(crm)
    assert (task["title"], task["priority"]) == ("Churn risk on account 1: first", "high")
    steps = await fetch(
        crm,
        "SELECT status, result FROM crmflow.execution_steps WHERE execution_id = %s"
        " ORDER BY position",
        (await execution_ids(crm))[-1],
    )
    assert [s["status"] for s in steps] == ["compensated", "failed"]
    assert steps[0]["result"]["deduped"] is True  # it had updated the open task
    assert steps[0]["result"]["previous"]["priority"] == "high"
