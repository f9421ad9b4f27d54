"""Bad input, through every public surface: each case is refused with an error that
names the offending field (its path) and the reason, and changes nothing — no workflow,
no version, no watched table, no row; values that look like SQL are plain data.

Surfaces: ``engine.workflows.apply`` (what the CLI and the API call), ``crmflow
workflow apply``/``crmflow watch`` through ``engine.cli.main``, and the HTTP API.
The injection corpus (identifiers, values, ``{"sql": ...}`` conditions, derived fields,
watched table names) has well over 50 cases; a ``canary`` table proves that none of
them ran a statement of its own.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from engine import capture, workflows
from engine.cli import main
from engine.config import Settings, get_settings
from engine.matcher import Matcher
from engine.model import MAX_DEFINITION_BYTES, DefinitionError
from engine.runtime import Runner
from tests.helpers import apply, drive, execution_ids, fetch, steps
from tests.servers import WebServer

Conn = psycopg.AsyncConnection[Any]

LEAD_CREATED = {"type": "entity_created", "entity_type": "lead"}
SET_STATUS = {"type": "update_field", "field": "status", "value": "contacted"}

# What "nothing changed" compares: crmflow's own rows, the CRM's rows, the canary, and
# the database's relations, triggers and functions (a DROP or CREATE would show).
STATE_QUERIES = {
    "workflows": "SELECT count(*) FROM crmflow.workflows",
    "versions": "SELECT count(*) FROM crmflow.workflow_versions",
    "watched": "SELECT count(*) FROM crmflow.watched_tables",
    "derived": "SELECT count(*) FROM crmflow.derived_fields",
    "outbox": "SELECT count(*) FROM crmflow.outbox",
    "executions": "SELECT count(*) FROM crmflow.executions",
    "leads": "SELECT count(*) FROM public.leads",
    "tasks": "SELECT count(*) FROM public.tasks",
    "canary": "SELECT string_agg(note, ',') FROM public.canary",
    "relations": "SELECT count(*) FROM pg_class WHERE relnamespace IN"
    " ('public'::regnamespace, 'crmflow'::regnamespace)",
    "triggers": "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal",
    "functions": "SELECT count(*) FROM pg_proc WHERE pronamespace IN"
    " ('public'::regnamespace, 'crmflow'::regnamespace)",
}


def state(db_url: str) -> dict[str, Any]:
    """A snapshot of everything bad input must leave alone (a connection of its own)."""
    with psycopg.connect(db_url, autocommit=True) as c:
        return {name: c.execute(q).fetchone()[0] for name, q in STATE_QUERIES.items()}  # type: ignore[index]


async def add_canary(conn: Conn) -> None:
    await conn.execute("CREATE TABLE public.canary (id int PRIMARY KEY, note text NOT NULL)")
    await conn.execute("INSERT INTO public.canary VALUES (1, 'still here')")


@pytest.fixture
async def crm_canary(crm: Conn) -> Conn:
    """The watched example CRM, plus a canary table an injection would drop or empty."""
    await add_canary(crm)
    return crm


def definition(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "Bad input",
        "trigger": LEAD_CREATED,
        "conditions": [{"field": "source", "operator": "equals", "value": "website_form"}],
        "actions": [SET_STATUS],
        "status": "active",
    }
    return {**base, **changes}


def leaf(field: str, operator: str, value: Any = None) -> list[dict[str, Any]]:
    return [{"field": field, "operator": operator, "value": value}]


def scheduled(schedule: str, **extra: Any) -> dict[str, Any]:
    return definition(trigger={"type": "scheduled", "schedule": schedule, **extra}, conditions=[])


def deep_conditions(levels: int) -> dict[str, Any]:
    tree: dict[str, Any] = {"field": "score", "operator": "greater_than", "value": 1}
    for _ in range(levels):
        tree = {"all": [tree]}
    return tree


BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)
)

# (definition, the path the error names, words of the reason)
DEFINITION_CASES = [
    pytest.param(
        definition(conditions=leaf("score", "greather_than", 1)),
        "conditions[0].operator",
        "unknown operator",
        id="unknown-operator",
    ),
    pytest.param(
        definition(conditions=leaf("scroe", "greater_than", 1)),
        "conditions[0].field",
        "scroe",
        id="unknown-field",
    ),
    pytest.param(
        definition(actions=[{"type": "launch_rockets"}]),
        "actions[0].type",
        "unknown action",
        id="unknown-action",
    ),
    pytest.param(
        definition(trigger={"type": "entity_exploded", "entity_type": "lead"}),
        "trigger.type",
        "unknown trigger type",
        id="unknown-trigger-type",
    ),
    pytest.param(
        definition(trigger={"type": "entity_created", "entity_type": "unicorn"}),
        "trigger.entity_type",
        "not a watched entity",
        id="unknown-entity",
    ),
    pytest.param(definition(colour="red"), "colour", "unknown field", id="unknown-top-level-key"),
    pytest.param(
        definition(actions=[{"type": "update_field", "field": "status", "valeu": "x"}]),
        "actions[0].valeu",
        "unknown field",
        id="unknown-action-parameter",
    ),
    pytest.param(
        definition(actions=[{"type": "update_field", "field": "colour", "value": "red"}]),
        "actions[0].field",
        "no column 'colour'",
        id="update-unknown-column",
    ),
    pytest.param(
        definition(trigger={"type": "field_updated", "entity_type": "lead", "field": "colour"}),
        "trigger.field",
        "colour",
        id="field-updated-unknown-field",
    ),
    pytest.param(
        definition(conditions=leaf("score", "greater_than", "forty")),
        "conditions[0].value",
        "'forty' is not a valid pg_catalog.int4",
        id="type-integer",
    ),
    pytest.param(
        definition(conditions=leaf("created_at", "greater_than", "last tuesday-ish")),
        "conditions[0].value",
        "is not a valid",
        id="type-timestamp",
    ),
    pytest.param(
        definition(conditions=leaf("score", "in", [1, "two", 3])),
        "conditions[0].value",
        "two",
        id="type-list-item",
    ),
    pytest.param(
        definition(conditions=leaf("score", "greater_than", 99999999999)),
        "conditions[0].value",
        "out of range",
        id="type-integer-overflow",
    ),
    pytest.param(
        definition(conditions=leaf("name", "matches", "(unclosed")),
        "conditions[0].value",
        "regular expression",
        id="type-regex",
    ),
    pytest.param(
        definition(
            trigger={"type": "entity_created", "entity_type": "account"},
            conditions=leaf("churn_risk", "equals", "apocalyptic"),
            actions=[{"type": "update_field", "field": "industry", "value": "x"}],
        ),
        "conditions[0].value",
        "churn_risk_level",
        id="type-enum",
    ),
    pytest.param(
        definition(actions=[{"type": "update_field", "field": "score", "value": "lots"}]),
        "actions[0].value",
        "'lots' is not a valid pg_catalog.int4",
        id="type-update-value",
    ),
    pytest.param(
        definition(actions=[{**SET_STATUS, "delay": "soonish"}]),
        "actions[0].delay",
        "duration",
        id="type-delay",
    ),
    pytest.param(definition(name=""), "name", "at least 1", id="empty-name"),
    pytest.param(definition(name="n" * 201), "name", "at most 200", id="oversized-name"),
    pytest.param(
        definition(description="d" * 5001),
        "description",
        "at most 5000",
        id="oversized-description",
    ),
    pytest.param(definition(actions=[]), "actions", "at least 1", id="no-actions"),
    pytest.param(
        definition(actions=[SET_STATUS] * 101), "actions", "at most 100", id="too-many-actions"
    ),
    pytest.param(
        definition(actions=[{**SET_STATUS, "value": "v" * (MAX_DEFINITION_BYTES + 1)}]),
        "",
        "larger than",
        id="oversized-definition",
    ),
    pytest.param(
        definition(conditions=deep_conditions(200)),
        "",
        "nested deeper than",
        id="oversized-nesting",
    ),
    pytest.param(
        definition(actions=[{"type": "create_task", "title": "{{ unclosed"}]),
        "actions[0].title",
        "template",
        id="template-syntax",
    ),
    pytest.param(scheduled("* * *"), "trigger.schedule", "not a cron expression", id="cron-short"),
    pytest.param(
        scheduled("61 * * * *"), "trigger.schedule", "not a cron expression", id="cron-range"
    ),
    pytest.param(
        scheduled("every minute"), "trigger.schedule", "not a cron expression", id="cron-words"
    ),
    pytest.param(
        scheduled("0 9 * * * * * *"), "trigger.schedule", "not a cron expression", id="cron-long"
    ),
    pytest.param(
        scheduled("* * * * * *"), "trigger.schedule", "minimum interval", id="cron-every-second"
    ),
    pytest.param(
        scheduled("*/10 * * * * *"), "trigger.schedule", "minimum interval", id="cron-10-seconds"
    ),
    pytest.param(
        scheduled("0,30 * * * * *"), "trigger.schedule", "minimum interval", id="cron-30-seconds"
    ),
    pytest.param(
        scheduled("0 9 * * *", timezone="Mars/Olympus_Mons"),
        "trigger.timezone",
        "unknown time zone",
        id="cron-timezone",
    ),
    pytest.param(
        definition(
            actions=[
                {**SET_STATUS, "id": "a", "depends_on": ["b"]},
                {**SET_STATUS, "id": "b", "depends_on": ["a"]},
            ]
        ),
        "actions",
        "cycle: a -> b -> a",
        id="depends-on-cycle",
    ),
    pytest.param(
        definition(
            actions=[
                {**SET_STATUS, "id": "a", "depends_on": ["c"]},
                {**SET_STATUS, "id": "b", "depends_on": ["a"]},
                {**SET_STATUS, "id": "c", "depends_on": ["b"]},
            ]
        ),
        "actions",
        "cycle",
        id="depends-on-cycle-of-three",
    ),
    pytest.param(
        definition(actions=[{**SET_STATUS, "id": "a", "depends_on": ["a"]}]),
        "actions[0].depends_on",
        "cannot depend on itself",
        id="depends-on-itself",
    ),
    pytest.param(
        definition(actions=[{**SET_STATUS, "id": "a", "depends_on": ["ghost"]}]),
        "actions[0].depends_on",
        "no step with id 'ghost'",
        id="depends-on-unknown",
    ),
]


def assert_names(issues: list[dict[str, str]], path: str, reason: str) -> None:
    """One of the issues is at ``path`` (or under it) and gives ``reason``."""
    assert any(
        (i["path"] == path or i["path"].startswith(path)) and reason in i["message"] for i in issues
    ), issues


@pytest.mark.parametrize(("raw", "path", "reason"), DEFINITION_CASES)
async def test_refused_definitions(
    crm_canary: Conn,
    client: httpx.AsyncClient,
    db_url: str,
    raw: dict[str, Any],
    path: str,
    reason: str,
) -> None:
    """The engine's save function and the API (POST /workflows) give the same answer."""
    before = state(db_url)
    with pytest.raises(DefinitionError) as exc:
        await workflows.apply(crm_canary, raw)
    assert_names(exc.value.as_list(), path, reason)
    response = await client.post("/workflows", json=raw)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["errors"] == exc.value.as_list()
    assert state(db_url) == before


