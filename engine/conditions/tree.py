"""The condition tree: operators per column kind, limits, parsing the JSON with errors that
name the path, walking the tree."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from engine.durations import parse_duration

NEW, OLD = "n", "o"

EQUALITY = frozenset({"equals", "not_equals"})
ORDERING = frozenset({"greater_than", "less_than", "greater_or_equal", "less_or_equal", "between"})
TEXTUAL = frozenset({"contains", "not_contains", "starts_with", "ends_with", "matches"})
MEMBERSHIP = frozenset({"in", "not_in"})
EMPTINESS = frozenset({"is_empty", "is_not_empty"})
RECENCY = frozenset({"older_than", "within_last"})
TRANSITIONS = frozenset({"changed", "changed_to", "changed_from"})
OPERATORS = EQUALITY | ORDERING | TEXTUAL | MEMBERSHIP | EMPTINESS | RECENCY | TRANSITIONS
VALUELESS = frozenset({"is_empty", "is_not_empty", "changed"})

ALLOWED_BY_KIND: dict[str, frozenset[str]] = {
    "text": EQUALITY | ORDERING | TEXTUAL | MEMBERSHIP | EMPTINESS | TRANSITIONS,
    "number": EQUALITY | ORDERING | MEMBERSHIP | EMPTINESS | TRANSITIONS,
    "boolean": EQUALITY | EMPTINESS | TRANSITIONS,
    "date": EQUALITY | ORDERING | MEMBERSHIP | EMPTINESS | RECENCY | TRANSITIONS,
    "timestamp": EQUALITY | ORDERING | MEMBERSHIP | EMPTINESS | RECENCY | TRANSITIONS,
    "time": EQUALITY | ORDERING | MEMBERSHIP | EMPTINESS | TRANSITIONS,
    "interval": EQUALITY | ORDERING | MEMBERSHIP | EMPTINESS | TRANSITIONS,
    "enum": EQUALITY | ORDERING | MEMBERSHIP | EMPTINESS | TRANSITIONS,
    "uuid": EQUALITY | MEMBERSHIP | EMPTINESS | TRANSITIONS,
    "array": EQUALITY
    | frozenset({"contains", "not_contains"})
    | MEMBERSHIP
    | EMPTINESS
    | TRANSITIONS,
    "json": EQUALITY | frozenset({"contains", "not_contains"}) | EMPTINESS | TRANSITIONS,
    # A value inside a JSON column ("meta.industry"): compared as JSON.
    "jsonpath": EQUALITY | ORDERING | TEXTUAL | MEMBERSHIP | EMPTINESS | TRANSITIONS,
    "other": EQUALITY | EMPTINESS | TRANSITIONS,
}

MAX_DEPTH = 20
MAX_LEAVES = 300
MAX_LIST = 1000
# A ``matches`` regex runs on the first MAX_REGEX_INPUT characters of the value.
MAX_REGEX_INPUT = 10_000

# ───────────────────────────── the tree ─────────────────────────────


@dataclass(frozen=True)
class FieldCondition:
    path: str
    field: str
    operator: str
    value: Any = None
    # Where the field and the value were written, when not at <path>.field/.value
    # (a trigger's "field" and "from"/"to", say).
    field_path: str | None = None
    value_path: str | None = None


@dataclass(frozen=True)
class Group:
    path: str
    mode: str  # "all" | "any"
    items: tuple[Condition, ...]


@dataclass(frozen=True)
class Negation:
    path: str
    item: Condition


@dataclass(frozen=True)
class SqlCondition:
    path: str
    sql: str


Condition = FieldCondition | Group | Negation | SqlCondition


class ConditionError(ValueError):
    def __init__(self, issues: list[tuple[str, str]]) -> None:
        self.issues = issues
        super().__init__("; ".join(f"{p}: {m}" for p, m in issues))


def parse_conditions(raw: Any, path: str = "conditions") -> Condition:
    """JSON → tree. A list means AND; a dict is a group, a ``not``, ``sql`` or a leaf."""
    issues: list[tuple[str, str]] = []
    leaves = [0]
    tree = _parse(raw, path, issues, 0, leaves)
    if issues:
        raise ConditionError(issues)
    assert tree is not None
    return tree


def _parse(
    raw: Any, path: str, issues: list[tuple[str, str]], depth: int, leaves: list[int]
) -> Condition | None:
    if depth > MAX_DEPTH:
        issues.append((path, f"conditions nest deeper than {MAX_DEPTH} levels"))
        return None
    if raw is None:
        return Group(path, "all", ())
    if isinstance(raw, list):
        items = [
            _parse(item, f"{path}[{i}]", issues, depth + 1, leaves) for i, item in enumerate(raw)
        ]
        return Group(path, "all", tuple(i for i in items if i is not None))
    if not isinstance(raw, dict):
        issues.append((path, "a condition is an object (or a list of them)"))
        return None
    group_keys = [k for k in ("all", "any", "not", "sql") if k in raw]
    if group_keys:
        key = group_keys[0]
        extra = set(raw) - {key}
        if extra or len(group_keys) > 1:
            issues.append(
                (path, f"a '{key}' condition takes no other keys (found {sorted(extra)})")
            )
            return None
        if key == "sql":
            if not isinstance(raw["sql"], str) or not raw["sql"].strip():
                issues.append((f"{path}.sql", "expected a non-empty SQL expression"))
                return None
            leaves[0] += 1
            return SqlCondition(path, raw["sql"])
        if key == "not":
            inner = _parse(raw["not"], f"{path}.not", issues, depth + 1, leaves)
            return Negation(path, inner) if inner is not None else None
        if not isinstance(raw[key], list):
            issues.append((f"{path}.{key}", f"'{key}' takes a list of conditions"))
            return None
        items = [
            _parse(item, f"{path}.{key}[{i}]", issues, depth + 1, leaves)
            for i, item in enumerate(raw[key])
        ]
        return Group(path, key, tuple(i for i in items if i is not None))

    leaves[0] += 1
    if leaves[0] == MAX_LEAVES + 1:
        issues.append((path, f"more than {MAX_LEAVES} conditions"))
    unknown = set(raw) - {"field", "operator", "value"}
    if unknown:
        issues.append(
            (
                path,
                f"unknown keys {sorted(unknown)}; a condition has field, operator, "
                "value (or is a group: all, any, not, sql)",
            )
        )
    fld, op = raw.get("field"), raw.get("operator")
    ok = True
    if not isinstance(fld, str) or not fld:
        issues.append((f"{path}.field", "expected a field name"))
        ok = False
    if not isinstance(op, str) or op not in OPERATORS:
        hint = difflib.get_close_matches(str(op), sorted(OPERATORS), n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        issues.append((f"{path}.operator", f"unknown operator {op!r}{suggestion}"))
        return None
    has_value = "value" in raw
    if op in VALUELESS and has_value and raw["value"] is not None:
        issues.append((f"{path}.value", f"{op} takes no value"))
        ok = False
    if op not in VALUELESS:
        ok = _check_value_shape(op, raw.get("value"), has_value, f"{path}.value", issues) and ok
    if not ok or not isinstance(fld, str):  # a field that is not a name is not ok
        return None
    return FieldCondition(path, fld, op, raw.get("value"))


def _check_value_shape(
    op: str, value: Any, has_value: bool, path: str, issues: list[tuple[str, str]]
) -> bool:
    if not has_value or value is None:
        issues.append((path, f"{op} needs a value (use is_empty to test for no value)"))
        return False
    if op == "between":
        if not isinstance(value, list) or len(value) != 2 or None in value:
            issues.append((path, "between takes [low, high]"))
            return False
    elif op in MEMBERSHIP:
        if not isinstance(value, list) or not value or None in value:
            issues.append((path, f"{op} takes a non-empty list of values without null"))
            return False
        if len(value) > MAX_LIST:
            issues.append((path, f"{op} takes at most {MAX_LIST} values"))
            return False
    elif op in RECENCY:
        try:
            parse_duration(value, default_unit="d")
        except ValueError as exc:
            issues.append((path, str(exc)))
            return False
    elif op in ("starts_with", "ends_with", "matches") and not isinstance(value, str | int | float):
        issues.append((path, f"{op} takes a single value"))
        return False
    return True


def walk(tree: Condition) -> list[Condition]:
    out: list[Condition] = [tree]
    if isinstance(tree, Group):
        for item in tree.items:
            out.extend(walk(item))
    elif isinstance(tree, Negation):
        out.extend(walk(tree.item))
    return out


def uses_transitions(tree: Condition) -> bool:
    return any(isinstance(c, FieldCondition) and c.operator in TRANSITIONS for c in walk(tree))
