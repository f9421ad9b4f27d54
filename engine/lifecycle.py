"""Enrollment lifecycle: a workflow's ``goal`` and ``exit_when``, and ``wait_until`` steps.

- ``"goal": <conditions>``: once the enrolled entity meets it, the execution ends
  ``completed`` with ``goal_met_at`` set, its remaining steps ``skipped`` ("goal met").
- ``"exit_when": <conditions>``: unenrollment: the execution ends ``cancelled`` ("exit
  criteria").
- a step's ``"wait_until": {"conditions": ...} | {"event": NAME}`` with a ``timeout``:
  the step waits until the entity meets the conditions, the custom event about it
  arrives, or the timeout passes; then it runs, its result saying which
  (``{"outcome": "met" | "event" | "timed_out"}``).

Where they are evaluated:

- by the matcher, set-based, on every captured change: an execution that starts waiting
  (a delay, a wait) leaves rows in ``crmflow.watches`` (entity, kind, step); each
  matcher round runs ONE extra statement (:func:`run_round`, sql/lifecycle.sql
  ``round``) that joins the round's events to the watches of their entities and
  evaluates each version's compiled conditions (engine/conditions.py) on the entity's
  row as it is now, read by its key; the hits end, or wake, in the round's transaction.
  Nothing polls the waiting executions. A hit on an execution another transaction holds
  (the round never waits for a lock) is kept in ``crmflow.watch_hits`` and the
  execution made due at once: the executor settles it (:func:`settle_kept`) once the
  holder lets go, or the next round does;
- by the executor before each step (:func:`before_step`): its kept hits, then an
  execution that met its goal while it was running ends there; and once more when it
  writes a watch, after the watch commits (a change committed between its look and the
  watch was seen by no round);
- a wait that times out is checked once more on the row as it is then (a change that
  raced with the writing of its watch is not lost: it is "met", not "timed_out").
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from engine import catalog, db
from engine.catalog import EntitySchema
from engine.conditions import NEW, Compiler
from engine.model import Issue, Step, WorkflowDefinition, parse_definition, step_ids

if TYPE_CHECKING:
    from engine.executor.plans import Plan
    from engine.executor.runner import Runner

log = logging.getLogger(__name__)

GOAL, EXIT, WAIT = "goal", "exit", "wait"
GOAL_MET, EXIT_CRITERIA = "goal met", "exit criteria"
MET, EVENT, TIMED_OUT = "met", "event", "timed_out"
SKIPPED = "skipped"  # wait_step: the step's "when" was false, it is skipped without waiting


_q = db.Queries("lifecycle.sql")


class EnrollmentState(StrEnum):
    """An enrollment's state in ``crmflow.enrollments`` (derived from the execution)."""

    ACTIVE = "active"  # pending or running
    WAITING = "waiting"  # a delay, a wait_until or a retry
    COMPLETED = "completed"
    GOAL_MET = "goal_met"  # completed: the entity met the workflow's goal
    EXITED = "exited"  # cancelled (exit criteria, or by hand) or skipped
    FAILED = "failed"


# ───────────────────────────── definitions ─────────────────────────────


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


# ───────────────────────────── the matcher's round ─────────────────────────────


@dataclass
class RoundPlan:
    """The round statement for one generation of workflows (None: nothing to watch)."""

    statement: str | None
    versions: int = 0
    # The watched versions whose conditions compiled, and the entities they are about
    # (to compose the statement again without the versions set apart).
    rows: list[dict[str, Any]] = field(default_factory=list)
    entities: dict[str, EntitySchema] = field(default_factory=dict)
    # Versions set apart: version id → (workflow id, why). Their conditions are left out
    # of the round (the executor's checks remain); the matcher marks their workflows
    # broken (record_broken), and a rebuild of the plan tries them again.
    broken: dict[int, tuple[int, str]] = field(default_factory=dict)
    unrecorded: list[int] = field(default_factory=list)  # of broken, not yet marked


def _pk_match(entity: EntitySchema) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier("n", c), sql.Identifier("p", c))
        for c in entity.pk_columns
    )


WHAT = {GOAL: "its goal", EXIT: "its exit_when"}


def _parts(found: Predicates) -> list[tuple[str, str, str]]:
    """A version's conditions: (kind, step id, predicate)."""
    parts = [(GOAL, "", found.goal), (EXIT, "", found.exit)]
    parts += [(WAIT, sid, p) for sid, p in found.waits.items()]
    return [(kind, sid, p) for kind, sid, p in parts if p is not None]


def _what(kind: str, sid: str) -> str:
    return WHAT.get(kind) or f"step {sid}'s wait_until"


