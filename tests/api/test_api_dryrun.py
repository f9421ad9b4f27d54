"""POST /workflows/{id}/test: the dry run evaluates the stored predicate and each top-level
condition on an entity or a given row, and writes nothing."""

from __future__ import annotations

import json
from typing import Any

import httpx
import psycopg

from engine.seed import seed_workflow_files
from tests.api.test_api import assert_problem, create
from tests.helpers import SEED_QUALIFY, fetch, value

HOT_LEADS = {
    "name": "Hot website leads",
    "trigger": {"type": "entity_created", "entity_type": "lead"},
    "conditions": [
        {"field": "source", "operator": "equals", "value": "website_form"},
        {"field": "score", "operator": "greater_than", "value": 50},
        {
            "any": [
                {"field": "country", "operator": "in", "value": ["FR", "DE"]},
                {"field": "email", "operator": "ends_with", "value": ".eu"},
            ]
        },
    ],
    "actions": [{"type": "create_task", "title": "Call {{ lead.name }}"}],
    "status": "active",
}


def seed_file(name: str) -> dict[str, Any]:
    [path] = [p for p in seed_workflow_files() if name in p.name]
    return dict(json.loads(path.read_text()))


async def counts(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
    tables = [
        "crmflow.outbox",
        "crmflow.executions",
        "crmflow.execution_steps",
        "procrastinate.procrastinate_jobs",
        "leads",
        "tasks",
        "notifications",
    ]
    result = {t: await value(conn, f"SELECT count(*) FROM {t}") for t in tables}
    result["leads_rows"] = await fetch(conn, "SELECT * FROM leads ORDER BY id")
    return result


async def test_dry_run_on_an_entity(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any]
) -> None:
    wf = await create(client, SEED_QUALIFY)
    await crm.execute(
        "INSERT INTO leads (name, source) VALUES ('Web', 'website_form'), ('Ref', 'referral')"
    )
    before = await counts(crm)

    response = await client.post(f"/workflows/{wf['id']}/test", json={"entity_id": 1})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["matches"] is True
    assert result["trigger_matches"] is True
    assert result["op"] == "insert"
    assert result["sql"] == wf["predicate"]
    assert result["row"]["name"] == "Web"
    [condition] = result["conditions"]
    assert condition["path"] == "conditions[0]"
    assert condition["condition"] == SEED_QUALIFY["conditions"][0]
    assert condition["matches"] is True
    assert "website_form" in condition["sql"]

    response = await client.post(f"/workflows/{wf['id']}/test", json={"entity_id": "2"})
    result = response.json()
    assert result["matches"] is False
    assert result["conditions"][0]["matches"] is False

    # nothing was written: no event, execution, job, task, and the rows are unchanged
    assert await counts(crm) == before


async def test_dry_run_on_a_row_names_each_condition(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any]
) -> None:
    wf = await create(client, HOT_LEADS)
    row = {"name": "X", "source": "website_form", "score": 80, "country": "US", "email": "x@a.eu"}
    result = (await client.post(f"/workflows/{wf['id']}/test", json={"row": row})).json()
    assert result["matches"] is True
    assert [c["matches"] for c in result["conditions"]] == [True, True, True]
    assert [c["path"] for c in result["conditions"]] == [
        "conditions[0]",
        "conditions[1]",
        "conditions[2]",
    ]
    assert result["row"]["score"] == 80 and result["row"]["status"] is None  # typed row

    row = {**row, "score": 20, "email": "x@a.com"}
    result = (await client.post(f"/workflows/{wf['id']}/test", json={"row": row})).json()
    assert result["matches"] is False
    assert [c["matches"] for c in result["conditions"]] == [True, False, False]
    assert result["conditions"][2]["condition"] == HOT_LEADS["conditions"][2]
    assert await value(crm, "SELECT count(*) FROM leads") == 0


