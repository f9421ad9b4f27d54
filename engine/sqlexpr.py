"""Safe SQL expressions: ``{"sql": "..."}`` conditions and derived fields.

The text is parsed by PostgreSQL's own parser (pglast) as the single target of a
``SELECT``; it is accepted only when every node of the tree is on a whitelist:
column references, constants, operators, casts to plain types, CASE/COALESCE and a
short list of pure functions. No subqueries, no DML, no volatile or side-effecting
functions, no catalogs. Column references are then qualified with the row alias and
the tree is printed back by pglast: what reaches the database is always our own
rendering of a checked tree, never the user's text.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import pglast
from pglast import ast, enums
from pglast.stream import RawStream

MAX_EXPRESSION_LENGTH = 2000
MAX_NODES = 500

# Pure (immutable or stable, side-effect free) functions. Stable ones such as now()
# are fine: they are evaluated inside the matcher's transaction. Nothing that makes a
# value many times larger than its input (repeat, lpad, rpad): the matcher runs the
# expression on every event, with no statement timeout.
ALLOWED_FUNCTIONS = frozenset(
    {
        "abs",
        "age",
        "array_length",
        "array_position",
        "btrim",
        "cardinality",
        "ceil",
        "ceiling",
        "char_length",
        "character_length",
        "concat",
        "concat_ws",
        "date",
        "date_part",
        "date_trunc",
        "extract",
        "floor",
        "greatest",
        "initcap",
        "isfinite",
        "jsonb_array_length",
        "jsonb_extract_path",
        "jsonb_extract_path_text",
        "jsonb_typeof",
        "justify_days",
        "least",
        "left",
        "length",
        "lower",
        "ltrim",
        "make_date",
        "make_interval",
        "md5",
        "mod",
        "now",
        "nullif",
        "position",
        "power",
        "regexp_replace",
        "replace",
        "reverse",
        "right",
        "round",
        "rtrim",
        "sign",
        "split_part",
        "sqrt",
        "starts_with",
        "strpos",
        "substr",
        "substring",
        "to_char",
        "trim",
        "trunc",
        "upper",
        "timezone",
        "coalesce",
    }
)

ALLOWED_OPERATORS = frozenset(
    {
        "=",
        "<>",
        "!=",
        "<",
        ">",
        "<=",
        ">=",
        "+",
        "-",
        "*",
        "/",
        "%",
        "||",
        "~",
        "~*",
        "!~",
        "!~*",
        "~~",
        "~~*",
        "!~~",
        "!~~*",
        "@>",
        "<@",
        "&&",
        "?",
        "?|",
        "?&",
        "->",
        "->>",
        "#>",
        "#>>",
    }
)

ALLOWED_TYPES = frozenset(
    {
        "int2",
        "int4",
        "int8",
        "smallint",
        "integer",
        "int",
        "bigint",
        "numeric",
        "decimal",
        "float4",
        "float8",
        "real",
        "double precision",
        "text",
        "varchar",
        "bpchar",
        "char",
        "bool",
        "boolean",
        "date",
        "timestamp",
        "timestamptz",
        "time",
        "timetz",
        "interval",
        "jsonb",
        "json",
        "uuid",
    }
)

ALLOWED_EXPR_KINDS = frozenset(
    {
        enums.A_Expr_Kind.AEXPR_OP,
        enums.A_Expr_Kind.AEXPR_OP_ANY,
        enums.A_Expr_Kind.AEXPR_OP_ALL,
        enums.A_Expr_Kind.AEXPR_DISTINCT,
        enums.A_Expr_Kind.AEXPR_NOT_DISTINCT,
        enums.A_Expr_Kind.AEXPR_NULLIF,
        enums.A_Expr_Kind.AEXPR_IN,
        enums.A_Expr_Kind.AEXPR_LIKE,
        enums.A_Expr_Kind.AEXPR_ILIKE,
        enums.A_Expr_Kind.AEXPR_BETWEEN,
        enums.A_Expr_Kind.AEXPR_NOT_BETWEEN,
    }
)

ALLOWED_VALUE_FUNCTIONS = frozenset(
    {
        enums.SQLValueFunctionOp.SVFOP_CURRENT_DATE,
        enums.SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP,
        enums.SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP_N,
        enums.SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP,
        enums.SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP_N,
    }
)

# Nodes that may appear anywhere; the ones with extra rules are checked below.
_PLAIN_NODES = (
    ast.A_Const,
    ast.BoolExpr,
    ast.NullTest,
    ast.BooleanTest,
    ast.CaseExpr,
    ast.CaseWhen,
    ast.CoalesceExpr,
    ast.MinMaxExpr,
    ast.A_ArrayExpr,
    ast.A_Indices,
    ast.String,
    ast.Integer,
    ast.Float,
    ast.Boolean,
)


class UnsafeExpression(ValueError):
    """The expression is not valid SQL or uses something outside the whitelist."""


def _names(nodes: Iterable[Any] | None) -> list[str]:
    return [n.sval for n in (nodes or ()) if isinstance(n, ast.String)]


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
    return targets[0].val


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
            raise UnsafeExpression(f"the construct {node.kind.name} is not allowed")
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
            raise UnsafeExpression(f"{node.op.name} is not allowed")
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


def _check_type(type_name: ast.TypeName) -> None:
    parts = _names(type_name.names)
    if len(parts) == 2 and parts[0] == "pg_catalog":
        parts = parts[1:]
    if type_name.setof or type_name.pct_type or len(parts) != 1:
        raise UnsafeExpression("casts are allowed to plain built-in types only")
    if parts[0].lower() not in ALLOWED_TYPES:
        raise UnsafeExpression(f"casts to {parts[0]!r} are not allowed")


def validate_expression(source: str, columns: Iterable[str] | None = None) -> None:
    """Raise :class:`UnsafeExpression` with the reason when ``source`` is not acceptable."""
    _check(_parse(source), set(columns) if columns is not None else None, [0])


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
            return ast.ColumnRef(fields=(ast.String(sval=self.alias), *node.fields))
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
    return str(RawStream()(_Qualify(alias)(tree)))
