"""Column pruning (crmflow.capture_pruned_columns in sql/install/capture.sql; docs/design.md,
"Capture keeps what can match"): the rows capture stores hold the key and the columns
the active workflows, derived fields and capture demands read; whole rows for tables
watched with --all-columns, for entity_updated and entity_deleted workflows and for
definitions that read the captured rows whole (``event``). Templates still see the
whole entity (the executor reads it by key), and the matcher enrolls the same
executions on pruned rows as on whole ones (a differential test on random workflows and
row pairs, NULLs included)."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.types.json import Jsonb

from engine import capture, prefilter
from engine.matcher import Matcher
from tests.capture.test_capture_prefilter import EVENTS, compile_one, workflow_definitions
from tests.helpers import apply, drive, fetch, value
from tests.match.test_conditions_property import (  # noqa: F401  (prop_db is a fixture)
    insert,
    prop_db,
    row_values,
)

NEW_LEAD = {
    "name": "Call new leads",
    "trigger": {"type": "entity_created", "entity_type": "lead"},
    "conditions": [{"field": "source", "operator": "equals", "value": "website_form"}],
    # A template reading a column no definition names as a word: the executor reads
    # the entity by its key, so it renders all the same.
    "actions": [{"type": "create_task", "title": "call {{ entity['ph' ~ 'one'] }}"}],
}
INSERT_LEAD = (
    "INSERT INTO leads (name, email, phone, source, score, country)"
    " VALUES ('Ada', 'ada@x.test', '+44 1', 'website_form', 70, 'UK')"
)


async def stored(conn: psycopg.AsyncConnection[Any], entity: str = "lead") -> list[set[str]]:
    rows = await fetch(
        conn,
        "SELECT coalesce(new_row, old_row) AS r, old_row AS o FROM crmflow.outbox"
        " WHERE entity_type = %s ORDER BY id",
        entity,
    )
    out = []
    for r in rows:
        assert r["o"] is None or set(r["o"]) == set(r["r"])  # old and new pruned alike
        out.append(set(r["r"]))
    return out


async def test_capture_stores_the_key_and_the_columns_workflows_read(
    crm: psycopg.AsyncConnection[Any], matcher: Matcher, runner: Any
) -> None:
    await apply(crm, NEW_LEAD)
    await crm.execute(INSERT_LEAD)
    # id: the key; source: the condition; name and title: keys of the definition (whole
    # words, so kept too: the rule over-approximates).
    assert await stored(crm) == [{"id", "source", "name", "title"}]
    await matcher.drain()
    [ex] = await fetch(crm, "SELECT id FROM crmflow.executions")
    assert (await drive(runner, crm, ex["id"]))["status"] == "completed"
    assert await value(crm, "SELECT title FROM tasks") == "call +44 1"


async def test_derived_fields_and_demands_add_their_columns(
    crm: psycopg.AsyncConnection[Any],
) -> None:
    await capture.declare_derived(crm, "lead", "big", "employees > 100")
    await apply(
        crm,
        {
            **NEW_LEAD,
            "conditions": [{"field": "big", "operator": "equals", "value": True}],
        },
    )
    async with crm.transaction():
        await prefilter.set_capture_demand(crm, "test", "lead", ["insert"], ["country"])
    await crm.execute(INSERT_LEAD)
    assert await stored(crm) == [{"id", "name", "title", "employees", "country"}]
    async with crm.transaction():
        await prefilter.set_capture_demand(crm, "test", "lead", ["insert"], None)
    await crm.execute(INSERT_LEAD)
    assert len((await stored(crm))[-1]) == 16  # a demand of all columns: whole rows


@pytest.mark.parametrize(
    "definition",
    [
        {**NEW_LEAD, "trigger": {"type": "entity_updated", "entity_type": "lead"}},
        {**NEW_LEAD, "trigger": {"type": "entity_deleted", "entity_type": "lead"}},
        {**NEW_LEAD, "actions": [{"type": "create_task", "title": "{{ event.new }}"}]},
    ],
    ids=["entity_updated", "entity_deleted", "event"],
)
async def test_whole_rows_where_the_captured_row_is_read_whole(
    crm: psycopg.AsyncConnection[Any], definition: dict[str, Any]
) -> None:
    await apply(crm, {**definition, "conditions": []})
    await crm.execute(INSERT_LEAD)
    await crm.execute("UPDATE leads SET score = 1")
    await crm.execute("DELETE FROM leads")
    kept = await stored(crm)
    assert kept and all(len(k) == 16 for k in kept)


async def test_all_columns_opts_a_table_out(crm: psycopg.AsyncConnection[Any]) -> None:
    await apply(crm, NEW_LEAD)
    await capture.watch(crm, "leads", all_columns=True)
    await crm.execute(INSERT_LEAD)
    await capture.watch(crm, "leads", all_columns=None)  # the table's choice stays
    await crm.execute(INSERT_LEAD)
    await capture.watch(crm, "leads", all_columns=False)
    await crm.execute(INSERT_LEAD)
    assert [len(k) for k in await stored(crm)] == [16, 16, 4]


async def test_an_update_of_pruned_columns_only_is_not_captured(
    crm: psycopg.AsyncConnection[Any],
) -> None:
    await apply(
        crm,
        {
            "name": "Score moves",
            "trigger": {"type": "field_updated", "entity_type": "lead", "field": "score"},
            "actions": [{"type": "create_task", "title": "look"}],
        },
    )
    await crm.execute(INSERT_LEAD)
    await crm.execute("UPDATE leads SET phone = '+44 2'")  # not read: nothing to capture
    await crm.execute("UPDATE leads SET score = 71, phone = '+44 3'")
    rows = await fetch(crm, "SELECT new_row, old_row FROM crmflow.outbox ORDER BY id")
    assert [(r["old_row"]["score"], r["new_row"]["score"]) for r in rows] == [(70, 71)]
    assert set(rows[0]["new_row"]) == {"id", "name", "title", "score"}


def test_watch_takes_all_columns_or_pruned() -> None:
    from engine.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["watch", "leads"]).all_columns is None
    assert parser.parse_args(["watch", "leads", "--all-columns"]).all_columns is True
    assert parser.parse_args(["watch", "leads", "--pruned-columns"]).all_columns is False


# ───────────────────────────── differential ─────────────────────────────

ACTIVATE = """
WITH w AS (INSERT INTO crmflow.workflows (name, status) VALUES (%(name)s, 'active') RETURNING id)
INSERT INTO crmflow.workflow_versions
       (workflow_id, version, definition, definition_hash, trigger_type, entity_type,
        predicate, capture_filter)