def _branches(
    rows: list[dict[str, Any]],
    entities: dict[str, EntitySchema],
    only: tuple[str, str] | None = None,
) -> dict[str, sql.Composable]:
    """Entity type → its branch of the round (``only``: one (kind, step id) of each)."""
    cases: dict[str, list[sql.Composable]] = {}
    for row in rows:
        entity = entities[row["entity_type"]]
        found = predicates(int(row["version_id"]), row["definition"], entity)
        whens = cases.setdefault(entity.entity_type, [])
        for kind, sid, predicate in _parts(found):
            if only is not None and (kind, sid) != only:
                continue
            whens.append(
                sql.SQL(_q("round_case")).format(
                    version_id=sql.Literal(int(row["version_id"])),
                    kind=sql.Literal(kind),
                    step_id=sql.Literal(sid),
                    predicate=db.stored_sql(predicate),
                )
            )
    return {
        et: sql.SQL(_q("round_branch")).format(
            table=entities[et].table,
            pk_match=_pk_match(entities[et]),
            entity_type=sql.Literal(et),
            cases=sql.SQL(" ").join(whens) if whens else sql.SQL("WHEN false THEN false"),
        )
        for et, whens in cases.items()
    }


def _set_apart(plan: RoundPlan, row: dict[str, Any], reason: str) -> None:
    version_id = int(row["version_id"])
    if version_id in plan.broken:
        return
    log.warning(
        "workflow %s (version %s): %s; its goal, exit_when and wait_until are left out of "
        "the matcher's round (the executor's checks remain), the other workflows' go on",
        row["workflow_id"],
        version_id,
        reason,
    )
    plan.broken[version_id] = (int(row["workflow_id"]), reason)
    plan.unrecorded.append(version_id)


def _compose(conn: psycopg.AsyncConnection[Any], plan: RoundPlan) -> None:
    rows = [r for r in plan.rows if int(r["version_id"]) not in plan.broken]
    branches = list(_branches(rows, plan.entities).values())
    plan.statement = (
        _round(sql.SQL("\nUNION ALL\n").join(branches), SKIP_LOCKED).as_string(conn)
        if branches
        else None
    )


SKIP_LOCKED = sql.SQL("SKIP LOCKED")


def _round(branches: sql.Composable, skip_locked: sql.Composable) -> sql.Composed:
    return sql.SQL(_q("round")).format(branches=branches, skip_locked=skip_locked)


async def _fails(
    conn: psycopg.AsyncConnection[Any], query: str, branches: list[sql.Composable], ids: list[int]
) -> str | None:
    """None if the round's hits of these branches on the events ``ids`` are evaluated
    without an error (in a savepoint), else PostgreSQL's reason."""
    if not branches:
        return None
    probe = sql.SQL(_q(query)).format(branches=sql.SQL("\nUNION ALL\n").join(branches))
    return await db.statement_error(conn, probe, {"ids": ids})


async def _narrow(
    conn: psycopg.AsyncConnection[Any],
    plan: RoundPlan,
    rows: list[dict[str, Any]],
    query: str,
    ids: list[int],
    failing: str,
) -> None:
    """Set apart the versions among ``rows`` whose conditions fail (``query``: the
    probe; ``failing``: what a failure means): one probe per entity, then, in the
    entities that fail, one per version and per condition of the versions that fail.
    Only on the failure path: the round itself stays one statement."""
    by_entity: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_entity.setdefault(row["entity_type"], []).append(row)
    for et, versions in by_entity.items():
        if (
            await _fails(conn, query, list(_branches(versions, plan.entities).values()), ids)
            is None
        ):
            continue
        for row in versions:
            if (
                await _fails(conn, query, list(_branches([row], plan.entities).values()), ids)
                is None
            ):
                continue
            found = predicates(int(row["version_id"]), row["definition"], plan.entities[et])
            for kind, sid, _ in _parts(found):
                only = (kind, sid)
                branch = _branches([row], plan.entities, only)[et]
                reason = await _fails(conn, query, [branch], ids)
                if reason is not None:
                    _set_apart(plan, row, f"{_what(kind, sid)} {failing}: {reason}")
                    break
            else:  # only together (should not happen): name them all
                _set_apart(plan, row, f"its goal, exit_when or wait_until {failing}")


