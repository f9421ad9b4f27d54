"""Health, entities, CORS, the body size limit, the OpenAPI document, errors of routing,
and the app's own pool (the lifespan)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from api import deps, main
from api.routes import health
from engine.config import Settings
from tests.api.test_api import assert_problem
from tests.helpers import SEED_QUALIFY


@asynccontextmanager
async def app_client(
    settings: Settings, key: str | None = None, pool: AsyncConnectionPool | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    app = main.create_app(settings, pool=pool)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver", headers=headers
        ) as c,
    ):
        yield c


async def test_health(client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any]) -> None:
    response = await client.get("/health", headers={"Authorization": ""})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"  # no worker yet
    assert body["database"] == {"ok": True, "error": None, "migrations_pending": []}
    assert body["workers"] == {
        "alive": 0,
        "last_heartbeat": None,
        "last_heartbeat_age_seconds": None,
    }
    assert body["outbox"] == {"pending": 0, "oldest_age_seconds": None}

    await crm.execute("INSERT INTO crmflow.workers (hostname, pid) VALUES ('h', 1)")
    from engine import capture

    await capture.watch(crm, "leads", all_rows=True)  # no workflow: keep the rows anyway
    await crm.execute("INSERT INTO leads (name) VALUES ('a'), ('b')")
    body = (await client.get("/health")).json()
    assert body["status"] == "ok"
    assert body["workers"]["alive"] == 1 and body["workers"]["last_heartbeat"] is not None
    assert body["outbox"]["pending"] == 2 and body["outbox"]["oldest_age_seconds"] >= 0

    # a worker whose heartbeat stopped is not alive
    await crm.execute("UPDATE crmflow.workers SET last_heartbeat = now() - interval '1 hour'")
    body = (await client.get("/health")).json()
    assert body["status"] == "degraded" and body["workers"]["alive"] == 0
    assert body["workers"]["last_heartbeat_age_seconds"] > 3000


async def test_health_without_database(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "HEALTH_TIMEOUT", 0.5)
    monkeypatch.setattr(deps, "CONNECTION_TIMEOUT", 0.5)
    down = settings.model_copy(
        update={"database_url": "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=1"}
    )
    async with app_client(down, key="cf_000000000000_" + "x" * 43) as client:
        response = await client.get("/health")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "down" and body["database"]["ok"] is False
        assert body["workers"] is None and body["outbox"] is None
        problem = assert_problem(await client.get("/workflows"), 503)
        assert "database" in problem["detail"]


async def test_the_app_opens_and_closes_its_own_pool(
    settings: Settings, crm: psycopg.AsyncConnection[Any], api_keys: dict[str, str]
) -> None:
    app = main.create_app(settings)
    async with app.router.lifespan_context(app):
        pool = app.state.pool
        assert not pool.closed
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            headers = {"Authorization": f"Bearer {api_keys['write']}"}
            response = await c.post("/workflows", json=SEED_QUALIFY, headers=headers)
            assert response.status_code == 201
    assert pool.closed


async def test_entities(client: httpx.AsyncClient, crm: psycopg.AsyncConnection[Any]) -> None:
    response = await client.get("/entities")
    assert response.status_code == 200
    entities = {e["entity_type"]: e for e in response.json()}
    # crmflow_alert: the engine's own alerts, watched by crmflow migrate; task: the churn
    # playbook's feedback
    assert set(entities) == {"account", "contact", "deal", "lead", "task", "crmflow_alert"}
    lead = entities["lead"]
    assert (lead["table_schema"], lead["table_name"], lead["pk_columns"]) == (
        "public",
        "leads",
        ["id"],
    )
    fields = {f["name"]: f for f in lead["fields"]}
    assert fields["source"]["type"] == "text" and fields["source"]["kind"] == "text"
    assert "starts_with" in fields["source"]["operators"]
    assert fields["score"]["kind"] == "number" and "starts_with" not in fields["score"]["operators"]
    assert fields["name"]["nullable"] is False and fields["email"]["nullable"] is True
    assert fields["tags"]["kind"] == "array"
    account = {f["name"]: f for f in entities["account"]["fields"]}
    assert account["churn_risk"]["enum_values"] == ["low", "medium", "high", "critical"]
    [derived] = entities["deal"]["derived_fields"]
    assert derived["name"] == "last_activity_days_ago"
    assert derived["type"] == "integer" and derived["kind"] == "number"
    assert "last_activity_at" in derived["expression"]

    one = await client.get("/entities/lead")
    assert one.json() == lead
    assert_problem(await client.get("/entities/spaceship"), 404)
    assert_problem(await client.get("/entities/Bad-Name"), 422)


async def test_cors(settings: Settings, pool: AsyncConnectionPool) -> None:
    origin = "https://crm.example.com"
    configured = settings.model_copy(update={"cors_origins": [origin]})
    async with app_client(configured, pool=pool) as client:
        preflight = await client.options(
            "/workflows",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        assert "POST" in preflight.headers["access-control-allow-methods"]
        response = await client.get("/health", headers={"Origin": origin})
        assert response.headers["access-control-allow-origin"] == origin
        other = await client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    async with app_client(settings, pool=pool) as client:  # not configured: no CORS
        response = await client.get("/health", headers={"Origin": origin})
        assert "access-control-allow-origin" not in response.headers


async def test_body_size_limit(
    settings: Settings, pool: AsyncConnectionPool, api_keys: dict[str, str]
) -> None:
    small = settings.model_copy(update={"api_max_body_bytes": 2000})
    async with app_client(small, key=api_keys["write"], pool=pool) as client:
        big = {**SEED_QUALIFY, "description": "x" * 3000}
        problem = assert_problem(await client.post("/workflows", json=big), 413)
        assert "2000" in problem["detail"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
            for _ in range(10):
                yield b" " * 500

        response = await client.post(
            "/events/x", content=chunks(), headers={"content-type": "application/json"}
        )
        assert_problem(response, 413)
        response = await client.post("/events/x", content=b"{}", headers={"content-length": "abc"})
        assert_problem(response, 400)
        # under the limit everything works as usual
        response = await client.post("/events/x", json={"payload": {"a": "y" * 100}})
        assert response.status_code == 202, response.text


async def test_routing_errors_and_openapi(client: httpx.AsyncClient) -> None:
    problem = assert_problem(await client.get("/nowhere"), 404)
    assert problem["type"].endswith("not-found")
    response = await client.post("/health")
    assert_problem(response, 405)
    assert response.headers["allow"] == "GET"
    # the Allow header names every method of the path, not only the first route's
    response = await client.request("OPTIONS", "/workflows/3")
    assert_problem(response, 405)
    assert response.headers["allow"] == "DELETE, GET, PATCH, PUT"

    # unknown query parameters are refused, not ignored (a typo must not widen a filter)
    problem = assert_problem(await client.get("/executions?workflow=3"), 422)
    assert problem["errors"][0]["path"] == "query.workflow"
    assert "workflow_id" in problem["errors"][0]["message"]
    assert_problem(await client.get("/health?verbose=1"), 422)

    schema = (await client.get("/openapi.json")).json()
    assert {
        "/workflows",
        "/workflows/{workflow_id}",
        "/workflows/{workflow_id}/activate",
        "/workflows/{workflow_id}/pause",
        "/workflows/{workflow_id}/executions",
        "/workflows/{workflow_id}/versions",
        "/workflows/{workflow_id}/test",
        "/workflows/{workflow_id}/run",
        "/workflows/{workflow_id}/replay-events",
        "/workflows/{workflow_id}/backfill",
        "/workflows/{workflow_id}/enrollments",
        "/workflows/{workflow_id}/history",
        "/scorecards",
        "/scorecards/{name}",
        "/scorecards/{name}/run",
        "/suppressions",
        "/suppressions/{list_name}",
        "/executions",
        "/executions/{execution_id}",
        "/executions/{execution_id}/retry",
        "/executions/{execution_id}/cancel",
        "/events/{name}",
        "/health",
        "/entities",
        "/entities/{entity_type}",
        "/apikeys",
        "/apikeys/{key_id}",
        "/metrics",
    } == set(schema["paths"])
    create = schema["paths"]["/workflows"]["post"]
    assert set(create["responses"]) >= {"201", "401", "403", "409", "413", "422"}
    assert create["responses"]["422"]["content"] == {
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
    }
    assert "HTTPValidationError" not in schema["components"]["schemas"]