SELECT w.id, 1, %(definition)s, %(hash)s, %(trigger_type)s, 'prop', %(predicate)s, %(filter)s
  FROM w
"""


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(st.tuples(row_values, st.none() | row_values), min_size=1, max_size=10),
    definitions=st.lists(workflow_definitions(), min_size=1, max_size=4),
)
def test_pruned_rows_enroll_what_whole_rows_enroll(
    prop_db: Any,  # noqa: F811  (the fixture imported above)
    db_url: str,
    rows: list[Any],
    definitions: list[dict[str, Any]],
) -> None:
    """The random workflows active together, the columns capture would leave out of
    their entity's rows: every workflow's predicate gives the same answer on the pruned
    rows as on the whole ones, and an update whose pruned rows are equal (capture
    leaves it out) is one no workflow matches."""
    conn, _ = prop_db
    conn.execute("TRUNCATE prop, prop_old")
    insert(conn, "prop", [(i, new) for i, (new, _) in enumerate(rows)])
    insert(conn, "prop_old", [(i, old) for i, (_, old) in enumerate(rows) if old is not None])
    compiled = [c for d in definitions if (c := asyncio.run(compile_one(db_url, d)))]
    with conn.transaction(force_rollback=True):
        for k, c in enumerate(compiled):
            conn.execute(
                ACTIVATE,
                {
                    "name": f"random {k}",
                    "definition": Jsonb(c.stored),
                    "hash": c.definition_hash,
                    "trigger_type": c.definition.trigger_type,
                    "predicate": c.predicate,
                    "filter": Jsonb(c.capture_filter),
                },
            )
        pruned = conn.execute("SELECT crmflow.capture_pruned_columns('prop') AS p").fetchone()["p"]
    drop = sql.Literal(pruned)
    for c in compiled:
        query = sql.SQL(
            "SELECT ev.id, ev.op, ({p}) AS matched, (SELECT {p} FROM jsonb_populate_record("
            "   NULL::prop, coalesce(ev.new_row, ev.old_row) - {d}::text[]) AS n,"
            "   jsonb_populate_record(NULL::prop, ev.old_row - {d}::text[]) AS o)"
            " AS matched_pruned,"
            " ev.new_row - {d}::text[] IS NOT DISTINCT FROM ev.old_row - {d}::text[] AS same"
            "  FROM ({events}) AS ev"
            " CROSS JOIN LATERAL jsonb_populate_record(NULL::prop,"
            "                                          coalesce(ev.new_row, ev.old_row)) AS n"
            " CROSS JOIN LATERAL jsonb_populate_record(NULL::prop, ev.old_row) AS o"
        ).format(p=sql.SQL(c.predicate), d=drop, events=sql.SQL(EVENTS))
        for r in conn.execute(query).fetchall():
            assert r["matched"] is r["matched_pruned"], (c.stored, pruned, r)
            if r["op"] == "update" and r["same"]:
                assert r["matched"] is not True, (c.stored, pruned, r)


# ───────────────────────────── wide tables ─────────────────────────────

WIDE_COLUMNS = 300  # 298 pruned: over the 2,000 comparisons the typed rows start at
WIDE_ROWS = 300


async def wide_table(conn: psycopg.AsyncConnection[Any]) -> None:
    columns = ", ".join(f"c{i} integer NOT NULL DEFAULT {i}" for i in range(1, WIDE_COLUMNS))
    await conn.execute(f"CREATE TABLE wides (id bigint PRIMARY KEY, {columns})")
    await conn.execute(f"INSERT INTO wides (id) SELECT g FROM generate_series(1, {WIDE_ROWS}) AS g")
    await capture.watch(conn, "wides", entity="wide")
    await apply(
        conn,
        {
            "name": "c1 moves",
            "trigger": {"type": "field_updated", "entity_type": "wide", "field": "c1"},
            "actions": [{"type": "create_task", "title": "look", "assignee": 1}],
        },
    )


async def update_time(conn: psycopg.AsyncConnection[Any], statement: str) -> float:
    """The best of five runs of an UPDATE of every row (rolled back), timed by the
    server: the fastest run is the one the machine's load disturbed least."""
    best = float("inf")
    for _ in range(5):
        async with conn.transaction(force_rollback=True):
            await conn.execute("SELECT set_config('crmflow.t0', clock_timestamp()::text, true)")
            await conn.execute(statement)
            took = await value(
                conn,
                "SELECT extract(epoch FROM clock_timestamp()"
                " - current_setting('crmflow.t0')::timestamptz)",
            )
            best = min(best, float(took))
    return best