async def test_a_bad_new_version_leaves_the_old_one(
    crm_canary: Conn, client: httpx.AsyncClient, db_url: str
) -> None:
    """PUT and PATCH with a bad definition: the workflow keeps its version."""
    created = await client.post("/workflows", json=definition())
    assert created.status_code == 201
    workflow_id = created.json()["id"]
    before = state(db_url)
    bad = definition(conditions=leaf("score", "greater_than", "forty"))
    put = await client.put(f"/workflows/{workflow_id}", json=bad)
    patch = await client.patch(
        f"/workflows/{workflow_id}", json={"actions": [{"type": "launch_rockets"}]}
    )
    assert put.status_code == 422 and patch.status_code == 422
    assert_names(put.json()["errors"], "conditions[0].value", "is not a valid")
    assert_names(patch.json()["errors"], "actions[0].type", "unknown action")
    assert state(db_url) == before
    versions = await client.get(f"/workflows/{workflow_id}/versions")
    assert [v["version"] for v in versions.json()] == [1]


# ───────────────────────────── files: crmflow workflow apply ─────────────────────────────


@pytest.fixture
def cli_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The CLI on the test's database, with leads watched and a canary table."""
    monkeypatch.setenv("CRMFLOW_DATABASE_URL", db_url)
    get_settings.cache_clear()
    assert main(["watch", "leads"]) == 0
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("CREATE TABLE public.canary (id int PRIMARY KEY, note text NOT NULL)")
        c.execute("INSERT INTO public.canary VALUES (1, 'still here')")
    yield db_url
    get_settings.cache_clear()


