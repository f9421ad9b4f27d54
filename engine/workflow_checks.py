"""The save-time checks of a workflow definition (engine/workflows.py compiles and
stores; these find what is wrong, each issue naming its path): the trigger's part of
the match predicate, the trigger's own checks, each step's parameters, windows, delays
and ``when``, and PostgreSQL's check of each value, regex and the compiled predicate.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from engine.actions import registry
from engine.actions.split import split_paths
from engine.actions.split import when_issues as split_when_issues
from engine.catalog import EntitySchema
from engine.conditions import NEW, Compiler, FieldCondition, Group, walk
from engine.config import get_settings
from engine.executor.context import with_steps
from engine.model import (
    UNSET,
    CustomEvent,
    DateRelative,
    DefinitionError,
    DelayUntil,
    FieldUpdated,
    Issue,
    Scheduled,
    WorkflowDefinition,
    step_ids,
)
from engine.windows import window_issues


def trigger_predicate(
    wf: WorkflowDefinition, compiler: Compiler, issues: list[Issue]
) -> sql.Composable:
    """The part of the match predicate the trigger makes (its event kind, its fields)."""
    trigger = wf.parsed_trigger
    kind = trigger.type
    if kind == "entity_created":
        return sql.SQL("ev.op = 'insert'")
    if kind == "entity_updated":
        return sql.SQL("ev.op = 'update'")
    if kind == "entity_deleted":
        return sql.SQL("ev.op = 'delete'")
    if isinstance(trigger, FieldUpdated):
        # The trigger's own comparisons of old and new rows are always allowed.
        compiler = Compiler(
            compiler.entity,
            allow_transitions=True,
            now=compiler.now,
            issues=compiler.issues,
            checks=compiler.checks,
        )
        names = trigger.watched_fields
        paths = (
            ["trigger.field"]
            if trigger.field
            else [f"trigger.fields[{i}]" for i in range(len(names))]
        )
        leaves = tuple(
            FieldCondition("trigger", name, "changed", field_path=path)
            for path, name in zip(paths, names, strict=True)
        )
        parts: list[sql.Composable] = [compiler.compile(Group("trigger", "any", leaves), NEW)]
        for key, operator, value in (
            ("from", "changed_from", trigger.from_),
            ("to", "changed_to", trigger.to),
        ):
            if value is not UNSET:
                leaf = FieldCondition(
                    "trigger",
                    names[0],
                    operator,
                    value,
                    field_path=paths[0],
                    value_path=f"trigger.{key}",
                )
                parts.append(compiler.compile(leaf, NEW))
        return sql.SQL("(ev.op = 'update' AND {})").format(sql.SQL(" AND ").join(parts))
    if isinstance(trigger, CustomEvent):
        return sql.SQL("(ev.op = 'event' AND ev.event_name = {})").format(
            sql.Literal(trigger.event)
        )
    # scheduled, date_relative and manual are not matched on events.
    return sql.SQL("false")


def check_trigger(wf: WorkflowDefinition, entity: EntitySchema | None, issues: list[Issue]) -> None:
    """A schedule not firing more often than the minimum interval; a date-relative
    trigger's field a date or timestamp column."""
    if isinstance(wf.parsed_trigger, Scheduled):
        from engine.scheduler import smallest_interval

        gap = smallest_interval(wf.parsed_trigger)
        floor = get_settings().min_schedule_interval
        if gap < floor:
            issues.append(
                Issue(
                    "trigger.schedule",
                    f"{wf.parsed_trigger.schedule!r} fires every {gap:g}s; the minimum interval is "
                    f"{floor}s (setting CRMFLOW_MIN_SCHEDULE_INTERVAL)",
                )
            )
    if isinstance(wf.parsed_trigger, DateRelative) and entity is not None:
        # A column: the scheduler reads it as n.<column> (not a derived field or JSON path).
        spec = entity.columns.get(wf.parsed_trigger.field)
        if spec is None or spec.kind not in ("date", "timestamp"):
            issues.append(
                Issue(
                    "trigger.field",
                    f"{wf.parsed_trigger.field!r} is not a date or timestamp column "
                    f"of {entity.entity_type}",
                )
            )