async def test_pruned_capture_of_a_wide_table_costs_no_more_than_whole_rows(
    crm: psycopg.AsyncConnection[Any],
) -> None:
    """Issue 15: pruning by subtracting the pruned names from each row's JSON cost
    columns x pruned comparisons per row (a 1,000-row update of a 500-column table took
    3-4x as long pruned as whole). The pruned capture must cost less than whole rows
    (asserted with a 3x margin: the best of five runs each, on a loaded machine)."""
    await wide_table(crm)
    kept = set(await value(crm, "SELECT to_jsonb(w.*) FROM wides AS w LIMIT 1")) - set(
        await value(crm, "SELECT crmflow.capture_pruned_columns('wide')")
    )
    assert kept == {"id", "c1"}
    matching = "UPDATE wides SET c1 = c1 + 1, c2 = c2 + 1"
    pruned = await update_time(crm, matching)
    await crm.execute(matching)
    rows = await fetch(crm, "SELECT new_row, old_row FROM crmflow.outbox ORDER BY id")
    assert len(rows) == WIDE_ROWS
    assert all(set(r["new_row"]) == set(r["old_row"]) == {"id", "c1"} for r in rows)
    assert {(r["old_row"]["c1"], r["new_row"]["c1"]) for r in rows} == {(1, 2)}
    await capture.watch(crm, "wides", entity="wide", all_columns=True)
    whole = await update_time(crm, matching)
    print(f"pruned {pruned * 1000:.1f} ms, whole rows {whole * 1000:.1f} ms")
    assert pruned * 3 < whole * 1.0, (pruned, whole)


