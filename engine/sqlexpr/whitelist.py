"""What a safe expression may contain: functions, operators, types, expression kinds and
plain parse-tree nodes (``engine/sqlexpr/__init__.py`` walks the tree against these)."""

from __future__ import annotations

from pglast import ast, enums

MAX_EXPRESSION_LENGTH = 2000
MAX_NODES = 500

# Pure (immutable or stable, side-effect free) functions. Stable ones such as now()
# are fine: they are evaluated inside the matcher's transaction. Nothing that makes a
# value arbitrarily larger than its input (repeat): the matcher runs the expression on
# every event; the others are bounded by _size().
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
        "lpad",
        "length",
        "ln",  # scorecards' log-scaled factors (docs/scorecards.md); ln(0) is an error
        "log",
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
        "rpad",
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

_NUMERIC_TYPES = frozenset(
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
    }
)
ALLOWED_TYPES = _NUMERIC_TYPES | frozenset(
    {
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