FILE_CASES = [
    pytest.param("bad.json", '{"name": "x", "trigger": ', "not valid JSON (line 1", id="json-cut"),
    pytest.param("bad.json", '{"name": "x",}', "not valid JSON", id="json-trailing-comma"),
    pytest.param("bad.json", "", "not valid JSON", id="json-empty"),
    pytest.param("bad.json", "{'name': 'x'}", "not valid JSON", id="json-single-quotes"),
    pytest.param("bad.json", '"just a string"', "expected a workflow object", id="json-scalar"),
    pytest.param("bad.json", "[" * 100_000, "nested too deeply", id="json-deep"),
    pytest.param("bad.yaml", "name: [unclosed\n", "not valid YAML", id="yaml-unclosed"),
    pytest.param("bad.yaml", "name: x\n\ttrigger: {}\n", "not valid YAML", id="yaml-tab"),
    pytest.param("bad.yml", "name: x\n- y\n", "not valid YAML", id="yaml-mapping-then-list"),
    pytest.param(
        "bad.yaml",
        "!!python/object/apply:os.system ['touch {marker}']\n",
        "not valid YAML",
        id="yaml-python-object",
    ),
    pytest.param("bad.yaml", BILLION_LAUGHS, "larger than", id="yaml-billion-laughs"),
    pytest.param(
        "bad.yaml",
        "name: x\ntrigger: {type: entity_created, entity_type: lead}\n"
        "conditions: [{field: score, operator: greater_than, value: forty}]\n"
        "actions: [{type: qualify_lead}]\n",
        "conditions[0].value: 'forty' is not a valid",
        id="yaml-type-mismatch",
    ),
    pytest.param(
        "bad.json",
        json.dumps(definition(conditions=leaf("score", "greather_than", 1))),
        "conditions[0].operator",
        id="json-unknown-operator",
    ),
]


