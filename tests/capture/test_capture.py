"""Capture: any table with a primary key, in the writer's transaction, no per-row NOTIFY."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from engine import capture, db
from tests.helpers import fetch, value


async def outbox(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    return await fetch(conn, "SELECT * FROM crmflow.outbox ORDER BY id")


def test_singular_names() -> None:
    assert capture.singular("leads") == "lead"
    assert capture.singular("opportunities") == "opportunity"
    assert capture.singular("addresses") == "address"
    assert capture.singular("people") == "person"
    assert capture.singular("status") == "status"
    assert capture.default_entity_name("Deal Line Items") == "deal_line_item"


async def test_watch_defaults_entity_to_singular(conn: psycopg.AsyncConnection[Any]) -> None:
    w = await capture.watch(conn, "leads", all_rows=True)
    assert (w.entity_type, w.table_schema, w.table_name, w.pk_columns) == (
        "lead",
        "public",
        "leads",
        ["id"],
    )
    await conn.execute("INSERT INTO leads (name, source) VALUES ('Bob', 'website_form')")
    [event] = await outbox(conn)
    assert event["entity_type"] == "lead"
    assert event["op"] == "insert"
    assert event["pk"] == {"id": 1}
    assert event["new_row"]["name"] == "Bob"
    assert event["old_row"] is None
    assert event["depth"] == 0
    assert event["actor"] == "postgres"
    assert event["txid"] is not None
    assert event["processed_at"] is None


async def test_composite_key_in_other_schema(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute(
        'CREATE SCHEMA "Sales Ops"; CREATE TABLE "Sales Ops"."Line Items" ('
        " deal_id int, line_no int, sku text, qty numeric, PRIMARY KEY (deal_id, line_no))"
    )
    w = await capture.watch(conn, '"Sales Ops"."Line Items"', entity="line_item", all_rows=True)
    assert w.pk_columns == ["deal_id", "line_no"]
    await conn.execute(
        """INSERT INTO "Sales Ops"."Line Items" VALUES (7, 1, 'A', 2), (7, 2, 'B', 1)"""
    )
    await conn.execute("""UPDATE "Sales Ops"."Line Items" SET qty = 5 WHERE line_no = 2""")
    await conn.execute("""DELETE FROM "Sales Ops"."Line Items" WHERE line_no = 1""")
    events = await outbox(conn)
    assert [(e["op"], e["pk"]) for e in events] == [
        ("insert", {"deal_id": 7, "line_no": 1}),
        ("insert", {"deal_id": 7, "line_no": 2}),
        ("update", {"deal_id": 7, "line_no": 2}),
        ("delete", {"deal_id": 7, "line_no": 1}),
    ]
    update = events[2]
    assert update["changed"] is None  # left to readers, off the writer's path
    assert await value(
        conn,
        "SELECT crmflow.changed_columns(new_row, old_row) FROM crmflow.outbox WHERE op = 'update'",
    ) == ["qty"]
    assert update["old_row"]["qty"] == 1 and update["new_row"]["qty"] == 5
    assert events[3]["old_row"]["sku"] == "A" and events[3]["new_row"] is None


async def test_rollback_captures_nothing(conn: psycopg.AsyncConnection[Any]) -> None:
    await capture.watch(conn, "leads", all_rows=True)
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            await conn.execute("INSERT INTO leads (name) VALUES ('ghost')")
            raise RuntimeError("rollback")
    assert await outbox(conn) == []
    async with conn.transaction():
        await conn.execute("INSERT INTO leads (name) VALUES ('real')")
    assert len(await outbox(conn)) == 1


async def test_noop_update_is_not_captured_and_key_change_is_delete_insert(
    conn: psycopg.AsyncConnection[Any],
) -> None:
    await conn.execute("CREATE TABLE plain (code text PRIMARY KEY, label text)")
    await capture.watch(conn, "plain", all_rows=True)
    await conn.execute("INSERT INTO plain VALUES ('a', 'x')")
    await conn.execute("UPDATE plain SET label = 'x'")  # changes nothing
    await conn.execute("UPDATE plain SET code = 'b'")  # changes the key
    ops = [(e["op"], e["pk"]) for e in await outbox(conn)]
    assert ops == [("insert", {"code": "a"}), ("delete", {"code": "a"}), ("insert", {"code": "b"})]


async def test_bulk_insert_is_one_statement_many_events(conn: psycopg.AsyncConnection[Any]) -> None:
    await capture.watch(conn, "leads", all_rows=True)
    await conn.execute(
        "INSERT INTO leads (name, source)"
        " SELECT 'lead ' || i, 'import' FROM generate_series(1, 2000) i"
    )
    assert await value(conn, "SELECT count(*) FROM crmflow.outbox") == 2000
    assert await value(conn, "SELECT count(DISTINCT txid) FROM crmflow.outbox") == 1


async def test_depth_and_actor_come_from_the_engine(conn: psycopg.AsyncConnection[Any]) -> None:
    await capture.watch(conn, "leads", all_rows=True)
    async with conn.transaction():
        await conn.execute("SELECT crmflow.set_write_context(3, 'crmflow:execution:9')")
        await conn.execute("INSERT INTO leads (name) VALUES ('from an action')")
        await conn.execute("UPDATE leads SET name = 'again'")
    events = await outbox(conn)
    assert [(e["depth"], e["actor"]) for e in events] == [(3, "crmflow:execution:9")] * 2
    await conn.execute("DELETE FROM crmflow.outbox")
    # The context is signed for its transaction: it is gone after it.
    await conn.execute("INSERT INTO leads (name) VALUES ('a person')")
    [event] = await outbox(conn)
    assert (event["depth"], event["actor"]) == (0, "postgres")


@pytest.mark.parametrize(
    "forged",
    [
        "SELECT set_config('crmflow.depth', '99', true)",
        "SELECT set_config('crmflow.depth', 'not a number', true)",
        "SELECT set_config('crmflow.actor', 'crmflow:execution:1', true)",
        # a signature copied from another transaction does not carry over
        "SELECT set_config('crmflow.depth', '4', true), set_config('crmflow.actor', 'x', true),"
        " set_config('crmflow.context_sig', %(sig)s, true)",
    ],
)
async def test_a_session_cannot_set_its_own_write_context(
    conn: psycopg.AsyncConnection[Any], forged: str
) -> None:
    """SET crmflow.depth = '99' used to opt a writer's events out of automation ("loop
    stopped"); a forged actor passed them off as the engine's."""
    await capture.watch(conn, "leads", all_rows=True)
    async with conn.transaction():
        await conn.execute("SELECT crmflow.set_write_context(4, 'x')")
        sig = await value(conn, "SELECT current_setting('crmflow.context_sig')")
    async with conn.transaction():
        await conn.execute(forged, {"sig": sig})
        await conn.execute("INSERT INTO leads (name) VALUES ('forged')")
    [event] = await outbox(conn)
    assert (event["depth"], event["actor"]) == (0, "postgres")


