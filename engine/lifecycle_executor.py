"""The executor's side of the lifecycle (engine/lifecycle.py): the watches an execution
leaves when it starts waiting, the hits the matcher's round kept for it, the goal and
exit criteria checked before each step, and the wait_until steps (their outcome)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from engine import db
from engine.catalog import EntitySchema
from engine.lifecycle_definitions import (
    EVENT,
    EXIT,
    EXIT_CRITERIA,
    GOAL,
    GOAL_MET,
    MET,
    SKIPPED,
    TIMED_OUT,
    WAIT,
    Predicates,
    has_lifecycle,
    predicates,
)
from engine.lifecycle_round import round_statement
from engine.model import Step

if TYPE_CHECKING:
    from engine.executor.plans import Plan
    from engine.executor.runner import Runner

log = logging.getLogger("engine.lifecycle")

_q = db.Queries("lifecycle.sql")


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
        _settle_kept = round_statement(sql.SQL(_q("no_hits")), sql.SQL("")).as_string(conn)
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
            if sid in plan.when_sql and await _when_false(
                runner, conn, ex, entity, sid, plan.when_sql[sid], rows
            ):
                return SKIPPED
            if await met_now():
                return MET  # (the common case of a condition met already: no watch written)
            at = ready_at + timedelta(seconds=float(wait.timeout))
            started = await _start_waiting(conn, ex, found, sid, wait.event, row, at, met_now)
            if started == MET:
                return MET
            # The goal and exit watches were written with the wait's: a change committed
            # after the check before this step and before they were visible was seen by
            # no round, so they are looked at once more (one met ends the execution here;
            # the caller's "waiting" leaves an ended execution as it is).
            if found.ends and await _ends(runner, conn, ex, entity, found) is not None:
                return None
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


async def _when_false(
    runner: Runner,
    conn: db.DictConnection,
    ex: dict[str, Any],
    entity: EntitySchema,
    sid: str,
    when_sql: str,
    rows: dict[str, dict[str, Any]] | None,
) -> bool:
    """The wait step's ``when`` on the entity and the steps so far: false, the step is
    skipped without waiting (returns True)."""
    steps_view = {
        s: {"status": r["status"], "result": r.get("result")} for s, r in (rows or {}).items()
    }
    current = await runner.entity_row(conn, ex, entity)
    if await runner.evaluate(conn, entity, current, steps_view, when_sql):
        return False
    await conn.execute(
        db.query("step_skipped", "runtime.sql"),
        {"id": ex["id"], "step_id": sid, "result": Jsonb({"reason": "'when' was false"})},
    )
    return True


async def _start_waiting(
    conn: db.DictConnection,
    ex: dict[str, Any],
    found: Predicates,
    sid: str,
    event: str | None,
    row: dict[str, Any],
    at: datetime,
    met_now: Callable[[], Awaitable[bool]],
) -> str | None:
    """The wait step is scheduled at its timeout ``at`` and watched, in one transaction
    (a round that sees the watch can wake the step); ``met`` if its conditions are met
    once the watch is visible (the step goes on at once, the watch dropped)."""
    async with conn.transaction():
        await conn.execute(
            db.query("step_scheduled", "runtime.sql"),
            {"id": ex["id"], "step_id": sid, "scheduled_at": at},
        )
        await add_watches(conn, ex, found, {sid: event})
    row["status"], row["scheduled_at"] = "scheduled", at
    # A change committed after the caller's look and before the watch did was seen by no
    # round: look once more, the watch visible. (An event posted before the watch does
    # not count: the wait starts with it, docs/workflows.md.)
    if await met_now():
        await conn.execute(_q("drop_wait_watch"), {"id": ex["id"], "step_id": sid})
        return MET
    return None
