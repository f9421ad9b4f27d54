"""The Python reference evaluator of conditions: docs/semantics.md written as code.

Rows hold the Python values psycopg reads (str, int, Decimal, bool, datetime, date,
list, parsed JSON); ``None`` is SQL NULL. Every condition is two-valued.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from engine.catalog import EntitySchema, FieldSpec
from engine.conditions import (
    MAX_REGEX_INPUT,
    Condition,
    FieldCondition,
    Group,
    Negation,
    SqlCondition,
)
from engine.model import parse_duration


class Unsupported(Exception):
    pass


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | Decimal) and not isinstance(v, bool)


def json_equal(a: Any, b: Any) -> bool:
    """jsonb equality: booleans are not numbers, numbers compare by value."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return Decimal(str(a)) == Decimal(str(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def json_contains(container: Any, contained: Any, top: bool = True) -> bool:
    """jsonb @>."""
    if isinstance(container, dict):
        return isinstance(contained, dict) and all(
            k in container and json_contains(container[k], v, False) for k, v in contained.items()
        )
    if isinstance(container, list):
        if isinstance(contained, list):
            return all(any(json_contains(c, x, False) for c in container) for x in contained)
        # A top-level array contains a primitive that is one of its elements.
        return (
            top
            and not isinstance(contained, dict)
            and any(json_equal(c, contained) for c in container if not isinstance(c, dict | list))
        )
    return json_equal(container, contained)


def json_empty(v: Any) -> bool:
    return v is None or v == "" or v == [] or v == {}


def coerce(value: Any, kind: str, spec: FieldSpec) -> Any:
    """A condition's JSON value as the column's Python value (what CAST would give)."""
    if kind == "number":
        return Decimal(str(value))
    if kind == "text":
        return (
            value
            if isinstance(value, str)
            else ("true" if value is True else "false" if value is False else str(value))
        )
    if kind == "boolean":
        return value if isinstance(value, bool) else str(value).lower() in ("true", "t", "1", "yes")
    if kind == "date":
        return value if isinstance(value, date) else date.fromisoformat(value)
    if kind == "timestamp":
        if isinstance(value, datetime):
            return value
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    if kind == "uuid":
        return uuid.UUID(str(value))
    if kind == "enum":
        return str(value)
    if kind == "array":
        assert spec.elem_kind is not None
        return [coerce(v, spec.elem_kind, spec) for v in value]
    return value


def _order_key(v: Any, kind: str, spec: FieldSpec) -> Any:
    if kind == "enum":
        return spec.enum_labels.index(v)
    if kind == "number":
        return Decimal(str(v))
    if kind == "timestamp" and isinstance(v, datetime) and v.tzinfo is None:
        return v.replace(tzinfo=UTC)
    return v  # text: code point order, as COLLATE "C"


