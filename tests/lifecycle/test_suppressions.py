"""Suppression lists: `crmflow suppress` and `/suppressions` (bad input changes nothing),
a workflow's "suppress" on every enrollment path (matcher, scheduler, manual runs,
custom events), expiry by "until", and send_email never writing to an address on the
list "unsubscribed" (a real SMTP server)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from engine import db, events, suppressions
from engine.cli import main
from engine.config import Settings, get_settings
from engine.matcher import Matcher
from engine.model import DefinitionError
from engine.scheduler import Scheduler, run_now
from engine.worker import running_worker
from tests.helpers import apply, fetch, install_test_crm, value, wait_executions_settled
from tests.servers import SmtpServer

Conn = psycopg.AsyncConnection[Any]

NEW_LEADS = {
    "name": "Welcome new leads",
    "trigger": {"type": "entity_created", "entity_type": "lead"},
    "suppress": ["vip", "unsubscribed"],
    "actions": [{"type": "update_field", "field": "status", "value": "contacted"}],
}


async def entities_enrolled(conn: Conn, workflow_id: int) -> list[Any]:
    rows = await fetch(
        conn,
        "SELECT entity_pk FROM crmflow.executions WHERE workflow_id = %s ORDER BY id",
        workflow_id,
    )
    return [r["entity_pk"]["id"] for r in rows]


async def suppression_count(conn: Conn) -> int:
    return int(await value(conn, "SELECT count(*) FROM crmflow.suppressions"))


# ───────────────────────────── the CLI ─────────────────────────────


@pytest.fixture
def cli_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    async def watch() -> None:
        async with await db.connect(db_url, autocommit=True) as conn:
            await install_test_crm(conn)

    asyncio.run(watch())
    monkeypatch.setenv("CRMFLOW_DATABASE_URL", db_url)
    get_settings.cache_clear()
    yield db_url
    get_settings.cache_clear()


def test_suppress_commands(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["suppress", "add", "vip", "--entity", "lead", "--key", "7", "--reason", "CEO"]) == 0
    )
    assert "lead 7 is on the list vip" in capsys.readouterr().out
    assert main(["suppress", "add", "unsubscribed", "--email", "Bob@Example.test"]) == 0
    assert main(["suppress", "add", "vip", "--email", "x@y.test", "--until", "2020-01-01"]) == 0
    assert "already expired" in capsys.readouterr().out
    assert main(["suppress", "list", "vip", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["entity_type"], e["key"], e["email"], e["active"]) for e in listed] == [
        ("lead", 7, None, True),
        (None, None, "x@y.test", False),
    ]
    assert listed[0]["reason"] == "CEO" and listed[0]["who"].startswith("os:")
    assert main(["suppress", "list", "--json"]) == 0
    everything = json.loads(capsys.readouterr().out)
    assert (everything[0]["list"], everything[0]["email"]) == ("unsubscribed", "Bob@Example.test")
    assert main(["suppress", "list"]) == 0  # the table
    assert "vip" in capsys.readouterr().out

    # Bad input: one line naming the option, exit 1, nothing changed.
    before = capsys.readouterr()
    bad = [
        (["suppress", "add", "no such list!", "--email", "a@b.test"], "--list"),
        (["suppress", "add", "vip", "--entity", "lead", "--key", "abc"], "--key"),
        (["suppress", "add", "vip", "--entity", "planet", "--key", "1"], "--entity-type"),
        (["suppress", "add", "vip", "--email", "not an address"], "--email"),
        (["suppress", "add", "vip", "--email", "a@b.test", "--until", "soon"], "--until"),
        (["suppress", "add", "vip", "--entity", "lead"], "--entity and --key"),
        (
            ["suppress", "add", "vip", "--email", "a@b.test", "--entity", "lead", "--key", "1"],
            "not both",
        ),
    ]
    for argv, named in bad:
        assert main(argv) == 1, argv
        assert named in capsys.readouterr().err, argv
    del before

    # Removing: by key (any spelling of the key), by address (any case).
    assert main(["suppress", "remove", "unsubscribed", "--email", "bob@example.TEST"]) == 0
    assert main(["suppress", "remove", "vip", "--entity", "lead", "--key", "7"]) == 0
    assert main(["suppress", "remove", "vip", "--entity", "lead", "--key", "7"]) == 1
    assert "not on the list" in capsys.readouterr().err
    assert main(["suppress", "list", "--json"]) == 0
    assert [e["email"] for e in json.loads(capsys.readouterr().out)] == ["x@y.test"]


# ───────────────────────────── the API ─────────────────────────────


async def test_suppressions_api(crm: Conn, client: Any) -> None:
    created = await client.post(
        "/suppressions",
        json={"list": "vip", "entity_type": "lead", "key": "7", "reason": "CEO"},
    )
    assert created.status_code == 201, created.text
    entry = created.json()
    assert (entry["list"], entry["entity_type"], entry["key"], entry["active"]) == (
        "vip",
        "lead",
        7,
        True,
    )
    assert entry["who"] == "api:test write"
    r = await client.post(
        "/suppressions",
        json={"list": "unsubscribed", "email": "Bob@Example.test", "until": "2099-01-01"},
    )
    assert r.status_code == 201 and r.json()["until"].startswith("2099-01-02")  # through the day
    assert [e["list"] for e in (await client.get("/suppressions")).json()] == [
        "unsubscribed",
        "vip",
    ]
    only = (await client.get("/suppressions", params={"list": "vip"})).json()
    assert [e["key"] for e in only] == [7]
    by_email = (await client.get("/suppressions", params={"email": "bob@example.test"})).json()
    assert [e["email"] for e in by_email] == ["Bob@Example.test"]

    # Bad input: 422 problem+json naming the field; nothing changed.
    before = await suppression_count(crm)
    for body, path in [
        ({"list": "bad list", "email": "a@b.test"}, "body.list"),
        ({"list": "vip", "entity_type": "lead", "key": "abc"}, "body.key"),
        ({"list": "vip", "entity_type": "planet", "key": 1}, "body.entity_type"),
        ({"list": "vip", "email": "nope"}, "body.email"),
        ({"list": "vip", "email": "a@b.test", "until": "tomorrow"}, "body.until"),
        ({"list": "vip", "email": "a@b.test", "entity_type": "lead", "key": 1}, "body.email"),
        ({"list": "vip"}, "body.entity_type"),
        ({"list": "vip", "email": "a@b.test", "colour": "red"}, "body.colour"),
    ]:
        r = await client.post("/suppressions", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert path in [e["path"] for e in r.json()["errors"]], (body, r.json())
    assert await suppression_count(crm) == before

    r = await client.delete("/suppressions/vip", params={"entity_type": "lead", "key": "7"})
    assert r.status_code == 204
    r = await client.delete("/suppressions/vip", params={"entity_type": "lead", "key": "7"})
    assert r.status_code == 404
    r = await client.delete("/suppressions/unsubscribed", params={"email": "BOB@example.test"})
    assert r.status_code == 204
    r = await client.delete("/suppressions/vip")
    assert r.status_code == 422 and r.json()["errors"][0]["path"].startswith("query.")
    assert await suppression_count(crm) == 0
    schema = (await client.get("/openapi.json")).json()
    assert {"get", "post"} <= set(schema["paths"]["/suppressions"])
    assert "delete" in schema["paths"]["/suppressions/{list_name}"]


async def test_suppress_is_checked_on_save(crm: Conn) -> None:
    with pytest.raises(DefinitionError) as refused:
        await apply(crm, {**NEW_LEADS, "suppress": ["vip", "no spaces"]})
    assert [i.path for i in refused.value.issues] == ["suppress[1]"]
    with pytest.raises(DefinitionError) as refused:
        await apply(crm, {**NEW_LEADS, "suppress": "vip"})
    assert [i.path for i in refused.value.issues] == ["suppress"]
    with pytest.raises(DefinitionError) as refused:  # nothing to suppress: no entity
        await apply(
            crm,
            {
                **NEW_LEADS,
                "trigger": {"type": "manual"},
                "actions": [{"type": "http_request", "url": "https://example.com/x"}],
            },
        )
    assert [(i.path, "entity_type" in i.message) for i in refused.value.issues] == [
        ("suppress", True)
    ]
    assert await value(crm, "SELECT count(*) FROM crmflow.workflows") == 0


# ───────────────────────────── enrollment paths ─────────────────────────────


async def test_suppressed_entities_do_not_enroll_on_events(crm: Conn, matcher: Matcher) -> None:
    wf = await apply(crm, NEW_LEADS)
    other = await apply(crm, {**NEW_LEADS, "name": "No lists"} | {"suppress": None})
    await suppressions.add(crm, "vip", entity_type="lead", key=2)
    await suppressions.add(crm, "unsubscribed", email="CAROL@x.test")
    await suppressions.add(
        crm, "vip", entity_type="lead", key=4, until=datetime.now(UTC) - timedelta(seconds=1)
    )
    await suppressions.add(crm, "elsewhere", entity_type="lead", key=5)  # a list it does not use
    await crm.execute(
        "INSERT INTO leads (name, email) VALUES ('a', 'a@x.test'), ('b', 'b@x.test'),"
        " ('c', 'carol@X.test'), ('d', 'd@x.test'), ('e', 'e@x.test')"
    )
    await matcher.drain()
    # 2 by key, 3 by address (any case); 4's entry expired; 5 is on another list.
    assert await entities_enrolled(crm, wf) == [1, 4, 5]
    assert await entities_enrolled(crm, other) == [1, 2, 3, 4, 5]
    # The same test for SQL users: crmflow.is_suppressed(lists, entity_type, key, row).
    checks = await fetch(
        crm,
        "SELECT id, crmflow.is_suppressed(ARRAY['vip', 'unsubscribed'], 'lead',"
        " jsonb_build_object('id', id), to_jsonb(leads)) AS s FROM leads ORDER BY id",
    )
    assert [c["s"] for c in checks] == [False, True, True, False, False]

    # A custom event about an entity goes through the matcher: the same test.
    on_event = await apply(
        crm,
        {
            "name": "On ping",
            "trigger": {"type": "event", "event": "ping", "entity_type": "lead"},
            "suppress": ["vip"],
            "actions": [{"type": "update_field", "field": "score", "value": 1}],
        },
    )
    for lead in (1, 2):
        await events.ingest(crm, "ping", entity_type="lead", entity_id=lead)
    await matcher.drain()
    assert await entities_enrolled(crm, on_event) == [1]

    # Once the entry goes (or expires), the entity enrolls again.
    assert await suppressions.remove(crm, "vip", entity_type="lead", key="2") == 1
    await events.ingest(crm, "ping", entity_type="lead", entity_id=2)
    await matcher.drain()
    assert await entities_enrolled(crm, on_event) == [1, 2]


async def test_suppressed_entities_do_not_enroll_on_ticks_or_manual_runs(
    crm: Conn, pool: Any, settings: Settings
) -> None:
    await crm.execute(
        "INSERT INTO deals (name, status, amount) VALUES ('a', 'open', 10), ('b', 'open', 20),"
        " ('c', 'open', 30)"
    )
    nightly = await apply(
        crm,
        {
            "name": "Nightly open deals",
            "trigger": {"type": "scheduled", "schedule": "0 3 * * *", "entity_type": "deal"},
            "conditions": [{"field": "status", "operator": "equals", "value": "open"}],
            "suppress": ["paused-accounts"],
            "actions": [{"type": "update_field", "field": "amount", "value": 1}],
        },
    )
    by_hand = await apply(
        crm,
        {
            "name": "Review a deal",
            "trigger": {"type": "manual", "entity_type": "deal"},
            "suppress": ["paused-accounts"],
            "actions": [{"type": "update_field", "field": "amount", "value": 2}],
        },
    )
    await suppressions.add(crm, "paused-accounts", entity_type="deal", key=2, reason="audit")
    await suppressions.add(
        crm,
        "paused-accounts",
        entity_type="deal",
        key=3,
        until=datetime.now(UTC) + timedelta(days=1),
    )
    scheduler = Scheduler(pool, settings)
    await scheduler.sync()
    await crm.execute("UPDATE crmflow.schedules SET next_run_at = now() - interval '1 second'")
    assert await scheduler.tick() == 1
    assert await entities_enrolled(crm, nightly) == [1]

    assert await run_now(crm, by_hand, settings=settings) != []
    assert await entities_enrolled(crm, by_hand) == [1]
    assert await run_now(crm, by_hand, settings=settings, entity_id=2) == []  # suppressed

    # The entry for deal 3 expires: the next tick enrolls it.
    await crm.execute(
        "UPDATE crmflow.suppressions SET until = now() - interval '1 second'"
        " WHERE entity_key = '{\"id\": 3}'"
    )
    await crm.execute("UPDATE crmflow.schedules SET next_run_at = now() - interval '1 second'")
    assert await scheduler.tick() == 2
    assert await entities_enrolled(crm, nightly) == [1, 1, 3]


# ───────────────────────────── send_email and "unsubscribed" ─────────────────────────────


async def test_send_email_never_writes_to_an_unsubscribed_address(
    crm: Conn, db_url: str, settings: Settings, smtp: SmtpServer
) -> None:
    await apply(
        crm,
        {
            "name": "Welcome mail",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [
                {
                    "type": "send_email",
                    "to": "{{ entity.email }}",
                    "cc": "ann@acme.test",
                    "subject": "Hello {{ entity.name }}",
                    "body": "Welcome",
                }
            ],
        },
    )
    await suppressions.add(crm, "unsubscribed", email="Gone@Example.test", reason="asked")
    await suppressions.add(crm, "unsubscribed", email="ann@acme.test", until="2000-01-01")
    mail = settings.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": smtp.port})
    async with running_worker(db_url, settings=mail, concurrency=2):
        await crm.execute(
            "INSERT INTO leads (name, email) VALUES ('Stays', 'stays@example.test'),"
            " ('Gone', 'gone@EXAMPLE.test')"
        )
        done = await wait_executions_settled(crm, expected=2)
    assert [x["status"] for x in done] == ["completed", "completed"]
    # One message, to the lead still subscribed (the cc's entry has expired).
    assert [m.rcpt_tos for m in smtp.received] == [["stays@example.test", "ann@acme.test"]]
    steps = await fetch(
        crm, "SELECT status, result, error FROM crmflow.execution_steps ORDER BY execution_id"
    )
    assert steps[0]["status"] == "succeeded"
    assert steps[1]["status"] == "skipped" and steps[1]["error"] is None
    assert "suppressed" in json.dumps(steps[1]["result"]) and "unsubscribed" in json.dumps(
        steps[1]["result"]
    )


async def test_the_docs_example(crm: Conn, matcher: Matcher) -> None:
    from tests.actions.test_dedupe import docs_example

    wf = await apply(crm, docs_example("Nurture new leads"))
    await suppressions.add(crm, "do-not-contact", entity_type="lead", key=1, until="2999-12-31")
    await suppressions.add(crm, "unsubscribed", email="bob@example.com")
    await crm.execute(
        "INSERT INTO leads (name, email) VALUES ('held', 'a@example.com'),"
        " ('bob', 'Bob@Example.com'), ('new', 'n@example.com')"
    )
    await matcher.drain()
    assert await entities_enrolled(crm, wf) == [3]
