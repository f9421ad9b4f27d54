"""Capture demands (engine/capture_demands.py set_capture_demand / drop_capture_demand,
migration 0022): a demanded (entity, operation) keeps every row even with no workflow
on the table, from the commit of the transaction that set it; dropping it stops that;
a rolled-back demand changes nothing; bad input names the argument and writes nothing."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from engine import capture, prefilter
from tests.helpers import fetch, value


async def captured(conn: psycopg.AsyncConnection[Any]) -> list[tuple[str, str]]:
    rows = await fetch(
        conn,
        "SELECT op, coalesce(new_row, old_row) ->> 'who' AS who FROM crmflow.outbox"
        " WHERE entity_type = 'test_signal' ORDER BY id",
    )
    return [(r["op"], r["who"]) for r in rows]


@pytest.fixture
async def test_signals(conn: psycopg.AsyncConnection[Any]) -> psycopg.AsyncConnection[Any]:
    await conn.execute(
        "CREATE TABLE test_signals (id serial PRIMARY KEY, who text, at timestamptz)"
    )
    await capture.watch(conn, "public.test_signals")
    return conn


async def test_a_demand_captures_rows_of_a_table_no_workflow_is_on(
    test_signals: psycopg.AsyncConnection[Any],
) -> None:
    conn = test_signals
    await conn.execute("INSERT INTO test_signals (who) VALUES ('before')")
    assert await captured(conn) == []

    async with conn.transaction():
        await prefilter.set_capture_demand(conn, "scorecards", "test_signal", ["insert"], ["who"])
    await conn.execute("INSERT INTO test_signals (who) VALUES ('a'), ('b')")
    await conn.execute("UPDATE test_signals SET who = 'c' WHERE who = 'a'")  # update: not demanded
    await conn.execute("DELETE FROM test_signals WHERE who = 'b'")  # nor delete
    assert await captured(conn) == [("insert", "a"), ("insert", "b")]
    assert await fetch(conn, "SELECT demand, operation, columns FROM crmflow.capture_demands") == [
        {"demand": "scorecards", "operation": "insert", "columns": ["who"]}
    ]

    # Setting it again replaces what the demand asked of the entity.
    async with conn.transaction():
        await prefilter.set_capture_demand(
            conn, "scorecards", "test_signal", ["update", "delete"], None
        )
    await conn.execute("INSERT INTO test_signals (who) VALUES ('d')")
    await conn.execute("UPDATE test_signals SET who = 'e' WHERE who = 'c'")
    await conn.execute("DELETE FROM test_signals WHERE who = 'e'")
    assert (await captured(conn))[2:] == [("update", "e"), ("delete", "e")]

    # A rolled-back drop leaves the demand in force; a committed one stops it.
    await conn.execute("TRUNCATE crmflow.outbox")
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            await prefilter.drop_capture_demand(conn, "scorecards")
            raise RuntimeError("rolled back")
    await conn.execute("UPDATE test_signals SET who = 'f' WHERE who = 'd'")
    assert await captured(conn) == [("update", "f")]
    async with conn.transaction():
        await prefilter.drop_capture_demand(conn, "scorecards")
    await conn.execute("UPDATE test_signals SET who = 'g'")
    await conn.execute("DELETE FROM test_signals")
    assert await captured(conn) == [("update", "f")]
    assert await value(conn, "SELECT count(*) FROM crmflow.capture_demands") == 0


async def test_a_rolled_back_demand_captures_nothing(
    test_signals: psycopg.AsyncConnection[Any],
) -> None:
    conn = test_signals
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            await prefilter.set_capture_demand(conn, "scorecards", "test_signal", ["insert"], None)
            raise RuntimeError("rolled back")
    assert await value(conn, "SELECT count(*) FROM crmflow.capture_demands") == 0
    # The regeneration used a number of the epoch sequence (not transactional): the
    # bodies left in place keep every row until the heal makes them anew (safe, slow).
    assert await capture.heal(conn) == [
        {
            "entity_type": "test_signal",
            "change": "capture filter regenerated (its last change was rolled back)",
        }
    ]
    await conn.execute("INSERT INTO test_signals (who) VALUES ('a')")
    assert await captured(conn) == []


def test_a_demand_through_a_synchronous_connection(
    test_signals: psycopg.AsyncConnection[Any], db_url: str
) -> None:
    with psycopg.connect(db_url) as sync:  # a transaction, committed on exit
        prefilter.set_capture_demand(sync, "usage", "test_signal", ("insert",), None)
    with psycopg.connect(db_url, autocommit=True) as sync:
        sync.execute("INSERT INTO test_signals (who) VALUES ('a')")
        assert sync.execute("SELECT count(*) FROM crmflow.outbox").fetchone() == (1,)
        prefilter.drop_capture_demand(sync, "usage")
        sync.execute("INSERT INTO test_signals (who) VALUES ('b')")
        assert sync.execute("SELECT count(*) FROM crmflow.outbox").fetchone() == (1,)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", "test_signal", ["insert"], None), "demand"),
        (("d", "Login!", ["insert"], None), "entity_type"),
        (("d", "test_signal", [], None), "operations"),
        (("d", "test_signal", "insert", None), "operations"),
        (("d", "test_signal", ["upsert"], None), "'upsert'"),
        (("d", "test_signal", ["insert"], "who"), "columns"),
        (("d", "test_signal", ["insert"], [""]), "columns"),
    ],
)
async def test_bad_demands_are_refused_and_write_nothing(
    test_signals: psycopg.AsyncConnection[Any], args: tuple[Any, ...], message: str
) -> None:
    with pytest.raises(prefilter.DemandError, match=message):
        await prefilter.set_capture_demand(test_signals, *args)
    assert await value(test_signals, "SELECT count(*) FROM crmflow.capture_demands") == 0
