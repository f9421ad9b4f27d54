"""What an expression may build: string-growing functions are modelled by how many times
the row's size they can produce (:class:`_Bounds`), refused above :data:`MAX_GROWTH` times
(or :data:`MAX_BUILT_CHARS` characters of constants) or nested deeper than
:data:`MAX_STRING_DEPTH`; regular expressions must be constants that pass
:func:`engine.sqlexpr.regex.regex_problem`."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, cast

from pglast import ast, enums

from engine.sqlexpr.regex import regex_problem
from engine.sqlexpr.whitelist import _NUMERIC_TYPES

MAX_GROWTH = 16  # an expression builds strings of at most 16 times the row's size...
MAX_BUILT_CHARS = 100_000  # ...plus this many characters from its constants
MAX_STRING_DEPTH = 8  # string functions nested in string functions
MAX_PAD = 1000  # lpad/rpad: a constant length up to this


class UnsafeExpression(ValueError):
    """The expression is not valid SQL or uses something outside the whitelist."""


def _names(nodes: Iterable[Any] | None) -> list[str]:
    return [cast(str, n.sval) for n in (nodes or ()) if isinstance(n, ast.String)]


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
