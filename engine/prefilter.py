"""The capture filter of a workflow version: which captured rows it could ever match.

Capture keeps a row only when some active workflow's filter holds for it
(``crmflow.capture_filter`` in sql/capture.sql, docs/design.md "Capture keeps what can
match"). A filter is a sound over-approximation of the workflow's event predicate: it
reads nothing but the captured rows' JSON, it is true for every row pair the matcher
could enroll the workflow on (a false positive only costs an outbox row; a false
negative would lose an execution), and what it renders to cannot fail on any row.

Each condition is bounded from both sides: ``upper`` holds whenever the condition
does, ``lower`` only when it does (``not`` swaps them). A leaf is exact when its
typed comparison, as the matcher makes it on the row rebuilt from the same JSON
(``jsonb_populate_record``), gives the same answer as a comparison of JSON values:
numbers of integer and numeric columns, strings of text and varchar columns with a
deterministic collation, booleans, enum labels, and emptiness. Anything else (text
operators, which fold case by the column's collation; floats; dates and times, whose
JSON depends on the writer's settings; recency, which moves with the clock; derived
fields; JSON paths; ``sql`` conditions) is unknown: true above, false below.

Within an exact leaf, a row whose JSON lacks the key (a column renamed or dropped
since the workflow was saved) or holds another JSON type (a column retyped) is
unknown too, so a broken workflow's events are still captured for replay-events.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, LiteralString, overload

import psycopg

from engine import db
from engine.catalog import EntitySchema, FieldSpec
from engine.conditions import (
    Condition,
    FieldCondition,
    Group,
    Negation,
    SqlCondition,
    value_text,
)
from engine.model import UNSET, FieldUpdated, WorkflowDefinition

Node = Any  # bool | dict: the trees rendered by crmflow.render_capture_filter

# The rows each event trigger is matched on (its "n" row: the new row, the deleted
# row for deletes); other trigger types are not matched on captured rows at all.
TRIGGER_OPS = {
    "entity_created": "insert",
    "entity_updated": "update",
    "field_updated": "update",
    "entity_deleted": "delete",
}

EXACT_NUMBERS = frozenset({"int2", "int4", "int8", "numeric"})
EXACT_STRINGS = frozenset({"text", "varchar"})
# Kinds whose SQL NULL is exactly JSON null (a composite's "IS NULL" is not).
NULL_EXACT_KINDS = {
    "number": "number",
    "boolean": "boolean",
    "enum": "string",
    "date": "string",
    "timestamp": "string",
    "time": "string",
    "interval": "string",
    "uuid": "string",
}

COLUMN_FACTS = """
SELECT a.attname AS name, bt.typname AS base_typname,
       coalesce(col.collisdeterministic, true) AS deterministic
  FROM pg_attribute AS a
  JOIN pg_type AS t ON t.oid = a.atttypid
  JOIN pg_type AS bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
  LEFT JOIN pg_collation AS col ON col.oid = a.attcollation
 WHERE a.attrelid = (SELECT c.oid FROM pg_class AS c
                        JOIN pg_namespace AS s ON s.oid = c.relnamespace
                       WHERE s.nspname = %(schema)s AND c.relname = %(name)s)
   AND a.attnum > 0 AND NOT a.attisdropped
