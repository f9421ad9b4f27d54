"""A wave's database work: ``when`` conditions and database steps, per (version, step).

A database step runs for the whole group in one transaction with the step records:
the effects and the records commit together, exactly once. The group's step rows are
locked in key order (two workers never deadlock on them); the entity rows its action
writes are locked without waiting (``SKIP LOCKED``). Any error undoes the whole group,
which then takes the careful path, where retries and failures are handled.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

from psycopg import sql
from psycopg.types.json import Jsonb

from engine import db, metrics, tracing, windows
from engine.actions import registry
from engine.catalog import EntitySchema
from engine.executor.context import StepContext, now
from engine.executor.errors import Skip, describe, jsonable
from engine.executor.runner import RUNNABLE_STEP
from engine.executor.waves import Item
from engine.statuses import LIVE

if TYPE_CHECKING:
    from engine.executor.batch import BatchExecutor

# A group waits this long at most for a row another transaction holds (seconds), then
# goes the careful way, where each execution waits with its own step's timeout.
GROUP_LOCK_WAIT = 2.0


_q = db.Queries("executor.sql")


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)


class GroupFallsBack(Exception):
    """A database group could not run set-based: its executions take the careful path."""


async def check_conditions(x: BatchExecutor, sid: str, group: list[Item]) -> None:
    """A step's ``when`` for the group in one statement: false skips the step (one
    statement), true lets it run in the next wave."""
    predicate = group[0].plan.when_sql[sid]
    safe = db.stored_sql(predicate)
    entity = group[0].entity
    async with db.autocommit(x.pool) as conn:
        params: dict[str, Any] = {
            "ids": [i.id for i in group],
            "steps": [Jsonb(i.view(), dumps=_dumps) for i in group],
        }
        if entity is None:
            query = sql.SQL(_q("evaluate_batch_no_entity")).format(predicate=safe)
        else:
            found = await entity_rows(x, conn, entity, group, lock=False)
            for i in group:
                key = json.dumps(i.ex["entity_pk"], sort_keys=True)
                i.row = found.get(key) or i.ex.get("event_new_row") or i.ex.get("event_old_row")
            params["rows"] = [Jsonb(i.row, dumps=_dumps) for i in group]
            query = sql.SQL(_q("evaluate_batch")).format(predicate=safe, table=entity.table)
        verdict = {r["id"]: r["ok"] for r in await (await conn.execute(query, params)).fetchall()}
        skipped = [i for i in group if not verdict.get(i.id)]
        if skipped:
            finished = now()
            await record(
                x,
                conn,
                [(i, sid) for i in skipped],
                [("skipped", {"reason": "'when' was false"})] * len(skipped),
                finished_at=finished,
            )
    for item in group:
        item.progressed = True
        if verdict.get(item.id):
            item.when_held.add(sid)
        else:
            item.steps[sid].update(
                status="skipped", result={"reason": "'when' was false"}, finished_at=finished
            )


async def check_windows(x: BatchExecutor, sid: str, group: list[Item]) -> None:
    """A windowed step due now for the group (engine/windows.py): open, it runs in the
    next wave; closed, it is scheduled at the next opening (one statement). The opening
    is computed once per distinct time zone of the group (they share the moment)."""
    window = group[0].plan.steps[sid].window
    assert window is not None
    entity = group[0].entity
    moment = now()
    rows: list[dict[str, Any] | None] = [None] * len(group)
    if window.timezone_field is not None and entity is not None:
        async with db.autocommit(x.pool) as conn:  # one statement
            found = await entity_rows(x, conn, entity, group, lock=False)
        rows = [
            found.get(json.dumps(i.ex["entity_pk"], sort_keys=True))
            or i.ex.get("event_new_row")
            or i.ex.get("event_old_row")
            for i in group
        ]
    what = f"step {sid} of workflow {group[0].ex['workflow_id']}"
    decisions = windows.decide_many(window, rows, moment, what=what)
    noted = [(i, d) for i, d in zip(group, decisions, strict=True) if d.worth_noting]
    if noted:  # deferred, or open in a fallback zone (the note says which)
        async with db.autocommit(x.pool) as conn:  # one statement
            await conn.execute(
                _q("steps_deferred"),
                {
                    "execution_ids": [i.id for i, _ in noted],
                    "step_ids": [sid] * len(noted),
                    "ats": [None if d.open else d.at for _, d in noted],
                    "notes": [Jsonb(d.note()) for _, d in noted],
                },
            )
        tracing.delays_scheduled([(i, sid, d.at) for i, d in noted if not d.open])
    for item, decision in zip(group, decisions, strict=True):
        item.progressed = True
        if decision.open:
            item.window_open.add(sid)
        else:
            item.steps[sid].update(
                status="scheduled", scheduled_at=decision.at, result=decision.note()
            )


async def entity_rows(
    x: BatchExecutor,
    conn: db.DictConnection,
    entity: EntitySchema,
    items: list[Item],
    lock: bool,
) -> dict[str, dict[str, Any]]:
    """The group's entity rows now, by key; with ``lock``, locked without waiting."""
    return await rows_by_key(conn, entity, [i.ex["entity_pk"] for i in items], lock=lock)


