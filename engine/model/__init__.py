"""Workflow definitions: the JSON users write, parsed and checked for shape.

The seed's JSON is accepted exactly as written::

    {"name": "Auto-qualify new leads from website",
     "trigger": {"type": "entity_created", "entity_type": "lead"},
     "conditions": [{"field": "source", "operator": "equals", "value": "website_form"}],
     "actions": [{"type": "qualify_lead"}, {"type": "enrich_lead", "delay": 60}],
     "status": "active"}

Checks that need the database (fields exist, values fit column types, action
parameters) live in :mod:`engine.workflows`; this module only needs the JSON.
Every error names the path of the offending part, e.g. ``conditions[1].operator``.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from engine.conditions import Condition, ConditionError, parse_conditions
from engine.durations import parse_duration as parse_duration  # engine.model.parse_duration
from engine.model.base import (
    DefinitionError,
    Duration,
    Issue,
    _Strict,
    format_loc,
    issues_from_pydantic,
)
from engine.model.steps import (
    DelayUntil,
    Limits,
    RetryPolicy,
    Step,
    WaitUntil,
)
from engine.model.triggers import (
    EVENT_TRIGGERS,
    TRIGGER_TYPES,
    UNSET,
    CustomEvent,
    DateRelative,
    EntityCreated,
    EntityDeleted,
    EntityUpdated,
    FieldUpdated,
    Manual,
    Scheduled,
    Trigger,
)

__all__ = [
    "EVENT_TRIGGERS",
    "MAX_DEFINITION_BYTES",
    "MAX_DEFINITION_DEPTH",
    "MAX_NAME_LENGTH",
    "TRIGGER_TYPES",
    "UNSET",
    "CustomEvent",
    "DateRelative",
    "DefinitionError",
    "DelayUntil",
    "Duration",
    "EntityCreated",
    "EntityDeleted",
    "EntityUpdated",
    "FieldUpdated",
    "Issue",
    "Limits",
    "Manual",
    "RetryPolicy",
    "Scheduled",
    "Step",
    "SuppressList",
    "Trigger",
    "WaitUntil",
    "WorkflowDefinition",
    "definition_size_issue",
    "dependencies",
    "find_cycle",
    "format_loc",
    "issues_from_pydantic",
    "normalise_name",
    "parse_definition",
    "parse_duration",
    "step_ids",
]

# ───────────────────────────── names ─────────────────────────────

MAX_NAME_LENGTH = 200
# Control (Cc), format (Cf: zero-width spaces and joiners, bidi overrides, soft hyphen,
# BOM), surrogate (Cs) and line/paragraph separator (Zl, Zp) characters: invisible or
# layout-changing, they would let two names that look the same be two workflows.
_REFUSED_NAME_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def normalise_name(value: str) -> str:
    """A workflow name in its one canonical form (NFKC: fullwidth letters, ligatures and
    compatibility spaces become their plain forms), so that names that read the same are
    the same name; ``ValueError`` for an invisible or control character, surrounding
    whitespace, or more than 200 characters once normalised."""
    for position, char in enumerate(value):
        if unicodedata.category(char) in _REFUSED_NAME_CATEGORIES:
            label = unicodedata.name(char, "a control character")
            raise ValueError(
                f"contains an invisible or control character, U+{ord(char):04X} ({label}), "
                f"at position {position}: remove it (it would make a lookalike of another name)"
            )
    normalised = unicodedata.normalize("NFKC", value)
    if normalised != normalised.strip():
        raise ValueError("begins or ends with whitespace: remove it")
    if len(normalised) > MAX_NAME_LENGTH:
        raise ValueError(
            f"is {len(normalised)} characters once normalised (NFKC); at most {MAX_NAME_LENGTH}"
        )
    if any(unicodedata.category(c) in _REFUSED_NAME_CATEGORIES for c in normalised):
        raise ValueError("contains an invisible or control character once normalised (NFKC)")
    return normalised


def _suppress_list(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,100}", value):
        raise ValueError(
            f"{value[:100]!r} is not a suppression list name "
            "(1 to 100 letters, digits or _ . : -, like 'unsubscribed')"
        )
    return value


SuppressList = Annotated[str, AfterValidator(_suppress_list)]


class WorkflowDefinition(_Strict):
    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    description: str | None = Field(None, max_length=5000)
    trigger: Any
    conditions: Any = Field(default_factory=list)
    actions: list[Step] = Field(min_length=1, max_length=100)
    status: Literal["active", "paused"] = "paused"
    priority: int = Field(0, ge=-1000, le=1000)
    environment: str = Field("production", pattern=r"^[A-Za-z0-9_-]{1,50}$")
    limits: Limits = Field(default_factory=Limits)
    edge_triggered: bool = False
    # Suppression lists (engine/suppressions.py): entities on any of them do not enroll.
    suppress: list[SuppressList] | None = Field(None, max_length=20)
    # Enrollment lifecycle (engine/lifecycle.py): met, the execution ends completed
    # ("goal met"); exit_when: it ends cancelled ("exit criteria").
    goal: Any = None
    exit_when: Any = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return normalise_name(v)

    # Filled by parse_definition from the raw JSON.
    _trigger: Trigger
    _conditions: Condition
    _goal: Condition | None = PrivateAttr(None)
    _exit_when: Condition | None = PrivateAttr(None)

    @property
    def parsed_goal(self) -> Condition | None:
        return self._goal

    @property
    def parsed_exit_when(self) -> Condition | None:
        return self._exit_when

    @property
    def parsed_trigger(self) -> Trigger:
        return self._trigger

    @property
    def parsed_conditions(self) -> Condition:
        return self._conditions

    @property
    def entity_type(self) -> str | None:
        return getattr(self._trigger, "entity_type", None)

    @property
    def trigger_type(self) -> str:
        return str(self._trigger.type)


MAX_DEFINITION_BYTES = 256_000
MAX_DEFINITION_DEPTH = 64


def definition_size_issue(raw: Any) -> Issue | None:
    """Whether ``raw`` is too large or too deep, found without serialising it.

    A walk that stops as soon as a limit is crossed: ``json.dumps`` of the whole value
    would first build it, and a YAML file of nested aliases (a "billion laughs") is a
    few hundred bytes that expand to gigabytes; a deep nesting would overflow the
    recursion of every recursive step that follows. Sizes are those of compact JSON
    (close enough: the limit is about memory and time, not an exact byte count).
    """
    size = 0
    stack: list[tuple[Any, int]] = [(raw, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEFINITION_DEPTH:
            return Issue("", f"the definition is nested deeper than {MAX_DEFINITION_DEPTH} levels")
        if isinstance(value, dict):
            size += 2 + len(value)
            for key, item in value.items():
                size += len(str(key)) + 3
                stack.append((item, depth + 1))
        elif isinstance(value, list | tuple):
            size += 2 + len(value)
            stack.extend((item, depth + 1) for item in value)
        else:
            size += len(value) + 2 if isinstance(value, str) else len(str(value))
        if size > MAX_DEFINITION_BYTES:
            return Issue("", f"the definition is larger than {MAX_DEFINITION_BYTES} bytes")
    return None


def parse_definition(raw: Any) -> WorkflowDefinition:
    """Parse and check the shape of a definition; raise :class:`DefinitionError`."""
    if not isinstance(raw, dict):
        raise DefinitionError([Issue("", "a workflow is a JSON object")])
    too_big = definition_size_issue(raw)
    if too_big is not None:
        raise DefinitionError([too_big])
    issues: list[Issue] = []
    try:
        wf = WorkflowDefinition.model_validate(raw)
    except ValidationError as exc:
        issues.extend(issues_from_pydantic(exc))
        wf = None

    trigger = _parse_trigger(raw.get("trigger"), issues)
    try:
        conditions = parse_conditions(raw.get("conditions", []), "conditions")
    except ConditionError as exc:
        issues.extend(Issue(p, m) for p, m in exc.issues)
        conditions = None

    lifecycle: dict[str, Condition | None] = {}
    for key in ("goal", "exit_when"):
        if raw.get(key) is None:
            lifecycle[key] = None
            continue
        try:
            lifecycle[key] = parse_conditions(raw[key], key)
        except ConditionError as exc:
            issues.extend(Issue(p, m) for p, m in exc.issues)
            lifecycle[key] = None

    actions = raw.get("actions")
    steps: list[Any] = actions if isinstance(actions, list) else []
    waits: list[Condition | None] = []
    for i, step in enumerate(steps):
        wait = step.get("wait_until") if isinstance(step, dict) else None
        conditions_of_wait = wait.get("conditions") if isinstance(wait, dict) else None
        if conditions_of_wait is None:
            waits.append(None)
            continue
        try:
            path = f"actions[{i}].wait_until.conditions"
            waits.append(parse_conditions(conditions_of_wait, path))
        except ConditionError as exc:
            issues.extend(Issue(p, m) for p, m in exc.issues)
            waits.append(None)
    whens: list[Condition | None] = []
    for i, step in enumerate(steps):
        when = step.get("when") if isinstance(step, dict) else None
        if when is None:
            whens.append(None)
            continue
        try:
            whens.append(parse_conditions(when, f"actions[{i}].when"))
        except ConditionError as exc:
            issues.extend(Issue(p, m) for p, m in exc.issues)
            whens.append(None)

    if wf is not None and trigger is not None:
        issues.extend(_check_steps(wf.actions))
        if wf.suppress and getattr(trigger, "entity_type", None) is None:
            issues.append(
                Issue(
                    "suppress",
                    "suppression lists name entities: they need a trigger with an entity_type",
                )
            )
    if issues:
        raise DefinitionError(issues)
    assert wf is not None and trigger is not None and conditions is not None
    wf._trigger = trigger
    wf._conditions = conditions
    wf._goal, wf._exit_when = lifecycle["goal"], lifecycle["exit_when"]
    for step, when, wait in zip(wf.actions, whens, waits, strict=True):
        step._when = when
        if step.wait_until is not None:
            step.wait_until._conditions = wait
    return wf


def _parse_trigger(raw: Any, issues: list[Issue]) -> Trigger | None:
    if not isinstance(raw, dict):
        issues.append(Issue("trigger", "a trigger is an object with a 'type'"))
        return None
    kind = raw.get("type")
    model = TRIGGER_TYPES.get(kind) if isinstance(kind, str) else None
    if model is None:
        issues.append(
            Issue("trigger.type", f"unknown trigger type {kind!r}; one of {sorted(TRIGGER_TYPES)}")
        )
        return None
    try:
        return model.model_validate(raw)  # type: ignore[return-value]
    except ValidationError as exc:
        issues.extend(issues_from_pydantic(exc, "trigger"))
        return None


def step_ids(steps: list[Step]) -> list[str]:
    """Each step's id: its own, else its type, numbered when a type repeats."""
    counts: dict[str, int] = {}
    for s in steps:
        counts[s.type] = counts.get(s.type, 0) + 1
    seen: dict[str, int] = {}
    ids = []
    for s in steps:
        if s.id:
            ids.append(s.id)
            continue
        seen[s.type] = seen.get(s.type, 0) + 1
        ids.append(s.type if counts[s.type] == 1 else f"{s.type}_{seen[s.type]}")
    return ids


