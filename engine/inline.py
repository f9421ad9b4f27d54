"""Immediate database steps, run set-based in the matcher's transaction.

A queue job per execution costs a fetch, a start and several round trips; for the
common workflow whose first steps only write to the database (create a task, set a
field, notify), that is most of the work. So the matcher runs those leading steps
itself, right after enrolling, in the same transaction: one statement per step and
workflow for the whole batch where the action supports it (``Action.run_batch``).

Guarantees kept:
- exactly once: the effects, the step records and the enrollment commit together;
- per-entity order: an execution runs inline only when no earlier execution of its
  entity is still queued or running (in the database or earlier in this batch), and
  when one of them goes to the queue, the later ones of that entity follow it there;
- depth: writes carry the execution's depth + 1, as in the step runner.

Anything that does not fit (a delay, a ``when``, an external action, start-time
limits, a business-hours ``window`` closed now) is left to the step runner: the
execution gets its job with the remaining steps. If a batch step raises, the whole
inline phase is undone and every execution of the batch takes the normal path, where
retries and failure handling apply.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from engine import db, metrics, windows
from engine.actions import Skip, registry
from engine.catalog import EntitySchema
from engine.executor.context import StepContext
from engine.executor.database_steps import rows_by_key
from engine.executor.plans import Plan, plan_for
from engine.executor.runner import Runner

log = logging.getLogger(__name__)


_q = db.Queries("matcher.sql")


def _dumps(value: Any) -> str:
    """Step results as JSON; dates and decimals as their text."""
    return json.dumps(value, default=str)


def _key(ex: dict[str, Any]) -> tuple[str, str] | None:
    if ex["entity_pk"] is None:
        return None
    return ex["entity_type"], json.dumps(ex["entity_pk"], sort_keys=True)


async def run_inline(
    conn: psycopg.AsyncConnection[Any],
    runner: Runner,
    enrolled: list[dict[str, Any]],
    versions: dict[int, dict[str, Any]],
    entities: dict[str, EntitySchema],
    careful: bool = True,
) -> set[int]:
    """Run the inline-able leading steps of ``enrolled`` (in id order); returns the ids of
    the executions that completed (they need no job). Each row carries ``entity_busy``
    and ``current_row`` from the match statement (sql/matcher.sql).

    The CRM rows these steps write are locked first, without waiting (``FOR UPDATE SKIP
    LOCKED``, in key order): an execution whose row another transaction holds (the
    CRM's own, usually) goes to the queue, where its job waits for the row in a short
    transaction of its own. The matcher's transaction, which holds the rows it wrote
    until it commits, thus never waits for a row lock: it cannot be part of a deadlock
    with the CRM's writers."""
    plans: dict[int, Plan | None] = {}  # per version: plan_for's cache key is a dumps
    chosen = _choose(enrolled, versions, entities, plans, set())
    if not chosen:
        return set()

    async def lock_then_run() -> set[int]:
        busy = await _lock_rows(conn, chosen, entities)
        final = chosen
        if busy:
            final = _choose(enrolled, versions, entities, plans, busy)
            metrics.INLINE_FALLBACKS.inc(len(chosen) - len(final))
            log.debug(
                "%d executions go to the queue: their rows are locked by another transaction",
                len(chosen) - len(final),
            )
        if not final:
            return set()
        return await _run(conn, runner, final, versions, entities)

    if not careful:  # the matcher redoes the whole batch carefully if this raises
        return await lock_then_run()
    try:
        async with conn.transaction():  # a savepoint: on any error, nothing of this happened
            return await lock_then_run()
    except Exception as exc:
        log.warning("inline steps failed (%s); %d executions go to the queue", exc, len(chosen))
        return set()


def _writes_entity(plan: Plan) -> bool:
    """Whether one of the plan's inline steps writes the entity's row (update_field,
    qualify_lead, assign_owner: the actions that need an entity)."""
    actions = registry()
    return any(actions[plan.steps[sid].type].needs_entity for sid in plan.inline_prefix)


async def _lock_rows(
    conn: psycopg.AsyncConnection[Any],
    chosen: list[tuple[dict[str, Any], Plan]],
    entities: dict[str, EntitySchema],
) -> set[tuple[str, str]]:
    """Lock the entity rows the chosen executions' inline steps write, skipping those
    another transaction holds; returns the keys not locked (busy, or gone)."""
    wanted: dict[str, dict[str, Any]] = {}  # entity type -> key -> pk
    for ex, plan in chosen:
        key = _key(ex)
        if key is None or ex["entity_type"] not in entities or not _writes_entity(plan):
            continue
        wanted.setdefault(ex["entity_type"], {})[key[1]] = ex["entity_pk"]
    missing: set[tuple[str, str]] = set()
    for entity_type in sorted(wanted):
        entity = entities[entity_type]
        pks = wanted[entity_type]
        locked = await rows_by_key(conn, entity, list(pks.values()), lock=True, whole_rows=False)
        missing |= {(entity_type, k) for k in pks if k not in locked}
    return missing


def _choose(
    enrolled: list[dict[str, Any]],
    versions: dict[int, dict[str, Any]],
    entities: dict[str, EntitySchema],
    plans: dict[int, Plan | None],
    unavailable: set[tuple[str, str]],
) -> list[tuple[dict[str, Any], Plan]]:
    """The executions whose leading steps can run inline, in id order; none of an
    entity in ``unavailable`` (its row is locked elsewhere) or after one of its entity
    that goes to the queue."""
    queued: set[tuple[str, str]] = set(unavailable)  # entities going to the queue
    chosen: list[tuple[dict[str, Any], Plan]] = []
    for ex in enrolled:
        if ex["status"] != "pending":
            continue
        key = _key(ex)
        version_id = ex["workflow_version_id"]
        if version_id not in plans:
            version = versions.get(version_id)
            entity = entities.get(ex["entity_type"]) if ex["entity_type"] else None
            plans[version_id] = (
                None if version is None else plan_for(version_id, version["definition"], entity)
            )
        plan = plans[version_id]
        runnable = (
            plan is not None
            and plan.inline_prefix
            and ex["not_before"] is None
            and (key is None or (not ex["entity_busy"] and key not in queued))
            and _windows_open(ex, plan)
        )
        if not runnable:
            if key is not None:
                queued.add(key)
            continue
        assert plan is not None
        chosen.append((ex, plan))
        if key is not None and len(plan.inline_prefix) < len(plan.ids):
            queued.add(key)  # the rest of it goes to the queue: later ones follow
    return chosen


def _windows_open(ex: dict[str, Any], plan: Plan) -> bool:
    """Whether the business-hours windows of the inline steps are open now
    (engine/windows.py); closed, the execution goes to the queue, where the step is
    deferred to the next opening."""
    windowed = [plan.steps[s].window for s in plan.inline_prefix if plan.steps[s].window]
    if not windowed:
        return True
    row = ex.get("current_row") or ex.get("event_new_row") or ex.get("event_old_row")
    at = datetime.now(UTC)
    return all(windows.decide(w, row, at).open for w in windowed if w is not None)


def _window_noted(window: Any, row: dict[str, Any] | None, value: dict[str, Any]) -> Any:
    """A result that says which fallback zone its window was read in, if one was."""
    decision = windows.decide(window, row, datetime.now(UTC))
    return {**decision.note(), **value} if decision.zone.note else value


Outcome = dict[int, dict[str, tuple[str, Any, datetime | None, datetime | None]]]
"""Per execution id, per inline step: (status, result, started, finished)."""

_STEP_COLUMNS = (
    "execution_ids",
    "step_ids",
    "positions",
    "types",
    "statuses",
    "attempts",
    "started",
    "finished",
    "results",
)


async def _run(
    conn: psycopg.AsyncConnection[Any],
    runner: Runner,
    chosen: list[tuple[dict[str, Any], Plan]],
    versions: dict[int, dict[str, Any]],
    entities: dict[str, EntitySchema],
) -> set[int]:
    """Run the chosen executions' inline steps level by level (the k-th inline step of
    every execution together), then record the steps and the executions in one
    statement; returns the ids of the executions that completed."""
    contexts, views = _contexts(conn, runner, chosen, versions, entities)
    outcome: Outcome = {}
    depth = max(len(plan.inline_prefix) for _, plan in chosen)
    for k in range(depth):
        await _run_level(conn, _level_groups(chosen, contexts, k), views, outcome)
    return await _record(conn, chosen, outcome)


def _contexts(
    conn: psycopg.AsyncConnection[Any],
    runner: Runner,
    chosen: list[tuple[dict[str, Any], Plan]],
    versions: dict[int, dict[str, Any]],
    entities: dict[str, EntitySchema],
) -> tuple[dict[int, dict[str, StepContext]], dict[int, dict[str, dict[str, Any]]]]:
    """A step context per execution and inline step, and per execution the view of its
    steps so far (what later steps' templates read), filled as steps run."""
    contexts: dict[int, dict[str, StepContext]] = {}
    views: dict[int, dict[str, dict[str, Any]]] = {}
    for ex, plan in chosen:
        execution = {**ex, "workflow_name": versions[ex["workflow_version_id"]]["name"]}
        # The entity now (read by the match statement); gone: as the event saw it.
        row = ex["current_row"] or ex["event_new_row"] or ex["event_old_row"]
        views[ex["id"]] = {}
        contexts[ex["id"]] = {
            sid: StepContext(
                runner,
                execution,
                sid,
                plan.steps[sid],
                1,
                entities.get(ex["entity_type"]) if ex["entity_type"] else None,
                row,
                views[ex["id"]],
                runner.settings,
                conn,
            )
            for sid in plan.inline_prefix
        }
    return contexts, views


def _level_groups(
    chosen: list[tuple[dict[str, Any], Plan]],
    contexts: dict[int, dict[str, StepContext]],
    k: int,
) -> dict[tuple[int, str, int], list[StepContext]]:
    """The k-th inline steps, one batch per (workflow version, step) and depth of the
    executions; each context reads the row as the previous inline step left it."""
    groups: dict[tuple[int, str, int], list[StepContext]] = {}
    for ex, plan in chosen:
        if k < len(plan.inline_prefix):
            sid = plan.inline_prefix[k]
            ctx = contexts[ex["id"]][sid]
            if k > 0:  # the row as the previous inline step left it
                ctx.row = contexts[ex["id"]][plan.inline_prefix[k - 1]].row
            groups.setdefault((ex["workflow_version_id"], sid, ex["depth"]), []).append(ctx)
    return groups


async def _run_level(
    conn: psycopg.AsyncConnection[Any],
    groups: dict[tuple[int, str, int], list[StepContext]],
    views: dict[int, dict[str, dict[str, Any]]],
    outcome: Outcome,
) -> None:
    """Run one level's batches, noting each step's outcome in ``outcome`` and ``views``.

    The write context (depth + 1, actor) is set when the depth changes, not per group:
    a round trip per workflow was a quarter of the matcher's time with many workflows.
    The actor names the executions of this level at that depth."""
    actions = registry()
    members_at: dict[int, list[int]] = {}
    for (_, _, ex_depth), group in groups.items():
        members_at.setdefault(ex_depth, []).extend(c.execution_id for c in group)
    context_depth: int | None = None
    for (_, sid, ex_depth), group in groups.items():
        step = group[0].step
        action = actions[step.type]
        if ex_depth != context_depth:
            await _set_write_context(conn, ex_depth, members_at[ex_depth])
            context_depth = ex_depth
        started: datetime | None = datetime.now(UTC)
        results = await action.run_batch(group, action.parse(step.params))
        finished: datetime | None = datetime.now(UTC)
        for ctx, result in zip(group, results, strict=True):
            status = "skipped" if isinstance(result, Skip) else "succeeded"
            metrics.STEPS_RUN.labels(step.type, status, "inline").inc()
            value = {"reason": str(result)} if isinstance(result, Skip) else result
            if step.window is not None and isinstance(value, dict):
                value = _window_noted(step.window, ctx.row, value)
            outcome.setdefault(ctx.execution_id, {})[sid] = (status, value, started, finished)
            views[ctx.execution_id][sid] = {"status": status, "result": value}


async def _set_write_context(
    conn: psycopg.AsyncConnection[Any], ex_depth: int, members: list[int]
) -> None:
    """Writes from here on carry depth ``ex_depth + 1`` and an actor naming ``members``."""
    actor = (
        f"crmflow:execution:{members[0]}"
        if len(members) == 1
        else f"crmflow:executions:{min(members)}-{max(members)}"
    )
    await conn.execute(
        db.query("set_write_context", "runtime.sql"),
        {"depth": str(ex_depth + 1), "actor": actor},
    )


async def _record(
    conn: psycopg.AsyncConnection[Any],
    chosen: list[tuple[dict[str, Any], Plan]],
    outcome: Outcome,
) -> set[int]:
    """Record every step of the chosen executions (the ones not run inline as pending)
    and each execution's status, first action and active time, in one statement;
    returns the ids of the executions that completed."""
    steps: dict[str, list[Any]] = {k: [] for k in _STEP_COLUMNS}
    ids, statuses, first_actions, actives = [], [], [], []
    for ex, plan in chosen:
        done = outcome.get(ex["id"], {})
        for position, sid in enumerate(plan.ids, start=1):
            recorded: tuple[str, Any, datetime | None, datetime | None] = done.get(
                sid, ("pending", None, None, None)
            )
            status, value, started, finished = recorded
            steps["execution_ids"].append(ex["id"])
            steps["step_ids"].append(sid)
            steps["positions"].append(position)
            steps["types"].append(plan.steps[sid].type)
            steps["statuses"].append(status)
            steps["attempts"].append(1 if status == "succeeded" else 0)
            steps["started"].append(started)
            steps["finished"].append(finished)
            steps["results"].append(None if value is None else Jsonb(value, dumps=_dumps))
        ids.append(ex["id"])
        statuses.append("completed" if len(done) == len(plan.ids) else "pending")
        ran = [
            (started, finished)
            for status, _, started, finished in done.values()
            if status == "succeeded" and started is not None and finished is not None
        ]
        first_actions.append(min((f for _, f in ran), default=None))
        actives.append(sum((f - s).total_seconds() for s, f in ran))
    await conn.execute(
        _q("record_inline"),
        {
            **steps,
            "ids": ids,
            "execution_statuses": statuses,
            "first_actions": first_actions,
            "actives": actives,
        },
    )
    return {i for i, s in zip(ids, statuses, strict=True) if s == "completed"}
