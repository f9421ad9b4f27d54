"""Capture keeps only the rows some active workflow could match (engine/prefilter.py,
crmflow.capture_filter in sql/install/capture.sql; docs/design.md, "Capture keeps what can match").

A row no active workflow can match leaves no outbox row; a matching one does; the filter
follows every activation, pause, edit and archive in that transaction; it never drops a
row the matcher would have enrolled (a differential test on random workflows and row
pairs, NULLs included); and no matching write committed after an activation is lost
while workflows are activated, edited and paused under concurrent writers.
"""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from engine import capture, db, workflows
from engine.config import Settings
from engine.matcher import Matcher
from engine.model import DefinitionError
from tests.helpers import apply, fetch, value
from tests.match.test_conditions_property import (  # noqa: F401  (prop_db is a fixture)
    insert,
    prop_db,
    row_values,
    trees,
)

HOT = {
    "name": "Hot website leads",
    "trigger": {"type": "entity_created", "entity_type": "lead"},
    "conditions": [
        {"field": "source", "operator": "equals", "value": "website_form"},
        {"field": "score", "operator": "greater_than", "value": 50},
    ],
    "actions": [{"type": "send_notification", "message": "hot", "recipient": 3}],
}
WON = {
    "name": "Deal won",
    "trigger": {"type": "field_updated", "entity_type": "deal", "field": "status", "to": "won"},
    "actions": [{"type": "send_notification", "message": "won", "recipient": 3}],
}


async def captured(conn: psycopg.AsyncConnection[Any], entity: str = "lead") -> list[Any]:
    rows = await fetch(
        conn,
        "SELECT op, coalesce(new_row, old_row) ->> 'name' AS name FROM crmflow.outbox"
        " WHERE entity_type = %s ORDER BY id",
        entity,
    )
    return [(r["op"], r["name"]) for r in rows]


async def body(conn: psycopg.AsyncConnection[Any], function: str) -> str:
    """A capture function's body, its epoch left out (a regeneration that rolls back has
    used a number of the sequence all the same)."""
    text = str(await value(conn, "SELECT prosrc FROM pg_proc WHERE proname = %s", function))
    return re.sub(r"__epoch'\)\) = [0-9]+", "__epoch')) = E", text)


async def test_rows_no_workflow_can_match_leave_no_outbox_row(
    crm: psycopg.AsyncConnection[Any],
) -> None:
    # No workflow at all: nothing is captured, whatever the operation.
    await crm.execute("INSERT INTO leads (name, source, score) VALUES ('a', 'website_form', 90)")
    await crm.execute("UPDATE leads SET score = 10")
    await crm.execute("DELETE FROM leads")
    assert await captured(crm) == []
    assert "WHERE" not in await body(crm, "tg_lead__insert")  # no filter: nothing kept

    await apply(crm, HOT)
    await apply(crm, WON)
    await crm.execute(
        "INSERT INTO leads (name, source, score) VALUES ('hot', 'website_form', 90),"
        " ('cold', 'website_form', 10), ('referral', 'referral', 90), ('null', NULL, NULL),"
        " ('null score', 'website_form', NULL)"
    )
    await crm.execute("UPDATE leads SET score = 99")  # no workflow on lead updates
    await crm.execute("DELETE FROM leads WHERE name = 'cold'")  # nor deletes
    assert await captured(crm) == [("insert", "hot")]

    await crm.execute("INSERT INTO deals (name, amount, status) VALUES ('d1', 10, 'open')")
    await crm.execute("INSERT INTO deals (name, amount, status) VALUES ('d2', 10, 'open')")
    await crm.execute("UPDATE deals SET amount = 20")  # status unchanged
    await crm.execute("UPDATE deals SET status = 'lost' WHERE name = 'd2'")  # not to won
    await crm.execute("UPDATE deals SET status = 'won' WHERE name = 'd1'")
    assert await captured(crm, "deal") == [("update", "d1")]