def _check_steps(steps: list[Step]) -> list[Issue]:
    issues: list[Issue] = []
    ids = step_ids(steps)
    positions = {}
    for i, sid in enumerate(ids):
        if sid in positions:
            issues.append(Issue(f"actions[{i}].id", f"step id {sid!r} is used twice"))
        positions[sid] = i
    for i, s in enumerate(steps):
        for dep in s.depends_on or []:
            if dep not in positions:
                issues.append(Issue(f"actions[{i}].depends_on", f"no step with id {dep!r}"))
            elif dep == ids[i]:
                issues.append(Issue(f"actions[{i}].depends_on", "a step cannot depend on itself"))
    if not issues:
        cycle = find_cycle(ids, dependencies(steps, ids))
        if cycle:
            issues.append(Issue("actions", "depends_on forms a cycle: " + " -> ".join(cycle)))
    return issues


def dependencies(steps: list[Step], ids: list[str]) -> dict[str, list[str]]:
    """Each step's prerequisites: its depends_on, else the step before it (sequential)."""
    deps: dict[str, list[str]] = {}
    for i, s in enumerate(steps):
        if s.depends_on is not None:
            deps[ids[i]] = list(s.depends_on)
        else:
            deps[ids[i]] = [ids[i - 1]] if i > 0 else []
    return deps


def find_cycle(ids: list[str], deps: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in deps.get(node, []):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in ids:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None
