"""A workflow version's steps, parsed once per process (versions are immutable)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from engine.actions import registry
from engine.catalog import EntitySchema
from engine.conditions import NEW, Compiler
from engine.executor.context import with_steps
from engine.executor.errors import PermanentError
from engine.lifecycle import has_lifecycle
from engine.model import Step, WorkflowDefinition, dependencies, parse_definition, step_ids


@dataclass
class Plan:
    """A workflow version's steps, parsed once per process."""

    definition: WorkflowDefinition
    ids: list[str]
    deps: dict[str, list[str]]
    steps: dict[str, Step]
    when_sql: dict[str, str] = field(default_factory=dict)
    # The leading steps the matcher may run in its own transaction (engine/inline.py):
    # immediate database actions without a delay or a "when", in order.
    inline_prefix: list[str] = field(default_factory=list)


_plans: dict[tuple[int, str], Plan] = {}

# Limits that are checked when an execution starts (engine.executor.flow):
# a workflow with any of them never runs steps in the matcher.
START_LIMITS = ("max_per_minute", "max_concurrent", "debounce")


def plan_for(version_id: int, definition: dict[str, Any], entity: EntitySchema | None) -> Plan:
    """The parsed steps of a workflow version. Versions are immutable, so they are cached;
    the key holds the definition too, as ids repeat across databases."""
    key = (version_id, json.dumps(definition, sort_keys=True))
    plan = _plans.get(key)
    if plan is not None:
        return plan
    wf = parse_definition(definition)
    ids = step_ids(wf.actions)
    plan = Plan(wf, ids, dependencies(wf.actions, ids), dict(zip(ids, wf.actions, strict=True)))
    for sid, step in plan.steps.items():
        if step.when_condition is not None:
            compiler = Compiler(with_steps(entity), allow_transitions=False)
            predicate = compiler.compile(step.when_condition, NEW)
            if compiler.issues:
                raise PermanentError(
                    f"step {sid}: 'when' no longer compiles: "
                    + "; ".join(m for _, m in compiler.issues)
                )
            plan.when_sql[sid] = predicate.as_string(None)
    actions = registry()
    limits = wf.limits.model_dump(exclude_none=True)
    # goal, exit_when, wait_until (engine/lifecycle.py) are checked before each step: none inline
    if not any(limits.get(k) for k in START_LIMITS) and not has_lifecycle(definition):
        for sid in ids:
            step, action = plan.steps[sid], actions.get(plan.steps[sid].type)
            if (
                action is None
                or action.kind != "database"
                or not action.inline
                or step.delay is not None
                or step.timeout is not None
                or step.when_condition is not None
                # a deduped step locks its open item, a CRM row the CRM may hold: never
                # in the matcher's transaction, where a wait would stall all matching
                or step.params.get("dedupe_key") is not None
                or not set(plan.deps[sid]) <= set(plan.inline_prefix)
            ):
                break
            plan.inline_prefix.append(sid)
    if len(_plans) > 2000:
        _plans.clear()
    _plans[key] = plan
    return plan