async def _notifications(db_url: str, writes: int, listening: bool) -> int:
    """How many NOTIFYs the matcher's channel gets for ``writes`` single-row commits."""
    async with (
        await db.connect(db_url, autocommit=True) as listener,
        await db.connect(db_url, autocommit=True) as writer,
    ):
        await writer.execute("UPDATE crmflow.matcher_state SET listening = %s", [listening])
        await listener.execute("LISTEN crmflow_outbox")
        for i in range(writes):
            await writer.execute("INSERT INTO leads (name) VALUES (%s)", [f"n{i}"])
        received = 0
        try:
            async for _ in listener.notifies(timeout=0.5):
                received += 1
        except TimeoutError:
            pass
        return received


async def test_writers_notify_only_an_idle_listening_matcher(
    conn: psycopg.AsyncConnection[Any], db_url: str
) -> None:
    await capture.watch(conn, "leads", all_rows=True)
    # A busy matcher (not listening): writers never NOTIFY.
    assert await _notifications(db_url, 20, listening=False) == 0
    # An idle one: a hint per transaction at most (NOTIFY folds duplicates within one).
    assert 1 <= await _notifications(db_url, 5, listening=True) <= 5


async def test_unwatch_removes_capture(conn: psycopg.AsyncConnection[Any]) -> None:
    await capture.watch(conn, "leads", all_rows=True)
    await capture.unwatch(conn, "leads")
    await conn.execute("INSERT INTO leads (name) VALUES ('after')")
    assert await outbox(conn) == []
    assert (
        await value(
            conn,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'leads'::regclass "
            "AND tgname LIKE 'tg_crmflow%%'",
        )
        == 0
    )
    with pytest.raises(capture.CaptureError, match="not watched"):
        await capture.unwatch(conn, "leads")


