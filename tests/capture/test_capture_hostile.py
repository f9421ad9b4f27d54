"""Capture against a hostile host schema: column names that collide with the capture
code's own names, key renames, type changes, partitions (direct writes, created and
attached later), renamed and recreated tables. A writer never fails because of
crmflow, and nothing committed is lost (docs/operations.md, "Schema changes")."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from engine import capture
from tests.helpers import fetch, value


async def events(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    rows = await fetch(
        conn,
        "SELECT entity_type, op, pk, new_row, old_row,"
        " crmflow.changed_columns(new_row, old_row) AS changed FROM crmflow.outbox ORDER BY id",
    )
    await conn.execute("DELETE FROM crmflow.outbox")
    return rows


async def without_event_trigger(conn: psycopg.AsyncConnection[Any]) -> None:
    """As installed by a non-superuser: only the worker's heal repairs capture."""
    await conn.execute("DROP EVENT TRIGGER IF EXISTS crmflow_heal_capture")


# Names the capture code uses or used itself: transition-table aliases, plpgsql
# variables, the aliases of its sub-queries.
COLLIDING = [
    "n",
    "o",
    "j",
    "k",
    "r",
    "t",
    "c",
    "e",
    "write_depth",
    "write_actor",
    "tg_relid",
    "new_rows",
    "old_rows",
    "found",
    "op",
    "pk",
    "changed",
    "part",
]


async def test_column_names_cannot_collide_with_capture(conn: psycopg.AsyncConnection[Any]) -> None:
    columns = ", ".join(f'"{c}" int' for c in COLLIDING)
    await conn.execute(f"CREATE TABLE points (id serial PRIMARY KEY, {columns}, label text)")
    await capture.watch(conn, "points", all_rows=True)
    await conn.execute("INSERT INTO points (n, o, label) VALUES (1, 2, 'a'), (3, 4, 'b')")
    await conn.execute("UPDATE points SET n = n + 10, write_depth = 5")
    await conn.execute("DELETE FROM points WHERE id = 1")
    got = await events(conn)
    assert [(e["op"], e["pk"]) for e in got] == [
        ("insert", {"id": 1}),
        ("insert", {"id": 2}),
        ("update", {"id": 1}),
        ("update", {"id": 2}),
        ("delete", {"id": 1}),
    ]
    assert got[0]["new_row"]["n"] == 1 and got[0]["new_row"]["label"] == "a"
    assert got[2]["changed"] == ["n", "write_depth"]
    assert got[2]["old_row"]["n"] == 1 and got[2]["new_row"]["n"] == 11
    assert got[4]["old_row"]["o"] == 2


async def test_adding_column_o_to_a_watched_table(conn: psycopg.AsyncConnection[Any]) -> None:
    await capture.watch(conn, "leads", all_rows=True)
    await conn.execute("ALTER TABLE leads ADD COLUMN o integer, ADD COLUMN n text")
    await conn.execute("INSERT INTO leads (name, o) VALUES ('Ann', 1)")
    await conn.execute("UPDATE leads SET o = 2, n = 'x'")
    got = await events(conn)
    assert [e["op"] for e in got] == ["insert", "update"]
    assert {"n", "o"} <= set(got[1]["changed"])


