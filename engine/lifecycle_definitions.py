"""The lifecycle's definitions (engine/lifecycle.py): a workflow's ``goal`` and
``exit_when`` and its steps' ``wait_until``, checked when the workflow is saved and
compiled to SQL predicates on the alias ``n`` (cached per version) for the matcher's
round (engine/lifecycle_round.py) and the executor's checks
(engine/lifecycle_executor.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from engine.catalog import EntitySchema
from engine.conditions import NEW, Compiler
from engine.model import Issue, WorkflowDefinition, parse_definition, step_ids

GOAL, EXIT, WAIT = "goal", "exit", "wait"
GOAL_MET, EXIT_CRITERIA = "goal met", "exit criteria"
MET, EVENT, TIMED_OUT = "met", "event", "timed_out"
SKIPPED = "skipped"  # wait_step: the step's "when" was false, it is skipped without waiting


def has_lifecycle(definition: dict[str, Any]) -> bool:
    """Whether a stored definition has a goal, exit criteria or a wait_until step."""
    if definition.get("goal") is not None or definition.get("exit_when") is not None:
        return True
    actions = definition.get("actions")
    return isinstance(actions, list) and any(
        isinstance(a, dict) and a.get("wait_until") is not None for a in actions
    )


@dataclass
class Predicates:
    """A version's lifecycle conditions compiled to SQL on the alias ``n``."""

    goal: str | None = None
    exit: str | None = None
    waits: dict[str, str] = field(default_factory=dict)  # step id → its conditions
    events: dict[str, str] = field(default_factory=dict)  # step id → the event it waits for

    @property
    def ends(self) -> bool:
        return self.goal is not None or self.exit is not None


_compiled: dict[tuple[int, str, str], Predicates] = {}


def _compile(entity: EntitySchema, tree: Any, what: str) -> str:
    compiler = Compiler(entity, allow_transitions=False)
    predicate = compiler.compile(tree, NEW)
    if compiler.issues:
        raise ValueError(f"{what} no longer compiles: " + "; ".join(m for _, m in compiler.issues))
    return predicate.as_string(None)


def predicates_of(wf: WorkflowDefinition, entity: EntitySchema | None) -> Predicates:
    found = Predicates()
    if entity is None:
        return found
    if wf.parsed_goal is not None:
        found.goal = _compile(entity, wf.parsed_goal, "the goal")
    if wf.parsed_exit_when is not None:
        found.exit = _compile(entity, wf.parsed_exit_when, "exit_when")
    for sid, step in zip(step_ids(wf.actions), wf.actions, strict=True):
        wait = step.wait_until
        if wait is None:
            continue
        if wait.event is not None:
            found.events[sid] = wait.event
        elif wait.parsed_conditions is not None:
            found.waits[sid] = _compile(entity, wait.parsed_conditions, f"step {sid}'s wait_until")
    return found


def predicates(version_id: int, definition: dict[str, Any], entity: EntitySchema) -> Predicates:
    """A version's compiled lifecycle conditions (cached: versions are immutable; the key
    holds the definition and the entity's columns, which may change)."""
    key = (
        version_id,
        json.dumps(definition, sort_keys=True),
        ",".join(f"{c}:{s.type_sql}" for c, s in sorted(entity.columns.items())),
    )
    found = _compiled.get(key)
    if found is None:
        if len(_compiled) > 2000:
            _compiled.clear()
        found = _compiled[key] = predicates_of(parse_definition(definition), entity)
    return found


def check(
    wf: WorkflowDefinition, entity: EntitySchema | None, compiler: Compiler, issues: list[Issue]
) -> None:
    """Save-time checks of goal, exit_when and wait_until (errors name the path); values
    go to ``compiler.checks`` for the database to check against the column types."""

    def compile_at(tree: Any) -> None:
        Compiler(
            entity, allow_transitions=False, checks=compiler.checks, issues=compiler.issues
        ).compile(tree, NEW)

    for key, tree in (("goal", wf.parsed_goal), ("exit_when", wf.parsed_exit_when)):
        if tree is None:
            continue
        if entity is None:
            issues.append(Issue(key, f"{key} needs a trigger with an entity_type"))
        else:
            compile_at(tree)
    for i, step in enumerate(wf.actions):
        wait = step.wait_until
        if wait is None:
            continue
        path = f"actions[{i}].wait_until"
        if entity is None:
            issues.append(Issue(path, "wait_until needs a trigger with an entity_type"))
            continue
        if step.delay is not None:
            issues.append(Issue(path, "a step has either a delay or a wait_until, not both"))
        if wait.timeout <= 0:
            issues.append(Issue(f"{path}.timeout", "a wait needs a timeout above zero"))
        if wait.parsed_conditions is not None:
            compile_at(wait.parsed_conditions)


def capture_filter(
    wf: WorkflowDefinition, entity: EntitySchema | None, found: dict[str, Any]
) -> dict[str, Any]:
    """A version's capture filter (engine/prefilter.py) with what its lifecycle needs:
    every update of the entity is kept (the matcher's round evaluates the watched
    executions' conditions on each change, and custom events are not filtered)."""
    waits = any(s.wait_until is not None for s in wf.actions)
    if entity is None or not (wf.parsed_goal or wf.parsed_exit_when or waits):
        return found
    return {**found, "update": True}