async def test_matching_rows_enroll_as_before(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher
) -> None:
    wf = await apply(crm, HOT)
    await crm.execute(
        "INSERT INTO leads (name, source, score) VALUES ('hot', 'website_form', 90),"
        " ('cold', 'website_form', 10)"
    )
    result = await matcher.drain()
    assert (result.claimed, result.enrolled) == (1, 1)
    [execution] = await fetch(crm, "SELECT workflow_id, entity_pk FROM crmflow.executions")
    assert execution == {"workflow_id": wf, "entity_pk": {"id": 1}}


async def test_unknown_conditions_keep_the_row(crm: psycopg.AsyncConnection[Any]) -> None:
    """What cannot be decided on the row's JSON alone is kept: text operators (case
    folding is the column's collation's), recency (the clock moves), sql conditions."""
    await apply(
        crm,
        {
            **HOT,
            "conditions": {
                "any": [
                    {"field": "name", "operator": "contains", "value": "acme"},
                    {"sql": "score * 2 > 100"},
                ]
            },
        },
    )
    await crm.execute("INSERT INTO leads (name, score) VALUES ('Zed', 1), ('ACME Corp', 1)")
    assert await captured(crm) == [("insert", "Zed"), ("insert", "ACME Corp")]


async def test_activation_pause_edit_archive_regenerate_in_their_transaction(
    crm: psycopg.AsyncConnection[Any],
) -> None:
    none = await body(crm, "tg_lead__insert")
    # Created active: the capture changes in the same transaction, and not if it rolls back.
    with pytest.raises(RuntimeError):
        async with crm.transaction():
            await apply(crm, HOT)
            assert "website_form" in await body(crm, "tg_lead__insert")
            raise RuntimeError("roll back")
    assert await body(crm, "tg_lead__insert") == none
    wf = await apply(crm, {**HOT, "status": "paused"})
    assert await body(crm, "tg_lead__insert") == none  # paused: nothing to keep

    async with crm.transaction():
        await workflows.set_status(crm, wf, "active")
        assert "website_form" in await body(crm, "tg_lead__insert")
    await crm.execute("INSERT INTO leads (name, source, score) VALUES ('a', 'website_form', 90)")

    # An edit: the new version's filter, in the edit's transaction.
    async with crm.transaction():
        await workflows.update(
            crm,
            wf,
            {**HOT, "conditions": [{"field": "source", "operator": "equals", "value": "event"}]},
        )
        assert "website_form" not in await body(crm, "tg_lead__insert")
    await crm.execute(
        "INSERT INTO leads (name, source, score) VALUES ('b', 'website_form', 90),"
        " ('c', 'event', 1)"
    )

    async with crm.transaction():
        await workflows.set_status(crm, wf, "paused")
        assert "'\"event\"'" not in await body(crm, "tg_lead__insert")
    await crm.execute("INSERT INTO leads (name, source) VALUES ('d', 'event')")

    await workflows.set_status(crm, wf, "active")
    await crm.execute("INSERT INTO leads (name, source) VALUES ('e', 'event')")
    await workflows.set_status(crm, wf, "archived")
    await crm.execute("INSERT INTO leads (name, source) VALUES ('f', 'event')")
    assert await captured(crm) == [("insert", "a"), ("insert", "c"), ("insert", "e")]
    assert await body(crm, "tg_lead__insert") == none


async def test_a_rolled_back_change_keeps_rows_until_the_heal(
    crm: psycopg.AsyncConnection[Any],
) -> None:
    """A regeneration that rolls back has bumped the epoch all the same (a sequence): the
    bodies in place keep every row (never fewer) until capture's heal makes them anew."""
    await apply(crm, HOT)
    with pytest.raises(RuntimeError):
        async with crm.transaction():
            await apply(crm, {**HOT, "name": "other", "conditions": []})
            raise RuntimeError("roll back")
    await crm.execute("INSERT INTO leads (name, source) VALUES ('kept', 'referral')")
    assert await captured(crm) == [("insert", "kept")]
    changes = await capture.heal(crm)
    assert [c["entity_type"] for c in changes] == ["lead"]
    await crm.execute("INSERT INTO leads (name, source) VALUES ('dropped', 'referral')")
    assert await captured(crm) == [("insert", "kept")]
    assert await capture.heal(crm) == []