@pytest.mark.parametrize("event_trigger", [True, False], ids=["ddl-trigger", "worker-heal"])
async def test_primary_key_rename_never_fails_a_write(
    conn: psycopg.AsyncConnection[Any], event_trigger: bool
) -> None:
    if not event_trigger:
        await without_event_trigger(conn)
    await conn.execute("CREATE TABLE gadgets (id int PRIMARY KEY, v text)")
    await capture.watch(conn, "gadgets", all_rows=True)
    await conn.execute("INSERT INTO gadgets VALUES (1, 'a'), (2, 'b')")
    await events(conn)
    await conn.execute("ALTER TABLE gadgets RENAME COLUMN id TO gadget_id")
    # Before any heal: every write works, keys come from the catalog.
    await conn.execute("DELETE FROM gadgets WHERE gadget_id = 99")  # matches nothing
    await conn.execute("INSERT INTO gadgets VALUES (3, 'c')")
    await conn.execute("UPDATE gadgets SET v = v || '!' WHERE gadget_id <= 2")
    await conn.execute("DELETE FROM gadgets WHERE gadget_id = 3")
    got = await events(conn)
    assert [(e["op"], e["pk"]) for e in got] == [
        ("insert", {"gadget_id": 3}),
        ("update", {"gadget_id": 1}),
        ("update", {"gadget_id": 2}),
        ("delete", {"gadget_id": 3}),
    ]
    assert got[1]["changed"] == ["v"]
    changes = await capture.heal(conn)
    stored = await value(
        conn, "SELECT pk_columns FROM crmflow.watched_tables WHERE entity_type = 'gadget'"
    )
    assert stored == ["gadget_id"]
    if not event_trigger:
        assert {"entity_type": "gadget", "change": "primary key is now (gadget_id)"} in changes
    assert await capture.heal(conn) == []  # nothing left to do: no needless regeneration
    await conn.execute("UPDATE gadgets SET v = 'z' WHERE gadget_id = 1")
    [event] = await events(conn)
    assert event["pk"] == {"gadget_id": 1}


