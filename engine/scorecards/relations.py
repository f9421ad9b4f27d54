"""Related tables of an entity (``crmflow relation add``): the rows of a table that belong
to an entity by a key column, with the time column aggregates window on."""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg import sql

from engine import capture, catalog, db
from engine.model import Issue
from engine.scorecards.model import ScorecardError


def _q(name: str) -> str:
    return db.query(name, "scorecards.sql")


async def _watched_entity(conn: psycopg.AsyncConnection[Any], table: str) -> str:
    """The entity type ``table`` is watched as, watching it first if it is not."""
    found = await catalog.resolve_table(conn, table)
    if found is None:
        raise ScorecardError([Issue("table", f"no table named {table!r}")])
    row = await (
        await conn.execute(
            db.query("watched_by_table", "catalog.sql"),
            {"table_schema": found["table_schema"], "table_name": found["table_name"]},
        )
    ).fetchone()
    if row is not None:
        return str(row["entity_type"])
    try:
        return (await capture.watch(conn, table)).entity_type
    except capture.CaptureError as exc:
        raise ScorecardError([Issue("table", str(exc))]) from None


async def add_relation(
    conn: psycopg.AsyncConnection[Any],
    table: str,
    entity_type: str,
    key_column: str,
    time_column: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Declare that ``table``'s rows belong to ``entity_type`` by ``key_column``."""
    async with conn.transaction():
        entities = await catalog.load_entities(conn)
        entity = entities.get(entity_type)
        if entity is None:
            watched = ", ".join(sorted(entities)) or "none yet"
            raise ScorecardError(
                [Issue("entity", f"{entity_type!r} is not a watched entity (watched: {watched})")]
            )
        if len(entity.pk_columns) != 1:
            raise ScorecardError(
                [Issue("entity", f"{entity_type} has a composite key; relations need one column")]
            )
        related_type = await _watched_entity(conn, table)
        related = await catalog.load_entity(conn, related_type)
        assert related is not None
        rel_name = _checked(related, key_column, time_column, name)
        await _probe_key(conn, entity, related, key_column, entity_type)
        row = await (
            await conn.execute(
                _q("upsert_relation"),
                {
                    "entity_type": entity_type,
                    "name": rel_name,
                    "related_entity_type": related_type,
                    "key_column": key_column,
                    "time_column": time_column,
                },
            )
        ).fetchone()
        assert row is not None
        return dict(row)


def _checked(
    related: catalog.EntitySchema, key_column: str, time_column: str | None, name: str | None
) -> str:
    """The relation's name, once its key and time columns exist in ``related`` (a time
    column a date or timestamp); every problem found at once otherwise."""
    issues: list[Issue] = []
    key = related.columns.get(key_column)
    if key is None:
        issues.append(Issue("key", f"{related.qualified_name} has no column {key_column!r}"))
    if time_column is not None:
        t = related.columns.get(time_column)
        if t is None:
            issues.append(
                Issue("time_column", f"{related.qualified_name} has no column {time_column!r}")
            )
        elif t.kind not in ("date", "timestamp"):
            issues.append(
                Issue(
                    "time_column",
                    f"{time_column!r} is {t.display_type}, not a date or timestamp",
                )
            )
    rel_name = name or related.table_name.lower()
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", rel_name):
        issues.append(
            Issue("name", f"{rel_name!r}: lowercase letters, digits and '_' (use --name)")
        )
    if issues:
        raise ScorecardError(issues)
    return rel_name


async def _probe_key(
    conn: psycopg.AsyncConnection[Any],
    entity: catalog.EntitySchema,
    related: catalog.EntitySchema,
    key_column: str,
    entity_type: str,
) -> None:
    """Refuses a key column that does not compare with the entity's key (a join that
    PostgreSQL cannot plan, run with LIMIT 0 in a savepoint)."""
    probe = sql.SQL("SELECT 1 FROM {t} AS n JOIN {r} AS r ON r.{k} = n.{pk} LIMIT 0").format(
        t=entity.table,
        r=related.table,
        k=sql.Identifier(key_column),
        pk=sql.Identifier(entity.pk_columns[0]),
    )
    try:
        async with conn.transaction():
            await conn.execute(probe)
    except psycopg.Error as exc:
        raise ScorecardError(
            [
                Issue(
                    "key",
                    f"{key_column!r} does not compare with {entity_type}'s key "
                    f"{entity.pk_columns[0]!r}: {exc.diag.message_primary or exc}",
                )
            ]
        ) from None


async def list_relations(
    conn: psycopg.AsyncConnection[Any], entity_type: str | None = None
) -> list[dict[str, Any]]:
    rows = await (await conn.execute(_q("relations"), {"entity_type": entity_type})).fetchall()
    return [dict(r) for r in rows]


async def remove_relation(conn: psycopg.AsyncConnection[Any], entity_type: str, name: str) -> bool:
    """Forget a relation; refused while a scorecard's current version reads it."""
    async with conn.transaction():
        users = await (
            await conn.execute(_q("relation_users"), {"entity_type": entity_type, "name": name})
        ).fetchall()
        if users:
            names = ", ".join(u["name"] for u in users)
            raise ScorecardError([Issue("name", f"relation {name!r} is used by {names}")])
        row = await (
            await conn.execute(_q("delete_relation"), {"entity_type": entity_type, "name": name})
        ).fetchone()
        return row is not None
