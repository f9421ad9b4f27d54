"""``GET /executions?entity_id=`` is index-backed: on 100k executions (ANALYZEd), the
list query finds one entity's executions through the (entity_type, entity_pk, id) index,
with or without ``entity_type``, instead of reading every execution's key; and it finds
what the key says: numbers and texts of single-column keys, and composite keys given as
the JSON object the API shows."""

from __future__ import annotations

import json
from typing import Any

import httpx
import psycopg
import pytest

from engine import capture, db, executions
from engine.executions import entity_values
from tests.helpers import apply, value

Conn = psycopg.AsyncConnection[Any]

ROWS = 100_000
LEADS = 20_000


async def fill(crm: Conn) -> tuple[int, int]:
    """100k executions: leads 1..20000 (five each), then 50 deals keyed like leads."""
    workflow_id = await apply(
        crm,
        {
            "name": "Many executions",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [{"type": "qualify_lead"}],
            "status": "paused",
        },
    )
    version_id = await value(
        crm, "SELECT id FROM crmflow.workflow_versions WHERE workflow_id = %s", workflow_id
    )
    await crm.execute(
        "INSERT INTO crmflow.executions (workflow_id, workflow_version_id, workflow_version,"
        " enrollment_key, entity_type, entity_pk, status, triggered_at)"
        " SELECT %(w)s, %(v)s, 1, 'event:' || i, 'lead',"
        " jsonb_build_object('id', i %% %(leads)s + 1), 'completed', now()"
        " FROM generate_series(1, %(rows)s) AS i",
        {"w": workflow_id, "v": version_id, "leads": LEADS, "rows": ROWS - 50},
    )
    await crm.execute(
        "INSERT INTO crmflow.executions (workflow_id, workflow_version_id, workflow_version,"
        " enrollment_key, entity_type, entity_pk, status, triggered_at)"
        " SELECT %(w)s, %(v)s, 1, 'deal:' || i, 'deal', jsonb_build_object('id', i), 'completed',"
        " now() FROM generate_series(1, 50) AS i",
        {"w": workflow_id, "v": version_id},
    )
    await crm.execute("ANALYZE crmflow.executions")
    return workflow_id, version_id


def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found.extend(nodes(child))
    return found


async def plan(crm: Conn, **filters: Any) -> list[dict[str, Any]]:
    params = {
        "workflow_id": None,
        "status": None,
        "entity_type": None,
        "entity_values": None,
        "since": None,
        "until": None,
        "before_id": None,
        "limit": 50,
        **filters,
    }
    row = await (
        await crm.execute(
            "EXPLAIN (FORMAT JSON) " + db.query("list_executions", "executions.sql"), params
        )
    ).fetchone()
    assert row is not None
    return nodes(next(iter(row.values()))[0]["Plan"])


@pytest.mark.parametrize("entity_type", [None, "lead"])
async def test_the_entity_filter_uses_an_index(crm: Conn, entity_type: str | None) -> None:
    await fill(crm)
    found = await plan(
        crm, entity_type=entity_type, entity_values=psycopg.types.json.Jsonb(entity_values("123"))
    )
    on_executions = [n for n in found if n.get("Relation Name") == "executions"]
    assert on_executions, found
    assert all(n["Node Type"] != "Seq Scan" for n in on_executions), on_executions
    assert any(n.get("Index Name") == "executions_entity_idx" for n in on_executions), on_executions


async def test_the_plan_stays_made_for_the_values(crm: Conn) -> None:
    """A connection of the pool runs the query many times: it must not become a
    prepared statement, whose generic plan (after five runs) reads every execution."""
    await fill(crm)
    for i in range(12):
        rows = await executions.list_executions(crm, entity_id=str(100 + i))
        assert len(rows) == 5
    prepared = await value(
        crm,
        "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s",
        "%entity_values%",
    )
    assert prepared == 0


async def test_entity_id_finds_the_entitys_executions(crm: Conn, client: httpx.AsyncClient) -> None:
    await fill(crm)
    expected = await value(
        crm,
        "SELECT array_agg(id ORDER BY id DESC) FROM crmflow.executions"
        " WHERE entity_pk = '{\"id\": 12}'",
    )
    assert len(expected) == 6  # five leads and a deal
    response = await client.get("/executions", params={"entity_id": "12"})
    assert [i["id"] for i in response.json()["items"]] == expected
    leads = await client.get("/executions", params={"entity_id": "12", "entity_type": "lead"})
    assert [i["entity_type"] for i in leads.json()["items"]] == ["lead"] * 5
    for nothing in ("12.5", "abc", "012", "NaN", "1e999", "[12]", "", '{"id": 12}'):
        response = await client.get("/executions", params={"entity_id": nothing})
        assert response.status_code == 200 and response.json()["items"] == [], nothing


async def test_text_and_composite_keys(crm: Conn, client: httpx.AsyncClient) -> None:
    workflow_id, version_id = await fill(crm)
    await crm.execute("CREATE TABLE public.codes (code text PRIMARY KEY)")
    await crm.execute("CREATE TABLE public.pairs (a int, b text, PRIMARY KEY (a, b))")
    await capture.watch(crm, "public.codes", entity="code")
    await capture.watch(crm, "public.pairs", entity="pair")
    for i, (entity, pk) in enumerate(
        [
            ("code", {"code": "123"}),
            ("code", {"code": "ABC-1"}),
            ("pair", {"a": 123, "b": "x"}),
            ("pair", {"a": 7, "b": "123"}),
        ]
    ):
        await crm.execute(
            "INSERT INTO crmflow.executions (workflow_id, workflow_version_id, workflow_version,"
            " enrollment_key, entity_type, entity_pk, status, triggered_at)"
            " VALUES (%s, %s, 1, %s, %s, %s, 'completed', now())",
            (workflow_id, version_id, f"k:{i}", entity, json.dumps(pk)),
        )

    async def found(entity_id: str, entity_type: str | None = None) -> list[tuple[str, Any]]:
        params = {"entity_id": entity_id} | ({"entity_type": entity_type} if entity_type else {})
        items = (await client.get("/executions", params=params)).json()["items"]
        return [(i["entity_type"], i["entity_id"]) for i in items]

    assert await found("123", "code") == [("code", "123")]
    assert await found("ABC-1") == [("code", "ABC-1")]
    assert await found('{"a": 123, "b": "x"}') == [("pair", {"a": 123, "b": "x"})]
    assert await found('{"b": "123", "a": 7}', "pair") == [("pair", {"a": 7, "b": "123"})]
    assert await found("123", "pair") == []  # a part of a composite key is not the key