async def test_key_type_change_and_composite_key(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute("CREATE TABLE lines (deal int, line int, qty int, PRIMARY KEY (deal, line))")
    await capture.watch(conn, "lines", all_rows=True)
    await conn.execute("ALTER TABLE lines ALTER COLUMN line TYPE text")
    await conn.execute("INSERT INTO lines VALUES (1, 'x', 2)")
    await conn.execute("UPDATE lines SET qty = 3")
    got = await events(conn)
    assert [(e["op"], e["pk"]) for e in got] == [
        ("insert", {"deal": 1, "line": "x"}),
        ("update", {"deal": 1, "line": "x"}),
    ]


async def test_dropped_primary_key_still_captures(conn: psycopg.AsyncConnection[Any]) -> None:
    await without_event_trigger(conn)
    await conn.execute("CREATE TABLE loose (id int PRIMARY KEY, v int)")
    await capture.watch(conn, "loose", all_rows=True)
    await conn.execute("ALTER TABLE loose DROP CONSTRAINT loose_pkey, DROP COLUMN id")
    await conn.execute("INSERT INTO loose VALUES (1)")
    await conn.execute("UPDATE loose SET v = 2")
    got = await events(conn)
    assert [e["op"] for e in got] == ["insert", "delete", "insert"]  # no key, no pairing
    assert {"entity_type": "loose", "change": "no primary key"} in await capture.heal(conn)


@pytest.mark.parametrize("event_trigger", [True, False], ids=["ddl-trigger", "worker-heal"])
async def test_partitions_present_created_and_attached_later(
    conn: psycopg.AsyncConnection[Any], event_trigger: bool
) -> None:
    if not event_trigger:
        await without_event_trigger(conn)
    await conn.execute(
        "CREATE TABLE events (id int, region text, v int, PRIMARY KEY (id, region))"
        " PARTITION BY LIST (region);"
        "CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu')"
    )
    await capture.watch(conn, "events", entity="event_row", all_rows=True)
    await conn.execute("INSERT INTO events VALUES (1, 'eu', 1)")  # through the parent
    await conn.execute("INSERT INTO events_eu VALUES (2, 'eu', 1)")  # straight in
    await conn.execute("UPDATE events_eu SET v = 5 WHERE id = 2")
    await conn.execute("UPDATE events SET v = 6 WHERE id = 1")
    got = await events(conn)
    assert [(e["op"], e["pk"]["id"]) for e in got] == [
        ("insert", 1),
        ("insert", 2),
        ("update", 2),
        ("update", 1),
    ]
    assert {e["entity_type"] for e in got} == {"event_row"}

    # A partition created later, one attached later, a sub-partitioned one.
    await conn.execute("CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us')")
    await conn.execute("CREATE TABLE events_br (LIKE events INCLUDING ALL)")
    await conn.execute("ALTER TABLE events ATTACH PARTITION events_br FOR VALUES IN ('br')")
    await conn.execute(
        "CREATE TABLE events_as PARTITION OF events FOR VALUES IN ('jp', 'in')"
        " PARTITION BY LIST (region);"
        "CREATE TABLE events_jp PARTITION OF events_as FOR VALUES IN ('jp')"
    )
    if not event_trigger:
        healed = {c["change"] for c in await capture.heal(conn)}
        assert {"events_us captured", "events_br captured", "events_jp captured"} <= healed
    for table, region in (("events_us", "us"), ("events_br", "br"), ("events_jp", "jp")):
        await conn.execute(f"INSERT INTO {table} VALUES (10, '{region}', 1)")
    await conn.execute("INSERT INTO events_as VALUES (11, 'jp', 1)")
    got = await events(conn)
    assert [(e["pk"]["region"], e["pk"]["id"]) for e in got] == [
        ("us", 10),
        ("br", 10),
        ("jp", 10),
        ("jp", 11),
    ]

    # Detached: no longer part of the entity.
    await conn.execute("ALTER TABLE events DETACH PARTITION events_br")
    if not event_trigger:
        await capture.heal(conn)
    await conn.execute("INSERT INTO events_br VALUES (12, 'xx', 1)")
    assert await events(conn) == []
    await capture.unwatch(conn, "events")
    await conn.execute("INSERT INTO events_eu VALUES (13, 'eu', 1)")
    assert await events(conn) == []
    assert (
        await value(
            conn,
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tg_crmflow__%%'"
            " AND tgrelid::regclass::text LIKE 'events%%'",
        )
        == 0
    )


async def test_renamed_table_is_followed(conn: psycopg.AsyncConnection[Any]) -> None:
    await without_event_trigger(conn)
    await conn.execute("CREATE TABLE gizmos (id int PRIMARY KEY)")
    await capture.watch(conn, "gizmos", all_rows=True)
    await conn.execute("ALTER TABLE gizmos RENAME TO widgets")
    await conn.execute("INSERT INTO widgets VALUES (1)")
    [event] = await events(conn)
    assert event["entity_type"] == "gizmo"
    assert await capture.heal(conn) == [
        {"entity_type": "gizmo", "change": "table is now public.widgets"}
    ]
    row = await fetch(
        conn, "SELECT table_name FROM crmflow.watched_tables WHERE entity_type = 'gizmo'"
    )
    assert row == [{"table_name": "widgets"}]
    # unwatch works by the new name, and by the entity name for a table that is gone.
    await capture.unwatch(conn, "widgets")
    await conn.execute("CREATE TABLE gone (id int PRIMARY KEY)")
    await capture.watch(conn, "gone", all_rows=True)
    await conn.execute("DROP TABLE gone")
    assert await capture.heal(conn) == [{"entity_type": "gone", "change": "table missing"}]
    await capture.unwatch(conn, "gone")


async def test_recreated_table_is_captured_again(conn: psycopg.AsyncConnection[Any]) -> None:
    await without_event_trigger(conn)
    await conn.execute("CREATE TABLE things (id int PRIMARY KEY)")
    await capture.watch(conn, "things", all_rows=True)
    await conn.execute("DROP TABLE things; CREATE TABLE things (id int PRIMARY KEY, x int)")
    assert await capture.heal(conn) == [{"entity_type": "thing", "change": "things captured"}]
    await conn.execute("INSERT INTO things VALUES (1, 2)")
    [event] = await events(conn)
    assert event["new_row"] == {"id": 1, "x": 2}


async def test_heal_does_not_wait_for_a_busy_table(
    conn: psycopg.AsyncConnection[Any], db_url: str
) -> None:
    """A writer holding its transaction open on a new partition: heal gives up at once
    instead of queueing every later writer behind its CREATE TRIGGER."""
    await without_event_trigger(conn)
    await conn.execute(
        "CREATE TABLE parts (id int, r text, PRIMARY KEY (id, r)) PARTITION BY LIST (r)"
    )
    await capture.watch(conn, "parts", all_rows=True)
    await conn.execute("CREATE TABLE parts_a PARTITION OF parts FOR VALUES IN ('a')")
    async with await psycopg.AsyncConnection.connect(db_url) as writer:
        await writer.execute("INSERT INTO parts VALUES (1, 'a')")  # open transaction
        changes = await capture.heal(conn, lock_timeout="50ms")
        assert {
            "entity_type": "part",
            "change": "parts_a is busy; its capture will be retried",
        } in changes
        await writer.commit()
    assert {"entity_type": "part", "change": "parts_a captured"} in await capture.heal(conn)


async def test_the_worker_heals_capture(
    conn: psycopg.AsyncConnection[Any], db_url: str, settings: Any
) -> None:
    """Without the DDL event trigger, a running worker notices a key rename and a new
    partition within a few heal rounds."""
    from engine.worker import running_worker
    from tests.helpers import wait_until

    await without_event_trigger(conn)
    await conn.execute(
        "CREATE TABLE shards (id int, r text, PRIMARY KEY (id, r)) PARTITION BY LIST (r)"
    )
    await capture.watch(conn, "shards", all_rows=True)
    quick = settings.model_copy(update={"capture_heal_interval": 0.2})
    async with running_worker(db_url, settings=quick, concurrency=1):
        await conn.execute("ALTER TABLE shards RENAME COLUMN id TO shard_id")
        await conn.execute("CREATE TABLE shards_a PARTITION OF shards FOR VALUES IN ('a')")

        async def healed() -> bool:
            return await value(
                conn,
                "SELECT pk_columns = '{shard_id,r}' AND EXISTS (SELECT 1 FROM pg_trigger"
                " WHERE tgrelid = 'shards_a'::regclass AND tgname = 'tg_crmflow__insert')"
                " FROM crmflow.watched_tables WHERE entity_type = 'shard'",
            )

        await wait_until(healed, timeout=10)


async def test_migrate_repairs_capture(conn: psycopg.AsyncConnection[Any]) -> None:
    """`crmflow migrate` heals too (it used to regenerate with the stored key)."""
    from engine.migrations import migrate

    await without_event_trigger(conn)
    await conn.execute("CREATE TABLE gadgets (id int PRIMARY KEY, v text)")
    await capture.watch(conn, "gadgets", all_rows=True)
    await conn.execute("ALTER TABLE gadgets RENAME COLUMN id TO gadget_id")
    await migrate(conn)
    stored = await value(
        conn, "SELECT pk_columns FROM crmflow.watched_tables WHERE entity_type = 'gadget'"
    )
    assert stored == ["gadget_id"]
    # migrate put the event trigger back (this role is a superuser), and it heals the
    # next rename in the DDL's own transaction.
    await conn.execute("ALTER TABLE gadgets RENAME COLUMN gadget_id TO gid")
    stored = await value(
        conn, "SELECT pk_columns FROM crmflow.watched_tables WHERE entity_type = 'gadget'"
    )
    assert stored == ["gid"]


async def test_unrelated_ddl_does_not_heal(conn: psycopg.AsyncConnection[Any]) -> None:
    """The event trigger leaves the CRM's other DDL alone: a table recreated under a
    watched name is only the worker's business."""
    await conn.execute("CREATE TABLE things (id int PRIMARY KEY)")
    await capture.watch(conn, "things", all_rows=True)
    await conn.execute("DROP TABLE things")
    await conn.execute("CREATE TABLE things (id int PRIMARY KEY)")
    await conn.execute("CREATE TEMP TABLE scratch (id int PRIMARY KEY)")
    assert (
        await value(conn, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'things'::regclass") == 0
    )
    assert await capture.heal(conn) == [{"entity_type": "thing", "change": "things captured"}]