async def build_round(
    conn: psycopg.AsyncConnection[Any], entities: dict[str, EntitySchema] | None = None
) -> RoundPlan:
    """The round statement of the versions with lifecycle conditions; a version whose
    conditions do not compile against the catalog is set apart (``RoundPlan.broken``),
    and any other failure leaves the round out (the executor's checks remain): matching
    goes on whatever happens here."""
    try:
        return await _build_round(conn, entities)
    except psycopg.OperationalError:
        raise
    except Exception:
        log.exception("goals, exits and waits are left to the executor's checks")
        return RoundPlan(None)


async def _build_round(
    conn: psycopg.AsyncConnection[Any], entities: dict[str, EntitySchema] | None
) -> RoundPlan:
    rows = await (await conn.execute(_q("watched_versions"), {})).fetchall()
    if not rows:
        return RoundPlan(None)
    entities = entities if entities is not None else await catalog.load_entities(conn)
    plan = RoundPlan(None, versions=len(rows), entities=entities)
    for row in rows:
        entity = entities.get(row["entity_type"])
        if entity is None:  # not watched any more: the match plan marks it broken
            continue
        try:
            predicates(int(row["version_id"]), row["definition"], entity)
        except Exception as exc:  # a column gone, say
            _set_apart(plan, row, str(exc))
            continue
        plan.rows.append(row)
    branches = list(_branches(plan.rows, entities).values())
    if await _fails(conn, "round_probe", branches, []) is not None:
        await _narrow(conn, plan, plan.rows, "round_probe", [], "no longer compiles")
    _compose(conn, plan)
    return plan


async def run_round(
    conn: psycopg.AsyncConnection[Any], plan: RoundPlan, ids: list[int], queue: str
) -> dict[str, int]:
    """Evaluate the watches the events ``ids`` hit, in the caller's transaction."""
    if plan.statement is None or not ids:
        return {"goals": 0, "exits": 0, "waits": 0}
    params = {"ids": ids, "queue": queue, "execution_id": None}
    row = await (await conn.execute(plan.statement, params)).fetchone()
    assert row is not None
    return {"goals": int(row["goals"]), "exits": int(row["exits"]), "waits": int(row["waits"])}


async def run_round_carefully(
    conn: psycopg.AsyncConnection[Any], plan: RoundPlan, ids: list[int], queue: str
) -> None:
    """The round in a savepoint, for a batch redone step by step. When it fails, the
    versions whose conditions fail on these events (a division by zero on one row, say)
    are set apart and the round runs again without them: the other workflows' goals,
    exits and waits go on. Raises what still fails (left to the executor's checks)."""
    try:
        async with conn.transaction():
            await run_round(conn, plan, ids, queue)
        return
    except psycopg.OperationalError:
        raise
    except psycopg.DatabaseError as exc:
        first = exc
    rows = [r for r in plan.rows if int(r["version_id"]) not in plan.broken]
    before = len(plan.broken)
    await _narrow(conn, plan, rows, "round_try", ids, "fails at run time")
    if len(plan.broken) == before:
        raise first
    _compose(conn, plan)
    async with conn.transaction():
        await run_round(conn, plan, ids, queue)


async def record_broken(conn: psycopg.AsyncConnection[Any], plan: RoundPlan) -> int | None:
    """Mark the workflows of the versions newly set apart broken (``broken_reason``,
    with a ``workflow_broken`` alert), in the caller's transaction; a workflow already
    marked (its match conditions, say) keeps its reason. Returns the matcher's generation
    after the change (the caller's plan takes it: this change compiles nothing new), or
    None when there was nothing to mark."""
    if not plan.unrecorded:
        return None
    marks: dict[int, str] = {}
    for version_id in plan.unrecorded:
        workflow_id, reason = plan.broken[version_id]
        marks.setdefault(workflow_id, reason)
    plan.unrecorded = []
    await conn.execute(_q("mark_broken"), {"ids": list(marks), "reasons": list(marks.values())})
    row = await (await conn.execute(_q("generation"), {})).fetchone()
    assert row is not None
    return int(row["generation"])


def broken_workflows(plan: RoundPlan | None) -> set[int]:
    """The workflows the round set apart (a rebuild of the match plan keeps them broken)."""
    return {workflow_id for workflow_id, _ in (plan.broken.values() if plan else ())}


# ───────────────────────────── the executor ─────────────────────────────