async def rows_by_key(
    conn: db.DictConnection,
    entity: EntitySchema,
    pks: list[Any],
    *,
    lock: bool,
    whole_rows: bool = True,
) -> dict[str, Any]:
    """The entity's rows with these keys, by key (``json.dumps(pk, sort_keys=True)``): as
    JSON, or None with ``whole_rows=False``; with ``lock``, locked in key order without
    waiting (a row another transaction holds is left out, as a gone one is)."""
    by_key = {json.dumps(pk, sort_keys=True): pk for pk in pks}
    columns = [sql.Identifier("t", c) for c in entity.pk_columns]
    query = sql.SQL(_q("entity_rows")).format(
        pairs=sql.SQL(", ").join(
            sql.SQL("{}, {}").format(sql.Literal(c), col)
            for c, col in zip(entity.pk_columns, columns, strict=True)
        ),
        row=sql.SQL("to_jsonb(t)" if whole_rows else "NULL::jsonb"),
        table=entity.table,
        t_cols=sql.SQL(", ").join(columns),
        p_cols=sql.SQL(", ").join(sql.Identifier("p", c) for c in entity.pk_columns),
        lock=sql.SQL("FOR UPDATE OF t SKIP LOCKED" if lock else ""),
    )
    rows = await (
        await conn.execute(query, {"pks": Jsonb(sorted(by_key.values(), key=_dumps))})
    ).fetchall()
    return {json.dumps(r["pk"], sort_keys=True): r["row"] for r in rows}