async def test_sql_changes_to_workflows_regenerate_at_commit(
    crm: psycopg.AsyncConnection[Any],
) -> None:
    """Whatever changes a workflow (here plain SQL, as `unwatch --force` does) has
    capture follow before its transaction commits (the deferred triggers)."""
    wf = await apply(crm, {**HOT, "status": "paused"})
    await crm.execute("UPDATE crmflow.workflows SET status = 'active' WHERE id = %s", [wf])
    await crm.execute("INSERT INTO leads (name, source, score) VALUES ('a', 'website_form', 90)")
    await crm.execute("UPDATE crmflow.workflows SET status = 'paused' WHERE id = %s", [wf])
    await crm.execute("INSERT INTO leads (name, source, score) VALUES ('b', 'website_form', 90)")
    assert await captured(crm) == [("insert", "a")]


async def test_broken_workflows_keep_their_rows_for_replay(
    crm: psycopg.AsyncConnection[Any],
) -> None:
    """A column renamed under an active workflow: the filter no longer finds the key in
    the rows, so it keeps them (replay-events may match them once it is repaired)."""
    await apply(crm, HOT)
    await crm.execute("ALTER TABLE leads RENAME COLUMN score TO points")
    await crm.execute("INSERT INTO leads (name, source, points) VALUES ('a', 'website_form', 1)")
    await crm.execute("INSERT INTO leads (name, source, points) VALUES ('b', 'referral', 1)")
    assert await captured(crm) == [("insert", "a")]


async def test_all_rows_keeps_every_row(crm: psycopg.AsyncConnection[Any]) -> None:
    await capture.watch(crm, "leads", all_rows=True)
    await crm.execute("INSERT INTO leads (name) VALUES ('a')")
    await capture.watch(crm, "leads", all_rows=False)
    await crm.execute("INSERT INTO leads (name) VALUES ('b')")
    assert await captured(crm) == [("insert", "a")]


async def test_a_dropped_epoch_sequence_fails_no_write(crm: psycopg.AsyncConnection[Any]) -> None:
    await apply(crm, HOT)
    await crm.execute("DROP SEQUENCE crmflow.tg_lead__epoch")
    await crm.execute("INSERT INTO leads (name, source) VALUES ('kept', 'referral')")
    assert await captured(crm) == [("insert", "kept")]  # every row kept meanwhile
    assert [c["entity_type"] for c in await capture.heal(crm)] == ["lead"]
    await crm.execute("INSERT INTO leads (name, source) VALUES ('dropped', 'referral')")
    assert await captured(crm) == [("insert", "kept")]


async def test_a_failing_filter_cannot_exist(crm: psycopg.AsyncConnection[Any]) -> None:
    """Whatever a stored filter tree holds (the runtime role can write the table), the
    SQL rendered from it reads JSON only: writes never fail because of it."""
    wf = await apply(crm, HOT)
    nasty = {
        "insert": {
            "and": [
                {
                    "test": {
                        "row": "n",
                        "key": "x'); DROP TABLE leads; --",
                        "type": "number",
                        "op": "gt",
                        "value": "not a number",
                    }
                },
                {"test": {"row": "q", "key": 1, "type": "?", "op": "eq"}},
                {"changed": ["not", "a", "key"]},
                {
                    "test": {
                        "row": "n",
                        "key": "score",
                        "type": "string",
                        "op": "lt",
                        "value": "%s%n\\'",
                    }
                },
                {"not": {"or": "nope"}},
                {"unknown": 1},
                [1, 2],
            ]
        }
    }
    await crm.execute(
        "UPDATE crmflow.workflow_versions SET capture_filter = %s WHERE workflow_id = %s",
        [psycopg.types.json.Jsonb(nasty), wf],
    )
    await crm.execute("INSERT INTO leads (name, score) VALUES ('a', 1), ('b', NULL)")
    assert await value(crm, "SELECT count(*) FROM leads") == 2


# ───────────────────────────── differential ─────────────────────────────

FIELDS = ["t", "n", "i", "b", "ts", "d", "j", "tags", "e"]
TO_VALUES = {
    "t": st.sampled_from(["Acme", "acme", "", "beta"]),
    "i": st.integers(-5, 5),
    "n": st.sampled_from([0, 1.5, 10, -1]),
    "b": st.booleans(),
    "e": st.sampled_from(["sad", "ok", "happy"]),
}