def check_steps(
    wf: WorkflowDefinition, entity: EntitySchema | None, compiler: Compiler, issues: list[Issue]
) -> None:
    actions = registry()
    ids = step_ids(wf.actions)
    splits = split_paths(wf.actions, ids)
    for i, step in enumerate(wf.actions):
        path = f"actions[{i}]"
        action = actions.get(step.type)
        if action is None:
            issues.append(
                Issue(f"{path}.type", f"unknown action {step.type!r}; one of {sorted(actions)}")
            )
            continue
        step_issues = action.check(step.params, entity, path)
        issues.extend(step_issues)
        if not step_issues:
            compiler.checks.extend(action.value_checks(action.parse(step.params), entity, path))
        if step.window is not None:  # business hours: the zone column exists (engine/windows.py)
            waits = getattr(step, "wait_until", None) is not None
            issues.extend(
                Issue(p, m) for p, m in window_issues(step.window, entity, path, waits=waits)
            )
        if isinstance(step.delay, DelayUntil):
            # A column: the runtime reads it as n.<column> (not a derived field or JSON path).
            spec = entity.columns.get(step.delay.until) if entity else None
            if spec is None or spec.kind not in ("date", "timestamp"):
                issues.append(
                    Issue(
                        f"{path}.delay.until",
                        f"{step.delay.until!r} is not a date or timestamp column",
                    )
                )
        when = step.when_condition
        if when is not None:
            step_compiler = Compiler(
                with_steps(entity),
                allow_transitions=False,
                checks=compiler.checks,
                issues=compiler.issues,
            )
            step_compiler.compile(when, NEW)
            for leaf in walk(when):
                if isinstance(leaf, FieldCondition) and leaf.field.startswith("steps."):
                    # a split's path compared with a name it does not have
                    issues.extend(Issue(p, m) for p, m in split_when_issues(leaf, splits))
                    ref = leaf.field.split(".")[1]
                    if ref not in ids[:i]:
                        issues.append(
                            Issue(
                                f"{leaf.path}.field",
                                f"'when' can only read earlier steps; no step {ref!r} "
                                "before this one",
                            )
                        )


async def check_in_database(
    conn: psycopg.AsyncConnection[Any],
    compiler: Compiler,
    entity: EntitySchema | None,
    predicate: str,
) -> None:
    """Let PostgreSQL check each value against its type, each regex, and the predicate."""
    issues: list[Issue] = []
    for check in compiler.checks:
        try:
            async with conn.transaction():
                if check.regex:
                    await conn.execute("SELECT '' ~ %s", [check.text])
                else:
                    await conn.execute(
                        sql.SQL("SELECT CAST(%s AS {})").format(sql.SQL(check.type_sql)),
                        [check.text],
                    )
        except psycopg.Error as exc:
            reason = exc.diag.message_primary or str(exc)
            what = "a valid regular expression" if check.regex else f"a valid {check.type_sql}"
            issues.append(Issue(check.path, f"{check.text!r} is not {what} ({reason})"))
    if issues:
        raise DefinitionError(issues)
    if entity is None:
        probe = sql.SQL("SELECT 1 FROM crmflow.outbox AS ev WHERE {} LIMIT 0").format(
            sql.SQL(predicate)
        )
    else:
        probe = sql.SQL(
            "SELECT 1 FROM crmflow.outbox AS ev"
            " CROSS JOIN LATERAL jsonb_populate_record(NULL::{t}, ev.new_row) AS n"
            " CROSS JOIN LATERAL jsonb_populate_record(NULL::{t}, ev.old_row) AS o"
            " WHERE {p} LIMIT 0"
        ).format(t=entity.table, p=sql.SQL(predicate))
    try:
        async with conn.transaction():
            await conn.execute(probe)
    except psycopg.Error as exc:
        reason = exc.diag.message_primary or str(exc)
        raise DefinitionError(
            [Issue("conditions", f"the conditions do not compile: {reason}")]
        ) from None
