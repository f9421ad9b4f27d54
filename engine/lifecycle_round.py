"""The matcher's lifecycle round (engine/lifecycle.py): one statement per matcher round
(sql/lifecycle.sql ``round``) evaluates the goals, exit criteria and wait_until
conditions the round's events hit, on the watched entities' rows, and settles the hits
in the round's transaction. Here: composing it for one generation of workflows
(:func:`build_round`), running it (:func:`run_round`, :func:`run_round_carefully`), and
setting apart the versions whose conditions fail (marked broken, :func:`record_broken`)
so that every other workflow's goals, exits and waits go on."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from engine import catalog, db
from engine.catalog import EntitySchema
from engine.lifecycle_definitions import EXIT, GOAL, WAIT, Predicates, predicates

log = logging.getLogger("engine.lifecycle")

_q = db.Queries("lifecycle.sql")


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
            pk_match=entities[et].pk_match("n", "p"),
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
        round_statement(sql.SQL("\nUNION ALL\n").join(branches), SKIP_LOCKED).as_string(conn)
        if branches
        else None
    )


SKIP_LOCKED = sql.SQL("SKIP LOCKED")


def round_statement(branches: sql.Composable, skip_locked: sql.Composable) -> sql.Composed:
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