async def test_a_wide_table_changed_since_its_capture_was_made(
    crm: psycopg.AsyncConnection[Any],
) -> None:
    """The kept columns are read from the typed rows only while the table's columns are
    those the capture was made with: a column added or renamed since is kept (as by the
    list of pruned names), and a dropped or retyped one never fails the write. (Without
    the DDL event trigger, as when crmflow was installed by a non-superuser: with it the
    DDL regenerates capture at once, the next test.)"""
    await crm.execute("DROP EVENT TRIGGER IF EXISTS crmflow_heal_capture")
    await wide_table(crm)
    await crm.execute("UPDATE wides SET c2 = 0 WHERE id = 2")  # the typed probe, planned
    await crm.execute("ALTER TABLE wides ADD COLUMN fresh text DEFAULT 'f'")
    await crm.execute("ALTER TABLE wides RENAME COLUMN c3 TO c3_renamed")
    await crm.execute("ALTER TABLE wides DROP COLUMN c4")
    await crm.execute("ALTER TABLE wides ALTER COLUMN c1 TYPE bigint")
    await crm.execute("UPDATE wides SET c1 = c1 + 1, fresh = 'g', c3_renamed = 0 WHERE id = 1")
    await crm.execute("INSERT INTO wides (id) VALUES (0)")
    rows = await fetch(crm, "SELECT op, new_row, old_row FROM crmflow.outbox ORDER BY id")
    assert [r["op"] for r in rows] == ["update"]  # (no entity_created workflow)
    assert set(rows[0]["new_row"]) == {"id", "c1", "fresh", "c3_renamed"}
    assert (rows[0]["old_row"]["c1"], rows[0]["new_row"]["c1"]) == (1, 2)
    await crm.execute("ALTER TABLE wides RENAME COLUMN c1 TO c1_old")  # a kept one
    await crm.execute("UPDATE wides SET c1_old = 5, c2 = 5 WHERE id = 2")
    await crm.execute("DELETE FROM wides WHERE id = 2")


async def test_capture_is_regenerated_when_the_columns_change(
    crm: psycopg.AsyncConnection[Any],
) -> None:
    """Issue 15: a column added, renamed or dropped left a wide table on the slow
    subtracting path, and the new column captured, until some workflow changed. The
    worker's heal regenerates capture for the new columns, and says so; the DDL's event
    trigger does not (it would hold the DDL's lock on the CRM table longer: in the chaos
    suite's drift under load the DDLs took so long that the last one did not run)."""
    await wide_table(crm)

    async def kept_on_update(assignment: str) -> set[str]:
        await crm.execute("DELETE FROM crmflow.outbox")
        await crm.execute(f"UPDATE wides SET c1 = c1 + 1, {assignment} WHERE id = 1")
        [row] = await fetch(crm, "SELECT new_row FROM crmflow.outbox")
        return set(row["new_row"])

    async def healed() -> list[tuple[str, str]]:
        rows = await fetch(crm, "SELECT entity_type, change FROM crmflow.heal_capture()")
        return [(h["entity_type"], h["change"]) for h in rows]

    regenerated = [("wide", "capture regenerated (the table's columns changed)")]
    await crm.execute("ALTER TABLE wides ADD COLUMN fresh text DEFAULT 'f'")
    assert await kept_on_update("fresh = 'g'") == {"id", "c1", "fresh"}  # safe meanwhile
    assert await healed() == regenerated
    assert await kept_on_update("fresh = 'h'") == {"id", "c1"}
    await crm.execute("DROP EVENT TRIGGER crmflow_heal_capture")
    await crm.execute("ALTER TABLE wides RENAME COLUMN c2 TO c2_renamed")
    assert await kept_on_update("c2_renamed = 7") == {"id", "c1", "c2_renamed"}
    assert await healed() == regenerated
    assert await kept_on_update("c2_renamed = 8") == {"id", "c1"}
    assert await healed() == []  # once