@pytest.mark.parametrize(("filename", "text", "reason"), FILE_CASES)
def test_refused_files(
    cli_db: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    filename: str,
    text: str,
    reason: str,
) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / filename
    bad.write_text(text.replace("{marker}", str(marker)), encoding="utf-8")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(definition(name="Fine on its own")), encoding="utf-8")
    before = state(cli_db)
    capsys.readouterr()
    started = time.monotonic()
    assert main(["workflow", "apply", str(good), str(bad)]) == 1
    elapsed = time.monotonic() - started
    err = " ".join(capsys.readouterr().err.split())  # unwrapped (rich wraps at 80)
    assert "error" in err and reason in err and filename in err, err
    assert state(cli_db) == before  # all or nothing: the good file was not applied either
    assert not marker.exists()
    assert elapsed < 10, f"refusing took {elapsed:.1f}s"


# ───────────────────────────── oversized API payloads ─────────────────────────────


async def test_oversized_api_payloads_get_413(
    crm_canary: Conn, client: httpx.AsyncClient, db_url: str, settings: Settings
) -> None:
    before = state(db_url)
    limit = settings.api_max_body_bytes
    big = definition(description="x" * limit)
    for method, url, body in [
        ("POST", "/workflows", json.dumps(big)),
        ("PUT", "/workflows/1", json.dumps(big)),
        ("POST", "/events/big", json.dumps({"entity_type": "lead", "payload": "x" * limit})),
    ]:
        response = await client.request(
            method, url, content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 413, (url, response.text)
        assert str(limit) in response.json()["detail"]

    async def chunks() -> Any:  # no Content-Length: the limit holds while streaming too
        for _ in range(limit // 65_536 + 2):
            yield b"x" * 65_536

    streamed = await client.post(
        "/workflows", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413
    assert state(db_url) == before


MALFORMED_BODIES = [
    pytest.param(b'{"name": "x", "trigger": ', id="cut"),
    pytest.param(b"{'name': 'x'}", id="single-quotes"),
    pytest.param(b"[" * 200_000, id="deep"),
    pytest.param(b"\xff\xfe\x00garbage", id="not-utf8"),
    pytest.param(b'"a string"', id="scalar"),
    pytest.param(b"", id="empty"),
]


@pytest.mark.parametrize("body", MALFORMED_BODIES)
async def test_malformed_api_bodies_are_refused(
    crm_canary: Conn, client: httpx.AsyncClient, db_url: str, body: bytes
) -> None:
    before = state(db_url)
    response = await client.post(
        "/workflows", content=body, headers={"content-type": "application/json"}
    )
    # 422 for what the parser refuses; 400 for a body Python's parser gives up on (too deep)
    assert response.status_code in (400, 422), response.text
    problem = response.json()
    assert problem["errors"]
    assert all(e["path"] == "body" and e["message"] for e in problem["errors"])
    assert state(db_url) == before


# ───────────────────────────── SQL injection ─────────────────────────────

# Identifiers: condition fields, update_field's field, a field_updated trigger's field.
FIELD_INJECTIONS = [
    "score; DROP TABLE canary",
    'score"; DROP TABLE canary; --',
    "score) OR (1=1",
    "score OR 1=1",
    "n.score",
    "leads.score",
    "*",
    "score -- ",
    "score/**/OR/**/1=1",
    "pg_sleep(5)",
    "(SELECT 1)",
    "score' OR '1'='1",
    '"score"',
    "1; DELETE FROM leads",
    "score::regclass",
    "tags[1]; DROP TABLE canary",
    "o.score",
    "score\x00",
]

ENTITY_INJECTIONS = [
    "lead; DROP TABLE canary",
    "lead' OR '1'='1",
    'lead"; DROP TABLE canary; --',
    "lead--",
    "LEAD",
    "lead\n",
]


@pytest.mark.parametrize("name", FIELD_INJECTIONS)
async def test_injection_in_field_names(crm_canary: Conn, db_url: str, name: str) -> None:
    before = state(db_url)
    for raw, path in [
        (definition(conditions=leaf(name, "equals", 1)), "conditions[0].field"),
        (
            definition(actions=[{"type": "update_field", "field": name, "value": "x"}]),
            "actions[0].field",
        ),
        (
            definition(trigger={"type": "field_updated", "entity_type": "lead", "field": name}),
            "trigger.field",
        ),
    ]:
        with pytest.raises(DefinitionError) as exc:
            await workflows.apply(crm_canary, raw)
        [issue] = [i for i in exc.value.issues if i.path == path]
        assert repr(name)[1:-1] in issue.message or "field" in issue.message, issue
    assert state(db_url) == before


@pytest.mark.parametrize("name", ENTITY_INJECTIONS)
async def test_injection_in_entity_names(
    crm_canary: Conn, client: httpx.AsyncClient, db_url: str, name: str
) -> None:
    before = state(db_url)
    raw = definition(trigger={"type": "entity_created", "entity_type": name})
    with pytest.raises(DefinitionError) as exc:
        await workflows.apply(crm_canary, raw)
    assert_names(exc.value.as_list(), "trigger.entity_type", "entity type")
    response = await client.post("/workflows", json=raw)
    assert response.status_code == 422
    assert_names(response.json()["errors"], "trigger.entity_type", "entity type")
    listed = await client.get("/executions", params={"entity_type": name})
    assert listed.status_code in (200, 422) and listed.json() != []
    assert state(db_url) == before


# Names given to `crmflow watch`: a table that does not exist, one crmflow must not
# capture, or a name that is not a name; and `--entity`/`--derived` names.
WATCH_INJECTIONS = [
    pytest.param(["watch", "leads; DROP TABLE canary"], "no table named", id="table-semicolon"),
    pytest.param(
        ["watch", 'leads" CASCADE; DROP TABLE canary; --'], "no table named", id="table-quote"
    ),
    pytest.param(["watch", "leads WHERE 1=1"], "no table named", id="table-where"),
    pytest.param(["watch", "(SELECT 1)"], "no table named", id="table-subquery"),
    pytest.param(["watch", "'leads'"], "no table named", id="table-quoted-literal"),
    pytest.param(["watch", "public.leads;--"], "no table named", id="table-comment"),
    pytest.param(["watch", "pg_catalog.pg_class"], "system catalog", id="table-system-catalog"),
    pytest.param(["watch", "crmflow.outbox"], "crmflow's own", id="table-own-outbox"),
    pytest.param(
        ["watch", "procrastinate.procrastinate_jobs"], "crmflow's own", id="table-job-queue"
    ),
    pytest.param(["watch", "information_schema.tables"], "not a table", id="table-view"),
    pytest.param(
        ["watch", "canary", "--entity", "x; DROP TABLE canary"], "entity name", id="entity-name"
    ),
    pytest.param(["watch", "canary", "--entity", "Canary"], "entity name", id="entity-uppercase"),
    pytest.param(
        ["watch", "canary", "--derived", "x; DROP TABLE canary=id + 1"],
        "derived field",
        id="derived-name",
    ),
    pytest.param(
        ["watch", "canary", "--derived", "gone=(SELECT count(*) FROM canary)"],
        "derived field",
        id="derived-subquery",
    ),
    pytest.param(
        ["watch", "canary", "--derived", "gone=pg_sleep(1)"], "derived field", id="derived-sleep"
    ),
    pytest.param(
        ["watch", "canary", "--derived", "gone=id; DROP TABLE canary"],
        "derived field",
        id="derived-semicolon",
    ),
]


@pytest.mark.parametrize(("argv", "reason"), WATCH_INJECTIONS)
def test_injection_in_watched_names(
    cli_db: str, capsys: pytest.CaptureFixture[str], argv: list[str], reason: str
) -> None:
    before = state(cli_db)
    capsys.readouterr()
    assert main(argv) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error") and reason in err, err
    assert state(cli_db) == before


# Values are data: they reach the database as parameters or quoted literals.
VALUE_INJECTIONS = [
    "'; DROP TABLE canary; --",
    "' OR '1'='1",
    "website_form' OR 1=1 --",
    "$$; DROP TABLE canary; $$",
    "$tag$ DROP TABLE canary $tag$",
    "\\'; DROP TABLE canary; --",
    "E'\\x27; DROP TABLE canary",
    "%(name)s",
    "%s; DROP TABLE canary",
    "Robert'); DROP TABLE canary;--",
    '"; DROP TABLE canary; --',
    "1; SELECT pg_sleep(5)",
    "*/ DROP TABLE canary /*",
    "\u2019; DROP TABLE canary; --",
    "' || (SELECT current_user) || '",
    "\\\\'; TRUNCATE canary",
]


@pytest.mark.parametrize("text", VALUE_INJECTIONS)
async def test_injected_values_are_plain_data(
    crm_canary: Conn, db_url: str, matcher: Matcher, runner: Runner, text: str
) -> None:
    """A condition value and an update_field value that look like SQL: the workflow
    matches exactly the lead whose source is that text, writes it back literally, and
    the canary is untouched."""
    await apply(
        crm_canary,
        definition(
            conditions=[
                {"field": "source", "operator": "equals", "value": text},
                {"field": "source", "operator": "in", "value": [text, "other"]},
                {"field": "source", "operator": "contains", "value": text[1:]},
            ],
            actions=[{"type": "update_field", "field": "title", "value": text}],
        ),
    )
    await crm_canary.execute(
        "INSERT INTO leads (name, source) VALUES ('Target', %s), ('Bystander', 'website_form')",
        [text],
    )
    await matcher.drain()
    [execution_id] = await execution_ids(crm_canary)
    assert (await drive(runner, crm_canary, execution_id))["status"] == "completed"
    rows = await fetch(crm_canary, "SELECT name, source, title FROM leads ORDER BY id")
    assert rows == [
        {"name": "Target", "source": text, "title": text},
        {"name": "Bystander", "source": "website_form", "title": None},
    ]
    assert await fetch(crm_canary, "SELECT * FROM canary") == [{"id": 1, "note": "still here"}]


# `{"sql": ...}` conditions: only a whitelisted expression over the row's own columns.
SQL_INJECTIONS = [
    "score > 1; DROP TABLE canary",
    "score > 1); DROP TABLE canary; --",
    "score > 1 \\; DROP TABLE canary",
    "DROP TABLE canary",
    "name = 'x' /* */; DELETE FROM leads",
    "(SELECT count(*) FROM canary) > 0",
    "EXISTS (SELECT 1 FROM canary)",
    "score IN (SELECT id FROM canary)",
    "score > ALL (SELECT 1)",
    "ARRAY(SELECT 1) IS NOT NULL",
    "name = (TABLE canary)",
    "score > 1 UNION SELECT 1",
    "score > 1 FROM canary",
    "pg_sleep(10) IS NULL",
    "PG_SLEEP(1) IS NULL",
    '"pg_sleep"(1) IS NULL',
    'U&"\\0070g_sleep"(1) IS NULL',
    "score > 1 AND pg_sleep(1) IS NULL",
    "pg_read_file('/etc/passwd') <> ''",
    "pg_ls_dir('.') IS NOT NULL",
    "lo_import('/etc/passwd') > 0",
    "current_setting('is_superuser') = 'on'",
    "set_config('search_path', 'evil', false) = ''",
    "nextval('crmflow.outbox_id_seq') > 0",
    "txid_current() > 0",
    "pg_terminate_backend(pg_backend_pid())",
    "pg_advisory_lock(1) IS NULL",
    "random() < 0.5",
    "query_to_xml('DROP TABLE canary', true, true, '') IS NOT NULL",
    "dblink_exec('dbname=x', 'DROP TABLE canary') = 'OK'",
    "'canary'::regclass IS NOT NULL",
    "CAST('canary' AS regclass) IS NOT NULL",
    "name::regproc IS NULL",
    "(name)::text::regclass IS NOT NULL",
    "pg_catalog.pg_sleep(1) IS NULL",
    "crmflow.wake_matcher() IS NULL",
    "public.evil(name)",
    "n.score > 1",
    "leads.score > 1",
    "count(*) > 0",
    "row_number() OVER () > 1",
    "format('%s', name) = name",
    "version() <> ''",
    "current_user = 'postgres'",
    "concat(VARIADIC ARRAY['a']) = name",
    "ROW(1, 2) IS NOT NULL",
    "xmlparse(document '<a/>') IS NOT NULL",
    "length(repeat(name, 200000000)) > 0",  # memory and time on every event: not listed
    "unknown_column > 1",
    "score >",
    "",
]


@pytest.mark.parametrize("expression", SQL_INJECTIONS)
async def test_injection_in_sql_conditions(
    crm_canary: Conn, client: httpx.AsyncClient, db_url: str, expression: str
) -> None:
    before = state(db_url)
    raw = definition(conditions=[{"sql": expression}])
    with pytest.raises(DefinitionError) as exc:
        await workflows.apply(crm_canary, raw)
    [issue] = exc.value.issues
    assert issue.path == "conditions[0].sql" and issue.message, issue
    response = await client.post("/workflows", json=raw)
    assert response.status_code == 422
    assert response.json()["errors"] == [{"path": issue.path, "message": issue.message}]
    step_when = definition(actions=[{**SET_STATUS, "when": {"sql": expression}}])
    with pytest.raises(DefinitionError) as exc:
        await workflows.apply(crm_canary, step_when)
    assert [i.path for i in exc.value.issues] == ["actions[0].when.sql"]
    assert state(db_url) == before


@pytest.mark.parametrize("expression", SQL_INJECTIONS[:12])
async def test_injection_in_derived_fields(crm_canary: Conn, db_url: str, expression: str) -> None:
    before = state(db_url)
    with pytest.raises(capture.CaptureError) as exc:
        await capture.declare_derived(crm_canary, "lead", "sneaky", expression)
    assert "derived field 'sneaky'" in str(exc.value)
    assert state(db_url) == before


# ───────────────────────────── template injection ─────────────────────────────

TEMPLATE_INJECTIONS = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ range.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__dict__ }}",
    "{{ ''['__class__'] }}",
    "{{ ''|attr('__class__') }}",
    "{{ (''|attr('__cla' ~ 'ss__')).__mro__ }}",
    "{% set c = ''|attr('__class__') %}{{ c }}",
    "{{ entity|attr('__class__') }}",
    "{{ entity.items.__self__ }}",
    "{{ config.__class__.__init__.__globals__['os'] }}",
    "{{ request.application.__globals__ }}",
    "{{ ''.format.__self__ }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ '{0.__init__.__globals__}'.format(cycler) }}",
    "{{ '%s'|format(''|attr('__class__')) }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os }}",
    "{% extends '/etc/passwd' %}",
    "{% macro m() %}{{ m.__globals__ }}{% endmacro %}{{ m() }}",
    "{{ {}.update(a=1) }}",
    "{{ [].append(1) }}",
    "{{ 'a' * 100000000 }}",
    "{{ 9 ** 9 ** 9 }}",
    "{{ range(100000000)|list|length }}",
    "{% for i in range(1000) %}{% for j in range(1000) %}x{% endfor %}{% endfor %}",
]