@st.composite
def workflow_definitions(draw: Any) -> dict[str, Any]:
    kind = draw(
        st.sampled_from(["entity_created", "entity_updated", "field_updated", "entity_deleted"])
    )
    trigger: dict[str, Any] = {"type": kind, "entity_type": "prop"}
    if kind == "field_updated":
        if draw(st.booleans()):
            trigger["fields"] = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3))
        else:
            field = draw(st.sampled_from(FIELDS))
            trigger["field"] = field
            if field in TO_VALUES:
                for key in ("from", "to"):
                    if draw(st.booleans()):
                        trigger[key] = draw(TO_VALUES[field])
    definition = {
        "name": "random",
        "trigger": trigger,
        "conditions": draw(trees),
        "actions": [{"type": "send_notification", "message": "x", "recipient": 1}],
    }
    if kind != "entity_deleted" and draw(st.booleans()):
        definition["edge_triggered"] = True
    return definition


EVENTS = """
SELECT p.id, op.op,
       CASE WHEN op.op <> 'delete' THEN to_jsonb(p) END AS new_row,
       CASE op.op WHEN 'update' THEN to_jsonb(po) WHEN 'delete' THEN to_jsonb(p) END AS old_row
  FROM prop AS p
  LEFT JOIN prop_old AS po ON po.id = p.id
 CROSS JOIN (VALUES ('insert'), ('update'), ('delete')) AS op(op)
 WHERE op.op <> 'update' OR (po.id IS NOT NULL AND to_jsonb(p) IS DISTINCT FROM to_jsonb(po))
"""


async def compile_one(url: str, definition: dict[str, Any]) -> Any:
    async with await db.connect(url, autocommit=True) as conn:
        try:
            return await workflows.compile_workflow(conn, definition)
        except DefinitionError:
            return None


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(st.tuples(row_values, st.none() | row_values), min_size=1, max_size=12),
    definitions=st.lists(workflow_definitions(), min_size=1, max_size=4),
)
def test_the_filter_never_drops_a_row_the_matcher_would_enroll(
    prop_db: Any,  # noqa: F811  (the fixture imported above)
    db_url: str,
    rows: list[Any],
    definitions: list[dict[str, Any]],
) -> None:
    conn, _ = prop_db
    conn.execute("TRUNCATE prop, prop_old")
    insert(conn, "prop", [(i, new) for i, (new, _) in enumerate(rows)])
    insert(conn, "prop_old", [(i, old) for i, (_, old) in enumerate(rows) if old is not None])
    compiled = [c for d in definitions if (c := asyncio.run(compile_one(db_url, d)))]
    for c in compiled:
        # The filter of each operation, rendered as the capture functions render it.
        rendered = {}
        for op, (new, old) in {
            "insert": ("ev.new_row", None),
            "update": ("ev.new_row", "ev.old_row"),
            "delete": ("ev.old_row", None),
        }.items():
            node = c.capture_filter.get(op)
            rendered[op] = (
                "false"
                if node is None
                else conn.execute(
                    "SELECT crmflow.render_capture_filter(%s, %s, %s) AS f",
                    [psycopg.types.json.Jsonb(node), new, old],
                ).fetchone()["f"]
            )
        query = sql.SQL(
            "SELECT ev.id, ev.op, ev.new_row, ev.old_row, ({p}) AS matched,"
            " (CASE ev.op WHEN 'insert' THEN {i} WHEN 'update' THEN {u} ELSE {d} END) AS kept"
            "  FROM ({events}) AS ev"
            " CROSS JOIN LATERAL jsonb_populate_record(NULL::prop,"
            "                                          coalesce(ev.new_row, ev.old_row)) AS n"
            " CROSS JOIN LATERAL jsonb_populate_record(NULL::prop, ev.old_row) AS o"
        ).format(
            p=sql.SQL(c.predicate),
            i=sql.SQL(rendered["insert"]),
            u=sql.SQL(rendered["update"]),
            d=sql.SQL(rendered["delete"]),
            events=sql.SQL(EVENTS),
        )
        for r in conn.execute(query).fetchall():
            assert r["kept"] is True or r["matched"] is not True, (c.stored, c.capture_filter, r)


