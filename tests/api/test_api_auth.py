"""API keys: Bearer auth, read < write < admin, 401/403, listing and revoking (API)."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
import pytest

from engine import apikeys
from tests.api.test_api import assert_problem
from tests.helpers import SEED_QUALIFY, fetch


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def anonymous(api_app: Any) -> Any:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api_app), base_url="http://testserver"
    ) as c:
        yield c


async def test_missing_or_bad_keys_are_401(
    anonymous: httpx.AsyncClient, api_keys: dict[str, str], crm: psycopg.AsyncConnection[Any]
) -> None:
    good = api_keys["admin"]
    prefix = good.split("_")[1]
    for headers in (
        {},
        {"Authorization": good},  # no scheme
        {"Authorization": f"Basic {good}"},
        auth("nonsense"),
        auth(f"cf_{prefix}_{'x' * 43}"),  # right prefix, wrong secret
        auth(good[:-1] + ("A" if good[-1] != "A" else "B")),
        auth(f"cf_{'0' * 12}_{good.split('_', 2)[2]}"),  # right secret, unknown prefix
    ):
        for method, url in (("GET", "/workflows"), ("POST", "/workflows"), ("GET", "/apikeys")):
            response = await anonymous.request(method, url, headers=headers, json={})
            problem = assert_problem(response, 401)
            assert response.headers["www-authenticate"] == "Bearer"
            assert problem["type"].endswith("unauthorized")


async def test_scopes_are_ordered(
    anonymous: httpx.AsyncClient, api_keys: dict[str, str], crm: psycopg.AsyncConnection[Any]
) -> None:
    read, write, admin = (auth(api_keys[s]) for s in ("read", "write", "admin"))
    assert (await anonymous.get("/workflows", headers=read)).status_code == 200
    assert (await anonymous.get("/entities", headers=read)).status_code == 200
    assert (await anonymous.get("/executions", headers=read)).status_code == 200
    problem = assert_problem(
        await anonymous.post("/workflows", json=SEED_QUALIFY, headers=read), 403
    )
    assert "write" in problem["detail"]
    assert_problem(await anonymous.put("/workflows/1/activate", headers=read), 403)
    assert_problem(await anonymous.delete("/workflows/1", headers=read), 403)
    assert_problem(await anonymous.post("/events/x", headers=read), 403)

    created = await anonymous.post("/workflows", json=SEED_QUALIFY, headers=write)
    assert created.status_code == 201
    assert (await anonymous.get("/workflows", headers=write)).status_code == 200
    assert_problem(await anonymous.get("/apikeys", headers=write), 403)
    assert_problem(await anonymous.get("/apikeys", headers=read), 403)
    assert_problem(
        await anonymous.post("/apikeys", json={"name": "x", "scope": "read"}, headers=write), 403
    )

    wf_id = created.json()["id"]
    assert (await anonymous.put(f"/workflows/{wf_id}/pause", headers=admin)).status_code == 200
    assert (await anonymous.get("/apikeys", headers=admin)).status_code == 200


async def test_health_and_openapi_are_public(anonymous: httpx.AsyncClient) -> None:
    assert (await anonymous.get("/health")).status_code == 200
    schema = (await anonymous.get("/openapi.json")).json()
    assert schema["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"


async def test_manage_keys_through_the_api(
    anonymous: httpx.AsyncClient, api_keys: dict[str, str], conn: psycopg.AsyncConnection[Any]
) -> None:
    admin = auth(api_keys["admin"])
    response = await anonymous.post(
        "/apikeys", json={"name": "zapier", "scope": "write"}, headers=admin
    )
    assert response.status_code == 201, response.text
    created = response.json()
    key = created["key"]
    assert key.startswith(f"cf_{created['prefix']}_")
    assert created["scope"] == "write" and created["revoked_at"] is None

    # the key works at once, and is stored hashed only
    assert (await anonymous.get("/workflows", headers=auth(key))).status_code == 200
    [stored] = await fetch(conn, "SELECT * FROM crmflow.api_keys WHERE id = %s", created["id"])
    assert key not in str(stored)
    assert stored["hash"] == apikeys.hash_secret(key.split("_", 2)[2])
    assert stored["last_used_at"] is not None

    listed = (await anonymous.get("/apikeys", headers=admin)).json()
    assert [k["name"] for k in listed] == ["test read", "test write", "test admin", "zapier"]
    assert all("key" not in k and "hash" not in k for k in listed)

    response = await anonymous.delete(f"/apikeys/{created['id']}", headers=admin)
    assert response.status_code == 200
    assert response.json()["revoked_at"] is not None
    # a revoked key is refused, and revoking again changes nothing
    assert_problem(await anonymous.get("/workflows", headers=auth(key)), 401)
    again = await anonymous.delete(f"/apikeys/{created['id']}", headers=admin)
    assert again.json()["revoked_at"] == response.json()["revoked_at"]
    live = (await anonymous.get("/apikeys?include_revoked=false", headers=admin)).json()
    assert "zapier" not in [k["name"] for k in live]

    assert_problem(await anonymous.delete("/apikeys/999", headers=admin), 404)
    for bad, path in (
        ({"name": "x", "scope": "root"}, "body.scope"),
        ({"name": "", "scope": "read"}, "body.name"),
        ({"name": "   ", "scope": "read"}, "body.name"),
        ({"scope": "read"}, "body.name"),
    ):
        problem = assert_problem(await anonymous.post("/apikeys", json=bad, headers=admin), 422)
        assert problem["errors"][0]["path"] == path


async def test_verify_in_the_engine(conn: psycopg.AsyncConnection[Any]) -> None:
    row, key = await apikeys.create(conn, "ci", "read")
    assert (await apikeys.verify(conn, key))["id"] == row["id"]
    assert await apikeys.verify(conn, key + "x") is None
    assert await apikeys.verify(conn, "") is None
    await apikeys.revoke(conn, row["id"])
    assert await apikeys.verify(conn, key) is None
    assert apikeys.allows("admin", "write") and apikeys.allows("write", "read")
    assert not apikeys.allows("read", "write") and not apikeys.allows("write", "admin")
    with pytest.raises(ValueError):
        await apikeys.create(conn, "x", "superuser")
