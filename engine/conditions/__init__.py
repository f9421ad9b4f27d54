"""Conditions: parse the JSON tree, compile it to one SQL predicate.

The predicate reads a typed row of the entity's table called ``n`` (the entity's
state: the new row, or the deleted row for deletes), and for transitions the old
row ``o`` and the event ``ev`` (a ``crmflow.outbox`` row). So one compiled predicate
serves the matcher (rows rebuilt from an event with ``jsonb_populate_record``) and
the scheduler (a scan ``FROM table AS n``).

NULL semantics (docs/semantics.md): every condition is two-valued. A positive
comparison on a NULL field is false; negated operators (``not_equals``, ``not_in``,
``not_contains``, ``is_not_empty``) and ``not`` groups are exact complements, so they
are true on NULL. ``all`` of nothing is true, ``any`` of nothing is false. The
reference evaluator in tests/reference.py implements the same table in Python.
"""

from engine.conditions.compiler import Compiler, ValueCheck, value_text
from engine.conditions.tree import (
    ALLOWED_BY_KIND,
    MAX_REGEX_INPUT,
    NEW,
    OLD,
    OPERATORS,
    Condition,
    ConditionError,
    FieldCondition,
    Group,
    Negation,
    SqlCondition,
    parse_conditions,
    uses_transitions,
    walk,
)

__all__ = [
    "ALLOWED_BY_KIND",
    "MAX_REGEX_INPUT",
    "NEW",
    "OLD",
    "OPERATORS",
    "Compiler",
    "Condition",
    "ConditionError",
    "FieldCondition",
    "Group",
    "Negation",
    "SqlCondition",
    "ValueCheck",
    "parse_conditions",
    "uses_transitions",
    "value_text",
    "walk",
]
