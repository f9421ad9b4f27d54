"""Capture demands: rows kept whatever the workflows say, for other parts of crmflow.

The scorecards' signal tables need every row of some operations on an entity captured,
whether or not an active workflow could match it: a demanded (entity, operation) keeps
every row, and the columns it names (all when None). Demands are stored in
crmflow.capture_demands (migration 0022); the entity's capture is regenerated in the
caller's transaction, so a demand holds from that transaction's commit on, and a
rollback leaves capture as it was.

Apart from engine/prefilter.py, which compiles the workflows' capture filters (reading
only the columns' facts): this module writes demands and regenerates capture
(``refresh_capture`` in sql/capture.sql), for a sync or an async connection alike.
``engine.prefilter`` re-exports its names for the callers written against it.
"""

from __future__ import annotations

import re
from collections.abc import Coroutine, Sequence
from typing import Any, LiteralString, overload

import psycopg

from engine import db

OPERATIONS = ("insert", "update", "delete")
_ENTITY = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class DemandError(ValueError):
    pass


Statements = list[tuple[LiteralString, dict[str, Any]]]


def _set_statements(
    demand: str, entity_type: str, operations: Sequence[str], columns: Sequence[str] | None
) -> Statements:
    if not isinstance(demand, str) or not 1 <= len(demand) <= 200:
        raise DemandError(f"demand {demand!r}: a name of 1 to 200 characters")
    if not isinstance(entity_type, str) or not _ENTITY.fullmatch(entity_type):
        raise DemandError(f"entity_type {entity_type!r}: lowercase letters, digits and '_'")
    if isinstance(operations, str):
        raise DemandError(f"operations {operations!r}: a list, e.g. ['insert']")
    ops = list(dict.fromkeys(operations))
    if not ops:
        raise DemandError("operations: at least one of insert, update, delete")
    for op in ops:
        if op not in OPERATIONS:
            raise DemandError(f"operations: {op!r} is not one of insert, update, delete")
    cols: list[str] | None = None
    if columns is not None:
        if isinstance(columns, str):
            raise DemandError(f"columns {columns!r}: a list of column names, or None for all")
        cols = list(dict.fromkeys(columns))
        for c in cols:
            if not isinstance(c, str) or not c:
                raise DemandError(f"columns: {c!r} is not a column name")
    return [
        (
            db.query("clear_capture_demand", "capture.sql"),
            {"demand": demand, "entity_type": entity_type},
        ),
        (
            db.query("insert_capture_demand", "capture.sql"),
            {"demand": demand, "entity_type": entity_type, "operations": ops, "columns": cols},
        ),
        (db.query("refresh_capture", "capture.sql"), {}),
    ]


def _drop_statements(demand: str) -> Statements:
    if not isinstance(demand, str) or not demand:
        raise DemandError(f"demand {demand!r}: a name of 1 to 200 characters")
    return [
        (db.query("clear_capture_demand", "capture.sql"), {"demand": demand, "entity_type": None}),
        (db.query("refresh_capture", "capture.sql"), {}),
    ]


async def _run_async(conn: psycopg.AsyncConnection[Any], statements: Statements) -> None:
    for query, params in statements:
        await conn.execute(query, params)


def _run(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], statements: Statements
) -> Coroutine[Any, Any, None] | None:
    if isinstance(conn, psycopg.AsyncConnection):
        return _run_async(conn, statements)
    for query, params in statements:
        conn.execute(query, params)
    return None


@overload
def set_capture_demand(
    conn: psycopg.AsyncConnection[Any],
    demand: str,
    entity_type: str,
    operations: Sequence[str],
    columns: Sequence[str] | None,
) -> Coroutine[Any, Any, None]: ...
@overload
def set_capture_demand(
    conn: psycopg.Connection[Any],
    demand: str,
    entity_type: str,
    operations: Sequence[str],
    columns: Sequence[str] | None,
) -> None: ...
def set_capture_demand(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    demand: str,
    entity_type: str,
    operations: Sequence[str],
    columns: Sequence[str] | None,
) -> Coroutine[Any, Any, None] | None:
    """Demand every row of ``operations`` on ``entity_type`` (its ``columns``, all when
    None), replacing what ``demand`` asked of that entity before; the entity's capture is
    regenerated in the caller's transaction. With an AsyncConnection, await the result.
    Bad input raises DemandError (naming the argument) before anything is written."""
    return _run(conn, _set_statements(demand, entity_type, operations, columns))


@overload
def drop_capture_demand(
    conn: psycopg.AsyncConnection[Any], demand: str
) -> Coroutine[Any, Any, None]: ...
@overload
def drop_capture_demand(conn: psycopg.Connection[Any], demand: str) -> None: ...
def drop_capture_demand(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], demand: str
) -> Coroutine[Any, Any, None] | None:
    """Drop everything ``demand`` asked for, on every entity, and regenerate their capture
    in the caller's transaction (a demand not set: nothing happens)."""
    return _run(conn, _drop_statements(demand))