class Reference:
    def __init__(self, entity: EntitySchema, now: datetime) -> None:
        self.entity = entity
        self.now = now  # aware; the session time zone is UTC

    def evaluate(
        self,
        tree: Condition,
        row: dict[str, Any],
        old: dict[str, Any] | None = None,
        op: str = "insert",
    ) -> bool:
        if isinstance(tree, Group):
            results = [self.evaluate(i, row, old, op) for i in tree.items]
            return all(results) if tree.mode == "all" else any(results)
        if isinstance(tree, Negation):
            return not self.evaluate(tree.item, row, old, op)
        if isinstance(tree, SqlCondition):
            raise Unsupported("sql conditions are evaluated by PostgreSQL only")
        return self._leaf(tree, row, old, op)

    def _get(self, spec: FieldSpec, row: dict[str, Any]) -> Any:
        if spec.derived_source is not None:
            raise Unsupported("derived fields are evaluated by PostgreSQL only")
        value = row.get(spec.column)
        for key in spec.json_path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def _leaf(
        self, cond: FieldCondition, row: dict[str, Any], old: dict[str, Any] | None, op: str
    ) -> bool:
        spec = self.entity.resolve(cond.field)
        assert spec is not None
        f = self._get(spec, row)
        o = cond.operator
        if o in ("changed", "changed_to", "changed_from"):
            if op != "update" or old is None:
                return False
            before = self._get(spec, old)
            distinct = not self._same(spec, f, before)
            if o == "changed":
                return distinct
            side = f if o == "changed_to" else before
            return distinct and self._equals(spec, side, cond.value)
        return self._compare(spec, f, o, cond.value)

    def _same(self, spec: FieldSpec, a: Any, b: Any) -> bool:  # NOT IS DISTINCT FROM
        if a is None or b is None:
            return a is None and b is None
        if spec.kind in ("json", "jsonpath"):
            return json_equal(a, b)
        return a == b

    def _equals(self, spec: FieldSpec, f: Any, value: Any) -> bool:
        return self._compare(spec, f, "equals", value)

    def _compare(self, spec: FieldSpec, f: Any, o: str, value: Any) -> bool:
        kind = spec.kind
        if kind == "jsonpath":
            return self._json_value(f, o, value)
        negations = {
            "not_equals": "equals",
            "not_in": "in",
            "not_contains": "contains",
            "is_not_empty": "is_empty",
        }
        if o in negations:
            return not self._compare(spec, f, negations[o], value)
        if o == "is_empty":
            if kind == "text":
                return f is None or f == ""
            if kind == "array":
                return f is None or len(f) == 0
            if kind == "json":
                return json_empty(f)
            return f is None
        if f is None:
            return False
        if o == "equals":
            if kind == "json":
                return json_equal(f, value)
            return f == coerce(value, kind, spec)
        if o in ("greater_than", "less_than", "greater_or_equal", "less_or_equal", "between"):
            key = _order_key(f, kind, spec)
            if o == "between":
                lo, hi = (_order_key(coerce(v, kind, spec), kind, spec) for v in value)
                return lo <= key <= hi
            v = _order_key(coerce(value, kind, spec), kind, spec)
            return {
                "greater_than": key > v,
                "less_than": key < v,
                "greater_or_equal": key >= v,
                "less_or_equal": key <= v,
            }[o]
        if o == "in":
            if kind == "array":
                wanted = coerce(value, "array", spec)
                return any(x is not None and x in wanted for x in f)
            return any(f == coerce(v, kind, spec) for v in value)
        if o == "contains":
            if kind == "array":
                assert spec.elem_kind
                return coerce(value, spec.elem_kind, spec) in [x for x in f if x is not None]
            if kind == "json":
                return json_contains(f, value)
            return str(value).lower() in f.lower()
        if o == "starts_with":
            return f.lower().startswith(str(value).lower())
        if o == "ends_with":
            return f.lower().endswith(str(value).lower())
        if o == "matches":
            return re.search(str(value), f[:MAX_REGEX_INPUT]) is not None
        if o in ("older_than", "within_last"):
            cutoff = self.now - timedelta(seconds=parse_duration(value, default_unit="d"))
            current: Any = self.now
            if kind == "date":
                cutoff, current = cutoff.date(), self.now.date()
            elif f.tzinfo is None:
                f = f.replace(tzinfo=UTC)
            return f < cutoff if o == "older_than" else cutoff <= f <= current
        raise Unsupported(o)

    def _json_value(self, f: Any, o: str, value: Any) -> bool:
        negations = {
            "not_equals": "equals",
            "not_in": "in",
            "not_contains": "contains",
            "is_not_empty": "is_empty",
        }
        if o in negations:
            return not self._json_value(f, negations[o], value)
        if o == "is_empty":
            return json_empty(f)
        if f is None:
            return False
        if o == "equals":
            return json_equal(f, value)
        if o == "in":
            return any(json_equal(f, v) for v in value)
        if o in ("greater_than", "less_than", "greater_or_equal", "less_or_equal", "between"):
            values = value if o == "between" else [value]
            if all(_is_number(v) for v in values):
                if not _is_number(f):
                    return False
                key, vals = Decimal(str(f)), [Decimal(str(v)) for v in values]
            else:
                if not isinstance(f, str):
                    return False
                key, vals = f, values
            if o == "between":
                return vals[0] <= key <= vals[1]
            return {
                "greater_than": key > vals[0],
                "less_than": key < vals[0],
                "greater_or_equal": key >= vals[0],
                "less_or_equal": key <= vals[0],
            }[o]
        if o == "contains":
            if isinstance(f, list):
                return json_contains(f, [value])
            return isinstance(f, str) and str(value).lower() in f.lower()
        if not isinstance(f, str):
            return False
        if o == "starts_with":
            return f.lower().startswith(str(value).lower())
        if o == "ends_with":
            return f.lower().endswith(str(value).lower())
        if o == "matches":
            return re.search(str(value), f[:MAX_REGEX_INPUT]) is not None
        raise Unsupported(o)
