"""/executions: filters and cursor pagination, detail with steps, retry and cancel, run
on executions the matcher enrolled and the runner ran."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg

from engine.matcher import Matcher
from engine.runtime import Runner
from tests.api.test_api import assert_problem, create
from tests.helpers import SEED_QUALIFY, value

FAILING = {
    "name": "Webhook to nowhere",
    "trigger": {"type": "entity_created", "entity_type": "deal"},
    "actions": [
        {
            "id": "first",
            "type": "send_notification",
            "recipient": "role:manager",
            "message": "skipped",
            "when": {"field": "name", "operator": "equals", "value": "never"},
        },
        {"type": "http_request", "url": "http://127.0.0.1:9/hook", "retry": 1, "timeout": 2},
    ],
    "status": "active",
}


async def run(runner: Runner, conn: psycopg.AsyncConnection[Any], execution_id: int) -> str:
    lock = await value(
        conn,
        "SELECT crmflow.execution_lock(entity_type, entity_pk, id) FROM crmflow.executions"
        " WHERE id = %s",
        execution_id,
    )
    return await runner.run(execution_id, job_lock=lock)


async def todo_jobs(conn: psycopg.AsyncConnection[Any], execution_id: int) -> int:
    """Whether the execution is in the step executor's queue (0 or 1)."""
    return int(
        await value(
            conn,
            "SELECT count(*) FROM crmflow.execution_queue WHERE execution_id = %s",
            execution_id,
        )
    )


async def test_list_filters_and_pagination(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    seed = await create(client, SEED_QUALIFY)
    other = await create(
        client,
        {
            "name": "Every new lead",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [{"type": "qualify_lead"}],
            "status": "active",
        },
    )
    await crm.execute(
        "INSERT INTO leads (name, source) SELECT 'L' || i, 'website_form'"
        " FROM generate_series(1, 5) AS i"
    )
    await matcher.drain()

    page = (await client.get("/executions")).json()
    assert len(page["items"]) == 10 and page["next_cursor"] is None
    ids = [i["id"] for i in page["items"]]
    assert ids == sorted(ids, reverse=True)
    item = page["items"][0]
    assert {
        "id",
        "status",
        "triggered_at",
        "actions_count",
        "workflow_id",
        "workflow_name",
        "workflow_version",
        "entity_type",
        "entity_id",
        "event_id",
        "started_at",
        "finished_at",
        "error",
    } == set(item)

    by_workflow = (await client.get("/executions", params={"workflow_id": other["id"]})).json()
    assert {i["workflow_id"] for i in by_workflow["items"]} == {other["id"]}
    assert len(by_workflow["items"]) == 5
    by_entity = (
        await client.get("/executions", params={"entity_type": "lead", "entity_id": "3"})
    ).json()
    assert {(i["entity_id"], i["workflow_id"]) for i in by_entity["items"]} == {
        (3, seed["id"]),
        (3, other["id"]),
    }
    assert (await client.get("/executions", params={"status": "failed"})).json()["items"] == []
    assert (
        len((await client.get("/executions", params={"status": "pending"})).json()["items"]) == 10
    )
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert (await client.get("/executions", params={"since": future})).json()["items"] == []
    assert len((await client.get("/executions", params={"since": past})).json()["items"]) == 10
    assert (await client.get("/executions", params={"until": past})).json()["items"] == []

    # cursor pagination: pages of 4 until next_cursor is null
    seen: list[int] = []
    params: dict[str, Any] = {"limit": 4}
    while True:
        page = (await client.get("/executions", params=params)).json()
        seen += [i["id"] for i in page["items"]]
        if page["next_cursor"] is None:
            break
        params["before_id"] = page["next_cursor"]
    assert seen == ids

    problem = assert_problem(await client.get("/executions", params={"status": "exploded"}), 422)
    assert problem["errors"][0]["path"] == "query.status"
    for since in ("yesterday", "0.5", "1700000000", "2026-01-01"):
        problem = assert_problem(await client.get("/executions", params={"since": since}), 422)
        assert problem["errors"][0]["path"] == "query.since"
        assert "RFC 3339" in problem["errors"][0]["message"]


async def test_detail_with_steps_and_cancel(
    client: httpx.AsyncClient,
    crm: psycopg.AsyncConnection[Any],
    matcher: Matcher,
    runner: Runner,
) -> None:
    await create(client, SEED_QUALIFY)
    await crm.execute("INSERT INTO leads (name, source) VALUES ('A', 'website_form')")
    await matcher.drain()
    [execution_id] = [i["id"] for i in (await client.get("/executions")).json()["items"]]
    assert await run(runner, crm, execution_id) == "waiting"  # enrich_lead waits 60 s

    response = await client.get(f"/executions/{execution_id}")
    assert response.status_code == 200
    detail = response.json()
    assert detail["status"] == "waiting"
    assert detail["actions_count"] == 1
    assert detail["entity_id"] == 1
    assert [(s["id"], s["type"], s["status"]) for s in detail["steps"]] == [
        ("qualify_lead", "qualify_lead", "succeeded"),
        ("enrich_lead", "enrich_lead", "scheduled"),
    ]
    assert set(detail["steps"][0]) == {
        "id",
        "type",
        "status",
        "attempts",
        "scheduled_at",
        "started_at",
        "finished_at",
        "result",
        "error",
    }
    assert detail["steps"][0]["attempts"] == 1
    assert detail["steps"][1]["scheduled_at"] is not None

    response = await client.post(
        f"/executions/{execution_id}/cancel", json={"reason": "customer asked"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert response.json()["error"] == "customer asked"
    # its queued wake-up job was cancelled too
    assert await todo_jobs(crm, execution_id) == 0
    problem = assert_problem(await client.post(f"/executions/{execution_id}/cancel"), 409)
    assert "cancelled" in problem["detail"]
    assert_problem(await client.post(f"/executions/{execution_id}/retry"), 409)


async def test_retry_replays_a_failed_execution(
    client: httpx.AsyncClient,
    crm: psycopg.AsyncConnection[Any],
    matcher: Matcher,
    runner: Runner,
) -> None:
    await create(client, FAILING)
    await crm.execute("INSERT INTO deals (name) VALUES ('D')")
    await matcher.drain()
    [execution_id] = [i["id"] for i in (await client.get("/executions")).json()["items"]]
    assert await run(runner, crm, execution_id) == "failed"
    detail = (await client.get(f"/executions/{execution_id}")).json()
    assert detail["status"] == "failed"
    assert detail["error"].startswith("step http_request failed")
    assert [s["status"] for s in detail["steps"]] == ["skipped", "failed"]
    failed = (await client.get("/executions", params={"status": "failed"})).json()["items"]
    assert [i["id"] for i in failed] == [execution_id]

    response = await client.post(f"/executions/{execution_id}/retry")
    assert response.status_code == 202, response.text
    detail = response.json()
    assert detail["status"] == "pending" and detail["error"] is None
    assert [s["status"] for s in detail["steps"]] == ["skipped", "pending"]
    assert detail["steps"][1]["error"].startswith("replayed after:")
    assert await todo_jobs(crm, execution_id) == 1  # queued again, due now
    # a pending execution is not retried
    assert_problem(await client.post(f"/executions/{execution_id}/retry"), 409)


async def test_unknown_executions_are_404(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any]
) -> None:
    for response in (
        await client.get("/executions/77"),
        await client.post("/executions/77/retry"),
        await client.post("/executions/77/cancel"),
    ):
        assert "77" in assert_problem(response, 404)["detail"]
