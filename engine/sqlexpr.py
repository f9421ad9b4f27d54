"""Safe SQL expressions: ``{"sql": "..."}`` conditions and derived fields.

The text is parsed by PostgreSQL's own parser (pglast) as the single target of a
``SELECT``; it is accepted only when every node of the tree is on a whitelist:
column references, constants, operators, casts to plain types, CASE/COALESCE and a
short list of pure functions. No subqueries, no DML, no volatile or side-effecting
functions, no catalogs. Column references are then qualified with the row alias and
the tree is printed back by pglast: what reaches the database is always our own
rendering of a checked tree, never the user's text.

The matcher evaluates the expression on every event, so what it may build is bounded
too (:func:`_size`): string-growing functions are modelled by how many times the row's
size they can produce, and refused above :data:`MAX_GROWTH` times (or
:data:`MAX_BUILT_CHARS` characters of constants), or nested deeper than
:data:`MAX_STRING_DEPTH`; ``replace``/``regexp_replace`` take constant replacements,
``lpad``/``rpad`` constant lengths up to :data:`MAX_PAD`; regular expressions (``~``,
``regexp_replace``) are constants that pass :func:`regex_problem`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any, cast

import pglast
from pglast import ast, enums
from pglast.stream import RawStream

MAX_EXPRESSION_LENGTH = 2000
MAX_NODES = 500
MAX_GROWTH = 16  # an expression builds strings of at most 16 times the row's size...
MAX_BUILT_CHARS = 100_000  # ...plus this many characters from its constants
MAX_STRING_DEPTH = 8  # string functions nested in string functions
MAX_PAD = 1000  # lpad/rpad: a constant length up to this
MAX_REGEX_LENGTH = 1000
MAX_REGEX_REPEAT = 100  # {m,n} bounds
MAX_REGEX_REPEATS = 1000  # all the {m,n} bounds of one regex, added up

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


class UnsafeExpression(ValueError):
    """The expression is not valid SQL or uses something outside the whitelist."""


def _names(nodes: Iterable[Any] | None) -> list[str]:
    return [cast(str, n.sval) for n in (nodes or ()) if isinstance(n, ast.String)]


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


# ───────────────────────────── regular expressions ─────────────────────────────

_BOUND = re.compile(r"\{(\d+)(,(\d*))?\}")
_OPTIONS = re.compile(r"\(\?([a-z]*)\)")


def regex_problem(pattern: str) -> str | None:
    """Why PostgreSQL's regex engine could spend unbounded time on ``pattern``, or None.

    PostgreSQL's engine (Spencer's, a DFA with back-tracking for back-references and
    sub-match dissection) has no step limit: a repetition of a group that itself holds
    a repetition (``(a+)+``, ``([[:alpha:]]{1,200}\\s?){1,200}``), large counted
    repetitions (``x{1,1000}``) and back-references (``(.*)\\1``) can take seconds to
    minutes on a few kilobytes. So those are refused; ``?`` and ``{0,1}`` are not
    repetitions. The check reads the advanced-regex syntax (ARE) conservatively: it may
    refuse an odd but harmless pattern, never the other way round. Syntax errors are
    left to PostgreSQL (the workflow is checked against it when saved).
    """
    if len(pattern) > MAX_REGEX_LENGTH:
        return f"a regular expression is limited to {MAX_REGEX_LENGTH} characters"
    p = pattern
    if p.startswith("***="):
        return None  # the rest is a literal string
    if p.startswith("***:"):
        p = p[4:]
    options = _OPTIONS.match(p)
    if options:
        if "q" in options[1]:
            return None  # literal
        if "b" in options[1] or "e" in options[1]:
            return "only advanced regular expressions are accepted (no (?b) or (?e))"
        p = p[options.end() :]
    # One frame per open group: does it hold a repetition?
    stack: list[bool] = [False]
    total = 0
    last: bool | None = None  # the previous atom: None (nothing to repeat), a group's flag
    i = 0
    while i < len(p):
        c = p[i]
        if c == "\\":
            d = p[i + 1 : i + 2]
            if d.isdigit() and d != "0":
                return f"back-references ({c}{d}) can make matching take exponential time"
            i += 2
            if d in ("x", "u", "U"):
                while i < len(p) and p[i] in "0123456789abcdefABCDEF":
                    i += 1
            elif d == "c":
                i += 1
            elif d == "0":
                while i < len(p) and p[i] in "01234567":
                    i += 1
            last = False
            continue
        if c == "[":
            i = _bracket_end(p, i)
            last = False
            continue
        if c == "(":
            stack.append(False)
            i += 1
            if p.startswith("?", i):  # (?: (?= (?! (?<= (?<!
                i += 1
                while i < len(p) and p[i] in ":=!<":
                    i += 1
            last = None
            continue
        if c == ")":
            inner = stack.pop() if len(stack) > 1 else False
            stack[-1] = stack[-1] or inner
            last = inner
            i += 1
            continue
        if c in "*+?{":
            low, high, end = 0, -1, i + 1  # high -1: unbounded
            if c == "+":
                low = 1
            elif c == "?":
                high = 1
            elif c == "{":
                bound = _BOUND.match(p, i)
                if bound is None:  # not a bound; PostgreSQL says what it is
                    last = False
                    i += 1
                    continue
                low = int(bound[1])
                high = low if bound[2] is None else (int(bound[3]) if bound[3] else -1)
                end = bound.end()
                if max(low, high) > MAX_REGEX_REPEAT:
                    return (
                        f"the repetition {bound[0]} is too large (at most {MAX_REGEX_REPEAT}):"
                        " large repetitions make matching slow"
                    )
                total += max(low, high)
                if total > MAX_REGEX_REPEATS:
                    return (
                        f"the repetition counts add up to more than {MAX_REGEX_REPEATS}:"
                        " large repetitions make matching slow"
                    )
            if end < len(p) and p[end] == "?":
                end += 1  # non-greedy
            repeats = high == -1 or high > 1
            if repeats and last:
                return (
                    "nested quantifiers (a repeated group that holds a repetition, such as"
                    " (a+)+) can make matching take exponential time"
                )
            if repeats:
                stack[-1] = True
            last = None
            i = end
            continue
        last = False if c not in "|^$" else None
        i += 1
    return None


def _bracket_end(p: str, i: int) -> int:
    """The index after the bracket expression that starts at ``p[i] == '['``."""
    j = i + 1
    if p.startswith("^", j):
        j += 1
    if p.startswith("]", j):
        j += 1
    while j < len(p) and p[j] != "]":
        if p[j] == "[" and p[j + 1 : j + 2] in (":", ".", "="):
            close = p.find(p[j + 1] + "]", j + 2)
            j = len(p) if close < 0 else close + 2
            continue
        j += 2 if p[j] == "\\" else 1
    return j + 1


# ───────────────────────────── what an expression may build ─────────────────────────────

REGEX_OPERATORS = frozenset({"~", "~*", "!~", "!~*"})
LIKE_OPERATORS = frozenset({"~~", "~~*", "!~~", "!~~*"})
# Functions returning text, counted for MAX_STRING_DEPTH; the others of ALLOWED_FUNCTIONS
# return numbers, booleans, dates or JSON no larger than their input.
_TEXT_FUNCTIONS = frozenset(
    {
        "btrim",
        "concat",
        "concat_ws",
        "initcap",
        "left",
        "lower",
        "lpad",
        "ltrim",
        "md5",
        "regexp_replace",
        "replace",
        "reverse",
        "right",
        "rpad",
        "rtrim",
        "split_part",
        "substr",
        "substring",
        "to_char",
        "trim",
        "upper",
    }
)
# No larger than the largest argument.
_SHRINKING = frozenset(
    {
        "btrim",
        "initcap",
        "left",
        "lower",
        "ltrim",
        "reverse",
        "right",
        "rtrim",
        "split_part",
        "substr",
        "substring",
        "trim",
        "upper",
        "jsonb_extract_path",
        "jsonb_extract_path_text",
    }
)
_NUMERIC_FUNCTIONS = frozenset(
    {
        "abs",
        "array_length",
        "array_position",
        "cardinality",
        "ceil",
        "ceiling",
        "char_length",
        "character_length",
        "date_part",
        "extract",
        "floor",
        "jsonb_array_length",
        "length",
        "mod",
        "position",
        "power",
        "round",
        "sign",
        "sqrt",
        "strpos",
        "trunc",
    }
)
_BACKREF = re.compile(r"\\[0-9&]")

Size = tuple[int, int]  # (times the row's size, characters from constants)


def _const_text(node: Any) -> str | None:
    if isinstance(node, ast.TypeCast):
        node = node.arg
    if isinstance(node, ast.A_Const) and isinstance(node.val, ast.String):
        return node.val.sval
    return None


def _const_int(node: Any) -> int | None:
    if isinstance(node, ast.TypeCast):
        node = node.arg
    if isinstance(node, ast.A_Const) and isinstance(node.val, ast.Integer):
        return node.val.ival
    return None


def _surely_numeric(node: Any) -> bool:
    """True when ``node`` cannot be text (so substring() reads it as a position)."""
    if isinstance(node, ast.A_Const):
        return isinstance(node.val, ast.Integer | ast.Float)
    if isinstance(node, ast.TypeCast):
        names = _names(node.typeName.names if node.typeName else None)
        return bool(names) and names[-1].lower() in _NUMERIC_TYPES
    if isinstance(node, ast.A_Expr):
        return _names(node.name)[:1] in (["+"], ["-"], ["*"], ["/"], ["%"])
    if isinstance(node, ast.FuncCall):
        return _names(node.funcname)[-1].lower() in _NUMERIC_FUNCTIONS
    return False


def _biggest(sizes: Iterable[Size]) -> Size:
    sizes = list(sizes)
    return (max((s[0] for s in sizes), default=0), max((s[1] for s in sizes), default=0))


def _total(sizes: Iterable[Size]) -> Size:
    sizes = list(sizes)
    return (sum(s[0] for s in sizes), sum(s[1] for s in sizes))


def _times(size: Size, factor: int) -> Size:
    return (size[0] * factor, size[1] * factor)


class _Bounds:
    """Walks a checked tree: the size of what each node builds, and its regexes."""

    def __init__(self) -> None:
        self.patterns: list[str] = []

    def pattern(self, node: Any, where: str) -> None:
        text = _const_text(node)
        if text is None:
            raise UnsafeExpression(
                f"the pattern of {where} must be a constant string (a regular expression"
                " taken from the data cannot be bounded)"
            )
        problem = regex_problem(text)
        if problem:
            raise UnsafeExpression(f"the pattern {text!r} of {where}: {problem}")
        self.patterns.append(text)

    def size(self, node: Any, depth: int = 0, in_concat: bool = False) -> Size:
        result = self._size(node, depth, in_concat)
        if result[0] > MAX_GROWTH:
            raise UnsafeExpression(
                f"this expression can build strings {result[0]} times the size of the row"
                f" (at most {MAX_GROWTH}): replace() and regexp_replace() multiply the size"
                " of their input by the length of their replacement, || and concat() add"
                " up their parts"
            )
        if result[1] > MAX_BUILT_CHARS:
            raise UnsafeExpression(
                f"this expression can build strings of {result[1]} characters from its"
                f" constants (at most {MAX_BUILT_CHARS})"
            )
        return result

    def _size(self, node: Any, depth: int, in_concat: bool) -> Size:
        if node is None or not isinstance(node, ast.Node):
            return (0, 0)
        if isinstance(node, ast.ColumnRef):
            return (1, 0)
        if isinstance(node, ast.A_Const):
            return (0, len(node.val.sval or "")) if isinstance(node.val, ast.String) else (0, 0)
        if isinstance(node, ast.TypeCast):
            return self.size(node.arg, depth)
        if isinstance(node, ast.A_Expr):
            return self._expr(node, depth, in_concat)
        if isinstance(node, ast.FuncCall):
            return self._call(node, depth)
        if isinstance(node, ast.CaseExpr):
            self.size(node.arg, depth)
            results = []
            for when in node.args or ():
                self.size(when.expr, depth)
                results.append(self.size(when.result, depth))
            results.append(self.size(node.defresult, depth))
            return _biggest(results)
        if isinstance(node, ast.CoalesceExpr | ast.MinMaxExpr):
            return _biggest(self.size(a, depth) for a in node.args or ())
        if isinstance(node, ast.A_ArrayExpr):
            return _total(self.size(e, depth) for e in node.elements or ())
        if isinstance(node, ast.A_Indirection):
            for index in node.indirection or ():
                self.size(index, depth)
            return self.size(node.arg, depth)
        for slot in node:  # booleans, tests, subscripts: small results; check the parts
            value = getattr(node, slot)
            for child in value if isinstance(value, tuple | list) else (value,):
                self.size(child, depth)
        return (0, 0)

    def _expr(self, node: ast.A_Expr, depth: int, in_concat: bool) -> Size:
        op = (_names(node.name) or [""])[0]
        if op in REGEX_OPERATORS and node.lexpr is not None:
            if node.kind in (enums.A_Expr_Kind.AEXPR_OP_ANY, enums.A_Expr_Kind.AEXPR_OP_ALL):
                if not isinstance(node.rexpr, ast.A_ArrayExpr):
                    raise UnsafeExpression(
                        f"the patterns of {op} ANY/ALL must be written ARRAY['...', ...]"
                    )
                for element in node.rexpr.elements or ():
                    self.pattern(element, op)
            else:
                self.pattern(node.rexpr, op)
        if op in LIKE_OPERATORS and node.lexpr is not None:
            patterns = (
                node.rexpr.elements or ()
                if isinstance(node.rexpr, ast.A_ArrayExpr)
                else (node.rexpr,)
            )
            if any(_const_text(p) is None for p in patterns):
                raise UnsafeExpression(
                    "LIKE patterns must be constant strings (a pattern taken from the data"
                    " costs the product of the two lengths)"
                )
        if op == "||":
            inner = depth if in_concat else depth + 1
            if inner > MAX_STRING_DEPTH:
                raise UnsafeExpression(
                    f"string functions nest deeper than {MAX_STRING_DEPTH} levels"
                )
            return _total([self.size(node.lexpr, inner, True), self.size(node.rexpr, inner, True)])
        sides = []
        for side in (node.lexpr, node.rexpr):
            for child in side if isinstance(side, tuple | list) else (side,):
                sides.append(self.size(child, depth))
        if node.kind == enums.A_Expr_Kind.AEXPR_NULLIF:
            return _biggest(sides)
        if op in ("->", "->>", "#>", "#>>"):
            return sides[0]
        return (0, 0)  # comparisons, arithmetic: booleans and numbers

    def _call(self, node: ast.FuncCall, depth: int) -> Size:
        name = _names(node.funcname)[-1].lower()
        args = list(node.args or ())
        if name in _TEXT_FUNCTIONS:
            depth += 1
            if depth > MAX_STRING_DEPTH:
                raise UnsafeExpression(
                    f"string functions nest deeper than {MAX_STRING_DEPTH} levels"
                )
        sizes = [self.size(a, depth) for a in args]
        if name == "replace" and len(args) == 3:
            new = _const_text(args[2])
            if new is None:
                raise UnsafeExpression(
                    "replace() needs a constant replacement string (it is copied once per"
                    " match, so a column would square the size of the row)"
                )
            old = _const_text(args[1])
            factor = -(-len(new) // len(old)) if old else len(new)
            return _times(sizes[0], max(factor, 1))
        if name == "regexp_replace" and len(args) >= 3:
            self.pattern(args[1], "regexp_replace()")
            new = _const_text(args[2])
            if new is None:
                raise UnsafeExpression(
                    "regexp_replace() needs a constant replacement string (it is copied once"
                    " per match, so a column would square the size of the row)"
                )
            flags = _const_text(args[3]) if len(args) == 4 else None
            every = len(args) > 3 and (flags is None or "g" in flags)
            factor = 1 + len(new) if every else 1 + len(_BACKREF.findall(new))
            size = _times(sizes[0], factor)
            return (size[0], size[1] + len(new))
        if name in ("lpad", "rpad") and len(args) >= 2:
            length = _const_int(args[1])
            if length is None:
                raise UnsafeExpression(f"{name}() needs a constant length")
            if length > MAX_PAD:
                raise UnsafeExpression(f"{name}() lengths are limited to {MAX_PAD}")
            if len(args) > 2 and _const_text(args[2]) is None:
                raise UnsafeExpression(f"{name}() needs a constant fill string")
            return (0, max(length, 0))
        if name in ("substring", "substr"):
            for arg in args[1:]:
                text = _const_text(arg)
                if text is not None:
                    if len(args) == 2:
                        self.pattern(arg, f"{name}()")
                    elif regex_problem(text):
                        raise UnsafeExpression(
                            f"the pattern {text!r} of {name}(): {regex_problem(text)}"
                        )
                elif not _surely_numeric(arg):
                    raise UnsafeExpression(
                        f"{name}() takes positions that are numbers (write ::int) or a"
                        " constant pattern"
                    )
        if name == "concat":
            return _total(sizes)
        if name == "concat_ws" and sizes:
            return _total([*sizes[1:], _times(sizes[0], max(len(sizes) - 2, 0))])
        if name == "to_char" and len(sizes) == 2:
            return _total([sizes[0], _times(sizes[1], 8)])
        if name == "md5":
            return (0, 32)
        if name in _SHRINKING:
            return _biggest(sizes)
        return (0, 0)


def _bound(tree: ast.Node) -> list[str]:
    """Raise UnsafeExpression if ``tree`` can build too much; returns its regexes."""
    bounds = _Bounds()
    bounds.size(tree)
    return bounds.patterns


def regex_patterns(source: str) -> list[str]:
    """The constant regular expressions of a valid expression (checked when saving)."""
    return _bound(_parse(source))
