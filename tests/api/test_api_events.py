"""POST /events/{name}: custom events enroll `event`-triggered workflows, with optional
HMAC signatures."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr

from api.main import create_app
from engine import events
from engine.config import Settings
from engine.matcher import Matcher
from tests.api.test_api import assert_problem, create
from tests.helpers import fetch, value

DEMO_REQUESTED = {
    "name": "Demo requested",
    "trigger": {"type": "event", "event": "demo_requested", "entity_type": "lead"},
    "conditions": [{"field": "status", "operator": "equals", "value": "new"}],
    "actions": [{"type": "create_task", "title": "Demo for {{ lead.name }}"}],
    "status": "active",
}


async def test_event_about_an_entity_enrolls_its_workflow(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    wf = await create(client, DEMO_REQUESTED)
    await crm.execute(
        "INSERT INTO leads (name, status) VALUES ('New one', 'new'), ('Old one', 'lost')"
    )
    await matcher.drain()  # the inserts themselves enroll nothing

    response = await client.post(
        "/events/demo_requested",
        json={"entity_type": "lead", "entity_id": "1", "payload": {"page": "/pricing"}},
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["event_name"] == "demo_requested"
    assert body["entity_type"] == "lead" and body["entity_id"] == 1
    [event] = await fetch(crm, "SELECT * FROM crmflow.outbox WHERE id = %s", body["event_id"])
    assert event["op"] == "event"
    assert event["pk"] == {"id": 1}  # as capture spells it, whatever the id's type given
    assert event["new_row"]["name"] == "New one"
    assert event["payload"] == {"page": "/pricing"}
    assert event["actor"] == "api:test write"
    assert event["processed_at"] is None

    # another event of that name, about a lead the conditions exclude, and one of another name
    await client.post("/events/demo_requested", json={"entity_type": "lead", "entity_id": 2})
    await client.post("/events/newsletter", json={"entity_type": "lead", "entity_id": 1})
    result = await matcher.drain()
    assert result.claimed == 3 and result.enrolled == 1

    [execution] = (await client.get(f"/workflows/{wf['id']}/executions")).json()
    assert execution["entity_id"] == 1 and execution["event_id"] == body["event_id"]
    assert await value(
        crm, "SELECT input FROM crmflow.executions WHERE id = %s", execution["id"]
    ) == {"page": "/pricing"}


async def test_event_without_entity(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    await create(
        client,
        {
            "name": "Deploy notice",
            "trigger": {"type": "event", "event": "app.deployed"},
            "actions": [
                {
                    "type": "send_notification",
                    "recipient": "role:manager",
                    "message": "deployed {{ event.payload.version }}",
                }
            ],
            "status": "active",
        },
    )
    response = await client.post("/events/app.deployed", json={"payload": {"version": "1.2"}})
    assert response.status_code == 202, response.text
    assert response.json()["entity_type"] is None
    response = await client.post("/events/app.deployed")  # no body at all
    assert response.status_code == 202, response.text
    assert (await matcher.drain()).enrolled == 2


async def test_bad_events_are_refused(
    client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any], api_keys: dict[str, str]
) -> None:
    await crm.execute("INSERT INTO leads (name) VALUES ('A')")
    cases = [
        ({"entity_type": "spaceship", "entity_id": 1}, "entity_type"),
        ({"entity_type": "lead", "entity_id": 99}, "entity_id"),
        ({"entity_type": "lead", "entity_id": "x"}, "entity_id"),
        ({"entity_type": "lead"}, "entity_id"),
        ({"entity_id": 1}, "entity_type"),
        ({"payload": [1, 2]}, "body.payload"),
        ({"colour": "red"}, "body.colour"),
        ({"payload": {"text": "nul \u0000 byte"}}, "payload"),
    ]
    for body, path in cases:
        problem = assert_problem(await client.post("/events/x", json=body), 422)
        assert problem["errors"][0]["path"] == path, (body, problem)
    problem = assert_problem(await client.post("/events/bad name!", json={}), 422)
    assert problem["errors"][0]["path"] == "path.name"
    assert_problem(
        await client.post("/events/x", headers={"Authorization": f"Bearer {api_keys['read']}"}),
        403,
    )
    assert await value(crm, "SELECT count(*) FROM crmflow.outbox WHERE op = 'event'") == 0


async def signed_client(
    settings: Settings, pool: AsyncConnectionPool, key: str
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        settings.model_copy(update={"events_hmac_secret": SecretStr("s3cret")}), pool=pool
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://testserver",
            headers={"Authorization": f"Bearer {key}"},
        ) as c,
    ):
        yield c


async def test_hmac_signature_when_a_secret_is_set(
    crm: psycopg.AsyncConnection[Any],
    settings: Settings,
    pool: AsyncConnectionPool,
    api_keys: dict[str, str],
) -> None:
    async for client in signed_client(settings, pool, api_keys["write"]):
        body = json.dumps({"payload": {"a": 1}}).encode()
        headers = {"content-type": "application/json"}
        problem = assert_problem(await client.post("/events/x", content=body, headers=headers), 401)
        assert "X-Crmflow-Signature" in problem["detail"]
        wrong = {**headers, "X-Crmflow-Signature": events.sign("other", body)}
        assert_problem(await client.post("/events/x", content=body, headers=wrong), 401)
        tampered = {**headers, "X-Crmflow-Signature": events.sign("s3cret", body + b" ")}
        assert_problem(await client.post("/events/x", content=body, headers=tampered), 401)

        right = {**headers, "X-Crmflow-Signature": events.sign("s3cret", body)}
        assert right["X-Crmflow-Signature"].startswith("sha256=")
        response = await client.post("/events/x", content=body, headers=right)
        assert response.status_code == 202, response.text
    assert await value(crm, "SELECT count(*) FROM crmflow.outbox WHERE op = 'event'") == 1
