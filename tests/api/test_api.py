"""The management API's workflow endpoints, through httpx against a real database: the
seed's endpoints and shapes, full CRUD with versions, validation errors, manual runs."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import psycopg
import pytest

from engine import workflows
from engine.matcher import Matcher
from engine.model import DefinitionError
from tests.helpers import SEED_QUALIFY, value

PROBLEM = "application/problem+json"


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert set(body) == {"type", "title", "status", "detail", "errors"}
    assert body["status"] == status
    return body


async def create(client: httpx.AsyncClient, definition: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/workflows", json=definition)
    assert response.status_code == 201, response.text
    return response.json()


# ───────────────────────────── the seed's endpoints ─────────────────────────────


async def test_seed_endpoints_with_seed_shapes(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    # POST /workflows with the seed's JSON exactly as written
    created = await create(client, SEED_QUALIFY)
    assert created["name"] == SEED_QUALIFY["name"]
    assert created["status"] == "active"
    assert created["version"] == 1
    assert created["execution_count"] == 0
    assert created["trigger_type"] == "entity_created"
    assert created["entity_type"] == "lead"
    assert "source" in created["predicate"]
    stored = {k: v for k, v in SEED_QUALIFY.items() if k != "status"}
    assert created["definition"] == stored
    wf_id = created["id"]

    # GET /workflows: a list of {"id", "name", "status", "execution_count", ...}
    response = await client.get("/workflows")
    assert response.status_code == 200
    [item] = response.json()
    assert {k: item[k] for k in ("id", "name", "status", "execution_count")} == {
        "id": wf_id,
        "name": SEED_QUALIFY["name"],
        "status": "active",
        "execution_count": 0,
    }

    # PUT /workflows/{id}/pause and /activate
    response = await client.put(f"/workflows/{wf_id}/pause")
    assert response.status_code == 200
    assert response.json()["status"] == "paused"
    assert (await client.get("/workflows")).json()[0]["status"] == "paused"
    response = await client.put(f"/workflows/{wf_id}/activate")
    assert response.json()["status"] == "active"

    # GET /workflows/{id}/executions?limit=: the seed's execution items
    await crm.execute(
        "INSERT INTO leads (name, source) VALUES ('A', 'website_form'), ('B', 'referral'),"
        " ('C', 'website_form'), ('D', 'website_form')"
    )
    await matcher.drain()
    response = await client.get(f"/workflows/{wf_id}/executions", params={"limit": 2})
    assert response.status_code == 200
    items = response.json()
    assert isinstance(items, list) and len(items) == 2
    for item in items:
        assert {"id", "status", "triggered_at", "actions_count"} <= set(item)
        assert item["status"] == "pending"
        assert item["actions_count"] == 0
        assert item["workflow_id"] == wf_id
        assert item["workflow_name"] == SEED_QUALIFY["name"]
        assert item["entity_type"] == "lead"
    assert [i["entity_id"] for i in items] == [4, 3]  # newest first
    everything = (await client.get(f"/workflows/{wf_id}/executions")).json()
    assert len(everything) == 3
    older = await client.get(
        f"/workflows/{wf_id}/executions", params={"before_id": items[-1]["id"]}
    )
    assert [i["entity_id"] for i in older.json()] == [1]
    assert (await client.get("/workflows")).json()[0]["execution_count"] == 3


# ───────────────────────────── CRUD and versions ─────────────────────────────


async def test_get_replace_patch_and_versions(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any]
) -> None:
    wf_id = (await create(client, SEED_QUALIFY))["id"]
    got = (await client.get(f"/workflows/{wf_id}")).json()
    assert got["id"] == wf_id and got["version"] == 1

    # PUT replaces the definition: a new version; the status stays when not given
    changed = copy.deepcopy(SEED_QUALIFY)
    del changed["status"]
    changed["conditions"][0]["value"] = "webinar"
    response = await client.put(f"/workflows/{wf_id}", json=changed)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == 2
    assert body["status"] == "active"
    assert body["definition"]["conditions"][0]["value"] == "webinar"
    assert "webinar" in body["predicate"]

    # the same definition again is not a new version
    response = await client.put(f"/workflows/{wf_id}", json=changed)
    assert response.json()["version"] == 2

    # PATCH merges top-level keys; null removes one; status can be given too
    response = await client.patch(
        f"/workflows/{wf_id}",
        json={"description": "website leads", "priority": 5, "status": "paused"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == 3
    assert body["status"] == "paused"
    assert body["priority"] == 5
    assert body["definition"]["description"] == "website leads"
    assert body["definition"]["conditions"] == changed["conditions"]  # untouched
    response = await client.patch(
        f"/workflows/{wf_id}",
        content=b'{"description": null}',
        headers={"content-type": "application/merge-patch+json"},
    )
    assert response.status_code == 200, response.text
    assert "description" not in response.json()["definition"]
    assert response.json()["version"] == 4
    # a key a definition cannot have is refused, even as null
    problem = assert_problem(
        await client.patch(f"/workflows/{wf_id}", json={"descripton": None}), 422
    )
    assert problem["errors"] == [{"path": "descripton", "message": "unknown field"}]

    # PUT renames too
    renamed = {**changed, "name": "Website leads v2"}
    assert (await client.put(f"/workflows/{wf_id}", json=renamed)).json()["name"] == (
        "Website leads v2"
    )

    # versions: every one kept, oldest first, the current one flagged
    response = await client.get(f"/workflows/{wf_id}/versions")
    assert response.status_code == 200
    versions = response.json()
    assert [v["version"] for v in versions] == [1, 2, 3, 4, 5]
    assert [v["current"] for v in versions] == [False] * 4 + [True]
    assert versions[0]["definition"]["conditions"][0]["value"] == "website_form"
    assert all({"predicate", "definition_hash", "created_at"} <= set(v) for v in versions)


async def test_delete_archives_and_keeps_history(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    wf_id = (await create(client, SEED_QUALIFY))["id"]
    await crm.execute("INSERT INTO leads (name, source) VALUES ('A', 'website_form')")
    await matcher.drain()

    response = await client.delete(f"/workflows/{wf_id}")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "archived"

    assert (await client.get("/workflows")).json() == []
    archived = (await client.get("/workflows", params={"include_archived": True})).json()
    assert [(w["id"], w["status"]) for w in archived] == [(wf_id, "archived")]
    # history stays: the workflow, its versions and its executions are still readable
    assert (await client.get(f"/workflows/{wf_id}")).json()["execution_count"] == 1
    assert len((await client.get(f"/workflows/{wf_id}/versions")).json()) == 1
    assert len((await client.get(f"/workflows/{wf_id}/executions")).json()) == 1
    assert await value(crm, "SELECT count(*) FROM crmflow.executions") == 1

    # an archived workflow no longer matches
    await crm.execute("INSERT INTO leads (name, source) VALUES ('B', 'website_form')")
    await matcher.drain()
    assert await value(crm, "SELECT count(*) FROM crmflow.executions") == 1

    # and cannot be edited or re-activated; deleting again changes nothing
    for response in (
        await client.put(f"/workflows/{wf_id}/activate"),
        await client.put(f"/workflows/{wf_id}/pause"),
        await client.put(f"/workflows/{wf_id}", json=SEED_QUALIFY),
        await client.patch(f"/workflows/{wf_id}", json={"priority": 1}),
    ):
        assert "archived" in assert_problem(response, 409)["detail"]
    assert (await client.delete(f"/workflows/{wf_id}")).json()["status"] == "archived"

    # its name is free again
    assert (await create(client, SEED_QUALIFY))["id"] != wf_id


async def test_name_taken_is_a_conflict(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any]
) -> None:
    first = await create(client, SEED_QUALIFY)
    problem = assert_problem(await client.post("/workflows", json=SEED_QUALIFY), 409)
    assert SEED_QUALIFY["name"] in problem["detail"]
    other = await create(client, {**SEED_QUALIFY, "name": "Other"})
    renamed = {**SEED_QUALIFY, "name": "Other"}
    assert_problem(await client.put(f"/workflows/{first['id']}", json=renamed), 409)
    assert other["id"] != first["id"]


# ───────────────────────────── validation ─────────────────────────────

INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "unknown operator",
        {
            "conditions": [
                {"field": "source", "operator": "equals", "value": "x"},
                {"field": "score", "operator": "bigger_than", "value": 5},
            ]
        },
        "conditions[1].operator",
        "unknown operator 'bigger_than'",
    ),
    (
        "unknown field",
        {"conditions": [{"field": "sourse", "operator": "equals", "value": "x"}]},
        "conditions[0].field",
        "did you mean 'source'",
    ),
    (
        "value of the wrong type",
        {"conditions": [{"field": "score", "operator": "greater_than", "value": "high"}]},
        "conditions[0].value",
        "not a valid",
    ),
    (
        "operator that does not fit the type",
        {"conditions": [{"field": "score", "operator": "starts_with", "value": "1"}]},
        "conditions[0].operator",
        "does not apply",
    ),
    ("unknown action", {"actions": [{"type": "launch_rocket"}]}, "actions[0].type", "unknown"),
    (
        "unknown trigger",
        {"trigger": {"type": "entity_exploded", "entity_type": "lead"}},
        "trigger.type",
        "unknown trigger type",
    ),
    (
        "unwatched entity",
        {"trigger": {"type": "entity_created", "entity_type": "spaceship"}},
        "trigger.entity_type",
        "not a watched entity",
    ),
    ("unknown top-level key", {"colour": "blue"}, "colour", "unknown field"),
    (
        "malicious sql",
        {"conditions": [{"sql": "(SELECT count(*) FROM users) > 0"}]},
        "conditions[0].sql",
        "",
    ),
]


@pytest.mark.parametrize(
    ("case", "change", "path", "message"), INVALID, ids=[c[0] for c in INVALID]
)
async def test_invalid_definitions_name_the_path(
    client: httpx.AsyncClient,
    crm: psycopg.AsyncConnection[Any],
    case: str,
    change: dict[str, Any],
    path: str,
    message: str,
) -> None:
    definition = {**SEED_QUALIFY, **change}
    problem = assert_problem(await client.post("/workflows", json=definition), 422)
    assert problem["type"].endswith("invalid-workflow")
    paths = [e["path"] for e in problem["errors"]]
    assert path in paths, problem
    assert any(message in e["message"] for e in problem["errors"] if e["path"] == path), problem
    # the same checks as `crmflow workflow apply`: one implementation, the same issues
    with pytest.raises(DefinitionError) as raised:
        await workflows.compile_workflow(crm, definition)
    assert problem["errors"] == raised.value.as_list()
    # and nothing was saved
    assert await value(crm, "SELECT count(*) FROM crmflow.workflows") == 0


async def test_invalid_replacement_changes_nothing(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any]
) -> None:
    wf_id = (await create(client, SEED_QUALIFY))["id"]
    bad = {**SEED_QUALIFY, "conditions": [{"field": "nope", "operator": "equals", "value": 1}]}
    assert_problem(await client.put(f"/workflows/{wf_id}", json=bad), 422)
    problem = assert_problem(await client.patch(f"/workflows/{wf_id}", json={"actions": []}), 422)
    assert problem["errors"][0]["path"] == "actions"
    assert (await client.get(f"/workflows/{wf_id}")).json()["version"] == 1


async def test_request_errors_share_the_problem_shape(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any]
) -> None:
    problem = assert_problem(await client.post("/workflows", json=[1, 2]), 422)
    assert problem["errors"][0]["path"] == "body"
    problem = assert_problem(
        await client.post(
            "/workflows", content=b'{"name": ', headers={"content-type": "application/json"}
        ),
        422,
    )
    assert problem["errors"][0]["path"] == "body"
    assert "JSON" in problem["errors"][0]["message"]
    problem = assert_problem(await client.get("/workflows/abc"), 422)
    assert problem["errors"][0]["path"] == "path.workflow_id"
    problem = assert_problem(await client.get("/workflows/1/executions?limit=0"), 422)
    assert problem["errors"][0]["path"] == "query.limit"
    problem = assert_problem(await client.get(f"/workflows/{2**63}"), 422)
    assert problem["errors"][0]["path"] == "path.workflow_id"
    # numbers are digits, flags true or false: nothing else is read as one
    for url in ("/workflows/%C2%A01", "/workflows/%201", "/workflows/+1", "/workflows/1.0"):
        assert_problem(await client.get(url), 422)
    problem = assert_problem(await client.get("/workflows?include_archived=yes"), 422)
    assert problem["errors"][0]["path"] == "query.include_archived"
    assert (await client.get("/workflows?include_archived=TRUE")).status_code == 200


async def test_unknown_ids_are_404(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any]
) -> None:
    for response in (
        await client.get("/workflows/4242"),
        await client.put("/workflows/4242", json=SEED_QUALIFY),
        await client.patch("/workflows/4242", json={"priority": 1}),
        await client.delete("/workflows/4242"),
        await client.put("/workflows/4242/activate"),
        await client.put("/workflows/4242/pause"),
        await client.get("/workflows/4242/versions"),
        await client.get("/workflows/4242/executions"),
        await client.post("/workflows/4242/test", json={"entity_id": 1}),
        await client.post("/workflows/4242/run", json={}),
    ):
        assert "4242" in assert_problem(response, 404)["detail"], response.request.url


# ───────────────────────────── manual runs ─────────────────────────────


async def test_run_enrolls_and_refuses_event_workflows(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any]
) -> None:
    await crm.execute(
        "INSERT INTO leads (name, source, score) VALUES ('A', 'x', 90), ('B', 'x', 10),"
        " ('C', 'x', 95)"
    )
    manual = await create(
        client,
        {
            "name": "Call hot leads",
            "trigger": {"type": "manual", "entity_type": "lead"},
            "conditions": [{"field": "score", "operator": "greater_than", "value": 50}],
            "actions": [{"type": "create_task", "title": "Call {{ lead.name }}"}],
            "status": "active",
        },
    )
    response = await client.post(f"/workflows/{manual['id']}/run")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["workflow_id"] == manual["id"] and len(body["execution_ids"]) == 2
    response = await client.post(
        f"/workflows/{manual['id']}/run", json={"entity_id": 3, "input": {"why": "demo"}}
    )
    [execution_id] = response.json()["execution_ids"]
    assert await value(crm, "SELECT input FROM crmflow.executions WHERE id = %s", execution_id) == {
        "why": "demo"
    }
    # a row the conditions exclude is not enrolled
    response = await client.post(f"/workflows/{manual['id']}/run", json={"entity_id": 2})
    assert response.json()["execution_ids"] == []

    seed = await create(client, SEED_QUALIFY)
    problem = assert_problem(await client.post(f"/workflows/{seed['id']}/run"), 409)
    assert "runs on events" in problem["detail"]
    problem = assert_problem(
        await client.post(f"/workflows/{manual['id']}/run", json={"entity": 1}), 422
    )
    assert problem["errors"][0]["path"] == "body.entity"