async def lock_steps(conn: db.DictConnection, keys: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """Lock these (execution, step) rows and their executions, in key order (a fixed
    order: two workers never deadlock on them); returns their statuses."""
    ordered = sorted(keys)
    rows: list[dict[str, Any]] = await (
        await conn.execute(
            _q("lock_steps"),
            {"execution_ids": [k[0] for k in ordered], "step_ids": [k[1] for k in ordered]},
        )
    ).fetchall()
    return rows


async def claim_group(
    x: BatchExecutor,
    conn: db.DictConnection,
    sid: str,
    group: list[Item],
    entity: EntitySchema | None,
    needs_entity: bool,
) -> tuple[list[Item], dict[int, int]]:
    """In the group's transaction: lock its step rows, load (and, when the action needs
    them, lock) its entity rows onto the items, and count an attempt for each; the
    members and each one's attempt number. GroupFallsBack when any step is no longer
    runnable or a needed entity row is locked elsewhere or gone."""
    locked = await lock_steps(conn, [(i.id, sid) for i in group])
    runnable = {
        r["execution_id"]
        for r in locked
        if r["status"] in RUNNABLE_STEP and r["execution_status"] in LIVE
    }
    members = [i for i in group if i.id in runnable]
    if len(members) < len(group):
        raise GroupFallsBack("some steps were done or cancelled meanwhile")
    if entity is not None:
        found = await entity_rows(x, conn, entity, members, lock=needs_entity)
        for item in members:
            key = json.dumps(item.ex["entity_pk"], sort_keys=True)
            row = found.get(key)
            if row is None and needs_entity:
                raise GroupFallsBack("an entity row is locked elsewhere or gone")
            item.row = row or item.ex.get("event_new_row") or item.ex.get("event_old_row")
    attempts = await (
        await conn.execute(
            _q("steps_running"),
            {
                "execution_ids": [i.id for i in members],
                "step_ids": [sid] * len(members),
            },
        )
    ).fetchall()
    attempt_of = {r["execution_id"]: r["attempts"] for r in attempts}
    return members, attempt_of


async def run_database(x: BatchExecutor, sid: str, group: list[Item]) -> None:
    """One step of one workflow version for a group of executions: the effects and
    the step records in one transaction (exactly once); any error undoes it all and
    the group takes the careful path, where retries and failures are handled."""
    step = group[0].plan.steps[sid]
    action = registry()[step.type]
    entity = group[0].entity
    timeout = float(step.timeout or x.settings.default_step_timeout)
    started = tracing.clock()
    try:
        params = action.parse(step.params)
    except Exception as exc:
        raise GroupFallsBack(f"bad parameters: {exc}") from exc
    try:
        async with x.pool.connection() as conn, conn.transaction():
            members, attempt_of = await claim_group(
                x, conn, sid, group, entity, action.needs_entity
            )
            await write_context(x, conn, members)
            await conn.execute(
                sql.SQL(
                    "SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {lock_ms}"
                ).format(
                    ms=sql.Literal(int(timeout * 1000)),
                    # never long for a whole group: past it, each one waits alone
                    lock_ms=sql.Literal(int(min(timeout, GROUP_LOCK_WAIT) * 1000)),
                )
            )
            contexts = [
                StepContext(
                    x.runner,
                    i.ex,
                    sid,
                    step,
                    attempt_of[i.id],
                    entity,
                    i.row,
                    i.view(),
                    x.settings,
                    conn,
                )
                for i in members
            ]
            results = await asyncio.wait_for(action.run_batch(contexts, params), timeout)
            outcome = [
                ("skipped", {"reason": str(r)}) if isinstance(r, Skip) else ("succeeded", r or {})
                for r in results
            ]
            finished = now()
            await record(x, conn, [(i, sid) for i in members], outcome, finished_at=finished)
    except GroupFallsBack:
        raise
    except Exception as exc:
        raise GroupFallsBack(describe(exc)) from exc
    for status, _ in outcome:
        metrics.STEPS_RUN.labels(step.type, status, "queue").inc()
    tracing.steps_recorded(
        [(i.ex, attempt_of[i.id], s) for i, (s, _) in zip(members, outcome, strict=True)],
        sid,
        step.type,
        started,
    )
    for item, (status, result) in zip(members, outcome, strict=True):
        item.steps[sid].update(status=status, result=jsonable(result), finished_at=finished)
        item.progressed = True


async def write_context(x: BatchExecutor, conn: db.DictConnection, items: list[Item]) -> None:
    """Writes carry depth + 1 and name the executions (one depth per group: a group
    is one workflow version's step, and its executions may differ in depth only
    when chains mix; then the deepest is used, which stops loops no later)."""
    depth = max(int(i.ex["depth"]) for i in items)
    ids = [i.id for i in items]
    actor = (
        f"crmflow:execution:{ids[0]}"
        if len(ids) == 1
        else f"crmflow:executions:{min(ids)}-{max(ids)}"
    )
    await conn.execute(
        db.query("set_write_context", "runtime.sql"), {"depth": str(depth + 1), "actor": actor}
    )


async def record(
    x: BatchExecutor,
    conn: db.DictConnection,
    keys: list[tuple[Item, str]],
    outcome: list[tuple[str, Any]],
    errors: list[str | None] | None = None,
    retry_ats: list[datetime | None] | None = None,
    finished_at: datetime | None = None,
) -> None:
    await conn.execute(
        _q("steps_finished"),
        {
            "execution_ids": [i.id for i, _ in keys],
            "step_ids": [s for _, s in keys],
            "statuses": [o[0] for o in outcome],
            "results": [None if o[1] is None else Jsonb(o[1], dumps=_dumps) for o in outcome],
            "errors": errors or [None] * len(keys),
            "retry_ats": retry_ats or [None] * len(keys),
            # the batch's moment, which the steps that follow count their delays from
            "finished_at": finished_at,
        },
    )