# What must never show in a rendered value: Python's internals.
LEAKS = ("<class", "<function", "<module", "<built-in", "__", "globals", "subclasses")


@pytest.mark.parametrize("template", TEMPLATE_INJECTIONS)
async def test_template_injection(
    crm_canary: Conn,
    db_url: str,
    tmp_path: Path,
    matcher: Matcher,
    runner: Runner,
    template: str,
) -> None:
    """Refused when saved, or refused by the sandbox when rendered (the step fails with a
    template error and writes nothing), or rendered as harmless text: never executed."""
    marker = tmp_path / "pwned"
    template = template.replace("{marker}", str(marker))
    raw = definition(
        conditions=[],
        actions=[
            {"type": "update_field", "field": "title", "value": template},
            {"type": "create_task", "title": template, "assignee": None},
        ],
    )
    before = state(db_url)
    try:
        await apply(crm_canary, raw)
    except DefinitionError as exc:
        assert exc.issues[0].path.startswith("actions[0]")
        assert "template" in exc.issues[0].message
        assert state(db_url) == before
        return
    await crm_canary.execute("INSERT INTO leads (name) VALUES ('Target')")
    await matcher.drain()
    [execution_id] = await execution_ids(crm_canary)
    ex = await drive(runner, crm_canary, execution_id)
    [first, _second] = await steps(crm_canary, execution_id)
    title = (await fetch(crm_canary, "SELECT title FROM leads"))[0]["title"]
    if ex["status"] == "failed":
        assert first["status"] == "failed" and "template" in first["error"], first
        assert title is None  # nothing written
        assert await fetch(crm_canary, "SELECT * FROM tasks") == []
    else:
        assert not any(leak in (title or "") for leak in LEAKS), title
    assert not marker.exists()
    assert await fetch(crm_canary, "SELECT * FROM canary") == [{"id": 1, "note": "still here"}]


