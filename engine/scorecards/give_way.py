"""A full scoring run gives way to the CRM's schema changes: its statement holds the
CRM tables' ACCESS SHARE lock for as long as it scores (seconds, minutes on a big CRM),
which an ALTER TABLE waits for, and the CRM's writers queue behind the ALTER. A monitor
connection watches for such a waiter and cancels the statement (docs/scorecards.md §4)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg
import psycopg.conninfo

from engine import db

log = logging.getLogger(__name__)


def _q(name: str) -> str:
    return db.query(name, "scorecards.sql")


class ScoringYielded(Exception):
    """A full run gave way to a session waiting for one of the CRM's tables it reads (an
    ALTER TABLE, say, which the CRM's writers queue behind): cancelled, nothing of it
    kept; it is to be run again later."""


# How often a full run checks whether it holds up a session waiting for a CRM table.
GIVE_WAY_POLL = 0.1


async def _give_way(conn: psycopg.AsyncConnection[Any], gave_way: asyncio.Event) -> None:
    """While ``conn``'s scoring statement runs, check on a connection of its own whether
    a session waits for a lock on a table outside crmflow's schema that ``conn``'s
    session holds; if one does, set ``gave_way`` and cancel the statement. The wait for
    the lock then lasts about GIVE_WAY_POLL. A session waiting for crmflow's own tables
    (another run) is not given way to."""
    pid = conn.info.backend_pid
    conninfo = psycopg.conninfo.make_conninfo(
        **{o.keyword.decode(): o.val.decode() for o in conn.pgconn.info if o.val is not None}
    )
    try:
        monitor = await db.connect(conninfo, autocommit=True)
    except psycopg.Error as exc:
        log.warning(
            "scorecard run: no monitor connection (%s); it will not give way to CRM schema changes",
            exc,
        )
        return
    async with monitor:
        while True:
            row = await (await monitor.execute(_q("held_up_by"), {"pid": pid})).fetchone()
            if row and row["waiting"]:
                log.warning(
                    "scorecard run gave way to %s session(s) waiting for %s (run it again later)",
                    row["waiting"],
                    row["tables"],
                )
                gave_way.set()
                await conn.cancel_safe()
                return
            await asyncio.sleep(GIVE_WAY_POLL)


async def scoring_statement(
    conn: psycopg.AsyncConnection[Any], statement: Any, params: dict[str, Any], full: bool
) -> dict[str, Any]:
    """Run the scoring statement; a full run's gives way to sessions waiting for the CRM
    tables it reads (:func:`_give_way`), raising ScoringYielded."""
    row: dict[str, Any] | None
    if not full:
        row = await (await conn.execute(statement, params)).fetchone()
        assert row is not None
        return dict(row)
    gave_way = asyncio.Event()
    watch = asyncio.create_task(_give_way(conn, gave_way))
    try:
        row = await (await conn.execute(statement, params)).fetchone()
    except psycopg.errors.QueryCanceled:
        if gave_way.is_set():
            raise ScoringYielded("gave way to a session waiting for a CRM table") from None
        raise
    finally:
        watch.cancel()
        # (gather: the watch's own cancellation or error is collected, a cancellation of
        # this task itself still propagates)
        for outcome in await asyncio.gather(watch, return_exceptions=True):
            if isinstance(outcome, Exception) and not isinstance(outcome, psycopg.Error):
                log.error("scorecard run: the monitor failed: %s", outcome)
    assert row is not None
    return dict(row)
