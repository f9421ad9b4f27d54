"""Compiling a condition tree to one SQL predicate over the typed rows ``n`` (new) and ``o``
(old) and the event ``ev`` (see ``engine/conditions/__init__.py`` for the NULL semantics)."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from engine.catalog import EntitySchema, FieldSpec
from engine.conditions.tree import (
    ALLOWED_BY_KIND,
    EMPTINESS,
    MAX_REGEX_INPUT,
    MEMBERSHIP,
    NEW,
    OLD,
    ORDERING,
    RECENCY,
    TEXTUAL,
    TRANSITIONS,
    Condition,
    FieldCondition,
    Group,
    Negation,
    SqlCondition,
)
from engine.durations import parse_duration


@dataclass(frozen=True)
class ValueCheck:
    """A value the database must accept as ``type_sql`` (checked when the workflow is saved)."""

    path: str
    text: str
    type_sql: str
    regex: bool = False


def value_text(value: Any) -> str:
    """The text PostgreSQL parses into the column's type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return json.dumps(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


@dataclass
class Compiler:
    """Compiles condition trees for one entity; collects issues instead of stopping."""

    entity: EntitySchema | None
    allow_transitions: bool = True
    now: sql.Composable = field(default_factory=lambda: sql.SQL("now()"))
    issues: list[tuple[str, str]] = field(default_factory=list)
    checks: list[ValueCheck] = field(default_factory=list)

    def compile(self, tree: Condition, alias: str = NEW) -> sql.Composable:
        if isinstance(tree, Group):
            if not tree.items:
                return sql.SQL("true" if tree.mode == "all" else "false")
            joiner = sql.SQL(" AND " if tree.mode == "all" else " OR ")
            return sql.SQL("({})").format(
                joiner.join(self.compile(item, alias) for item in tree.items)
            )
        if isinstance(tree, Negation):
            return sql.SQL("(NOT {})").format(self.compile(tree.item, alias))
        if isinstance(tree, SqlCondition):
            return self._sql(tree, alias)
        return self._leaf(tree, alias)

    # ── leaves ──

    def _sql(self, cond: SqlCondition, alias: str) -> sql.Composable:
        from engine.sqlexpr import (
            UnsafeExpression,
            regex_patterns,
            render_expression,
            validate_expression,
        )

        if self.entity is None:
            self.issues.append((cond.path, "sql conditions need an entity"))
            return sql.SQL("false")
        try:
            validate_expression(cond.sql, self.entity.columns)
            rendered = render_expression(cond.sql, alias)
            patterns = regex_patterns(cond.sql)
        except UnsafeExpression as exc:
            self.issues.append((f"{cond.path}.sql", str(exc)))
            return sql.SQL("false")
        for pattern in patterns:
            self.checks.append(ValueCheck(f"{cond.path}.sql", pattern, "pg_catalog.text", True))
        return sql.SQL("coalesce(({}), false)").format(sql.SQL(rendered))

    def _field(self, cond: FieldCondition) -> FieldSpec | None:
        if self.entity is None:
            self.issues.append((f"{cond.path}.field", "conditions need an entity to read"))
            return None
        spec = self.entity.resolve(cond.field)
        if spec is None:
            names = self.entity.field_names()
            hint = difflib.get_close_matches(cond.field, names, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            self.issues.append(
                (
                    f"{cond.path}.field",
                    f"{self.entity.entity_type} has no field {cond.field!r}{suggestion}",
                )
            )
        return spec

    def _leaf(self, cond: FieldCondition, alias: str) -> sql.Composable:
        spec = self._field(cond)
        if spec is None:
            return sql.SQL("false")
        op = cond.operator
        if op not in ALLOWED_BY_KIND[spec.kind]:
            self.issues.append(
                (
                    f"{cond.path}.operator",
                    f"{op} does not apply to {cond.field!r} ({spec.display_type}); "
                    f"use one of {sorted(ALLOWED_BY_KIND[spec.kind])}",
                )
            )
            return sql.SQL("false")
        if op in TRANSITIONS:
            return self._transition(cond, spec, alias)
        return self._compare(cond, spec, spec.expr(alias))

    def _transition(self, cond: FieldCondition, spec: FieldSpec, alias: str) -> sql.Composable:
        if not self.allow_transitions or alias != NEW:
            self.issues.append(
                (
                    f"{cond.path}.operator",
                    f"{cond.operator} compares the old and new row, so it needs an update "
                    "trigger (entity_updated or field_updated) and no edge_triggered",
                )
            )
            return sql.SQL("false")
        new, old = spec.expr(NEW), spec.expr(OLD)
        changed = sql.SQL("(ev.op = 'update' AND {} IS DISTINCT FROM {})").format(new, old)
        if cond.operator == "changed":
            return changed
        side = new if cond.operator == "changed_to" else old
        equal = self._compare(
            FieldCondition(cond.path, cond.field, "equals", cond.value, value_path=cond.value_path),
            spec,
            side,
        )
        return sql.SQL("({} AND {})").format(changed, equal)

    def _value(self, path: str, value: Any, type_sql: str) -> sql.Composable:
        text = value_text(value)
        self.checks.append(ValueCheck(path, text, type_sql))
        return sql.SQL("CAST({} AS {})").format(sql.Literal(text), sql.SQL(type_sql))

    def _json_value(self, path: str, value: Any) -> sql.Composable:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
        self.checks.append(ValueCheck(path, text, "pg_catalog.jsonb"))
        return sql.SQL("CAST({} AS jsonb)").format(sql.Literal(text))

    def _array_value(self, path: str, value: Any, spec: FieldSpec) -> sql.Composable:
        if not isinstance(value, list):
            self.issues.append((path, f"{spec.name!r} is an array: compare it with a list"))
            return sql.SQL("NULL")
        if not value:
            return sql.SQL("CAST({} AS {})").format(sql.Literal("{}"), sql.SQL(spec.type_sql))
        assert spec.elem_type_sql
        items = [self._value(f"{path}[{i}]", v, spec.elem_type_sql) for i, v in enumerate(value)]
        return sql.SQL("CAST(ARRAY[{}] AS {})").format(
            sql.SQL(", ").join(items), sql.SQL(spec.type_sql)
        )

    def _compare(self, cond: FieldCondition, spec: FieldSpec, f: sql.Composable) -> sql.Composable:
        if spec.kind == "jsonpath":
            return self._compare_json_value(cond, f)
        op, value, vpath = cond.operator, cond.value, cond.value_path or f"{cond.path}.value"
        kind = spec.kind

        def typed(v: Any, path: str = vpath) -> sql.Composable:
            if kind == "json":
                return self._json_value(path, v)
            if kind == "array":
                return self._array_value(path, v, spec)
            return self._value(path, v, spec.type_sql)

        if op in ("equals", "not_equals"):
            return _negate_if(
                op == "not_equals", _false_if_null(sql.SQL("{} = {}").format(f, typed(value)))
            )
        if op in ORDERING:
            ordered = sql.SQL('{} COLLATE "C"').format(f) if kind == "text" else f
            return self._ordering(op, ordered, value, vpath, typed)
        if op in MEMBERSHIP:
            if kind == "array":
                assert spec.elem_type_sql
                items = [
                    self._value(f"{vpath}[{i}]", v, spec.elem_type_sql) for i, v in enumerate(value)
                ]
                test = sql.SQL("{} && ARRAY[{}]").format(f, sql.SQL(", ").join(items))
            else:
                items = [typed(v, f"{vpath}[{i}]") for i, v in enumerate(value)]
                test = sql.SQL("{} = ANY(ARRAY[{}])").format(f, sql.SQL(", ").join(items))
            return _negate_if(op == "not_in", _false_if_null(test))
        if op in ("contains", "not_contains") and kind == "array":
            assert spec.elem_type_sql
            elem = self._value(vpath, value, spec.elem_type_sql)
            test = sql.SQL("{} = ANY({})").format(elem, f)
            return _negate_if(op == "not_contains", _false_if_null(test))
        if op in ("contains", "not_contains") and kind == "json":
            test = sql.SQL("{} @> {}").format(f, self._json_value(vpath, value))
            return _negate_if(op == "not_contains", _false_if_null(test))
        if op in TEXTUAL:
            return self._textual(op, f, value, vpath)
        if op in EMPTINESS:
            if kind == "text":
                test = sql.SQL("({} IS NULL OR {} = '')").format(f, f)
            elif kind == "array":
                test = sql.SQL("({} IS NULL OR cardinality({}) = 0)").format(f, f)
            elif kind == "json":
                test = _json_empty(f)
            else:
                test = sql.SQL("({} IS NULL)").format(f)
            return _negate_if(op == "is_not_empty", test)
        if op in RECENCY:
            return self._recency(op, f, value, kind)
        raise AssertionError(f"unhandled operator {op}")  # pragma: no cover

    def _ordering(
        self, op: str, f: sql.Composable, value: Any, vpath: str, typed: Any
    ) -> sql.Composable:
        if op == "between":
            low, high = typed(value[0], f"{vpath}[0]"), typed(value[1], f"{vpath}[1]")
            return _false_if_null(sql.SQL("({} >= {} AND {} <= {})").format(f, low, f, high))
        symbol = {
            "greater_than": ">",
            "less_than": "<",
            "greater_or_equal": ">=",
            "less_or_equal": "<=",
        }[op]
        return _false_if_null(sql.SQL("{} {} {}").format(f, sql.SQL(symbol), typed(value)))

    def _textual(self, op: str, f: sql.Composable, value: Any, vpath: str) -> sql.Composable:
        if op == "matches":
            from engine.sqlexpr import regex_problem

            text = value_text(value)
            problem = regex_problem(text)
            if problem:
                self.issues.append((vpath, f"{text!r} is refused: {problem}"))
                return sql.SQL("false")
            self.checks.append(ValueCheck(vpath, text, "pg_catalog.text", regex=True))
            # Bounded input: the regex reads the first MAX_REGEX_INPUT characters (values
            # that short are matched as they are: char(n) padding, citext's own ~).
            pattern, limit = sql.Literal(text), sql.Literal(MAX_REGEX_INPUT)
            return _false_if_null(
                sql.SQL(
                    "(CASE WHEN octet_length({f}) <= {n} THEN {f} ~ {p}"
                    " ELSE left({f}, {n}) ~ {p} END)"
                ).format(f=f, n=limit, p=pattern)
            )
        v = self._value(vpath, value, "pg_catalog.text")
        if op in ("contains", "not_contains"):
            test = sql.SQL("strpos(lower({}), lower({})) > 0").format(f, v)
            return _negate_if(op == "not_contains", _false_if_null(test))
        if op == "starts_with":
            return _false_if_null(sql.SQL("starts_with(lower({}), lower({}))").format(f, v))
        # ends_with: a prefix of the reversed strings (no LIKE, so no escaping to get wrong)
        return _false_if_null(
            sql.SQL("starts_with(reverse(lower({})), reverse(lower({})))").format(f, v)
        )

    def _recency(self, op: str, f: sql.Composable, value: Any, kind: str) -> sql.Composable:
        seconds = parse_duration(value, default_unit="d")
        cutoff: sql.Composable = sql.SQL("({} - make_interval(secs => {}))").format(
            self.now, sql.Literal(float(seconds))
        )
        current: sql.Composable = self.now
        if kind == "date":  # whole days: compare with the dates of the moments
            cutoff = sql.SQL("CAST({} AS date)").format(cutoff)
            current = sql.SQL("CAST({} AS date)").format(self.now)
        if op == "older_than":
            return _false_if_null(sql.SQL("{} < {}").format(f, cutoff))
        return _false_if_null(sql.SQL("({} >= {} AND {} <= {})").format(f, cutoff, f, current))

    def _compare_json_value(self, cond: FieldCondition, f: sql.Composable) -> sql.Composable:
        """A value inside JSON: equality as JSON, order on numbers or on strings, text
        operators on strings (and ``contains`` on arrays too)."""
        op, value, vpath = cond.operator, cond.value, cond.value_path or f"{cond.path}.value"
        as_text = sql.SQL(
            "(CASE WHEN jsonb_typeof({}) = 'string' THEN {} #>> ARRAY[]::text[] END)"
        ).format(f, f)
        if op in ("equals", "not_equals"):
            test = _false_if_null(sql.SQL("{} = {}").format(f, self._json_value(vpath, value)))
            return _negate_if(op == "not_equals", test)
        if op in MEMBERSHIP:
            items = [self._json_value(f"{vpath}[{i}]", v) for i, v in enumerate(value)]
            test = _false_if_null(
                sql.SQL("{} = ANY(ARRAY[{}])").format(f, sql.SQL(", ").join(items))
            )
            return _negate_if(op == "not_in", test)
        if op in ORDERING:
            values = value if op == "between" else [value]
            if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                number = sql.SQL(
                    "(CASE WHEN jsonb_typeof({}) = 'number' THEN "
                    "CAST({} #>> ARRAY[]::text[] AS numeric) END)"
                ).format(f, f)
                return self._ordering(
                    op,
                    number,
                    value,
                    vpath,
                    lambda v, p=vpath: self._value(p, v, "pg_catalog.numeric"),
                )
            if all(isinstance(v, str) for v in values):
                text = sql.SQL('{} COLLATE "C"').format(as_text)
                return self._ordering(
                    op, text, value, vpath, lambda v, p=vpath: self._value(p, v, "pg_catalog.text")
                )
            self.issues.append(
                (
                    vpath,
                    f"{op} on a JSON value compares numbers with numbers or strings with strings",
                )
            )
            return sql.SQL("false")
        if op in ("contains", "not_contains"):
            text_test = sql.SQL("strpos(lower({}), lower({})) > 0").format(
                as_text, self._value(vpath, value, "pg_catalog.text")
            )
            array_test = sql.SQL("{} @> {}").format(f, self._json_value(vpath, [value]))
            test = _false_if_null(
                sql.SQL(
                    "(CASE jsonb_typeof({}) WHEN 'array' THEN {} WHEN 'string' THEN {} END)"
                ).format(f, array_test, text_test)
            )
            return _negate_if(op == "not_contains", test)
        if op in TEXTUAL:
            return self._textual(op, as_text, value, vpath)
        if op in EMPTINESS:
            return _negate_if(op == "is_not_empty", _json_empty(f))
        raise AssertionError(f"unhandled operator {op}")  # pragma: no cover


def _false_if_null(expr: sql.Composable) -> sql.Composable:
    return sql.SQL("coalesce({}, false)").format(expr)


def _negate_if(negate: bool, expr: sql.Composable) -> sql.Composable:
    return sql.SQL("(NOT {})").format(expr) if negate else expr


def _json_empty(f: sql.Composable) -> sql.Composed:
    empties = sql.SQL(", ").join(
        sql.SQL("CAST({} AS jsonb)").format(sql.Literal(e)) for e in ("null", '""', "[]", "{}")
    )
    return sql.SQL("({} IS NULL OR {} IN ({}))").format(f, f, empties)