async def test_unwatch_refuses_while_active_workflows_use_it(
    conn: psycopg.AsyncConnection[Any],
) -> None:
    from tests.helpers import SEED_QUALIFY, apply

    await capture.watch(conn, "leads", all_rows=True)
    await apply(conn, SEED_QUALIFY)
    with pytest.raises(capture.CaptureError, match="active workflows use 'lead'"):
        await capture.unwatch(conn, "leads")
    await capture.unwatch(conn, "leads", force=True)
    assert await value(conn, "SELECT status FROM crmflow.workflows") == "paused"


@pytest.mark.parametrize(
    ("ddl", "table", "message"),
    [
        ("CREATE TABLE nokey (a int)", "nokey", "no primary key"),
        ("CREATE VIEW v AS SELECT 1 AS a", "v", "not a table"),
        ("", "does_not_exist", "no table named"),
        ("", "leads; DROP TABLE leads", "no table named"),
    ],
)
async def test_watch_refuses_what_it_cannot_capture(
    conn: psycopg.AsyncConnection[Any], ddl: str, table: str, message: str
) -> None:
    if ddl:
        await conn.execute(ddl)
    with pytest.raises(capture.CaptureError, match=message):
        await capture.watch(conn, table, all_rows=True)
    assert await value(conn, "SELECT count(*) FROM leads") == 0  # nothing dropped


async def test_hostile_names_are_quoted(conn: psycopg.AsyncConnection[Any]) -> None:
    # A key column carrying a dollar-quote tag: the generated bodies are quoted as
    # literals (format %L), never dollar-quoted around names.
    await conn.execute(
        'CREATE TABLE tagged ("k$crmflow_capture$; DROP TABLE leads; --" int PRIMARY KEY)'
    )
    await capture.watch(conn, "tagged", all_rows=True)
    await conn.execute("INSERT INTO tagged VALUES (7)")
    [event] = await outbox(conn)
    assert event["pk"] == {"k$crmflow_capture$; DROP TABLE leads; --": 7}
    await conn.execute("DELETE FROM crmflow.outbox")
    await conn.execute('CREATE TABLE "x""; DROP TABLE leads; --" (id int PRIMARY KEY, v text)')
    await capture.watch(conn, '"x""; DROP TABLE leads; --"', entity="weird", all_rows=True)
    await conn.execute("""INSERT INTO "x""; DROP TABLE leads; --" VALUES (1, 'ok')""")
    assert len(await outbox(conn)) == 1
    assert await value(conn, "SELECT to_regclass('public.leads') IS NOT NULL") is True


async def test_entity_name_belongs_to_one_table(conn: psycopg.AsyncConnection[Any]) -> None:
    await capture.watch(conn, "leads", all_rows=True)
    with pytest.raises(capture.CaptureError, match="already used"):
        await capture.watch(conn, "deals", entity="lead", all_rows=True)
    with pytest.raises(capture.CaptureError, match="already watched as 'lead'"):
        await capture.watch(conn, "leads", entity="prospect", all_rows=True)
    await capture.watch(conn, "leads", all_rows=True)  # idempotent


async def test_derived_fields_are_checked(conn: psycopg.AsyncConnection[Any]) -> None:
    await capture.watch(
        conn,
        "deals",
        derived={"idle_days": "current_date - CAST(last_activity_at AS date)"},
        all_rows=True,
    )
    rows = await capture.list_watched(conn)
    [deal] = [r for r in rows if r["entity_type"] == "deal"]
    assert deal["derived_fields"] == {"idle_days": "current_date - CAST(last_activity_at AS date)"}
    for bad in ("(SELECT 1)", "pg_sleep(1)", "nope + 1", "amount::regclass"):
        with pytest.raises(capture.CaptureError):
            await capture.declare_derived(conn, "deal", "bad", bad)
