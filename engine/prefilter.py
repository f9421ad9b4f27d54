"""The capture filter of a workflow version: which captured rows it could ever match.

Capture keeps a row only when some active workflow's filter holds for it
(``crmflow.capture_filter`` in sql/install/capture.sql, docs/design.md "Capture keeps what can
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

Rows kept whatever the workflows say (capture demands) are engine/capture_demands.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import psycopg

# Capture demands (rows kept whatever the workflows say) live in engine/capture_demands.py;
# their names stay importable from here for the callers written against this module.
from engine.capture_demands import OPERATIONS as OPERATIONS
from engine.capture_demands import DemandError as DemandError
from engine.capture_demands import drop_capture_demand as drop_capture_demand
from engine.capture_demands import set_capture_demand as set_capture_demand
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