# ───────────────────────────── http_request to internal addresses ─────────────────────────────

INTERNAL_URLS = [
    "http://127.0.0.1:{port}/hook",
    "http://localhost:{port}/hook",
    "http://LOCALHOST:{port}/hook",
    "http://localhost.:{port}/hook",
    "http://[::1]:{port}/hook",
    "http://[::ffff:127.0.0.1]:{port}/hook",
    "http://2130706433:{port}/hook",
    "http://0x7f000001:{port}/hook",
    "http://0177.0.0.1:{port}/hook",
    "http://127.1:{port}/hook",
    "http://0.0.0.0:{port}/hook",
    "http://10.0.0.1/hook",
    "http://172.16.0.1/hook",
    "http://192.168.1.1/hook",
    "http://100.64.0.1/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00::1]/hook",
    "http://[fe80::1]/hook",
    "http://{hostname}:{port}/hook",
]


@pytest.mark.parametrize("url", INTERNAL_URLS)
async def test_http_request_to_internal_addresses(
    crm_canary: Conn,
    matcher: Matcher,
    pool: AsyncConnectionPool,
    settings: Settings,
    web: WebServer,
    url: str,
) -> None:
    """With no allowlist and private addresses not allowed, the step fails at once
    (permanently: no retry), naming the host and the reason; no request leaves."""
    url = url.format(port=web.port, hostname=socket.gethostname())
    public_only = Settings.model_validate(
        {**settings.model_dump(), "http_allowed_hosts": [], "http_allow_private": False}
    )
    await apply(
        crm_canary,
        definition(conditions=[], actions=[{"type": "http_request", "url": url, "retry": 3}]),
    )
    await crm_canary.execute("INSERT INTO leads (name) VALUES ('Target')")
    await matcher.drain()
    [execution_id] = await execution_ids(crm_canary)
    ex = await drive(Runner(pool, public_only), crm_canary, execution_id)
    [step] = await steps(crm_canary, execution_id)
    assert ex["status"] == "failed" and step["attempts"] == 1
    assert "non-public address" in step["error"] or "cannot resolve" in step["error"], step
    assert web.requests == []