async def add_watches(
    conn: db.DictConnection, ex: dict[str, Any], found: Predicates, waits: dict[str, str | None]
) -> int:
    """What the matcher watches for an execution that starts waiting: its goal and exit
    criteria, and the wait_until steps in ``waits`` (step id → event name or None).
    Returns how many watches are new: until one commits, no round sees the entity's
    changes for it, so the caller looks at the entity once more after that."""
    kinds: list[tuple[str, str, str | None]] = []
    if found.goal is not None:
        kinds.append((GOAL, "", None))
    if found.exit is not None:
        kinds.append((EXIT, "", None))
    kinds.extend((WAIT, sid, event) for sid, event in waits.items())
    if not kinds or ex.get("entity_pk") is None:
        return 0
    written = await conn.execute(
        _q("add_watches"),
        {
            "id": ex["id"],
            "kinds": [k for k, _, _ in kinds],
            "step_ids": [s for _, s, _ in kinds],
            "event_names": [e for _, _, e in kinds],
        },
    )
    return len(await written.fetchall())


def _found(runner: Runner, ex: dict[str, Any], entity: EntitySchema | None) -> Predicates | None:
    if entity is None or ex.get("entity_pk") is None or not has_lifecycle(ex["definition"]):
        return None
    try:
        return predicates(int(ex["workflow_version_id"]), ex["definition"], entity)
    except ValueError as exc:  # a column the conditions read is gone: the steps go on
        log.warning("execution %s: goal, exit_when or wait_until left out: %s", ex["id"], exc)
        return None


async def _holds(
    runner: Runner,
    conn: db.DictConnection,
    ex: dict[str, Any],
    entity: EntitySchema | None,
    row: dict[str, Any] | None,
    predicate: str,
) -> bool:
    """A lifecycle condition on the entity's row; one that fails on it (a division by
    zero, say) is logged and taken as not met: the execution's steps go on."""
    try:
        return await runner.evaluate(conn, entity, row, {}, predicate)
    except psycopg.OperationalError:
        raise
    except psycopg.DatabaseError as exc:
        log.warning(
            "execution %s: a goal, exit_when or wait_until failed, left out: %s", ex["id"], exc
        )
        return False


_settle_kept: str | None = None  # the round without events, on one execution's kept hits


async def settle_kept(conn: db.DictConnection, execution_id: int, queue: str) -> str | None:
    """Settle the hits the matcher's round kept for this execution (it was held when the
    round found them: crmflow.watch_hits), waiting for the rows' locks as the executor
    does: the round's statement on no events. Returns what ended it, if anything."""
    global _settle_kept
    kept = await (await conn.execute(_q("has_kept_hits"), {"id": execution_id})).fetchone()
    if not (kept and kept["kept"]):
        return None
    if _settle_kept is None:
        _settle_kept = _round(sql.SQL(_q("no_hits")), sql.SQL("")).as_string(conn)
    params = {"ids": [], "queue": queue, "execution_id": execution_id}
    row = await (await conn.execute(_settle_kept, params)).fetchone()
    assert row is not None
    if row["goals"]:
        return GOAL_MET
    return EXIT_CRITERIA if row["exits"] else None


async def before_step(runner: Runner, ex: dict[str, Any]) -> str | None:
    """The executor's check before a step: the hits the matcher's round kept for it (met
    earlier), then the goal (first) and the exit criteria on the entity as it is now;
    met, the execution ends here. Returns what ended it."""
    if not has_lifecycle(ex["definition"]):
        return None  # (no connection taken: this runs before every step of every workflow)
    async with db.autocommit(runner.pool) as conn:
        if ex.get("entity_pk") is not None:
            ended = await settle_kept(conn, ex["id"], runner.settings.queue_name)
            if ended is not None:
                return ended
        entity = await runner.entity(conn, ex["entity_type"])
        found = _found(runner, ex, entity)
        if found is None or not found.ends:
            return None
        return await _ends(runner, conn, ex, entity, found)


async def _ends(
    runner: Runner,
    conn: db.DictConnection,
    ex: dict[str, Any],
    entity: EntitySchema | None,
    found: Predicates,
) -> str | None:
    """The goal (first), then the exit criteria, on the entity as it is now; met, the
    execution ends here. Returns what ended it."""
    row = await runner.entity_row(conn, ex, entity)
    for kind, predicate in ((GOAL, found.goal), (EXIT, found.exit)):
        if predicate is not None and await _holds(runner, conn, ex, entity, row, predicate):
            await conn.execute(_q("end_execution"), {"id": ex["id"], "kind": kind})
            return GOAL_MET if kind == GOAL else EXIT_CRITERIA
    return None


async def watch_waiting(runner: Runner, ex: dict[str, Any]) -> None:
    """An execution with a goal or exit criteria starts waiting (a delay, a retry): the
    matcher watches its entity from now on. A change committed after the check before
    its last step and before the new watches did was seen by no round: the goal and
    exit criteria are checked once more, the watches visible (an execution that meets
    one ends here, and the caller's "waiting" leaves an ended execution as it is)."""
    if not has_lifecycle(ex["definition"]):
        return
    async with db.autocommit(runner.pool) as conn:
        entity = await runner.entity(conn, ex["entity_type"])
        found = _found(runner, ex, entity)
        if found is not None and found.ends and await add_watches(conn, ex, found, {}):
            await _ends(runner, conn, ex, entity, found)