# ───────────────────────────── under concurrent writes ─────────────────────────────


async def test_no_matching_write_after_an_activation_is_lost_under_concurrent_writes(
    crm: psycopg.AsyncConnection[Any], db_url: str, settings: Settings, pool: Any
) -> None:
    """Writers insert leads all along (some in two statements with a pause between, so
    that transactions are in flight at every change) while a workflow is activated,
    edited to a wider condition, paused and activated again. Every write committed after
    an activation (by the matcher's rule: its transaction not visible in the activation's
    snapshot) and before the next change, that the version then current matches, was
    captured; the ones after the last activation all enroll (so their rows hold the
    column the edit started reading: the pruned columns follow the changes as the
    filter does). Writers never wait."""
    wf = await apply(
        crm,
        {
            **HOT,
            "status": "paused",
            "conditions": [{"field": "source", "operator": "equals", "value": "hot"}],
        },
    )
    stop = asyncio.Event()
    writes: list[tuple[int, str, str]] = []  # (lead id, source, txid), committed
    slowest = [0.0]

    async def writer(k: int) -> None:
        rng = random.Random(k)
        async with await db.connect(db_url) as w:
            n = 0
            while not stop.is_set():
                n += 1
                started = asyncio.get_running_loop().time()
                mine = []
                for _ in range(rng.choice([1, 1, 2])):
                    source = rng.choice(["hot", "warm", "cold"])
                    row = await (
                        await w.execute(
                            "INSERT INTO leads (name, source, country) VALUES (%s, %s, 'UK')"
                            " RETURNING id, pg_current_xact_id()::text AS txid",
                            [f"w{k}-{n}", source],
                        )
                    ).fetchone()
                    mine.append((row["id"], source, row["txid"]))
                    if rng.random() < 0.5:
                        await asyncio.sleep(rng.uniform(0, 0.02))
                await w.commit()
                slowest[0] = max(slowest[0], asyncio.get_running_loop().time() - started)
                writes.extend(mine)

    async def snapshot() -> str:
        return str(await value(crm, "SELECT pg_current_snapshot()::text"))

    async def active_since() -> str:
        return str(
            await value(crm, "SELECT active_since::text FROM crmflow.workflows WHERE id = %s", wf)
        )

    tasks = [asyncio.create_task(writer(k)) for k in range(4)]
    await asyncio.sleep(0.3)
    phases = []  # (from snapshot: writes not visible in it, to snapshot: visible in it, sources)
    await workflows.set_status(crm, wf, "active")
    start = await active_since()
    await asyncio.sleep(0.5)
    before_edit = await snapshot()
    phases.append((start, before_edit, ("hot",)))
    # The edit reads a column the first version did not (capture pruned it until then).
    await workflows.update(
        crm,
        wf,
        {
            **HOT,
            "conditions": [
                {"field": "source", "operator": "in", "value": ["hot", "warm"]},
                {"field": "country", "operator": "is_not_empty"},
            ],
        },
    )
    after_edit = await snapshot()
    await asyncio.sleep(0.5)
    phases.append((after_edit, await snapshot(), ("hot", "warm")))
    await workflows.set_status(crm, wf, "paused")
    await asyncio.sleep(0.3)
    await workflows.set_status(crm, wf, "active")
    start = await active_since()
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*tasks)
    end = await snapshot()
    phases.append((start, end, ("hot", "warm")))

    kept = {
        r["id"]
        for r in await fetch(crm, "SELECT (new_row ->> 'id')::int AS id FROM crmflow.outbox")
    }
    checked = 0
    for since, until, sources in phases:
        for lead, source, txid in writes:
            if source not in sources:
                continue
            after = not await value(
                crm, "SELECT pg_visible_in_snapshot(%s::xid8, %s::pg_snapshot)", txid, since
            )
            before = await value(
                crm, "SELECT pg_visible_in_snapshot(%s::xid8, %s::pg_snapshot)", txid, until
            )
            if after and before:
                checked += 1
                assert lead in kept, (lead, source, txid, since, until)
    assert checked > 20
    assert slowest[0] < 1.0  # writers never waited for a workflow change

    # The writes after the last activation enroll it.
    await Matcher(pool, settings).drain()
    enrolled = {
        r["id"]
        for r in await fetch(
            crm,
            "SELECT (entity_pk ->> 'id')::int AS id FROM crmflow.executions WHERE workflow_id = %s",
            wf,
        )
    }
    for lead, source, txid in writes:
        after = not await value(
            crm, "SELECT pg_visible_in_snapshot(%s::xid8, %s::pg_snapshot)", txid, start
        )
        if after and source in ("hot", "warm"):
            assert lead in enrolled, (lead, source, txid)