async def test_dry_run_of_an_update_trigger(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any]
) -> None:
    wf = await create(client, seed_file("notify_deal_won"))
    await crm.execute("INSERT INTO deals (name, amount, status) VALUES ('Big', 1000, 'won')")
    url = f"/workflows/{wf['id']}/test"

    result = (await client.post(url, json={"entity_id": 1, "old_row": {"status": "open"}})).json()
    assert result["op"] == "update"
    assert result["matches"] is True and result["trigger_matches"] is True
    assert result["old_row"]["status"] == "open" and result["old_row"]["name"] == "Big"
    assert result["conditions"] == []

    # status did not change: the field_updated trigger does not fire
    result = (await client.post(url, json={"entity_id": 1, "old_row": {"amount": 5}})).json()
    assert result["matches"] is False and result["trigger_matches"] is False

    problem = assert_problem(
        await client.post(url, json={"entity_id": 1, "old_row": {"colour": "red"}}), 422
    )
    assert problem["errors"][0]["path"] == "old_row.colour"


async def test_dry_run_of_an_edge_triggered_workflow(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any]
) -> None:
    # The seed's churn playbook, made edge-triggered (it is not: it fires on every level
    # change within high and critical).
    wf = await create(client, {**seed_file("churn_risk"), "edge_triggered": True})
    await crm.execute("INSERT INTO accounts (name, churn_risk) VALUES ('Acme', 'high')")
    url = f"/workflows/{wf['id']}/test"
    rising = await client.post(url, json={"entity_id": 1, "old_row": {"churn_risk": "low"}})
    assert rising.json()["matches"] is True
    # already high before: edge-triggered, so no
    staying = await client.post(
        url, json={"entity_id": 1, "old_row": {"churn_risk": "critical", "name": "Old"}}
    )
    assert staying.json()["matches"] is False
    assert staying.json()["conditions"][0]["matches"] is True


async def test_dry_run_refuses_bad_input(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any]
) -> None:
    wf = await create(client, SEED_QUALIFY)
    url = f"/workflows/{wf['id']}/test"
    await crm.execute("INSERT INTO leads (name) VALUES ('A')")

    problem = assert_problem(await client.post(url, json={"entity_id": 999}), 404)
    assert "999" in problem["detail"]
    problem = assert_problem(await client.post(url, json={"entity_id": "abc"}), 422)
    assert problem["errors"][0]["path"] == "entity_id"
    problem = assert_problem(await client.post(url, json={}), 422)
    assert problem["errors"][0]["path"] == "entity_id"
    problem = assert_problem(await client.post(url, json={"entity_id": 1, "row": {}}), 422)
    assert problem["errors"][0]["path"] == "row"
    problem = assert_problem(await client.post(url, json={"row": {"sauce": 1}}), 422)
    assert problem["errors"][0]["path"] == "row.sauce"
    problem = assert_problem(await client.post(url, json={"row": {"score": "many"}}), 422)
    assert problem["errors"][0]["path"] == "row"
    assert "integer" in problem["errors"][0]["message"]
    problem = assert_problem(
        await client.post(url, json={"entity_id": 1, "old_row": {"name": "B"}}), 422
    )
    assert problem["errors"][0]["path"] == "old_row"
    problem = assert_problem(await client.post(url, json={"entity_id": 1, "extra": 1}), 422)
    assert problem["errors"][0]["path"] == "body.extra"


async def test_dry_run_of_an_event_workflow_without_entity(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any]
) -> None:
    wf = await create(
        client,
        {
            "name": "Ping",
            "trigger": {"type": "event", "event": "ping"},
            "actions": [
                {"type": "send_notification", "recipient": "role:manager", "message": "ping"}
            ],
        },
    )
    url = f"/workflows/{wf['id']}/test"
    result = (await client.post(url, json={"payload": {"a": 1}})).json()
    assert result["op"] == "event" and result["matches"] is True and result["row"] is None
    problem = assert_problem(await client.post(url, json={"entity_id": 1}), 422)
    assert "no entity" in problem["errors"][0]["message"]