async def wait_step(
    runner: Runner,
    ex: dict[str, Any],
    plan: Plan,
    sid: str,
    step: Step,
    row: dict[str, Any],
    ready_at: datetime,
    rows: dict[str, dict[str, Any]] | None = None,
) -> str | None:
    """A wait_until step that is ready: its outcome once the wait is over (``met``,
    ``event``, ``timed_out``), None while it goes on. The first time, a condition met
    already is ``met`` at once; otherwise the step is scheduled at its timeout and the
    matcher watches the entity (the round makes it due at once, with its outcome)."""
    from engine.executor.context import now

    wait = step.wait_until
    assert wait is not None
    async with db.autocommit(runner.pool) as conn:
        entity = await runner.entity(conn, ex["entity_type"])
        found = _found(runner, ex, entity) or Predicates()
        assert entity is not None
        predicate = found.waits.get(sid)

        async def met_now() -> bool:
            if predicate is None:
                return False
            current = await runner.entity_row(conn, ex, entity)
            return await _holds(runner, conn, ex, entity, current, predicate)

        if row["status"] == "pending":
            if sid in plan.when_sql:
                steps_view = {
                    s: {"status": r["status"], "result": r.get("result")}
                    for s, r in (rows or {}).items()
                }
                current = await runner.entity_row(conn, ex, entity)
                if not await runner.evaluate(conn, entity, current, steps_view, plan.when_sql[sid]):
                    await conn.execute(
                        db.query("step_skipped", "runtime.sql"),
                        {
                            "id": ex["id"],
                            "step_id": sid,
                            "result": Jsonb({"reason": "'when' was false"}),
                        },
                    )
                    return SKIPPED
            if await met_now():
                return MET  # (the common case of a condition met already: no watch written)
            at = ready_at + timedelta(seconds=float(wait.timeout))
            # scheduled and watched together: a round that sees the watch can wake the step
            async with conn.transaction():
                await conn.execute(
                    db.query("step_scheduled", "runtime.sql"),
                    {"id": ex["id"], "step_id": sid, "scheduled_at": at},
                )
                await add_watches(conn, ex, found, {sid: wait.event})
            row["status"], row["scheduled_at"] = "scheduled", at
            # A change committed after the look above and before the watch did was seen by
            # no round: look once more, the watch visible. (An event posted before the
            # watch does not count: the wait starts with it, docs/workflows.md.)
            if await met_now():
                await conn.execute(_q("drop_wait_watch"), {"id": ex["id"], "step_id": sid})
                return MET
            if at > now():
                return None
        else:
            # the rows were read before the check that settles kept hits (before_step),
            # and a round may have ended the wait since: its outcome as it is now
            current = await (
                await conn.execute(_q("wait_state"), {"id": ex["id"], "step_id": sid})
            ).fetchone()
            if current is not None:
                row["result"], row["scheduled_at"] = current["result"], current["scheduled_at"]
        outcome = (row.get("result") or {}).get("outcome")
        if outcome in (MET, EVENT):
            return str(outcome)
        if row["scheduled_at"] is not None and row["scheduled_at"] > now():
            return None
        outcome = MET if await met_now() else TIMED_OUT
        await conn.execute(_q("drop_wait_watch"), {"id": ex["id"], "step_id": sid})
        return outcome


# ───────────────────────────── enrollments ─────────────────────────────


async def list_enrollments(
    conn: psycopg.AsyncConnection[Any],
    workflow_id: int,
    state: EnrollmentState | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> dict[str, Any]:
    """A workflow's enrollments, newest first (``before_id``: the page after), and how
    many are in each state."""
    from engine.executor.context import entity_id_of

    params = {
        "workflow_id": workflow_id,
        "state": None if state is None else str(state),
        "before_id": before_id,
        "limit": limit,
    }
    items = await (await conn.execute(_q("list_enrollments"), params)).fetchall()
    for item in items:
        item["entity_id"] = entity_id_of(item.pop("entity_pk"))
    counts = {str(s): 0 for s in EnrollmentState}
    for row in await (await conn.execute(_q("enrollment_counts"), params)).fetchall():
        counts[row["state"]] = int(row["n"])
    return {
        "items": items,
        "counts": counts,
        "next_cursor": items[-1]["execution_id"] if len(items) == limit else None,
    }