"""


@dataclass(frozen=True)
class ColumnFacts:
    base_typname: str
    deterministic: bool


async def column_facts(
    conn: psycopg.AsyncConnection[Any], entity: EntitySchema
) -> dict[str, ColumnFacts]:
    """What the catalog says beyond EntitySchema: base types and collations."""
    rows = await (
        await conn.execute(COLUMN_FACTS, {"schema": entity.table_schema, "name": entity.table_name})
    ).fetchall()
    return {r["name"]: ColumnFacts(r["base_typname"], r["deterministic"]) for r in rows}


# ───────────────────────────── trees ─────────────────────────────


def all_of(items: list[Node]) -> Node:
    out: list[Node] = []
    for item in items:
        if item is False:
            return False
        if item is True:
            continue
        out.extend(item["and"] if isinstance(item, dict) and "and" in item else [item])
    if not out:
        return True
    return out[0] if len(out) == 1 else {"and": out}


def any_of(items: list[Node]) -> Node:
    out: list[Node] = []
    for item in items:
        if item is True:
            return True
        if item is False:
            continue
        out.extend(item["or"] if isinstance(item, dict) and "or" in item else [item])
    if not out:
        return False
    return out[0] if len(out) == 1 else {"or": out}


def negate(item: Node) -> Node:
    if isinstance(item, bool):
        return not item
    if isinstance(item, dict) and "not" in item:
        return item["not"]
    return {"not": item}


UNKNOWN = (True, False)  # (upper, lower) of a condition nothing is known about


@dataclass
class _Test:
    """An exact comparison of one JSON value; ``other`` decides upper or lower."""

    row: str
    key: str
    type: str
    op: str
    value: Any = None
    null: bool = False

    def node(self, other: bool) -> Node:
        test: dict[str, Any] = {"row": self.row, "key": self.key, "type": self.type, "op": self.op}
        if self.op not in ("empty", "null"):
            test["value"] = self.value
        test["null"] = self.null
        test["other"] = other
        return {"test": test}


def _bounds_of(tests: list[_Test], mode: str) -> tuple[Node, Node]:
    join = all_of if mode == "all" else any_of
    return join([t.node(True) for t in tests]), join([t.node(False) for t in tests])


class PrefilterCompiler:
    def __init__(self, entity: EntitySchema, facts: dict[str, ColumnFacts]) -> None:
        self.entity = entity
        self.facts = facts

    # ── the JSON type a field's values have, when its comparisons are exact ──

    def _column(self, name: str) -> tuple[FieldSpec, ColumnFacts] | None:
        spec = self.entity.resolve(name)
        if (
            spec is None
            or spec.column is None
            or spec.derived_source is not None
            or spec.json_path
            or spec.row_alias
        ):
            return None
        facts = self.facts.get(spec.column)
        if facts is None:
            return None
        return spec, facts

    def _scalar_type(self, spec: FieldSpec, facts: ColumnFacts) -> str | None:
        if spec.kind == "number" and facts.base_typname in EXACT_NUMBERS:
            return "number"
        if spec.kind == "text" and facts.base_typname in EXACT_STRINGS and facts.deterministic:
            return "string"
        if spec.kind == "boolean":
            return "boolean"
        if spec.kind == "enum":
            return "string"
        return None

    def _json_value(self, kind: str, value: Any) -> tuple[bool, Any]:
        """The JSON a value compares as, when it is exactly what the typed cast gives."""
        if kind == "number":
            if isinstance(value, bool) or not isinstance(value, int | float):
                return False, None
            if isinstance(value, float) and not math.isfinite(value):
                return False, None
            return True, value
        if kind == "string":
            if isinstance(value, str | int | float | bool):
                return True, value_text(value)
            return False, None
        if kind == "boolean":
            if isinstance(value, bool):
                return True, value
            if value in ("true", "false"):
                return True, value == "true"
            return False, None
        return False, None

    def _equals(self, row: str, name: str, value: Any) -> list[_Test] | None:
        found = self._column(name)
        if found is None:
            return None
        spec, facts = found
        kind = self._scalar_type(spec, facts)
        if kind is None:
            return None
        ok, v = self._json_value(kind, value)
        if not ok:
            return None
        return [_Test(row, spec.column or name, kind, "eq", v)]

    # ── conditions ──

    def bounds(self, tree: Condition, row: str) -> tuple[Node, Node]:
        if isinstance(tree, Group):
            parts = [self.bounds(item, row) for item in tree.items]
            join = all_of if tree.mode == "all" else any_of
            return join([u for u, _ in parts]), join([lo for _, lo in parts])
        if isinstance(tree, Negation):
            upper, lower = self.bounds(tree.item, row)
            return negate(lower), negate(upper)
        if isinstance(tree, SqlCondition):
            return UNKNOWN
        return self._leaf(tree, row)

    def _leaf(self, cond: FieldCondition, row: str) -> tuple[Node, Node]:
        op = cond.operator
        if op in ("changed", "changed_to", "changed_from"):
            return self._transition(cond)
        if op in ("equals", "not_equals", "in", "not_in"):
            values = cond.value if op in ("in", "not_in") else [cond.value]
            if not isinstance(values, list):
                return UNKNOWN
            tests: list[_Test] = []
            for v in values:
                found = self._equals(row, cond.field, v)
                if found is None:
                    return UNKNOWN
                tests.extend(found)
            upper, lower = _bounds_of(tests, "any")
            return (
                (negate(lower), negate(upper))
                if op in ("not_equals", "not_in")
                else (
                    upper,
                    lower,
                )
            )
        if op in ("greater_than", "less_than", "greater_or_equal", "less_or_equal", "between"):
            return self._ordering(cond, row)
        if op in ("is_empty", "is_not_empty"):
            test = self._empty(cond.field, row)
            if test is None:
                return UNKNOWN
            upper, lower = test.node(True), test.node(False)
            return (negate(lower), negate(upper)) if op == "is_not_empty" else (upper, lower)
        return UNKNOWN

    def _ordering(self, cond: FieldCondition, row: str) -> tuple[Node, Node]:
        found = self._column(cond.field)
        if found is None:
            return UNKNOWN
        spec, facts = found
        kind = self._scalar_type(spec, facts)
        if kind not in ("number", "string") or spec.kind == "enum":
            return UNKNOWN
        pairs = (
            [("ge", cond.value[0]), ("le", cond.value[1])]
            if cond.operator == "between"
            else [
                (
                    {
                        "greater_than": "gt",
                        "less_than": "lt",
                        "greater_or_equal": "ge",
                        "less_or_equal": "le",
                    }[cond.operator],
                    cond.value,
                )
            ]
        )
        tests = []
        for symbol, v in pairs:
            ok, jv = self._json_value(kind, v)
            if not ok:
                return UNKNOWN
            tests.append(_Test(row, spec.column or cond.field, kind, symbol, jv))
        return _bounds_of(tests, "all")

    def _empty(self, name: str, row: str) -> _Test | None:
        found = self._column(name)
        if found is None:
            return None
        spec, facts = found
        column = spec.column or name
        if spec.kind == "text":
            if facts.base_typname in EXACT_STRINGS and facts.deterministic:
                return _Test(row, column, "string", "empty", null=True)
            return None
        if spec.kind == "array":
            return _Test(row, column, "array", "empty", null=True)
        json_type = NULL_EXACT_KINDS.get(spec.kind)
        if json_type is None:
            return None
        return _Test(row, column, json_type, "null", null=True)

    def changed(self, name: str) -> Node:
        """True whenever the field's value differs between the old and the new row."""
        found = self._column(name)
        if found is None:
            return True  # a derived field or a JSON path: some column changed, at least
        return {"changed": found[0].column}

    def _transition(self, cond: FieldCondition) -> tuple[Node, Node]:
        changed = self.changed(cond.field)
        if cond.operator == "changed":
            return changed, False
        side = "n" if cond.operator == "changed_to" else "o"
        equal = self._equals(side, cond.field, cond.value)
        upper = _bounds_of(equal, "any")[0] if equal else True
        return all_of([changed, upper]), False


