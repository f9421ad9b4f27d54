"""What the database says about watched entities: tables, keys, columns and their types.

A :class:`FieldSpec` tells the condition compiler how to read a field from a typed row
("n" for the new row, "o" for the old one) and which operators suit its type.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, LiteralString

import psycopg
from psycopg import sql

from engine import db

log = logging.getLogger(__name__)

# Type categories of pg_type.typcategory mapped onto the kinds the compiler knows.
_CATEGORY_KIND = {
    "S": "text",
    "N": "number",
    "B": "boolean",
    "E": "enum",
    "A": "array",
    "T": "interval",
}


def kind_of(category: str, typname: str) -> str:
    if typname in ("date",):
        return "date"
    if typname in ("timestamp", "timestamptz"):
        return "timestamp"
    if typname in ("time", "timetz"):
        return "time"
    if typname in ("jsonb", "json"):
        return "json"
    if typname == "uuid":
        return "uuid"
    return _CATEGORY_KIND.get(category, "other")


@dataclass(frozen=True)
class FieldSpec:
    """A field of an entity: a column, a path into a JSON column, or a derived expression."""

    name: str
    kind: str
    type_sql: str  # a type name for CAST(... AS type_sql), already quoted
    display_type: str
    column: str | None = None  # the column read (None for derived fields)
    json_path: tuple[str, ...] = ()
    derived_source: str | None = None  # derived fields: the declared SQL expression
    enum_labels: tuple[str, ...] = ()
    elem_kind: str | None = None  # arrays: the kind of the elements
    elem_type_sql: str | None = None
    elem_enum_labels: tuple[str, ...] = ()
    nullable: bool = True
    row_alias: str | None = None  # read from this alias whatever row is asked for

    def expr(self, alias: str) -> sql.Composable:
        """SQL reading this field from the typed row called ``alias``."""
        alias = self.row_alias or alias
        if self.derived_source is not None:
            from engine.sqlexpr import render_expression

            return sql.SQL("({})").format(sql.SQL(render_expression(self.derived_source, alias)))
        assert self.column is not None
        ref = sql.Identifier(alias, self.column)
        if self.json_path:
            path = sql.SQL("ARRAY[{}]::text[]").format(
                sql.SQL(", ").join(sql.Literal(p) for p in self.json_path)
            )
            return sql.SQL("({} #> {})").format(ref, path)
        return ref


@dataclass
class EntitySchema:
    entity_type: str
    table_schema: str
    table_name: str
    pk_columns: list[str]
    columns: dict[str, FieldSpec]
    derived: dict[str, FieldSpec] = field(default_factory=dict)

    @property
    def table(self) -> sql.Identifier:
        return sql.Identifier(self.table_schema, self.table_name)

    @property
    def qualified_name(self) -> str:
        return f"{self.table_schema}.{self.table_name}"

    def pk_match(self, left: str = "t", right: str = "p") -> sql.Composable:
        """``left.k1 = right.k1 AND ...`` over the primary key: the one place a row is matched
        to a key (``p`` is usually ``jsonb_populate_record(NULL::table, %(pk)s)``)."""
        return sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(sql.Identifier(left, c), sql.Identifier(right, c))
            for c in self.pk_columns
        )

    def pk_object(self, alias: str) -> sql.Composable:
        """``jsonb_build_object('k1', alias.k1, ...)``: the key of the row ``alias`` as JSON
        (the shape of ``entity_key`` in the outbox and the executions)."""
        return sql.SQL("jsonb_build_object({})").format(
            sql.SQL(", ").join(
                sql.SQL("{}, {}").format(sql.Literal(c), sql.Identifier(alias, c))
                for c in self.pk_columns
            )
        )

    def resolve(self, name: str) -> FieldSpec | None:
        """A column, a derived field, or ``column.key.subkey`` into a json/jsonb column."""
        if name in self.columns:
            return self.columns[name]
        if name in self.derived:
            return self.derived[name]
        head, sep, rest = name.partition(".")
        column = self.columns.get(head)
        if sep and column is not None and column.kind == "json" and rest:
            keys = tuple(rest.split("."))
            if all(keys):
                return FieldSpec(
                    name=name,
                    kind="jsonpath",
                    type_sql="pg_catalog.jsonb",
                    display_type=f"json value in {head}",
                    column=head,
                    json_path=keys,
                    row_alias=column.row_alias,
                )
        return None

    def field_names(self) -> list[str]:
        return [*self.columns, *self.derived]


def _spec_from_row(row: dict[str, Any]) -> FieldSpec:
    kind = kind_of(row["category"], row["base_typname"])
    elem_kind = None
    if kind == "array" and row["elem_typname"] is not None:
        elem_kind = kind_of(row["elem_category"], row["elem_typname"])
    return FieldSpec(
        name=row["name"],
        kind=kind,
        type_sql=row["type_sql"],
        display_type=row["display_type"],
        column=row["name"],
        enum_labels=tuple(row["enum_labels"] or ()),
        elem_kind=elem_kind,
        elem_type_sql=row["elem_type_sql"],
        elem_enum_labels=tuple(row["elem_enum_labels"] or ()),
        nullable=not row["not_null"],
    )


async def table_fields(conn: psycopg.AsyncConnection[Any], relid: int) -> dict[str, FieldSpec]:
    rows = await (
        await conn.execute(db.query("table_columns", "catalog.sql"), {"relid": relid})
    ).fetchall()
    return {row["name"]: _spec_from_row(row) for row in rows}


async def resolve_table(conn: psycopg.AsyncConnection[Any], name: str) -> dict[str, Any] | None:
    """Find a table by the name a user typed (``leads``, ``crm.leads``, ``"Odd Name"``)."""
    try:
        row = await (
            await conn.execute(db.query("resolve_table", "catalog.sql"), {"name": name})
        ).fetchone()
    except psycopg.errors.InvalidName:
        return None
    return row


async def load_entities(conn: psycopg.AsyncConnection[Any]) -> dict[str, EntitySchema]:
    """Every watched entity with its fields and derived fields."""
    entities: dict[str, EntitySchema] = {}
    watched = await (
        await conn.execute(db.query("watched_tables_with_oid", "catalog.sql"), {})
    ).fetchall()
    for w in watched:
        if w["relid"] is None:  # the table was dropped behind our back
            continue
        entities[w["entity_type"]] = EntitySchema(
            entity_type=w["entity_type"],
            table_schema=w["table_schema"],
            table_name=w["table_name"],
            # The key as it is now: after a key rename, before capture heals, events and
            # rows are keyed by the new columns already.
            pk_columns=list(w["key_now"] or w["pk_columns"]),
            columns=await table_fields(conn, w["relid"]),
        )
    derived = await (await conn.execute(db.query("derived_fields", "catalog.sql"), {})).fetchall()
    for d in derived:
        entity = entities.get(d["entity_type"])
        if entity is None:
            continue
        facts: dict[str, Any] = d
        if d["type_sql"] is None:  # its type was renamed or dropped since it was declared
            now = await _derived_type_now(conn, entity, d)
            if now is None:
                continue  # the expression no longer compiles: workflows using it break
            facts = now
        entity.derived[d["name"]] = derived_spec(d["name"], d["source"], facts)
    return entities


async def _derived_type_now(
    conn: psycopg.AsyncConnection[Any], entity: EntitySchema, d: dict[str, Any]
) -> dict[str, Any] | None:
    """The type a derived field's expression has now (after ``ALTER TYPE ... RENAME``,
    say), asked of PostgreSQL the way ``watch --derived`` asked it; None if it no longer
    compiles."""
    probe = sql.SQL("SELECT ({}) FROM {} AS n LIMIT 0").format(
        sql.SQL(d["expression"]), entity.table
    )
    try:
        async with conn.transaction():
            cur = await conn.execute(probe)
    except (psycopg.ProgrammingError, psycopg.DataError, psycopg.NotSupportedError) as exc:
        log.warning(
            "derived field %s.%s does not compile: %s",
            entity.entity_type,
            d["name"],
            exc.diag.message_primary or exc,
        )
        return None
    assert cur.description is not None
    return await (
        await conn.execute(
            db.query("type_facts", "catalog.sql"), {"type_oid": cur.description[0].type_code}
        )
    ).fetchone()


# Where each watched entity stands against the catalog: the table under its stored name,
# else the relation its capture triggers are on now (renamed), and the primary key.
_ENTITY_STATES: LiteralString = """
SELECT w.entity_type, w.table_schema, w.table_name, w.pk_columns,
       to_regclass(format('%I.%I', w.table_schema, w.table_name)) IS NOT NULL AS present,
       (SELECT format('%s.%s', ns.nspname, c.relname)
          FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
          JOIN pg_namespace AS ns ON ns.oid = c.relnamespace
         WHERE t.tgname = 'tg_crmflow__insert' AND NOT c.relispartition
           AND t.tgfoid = to_regprocedure(format('crmflow.%I()', 'tg_' || w.entity_type
                                                  || '__insert'))
         ORDER BY t.tgrelid LIMIT 1) AS captured_on,
       ARRAY(SELECT a.attname::text
               FROM pg_index AS i
              CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
               JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = to_regclass(format('%I.%I', w.table_schema, w.table_name))
                AND i.indisprimary
              ORDER BY k.position) AS key_now
  FROM crmflow.watched_tables AS w
 ORDER BY w.entity_type
"""


async def entity_states(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    """Each watched entity with ``state``: ``ok``, ``table missing``, ``table renamed
    (now X)`` or ``key changed (now ...)`` (``crmflow entities``)."""
    rows = await (await conn.execute(_ENTITY_STATES)).fetchall()
    for r in rows:
        if not r["present"]:
            r["state"] = (
                f"table renamed (now {r['captured_on']})" if r["captured_on"] else "table missing"
            )
        elif list(r["key_now"]) != list(r["pk_columns"]):
            now = ", ".join(r["key_now"]) or "none"
            r["state"] = f"key changed (now {now})"
        else:
            r["state"] = "ok"
    return rows


def derived_spec(name: str, source: str, type_row: dict[str, Any]) -> FieldSpec:
    return FieldSpec(
        name=name,
        kind=kind_of(type_row["category"], type_row["base_typname"]),
        type_sql=type_row["type_sql"],
        display_type=type_row["data_type"],
        derived_source=source,
    )


async def load_entity(conn: psycopg.AsyncConnection[Any], entity_type: str) -> EntitySchema | None:
    return (await load_entities(conn)).get(entity_type)
