"""What the database says about watched entities: tables, keys, columns and their types.

A :class:`FieldSpec` tells the condition compiler how to read a field from a typed row
("n" for the new row, "o" for the old one) and which operators suit its type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from engine import db

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
    rows = await (await conn.execute(db.query("table_columns"), {"relid": relid})).fetchall()
    return {row["name"]: _spec_from_row(row) for row in rows}


async def resolve_table(conn: psycopg.AsyncConnection[Any], name: str) -> dict[str, Any] | None:
    """Find a table by the name a user typed (``leads``, ``crm.leads``, ``"Odd Name"``)."""
    try:
        row = await (await conn.execute(db.query("resolve_table"), {"name": name})).fetchone()
    except psycopg.errors.InvalidName:
        return None
    return row


async def load_entities(conn: psycopg.AsyncConnection[Any]) -> dict[str, EntitySchema]:
    """Every watched entity with its fields and derived fields."""
    entities: dict[str, EntitySchema] = {}
    watched = await (await conn.execute(db.query("watched_tables_with_oid"), {})).fetchall()
    for w in watched:
        if w["relid"] is None:  # the table was dropped behind our back
            continue
        entities[w["entity_type"]] = EntitySchema(
            entity_type=w["entity_type"],
            table_schema=w["table_schema"],
            table_name=w["table_name"],
            pk_columns=list(w["pk_columns"]),
            columns=await table_fields(conn, w["relid"]),
        )
    derived = await (await conn.execute(db.query("derived_fields"), {})).fetchall()
    for d in derived:
        entity = entities.get(d["entity_type"])
        if entity is None:
            continue
        entity.derived[d["name"]] = derived_spec(d["name"], d["source"], d)
    return entities


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
