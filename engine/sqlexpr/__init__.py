"""Safe SQL expressions: ``{"sql": "..."}`` conditions and derived fields.

The text is parsed by PostgreSQL's own parser (pglast) as the single target of a
``SELECT``; it is accepted only when every node of the tree is on a whitelist:
column references, constants, operators, casts to plain types, CASE/COALESCE and a
short list of pure functions. No subqueries, no DML, no volatile or side-effecting
functions, no catalogs. Column references are then qualified with the row alias and
the tree is printed back by pglast: what reaches the database is always our own
rendering of a checked tree, never the user's text.

The matcher evaluates the expression on every event, so what it may build is bounded
too (``bounds.py``: string-growing functions, nesting, constant replacements and pad
lengths), and regular expressions must be constants that PostgreSQL matches in bounded
time (``regex.py``). ``whitelist.py`` lists what may appear at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import pglast
from pglast import ast
from pglast.stream import RawStream

from engine.sqlexpr.bounds import UnsafeExpression, _bound, _names
from engine.sqlexpr.regex import regex_problem
from engine.sqlexpr.whitelist import (
    _PLAIN_NODES,
    ALLOWED_EXPR_KINDS,
    ALLOWED_FUNCTIONS,
    ALLOWED_OPERATORS,
    ALLOWED_TYPES,
    ALLOWED_VALUE_FUNCTIONS,
    MAX_EXPRESSION_LENGTH,
    MAX_NODES,
)

__all__ = [
    "UnsafeExpression",
    "regex_patterns",
    "regex_problem",
    "render_expression",
    "validate_expression",
]


def _parse(source: str) -> ast.Node:
    if not isinstance(source, str) or not source.strip():
        raise UnsafeExpression("the expression is empty")
    if len(source) > MAX_EXPRESSION_LENGTH:
        raise UnsafeExpression(f"the expression is longer than {MAX_EXPRESSION_LENGTH} characters")
    try:
        statements = pglast.parse_sql(f"SELECT ({source})")
    except pglast.parser.ParseError as exc:
        raise UnsafeExpression(f"not a valid SQL expression: {exc}") from None
    if len(statements) != 1:
        raise UnsafeExpression("only a single expression is allowed (no ';')")
    select = statements[0].stmt
    if not isinstance(select, ast.SelectStmt) or _has_clauses(select):
        raise UnsafeExpression("only a single expression is allowed")
    targets = select.targetList or ()
    if len(targets) != 1 or targets[0].name:
        raise UnsafeExpression("only a single expression is allowed")
    expression: ast.Node = targets[0].val
    return expression


def _has_clauses(select: ast.SelectStmt) -> bool:
    return any(
        getattr(select, name, None)
        for name in (
            "fromClause",
            "whereClause",
            "groupClause",
            "havingClause",
            "windowClause",
            "valuesLists",
            "sortClause",
            "limitCount",
            "limitOffset",
            "lockingClause",
            "withClause",
            "distinctClause",
            "intoClause",
            "larg",
            "rarg",
        )
    )


def _check(node: Any, columns: set[str] | None, seen: list[int]) -> None:
    """Raise UnsafeExpression unless ``node`` and everything under it is allowed."""
    if node is None:
        return
    if isinstance(node, tuple | list):
        for child in node:
            _check(child, columns, seen)
        return
    if not isinstance(node, ast.Node):
        return
    seen[0] += 1
    if seen[0] > MAX_NODES:
        raise UnsafeExpression(f"the expression has more than {MAX_NODES} parts")

    if isinstance(node, ast.ColumnRef):
        fields = node.fields or ()
        if len(fields) != 1 or not isinstance(fields[0], ast.String):
            raise UnsafeExpression("columns must be named alone (write status, not t.status or *)")
        name = fields[0].sval
        if columns is not None and name not in columns:
            raise UnsafeExpression(f"unknown column {name!r}")
        return
    if isinstance(node, ast.A_Expr):
        if node.kind not in ALLOWED_EXPR_KINDS:
            raise UnsafeExpression(
                f"the construct {getattr(node.kind, 'name', None)} is not allowed"
            )
        names = node.name or ()
        if len(names) != 1 or _names(names)[0] not in ALLOWED_OPERATORS | {
            "~~",
            "~~*",
            "!~~",
            "!~~*",
            "BETWEEN",
            "NOT BETWEEN",
        }:
            raise UnsafeExpression(f"the operator {'.'.join(_names(names))!r} is not allowed")
        _check(node.lexpr, columns, seen)
        _check(node.rexpr, columns, seen)
        return
    if isinstance(node, ast.FuncCall):
        parts = _names(node.funcname)
        if len(parts) == 2 and parts[0] == "pg_catalog":
            parts = parts[1:]
        if len(parts) != 1 or parts[0].lower() not in ALLOWED_FUNCTIONS:
            raise UnsafeExpression(f"the function {'.'.join(parts)!r} is not allowed")
        if node.agg_order or node.agg_filter or node.over or node.agg_star or node.agg_distinct:
            raise UnsafeExpression("aggregates and window functions are not allowed")
        if node.func_variadic:
            raise UnsafeExpression("VARIADIC calls are not allowed")
        _check(node.args, columns, seen)
        return
    if isinstance(node, ast.TypeCast):
        _check_type(node.typeName)
        _check(node.arg, columns, seen)
        return
    if isinstance(node, ast.SQLValueFunction):
        if node.op not in ALLOWED_VALUE_FUNCTIONS:
            raise UnsafeExpression(f"{getattr(node.op, 'name', None)} is not allowed")
        return
    if isinstance(node, ast.A_Indirection):
        if not all(isinstance(i, ast.A_Indices) for i in node.indirection or ()):
            raise UnsafeExpression("only array subscripts are allowed after an expression")
        _check(node.arg, columns, seen)
        _check(node.indirection, columns, seen)
        return
    if isinstance(node, _PLAIN_NODES):
        for slot in node:
            _check(getattr(node, slot), columns, seen)
        return
    raise UnsafeExpression(f"{type(node).__name__} is not allowed in an expression")


def _check_type(type_name: ast.TypeName | None) -> None:
    if type_name is None:
        raise UnsafeExpression("casts are allowed to plain built-in types only")
    parts = _names(type_name.names)
    if len(parts) == 2 and parts[0] == "pg_catalog":
        parts = parts[1:]
    if type_name.setof or type_name.pct_type or len(parts) != 1:
        raise UnsafeExpression("casts are allowed to plain built-in types only")
    if parts[0].lower() not in ALLOWED_TYPES:
        raise UnsafeExpression(f"casts to {parts[0]!r} are not allowed")


def validate_expression(source: str, columns: Iterable[str] | None = None) -> None:
    """Raise :class:`UnsafeExpression` with the reason when ``source`` is not acceptable."""
    tree = _parse(source)
    _check(tree, set(columns) if columns is not None else None, [0])
    _bound(tree)


class _Qualify:
    """Rewrites bare column references ``col`` into ``alias.col``."""

    def __init__(self, alias: str) -> None:
        self.alias = alias

    def __call__(self, node: Any) -> Any:
        if isinstance(node, tuple | list):
            return type(node)(self(child) for child in node)
        if not isinstance(node, ast.Node):
            return node
        if isinstance(node, ast.ColumnRef):
            return ast.ColumnRef(fields=(ast.String(sval=self.alias), *(node.fields or ())))
        for slot in node:
            value = getattr(node, slot)
            if isinstance(value, ast.Node | tuple | list):
                setattr(node, slot, self(value))
        return node


@lru_cache(maxsize=4096)
def render_expression(source: str, alias: str) -> str:
    """The checked expression, printed by pglast with columns qualified by ``alias``."""
    tree = _parse(source)
    _check(tree, None, [0])
    _bound(tree)
    return str(RawStream()(_Qualify(alias)(tree)))


def regex_patterns(source: str) -> list[str]:
    """The constant regular expressions of a valid expression (checked when saving)."""
    return _bound(_parse(source))