def compile_filter(
    wf: WorkflowDefinition, entity: EntitySchema | None, facts: dict[str, ColumnFacts]
) -> dict[str, Node]:
    """{operation: tree} for the operations whose captured rows ``wf`` could match."""
    op = TRIGGER_OPS.get(wf.trigger_type)
    if op is None:
        return {}
    if entity is None:
        return {op: True}
    c = PrefilterCompiler(entity, facts)
    parts = [c.bounds(wf.parsed_conditions, "n")[0]]
    trigger = wf.parsed_trigger
    if isinstance(trigger, FieldUpdated):
        parts.append(any_of([c.changed(name) for name in trigger.watched_fields]))
        first = trigger.watched_fields[0]
        for side, value in (("o", trigger.from_), ("n", trigger.to)):
            if value is not UNSET:
                equal = c._equals(side, first, value)
                parts.append(_bounds_of(equal, "any")[0] if equal else True)
    if wf.edge_triggered and op == "update":
        # NOT (conditions on the old row): above it, NOT of what is known below them.
        parts.append(negate(c.bounds(wf.parsed_conditions, "o")[1]))
    return {op: all_of(parts)}


def dumps(tree: dict[str, Node]) -> str:
    return json.dumps(tree, sort_keys=True, separators=(",", ":"))


# ───────────────────────────── capture demands ─────────────────────────────
# Other parts of crmflow (the scorecards' signal tables) need rows captured whatever the
# workflows say: a demanded (entity, operation) keeps every row, and the columns it
# names (all when None). Stored in crmflow.capture_demands (migration 0022); the
# entity's capture is regenerated in the caller's transaction, so a demand holds from
# that transaction's commit on, and a rollback leaves capture as it was.

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