def test_watch_takes_all_rows_or_filtered() -> None:
    from engine.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["watch", "leads"]).all_rows is None  # the table's choice stays
    assert parser.parse_args(["watch", "leads", "--all-rows"]).all_rows is True
    assert parser.parse_args(["watch", "leads", "--filtered"]).all_rows is False
    with pytest.raises(SystemExit):
        parser.parse_args(["watch", "leads", "--all-rows", "--filtered"])


async def test_filtered_capture_with_colliding_column_names(
    conn: psycopg.AsyncConnection[Any],
) -> None:
    """The filtered bodies read the row's JSON by quoted keys: columns named like the
    capture code's aliases, or with quotes and spaces, work as any other."""
    from tests.capture.test_capture_hostile import COLLIDING

    columns = ", ".join(f'"{c}" int' for c in COLLIDING)
    await conn.execute(
        f'CREATE TABLE points (id serial PRIMARY KEY, {columns}, "it\'s a b" text, label text)'
    )
    await capture.watch(conn, "points")
    definition = {
        "trigger": {"type": "entity_created", "entity_type": "point"},
        "actions": [{"type": "update_field", "field": "label", "value": "x"}],
        "status": "active",
    }
    for name, trigger, conditions in (
        ("n big", "entity_created", [{"field": "n", "operator": "greater_than", "value": 5}]),
        ("quoted", "entity_deleted", [{"field": "it's a b", "operator": "equals", "value": "q"}]),
        ("o moved", "field_updated", []),
    ):
        await workflows.apply(
            conn,
            {
                **definition,
                "name": name,
                "trigger": {"type": trigger, "entity_type": "point"}
                | ({"field": "o"} if trigger == "field_updated" else {}),
                "conditions": conditions,
            },
        )
    await conn.execute(
        "INSERT INTO points (n, o, j, r, k, \"it's a b\") VALUES (1, 1, 1, 1, 1, 'q'),"
        " (9, 1, 1, 1, 1, 'z')"
    )
    await conn.execute("UPDATE points SET n = n + 1")  # o unchanged
    await conn.execute("UPDATE points SET o = 2 WHERE id = 1")
    await conn.execute("DELETE FROM points")
    got = await fetch(
        conn, "SELECT op, pk FROM crmflow.outbox WHERE entity_type = 'point' ORDER BY id"
    )
    assert [(e["op"], e["pk"]["id"]) for e in got] == [("insert", 2), ("update", 1), ("delete", 1)]


async def test_a_key_change_is_filtered_as_the_delete_and_insert_it_is_captured_as(
    crm: psycopg.AsyncConnection[Any],
) -> None:
    await capture.watch(crm, "leads", all_rows=True)
    await crm.execute(
        "INSERT INTO leads (id, name, source) VALUES (1, 'x', 'x'), (2, 'y', 'y'), (3, 'z', 'z')"
    )
    await capture.watch(crm, "leads", all_rows=False)
    for name, kind, source in (("gone", "entity_deleted", "x"), ("new", "entity_created", "y")):
        await apply(
            crm,
            {
                **HOT,
                "name": name,
                "trigger": {"type": kind, "entity_type": "lead"},
                "conditions": [{"field": "source", "operator": "equals", "value": source}],
            },
        )
    await crm.execute("DELETE FROM crmflow.outbox")
    await crm.execute("UPDATE leads SET id = id + 100")
    assert await captured(crm) == [("delete", "x"), ("insert", "y")]