async def test_http_request_outside_the_allowlist(
    crm_canary: Conn,
    matcher: Matcher,
    pool: AsyncConnectionPool,
    settings: Settings,
    web: WebServer,
) -> None:
    listed = Settings.model_validate(
        {**settings.model_dump(), "http_allowed_hosts": ["hooks.example.com"]}
    )
    await apply(
        crm_canary,
        definition(conditions=[], actions=[{"type": "http_request", "url": web.url()}]),
    )
    await crm_canary.execute("INSERT INTO leads (name) VALUES ('Target')")
    await matcher.drain()
    [execution_id] = await execution_ids(crm_canary)
    ex = await drive(Runner(pool, listed), crm_canary, execution_id)
    [step] = await steps(crm_canary, execution_id)
    assert ex["status"] == "failed"
    assert "127.0.0.1 is not in CRMFLOW_HTTP_ALLOWED_HOSTS" in step["error"]
    assert web.requests == []


def test_corpus_sizes() -> None:
    """The issue asks for at least 50 injection cases; this file has many more."""
    injections = (
        len(FIELD_INJECTIONS)
        + len(ENTITY_INJECTIONS)
        + len(WATCH_INJECTIONS)
        + len(VALUE_INJECTIONS)
        + len(SQL_INJECTIONS)
    )
    assert injections >= 50
    assert len(TEMPLATE_INJECTIONS) >= 20 and len(INTERNAL_URLS) >= 15
