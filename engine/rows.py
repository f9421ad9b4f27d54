"""One entity's row, found by the id a user gives (``42``, ``"42"``, or ``{"a": 1, "b": 2}``
for a composite key). Used by the dry run and by custom events about an entity."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from engine import db
from engine.catalog import EntitySchema


class BadEntityId(ValueError):
    """The id does not fit the entity's key (wrong columns, or a value of the wrong type)."""


def pk_object(entity: EntitySchema, entity_id: Any) -> dict[str, Any]:
    """The key as JSON: ``{"id": 42}``; a composite key must be given as an object."""
    if isinstance(entity_id, dict):
        if set(entity_id) != set(entity.pk_columns):
            raise BadEntityId(
                f"the key of {entity.entity_type} is {{{', '.join(entity.pk_columns)}}}"
            )
        return dict(entity_id)
    if len(entity.pk_columns) != 1:
        raise BadEntityId(
            f"{entity.entity_type} has a composite key: give an object with "
            f"{', '.join(entity.pk_columns)}"
        )
    if entity_id is None or isinstance(entity_id, bool | list):
        raise BadEntityId("an entity id is a string or a number")
    return {entity.pk_columns[0]: entity_id}


def entity_row_query(entity: EntitySchema, *, lock: bool = False) -> sql.Composed:
    """The statement reading one entity's row by its key (``%(pk)s``), as ``row``; with
    ``lock``, the row stays locked for the rest of the transaction."""
    return db.template("entity_row", "rows.sql").format(
        table=entity.table,
        pk_match=entity.pk_match(),
        lock=sql.SQL("FOR UPDATE OF t" if lock else ""),
    )


async def fetch_row(
    conn: psycopg.AsyncConnection[Any], entity: EntitySchema, entity_id: Any
) -> dict[str, Any] | None:
    """The entity's row as JSON (``to_jsonb``), or None when there is no such row."""
    pk = pk_object(entity, entity_id)
    query = entity_row_query(entity)
    try:
        async with conn.transaction():
            row = await (await conn.execute(query, {"pk": Jsonb(pk)})).fetchone()
    except psycopg.DataError as exc:  # "abc" for a bigint key, a number out of range...
        reason = exc.diag.message_primary or str(exc)
        what = f"{entity_id!r} is not a valid {entity.entity_type} id"
        raise BadEntityId(f"{what} ({reason})") from None
    return row["row"] if row else None
