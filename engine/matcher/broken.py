"""Broken workflows: recorded when a plan sets them apart, listed, and replayed on the
events they missed once fixed."""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from engine import catalog, db
from engine.catalog import EntitySchema
from engine.config import Settings, get_settings
from engine.executor import queue as execution_queue
from engine.matcher.plan import MatchPlan, build_plan, compose, find_broken

log = logging.getLogger("engine.matcher")


_q = db.Queries("matcher.sql")


async def record_broken(conn: psycopg.AsyncConnection[Any], plan: MatchPlan) -> None:
    """Record the plan's broken-state changes (and their alerts), in the caller's
    transaction: a workflow found broken misses events from the oldest pending one on,
    the batch being matched included (``broken_since_event_id``). Saving bumps the
    generation; the plan takes the new one, so it is not rebuilt for its own change."""
    if not plan.changes:
        return
    first = await (await conn.execute(_q("first_unmatched_event"), {})).fetchone()
    assert first is not None
    await conn.execute(
        _q("set_broken"),
        {
            "ids": [wf_id for wf_id, _ in plan.changes],
            "reasons": [reason for _, reason in plan.changes],
            "since": [first["id"]] * len(plan.changes),
        },
    )
    plan.changes = []
    now = await (await conn.execute(_q("first_unmatched_event"), {})).fetchone()
    if now is not None and now["generation"] == plan.generation + 1:
        plan.generation = now["generation"]


async def refresh_broken(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    """Probe the active workflows now (as a plan build does), record which are broken,
    and return the broken ones (``workflow apply`` warns about them)."""
    async with conn.transaction():
        row = await (await conn.execute(_q("first_unmatched_event"), {})).fetchone()
        assert row is not None
        await record_broken(conn, await build_plan(conn, row["generation"], log_changes=False))
    return await (await conn.execute(_q("broken_workflows"), {})).fetchall()


async def broken_workflows(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    """Active workflows marked broken (health, metrics, alerts)."""
    return await (await conn.execute(_q("broken_workflows"), {})).fetchall()


REPLAY_CHUNK = 500  # events per replay transaction


async def _recheck(
    conn: psycopg.AsyncConnection[Any], workflow_id: int
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, EntitySchema], str | None]:
    """The workflow to replay, its plan rows and the entities, after probing it again (in
    a transaction of its own, its broken state recorded anew when it changed): the
    reason it is still broken, or None. Raises when it cannot be replayed at all."""
    from engine import workflows

    async with conn.transaction():
        wf = await (await conn.execute(_q("replay_workflow"), {"id": workflow_id})).fetchone()
        if wf is None or wf["status"] == "archived":
            raise workflows.WorkflowNotFound(workflow_id)
        if wf["status"] != "active":
            raise workflows.ReplayRefused(
                f"workflow {workflow_id} is {wf['status']}: activate it to replay its events"
            )
        rows = [
            r
            for r in await (await conn.execute(_q("active_event_workflows"), {})).fetchall()
            if r["workflow_id"] == workflow_id
        ]
        if not rows:
            raise workflows.ReplayRefused(
                f"workflow {workflow_id} is not triggered by events: nothing to replay"
            )
        entities = await catalog.load_entities(conn)
        reason = (await find_broken(conn, rows, entities)).get(workflow_id)
        plan = MatchPlan(0, None, changes=[(workflow_id, reason)])
        if reason != wf["broken_reason"]:
            await record_broken(conn, plan)
    return wf, rows, entities, reason


async def replay_events(
    conn: psycopg.AsyncConnection[Any], workflow_id: int, settings: Settings | None = None
) -> dict[str, Any]:
    """Re-match workflow ``workflow_id`` alone over the events it may have missed while
    broken (its entity's events since ``broken_since_event_id``), once it compiles again.

    Clears its broken state first, in a transaction of its own, so that matchers take it
    into their plans from then on; then waits for batches still matching its entity's
    events with an older plan, and enrolls it on the processed events since the break, in
    chunks of a transaction each. Idempotent: the enrollment key (version, event) lets no
    event enroll twice, so a replay cut short is run again.
    Raises :class:`workflows.StillBroken` while it does not compile."""
    from engine import workflows

    settings = settings or get_settings()
    wf, rows, entities, reason = await _recheck(conn, workflow_id)
    if reason is not None:
        raise workflows.StillBroken(f"workflow {workflow_id} is still broken: {reason}")
    since = wf["broken_since_event_id"]
    report = {"workflow_id": workflow_id, "since_event_id": since, "events": 0, "enrolled": 0}
    if since is None:
        return report  # nothing missed (or replayed already)
    statement = compose(conn, rows, entities, processed="count_replayed")
    assert statement is not None
    entity_type = rows[0]["entity_type"]
    async with conn.transaction():  # held only until those batches are done
        await conn.execute(
            _q("replay_wait_for_matchers"), {"since": since, "entity_type": entity_type}
        )
    after = since
    while True:  # a transaction per chunk; a replay cut short is simply run again
        async with conn.transaction():
            chunk = await (
                await conn.execute(
                    _q("replay_event_ids"),
                    {"after": after, "entity_type": entity_type, "limit": REPLAY_CHUNK},
                )
            ).fetchone()
            ids = list(chunk["ids"] or []) if chunk else []
            if not ids:
                await conn.execute(_q("replay_done"), {"id": workflow_id})
                break
            enrolled = await (
                await conn.execute(
                    statement,
                    {"ids": ids, "queue": settings.queue_name, "max_depth": settings.max_depth},
                )
            ).fetchall()
            waiting = [e["id"] for e in enrolled if e["status"] == "pending"]
            if waiting:
                await execution_queue.enqueue(conn, waiting, settings.queue_name)
        report["events"] += len(ids)
        report["enrolled"] += len(enrolled)
        after = ids[-1] + 1
    log.warning(
        "workflow %d: replayed %d events since event %d, %d enrolled",
        workflow_id,
        report["events"],
        since,
        report["enrolled"],
    )
    return report
