"""Building the match plan: which active workflow versions compile, one statement for all
of them (``compose``), and the broken ones set apart."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from engine import catalog, db, suppressions

log = logging.getLogger("engine.matcher")


_q = db.Queries("matcher.sql")


def catalog_error(exc: BaseException) -> bool:
    """Whether an error names a catalog problem (class 42: a table, column, type,
    function or operator missing or mismatched; 0A000: a cached plan whose row type
    changed): the plan is rebuilt and re-probed, never the events consumed."""
    state = getattr(exc, "sqlstate", None) or ""
    return state.startswith("42") or state == "0A000"


@dataclass
class MatchPlan:
    """The match statement for one generation of active workflows."""

    generation: int
    statement: str | None  # None: no active workflow reacts to events
    workflows: int = 0
    entity_types: list[str] = field(default_factory=list)
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)  # id → definition, name
    entities: dict[str, catalog.EntitySchema] = field(default_factory=dict)
    broken: dict[int, str] = field(default_factory=dict)  # workflow id → why, left out
    # Broken states that changed at this build (workflow id, reason or None), to record.
    changes: list[tuple[int, str | None]] = field(default_factory=list)
    # Workflows of other environments: (environment, entity type or None for custom
    # events of any entity) whose events this matcher queues for them.
    elsewhere: list[tuple[str, str | None]] = field(default_factory=list)
    # The statement matching events queued for this environment (environment_events).
    queued_statement: str | None = None


def _branch(
    entity_type: str | None,
    versions: list[dict[str, Any]],
    entities: dict[str, catalog.EntitySchema],
) -> sql.Composable:
    cases = sql.SQL(", ").join(
        sql.SQL(_q("match_case")).format(
            predicate=db.stored_sql(v["predicate"]), version_id=sql.Literal(v["version_id"])
        )
        for v in versions
    )
    if entity_type is None:
        return sql.SQL(_q("match_branch_no_entity")).format(cases=cases)
    return sql.SQL(_q("match_branch")).format(
        table=entities[entity_type].table, cases=cases, entity_type=sql.Literal(entity_type)
    )


def _by_entity(rows: list[dict[str, Any]]) -> dict[str | None, list[dict[str, Any]]]:
    by_entity: dict[str | None, list[dict[str, Any]]] = {}
    for row in rows:
        by_entity.setdefault(row["entity_type"], []).append(row)
    return by_entity


def _current_row(entities: list[catalog.EntitySchema]) -> sql.Composable:
    """The entity's row now, as JSON, for each of these entities (match_and_enroll)."""
    cases = [
        sql.SQL(_q("current_row_case")).format(
            entity_type=sql.Literal(e.entity_type),
            table=e.table,
            pk_match=e.pk_match(),
        )
        for e in entities
    ]
    if not cases:
        return sql.SQL("NULL::jsonb")
    return sql.SQL("CASE x.entity_type {} END").format(sql.SQL(" ").join(cases))


def compose(
    conn: psycopg.AsyncConnection[Any],
    rows: list[dict[str, Any]],
    entities: dict[str, catalog.EntitySchema],
    processed: str = "mark_batch_processed",
) -> str | None:
    """The match statement of these workflow versions (all on watched entities);
    ``processed`` names its last step (``count_replayed`` for replay-events)."""
    by_entity = _by_entity(rows)
    if not by_entity:
        return None
    branches = [_branch(et, versions, entities) for et, versions in by_entity.items()]
    current_row = _current_row([e for name, e in entities.items() if name in by_entity])
    statement = sql.SQL(_q("match_and_enroll")).format(
        branches=sql.SQL("\nUNION ALL\n").join(branches),
        current_row=current_row,
        processed=sql.SQL(_q(processed)),
        not_suppressed=_not_suppressed(rows, entities),
    )
    return statement.as_string(conn)


def _not_suppressed(
    rows: list[dict[str, Any]], entities: dict[str, catalog.EntitySchema]
) -> sql.Composable:
    """The suppression test of match_and_enroll's candidates: ``true`` when no workflow
    has ``suppress`` (nothing read), else the lists of each version as constants (a CASE
    on the version: the stored definitions are not read per event). Address entries are
    compared with the entity's ``email`` as it is now, read from its table by key:
    captured rows may leave out columns no workflow names (capture's column pruning)."""
    lists = {
        r["version_id"]: r["definition"].get("suppress")
        for r in rows
        if (r.get("definition") or {}).get("suppress")
    }
    if not lists:
        return sql.SQL("true")
    by_version = sql.SQL("CASE mt.version_id {} END").format(
        sql.SQL(" ").join(
            sql.SQL("WHEN {} THEN {}::jsonb").format(
                sql.Literal(version_id), sql.Literal(json.dumps(names))
            )
            for version_id, names in sorted(lists.items())
        )
    )
    with_email = sorted(
        {
            r["entity_type"]
            for r in rows
            if r["version_id"] in lists
            and r["entity_type"] in entities
            and "email" in entities[r["entity_type"]].columns
        }
    )
    captured = sql.SQL("coalesce(ev.new_row, ev.old_row)")
    entity_row: sql.Composable = captured
    if with_email:
        now_cases = sql.SQL(" ").join(
            sql.SQL(
                "WHEN {et} THEN (SELECT jsonb_build_object('email', t.email)"
                " FROM jsonb_populate_record(NULL::{table}, ev.pk) AS p"
                " JOIN {table} AS t ON {pk_match})"
            ).format(
                et=sql.Literal(et),
                table=entities[et].table,
                pk_match=entities[et].pk_match(),
            )
            for et in with_email
        )
        entity_row = sql.SQL("coalesce(CASE ev.entity_type {} END, {})").format(now_cases, captured)
    return suppressions.not_suppressed(
        by_version, sql.SQL("ev.entity_type"), sql.SQL("ev.pk"), entity_row
    )


def workflow_environment(row: dict[str, Any]) -> str:
    """A workflow version's environment ("production" when its definition names none)."""
    return str((row.get("definition") or {}).get("environment") or "production")


async def _compiles(
    conn: psycopg.AsyncConnection[Any],
    branches: list[sql.Composable],
    current_row: sql.Composable | None = None,
) -> str | None:
    """None if these branches (and the reading of the entities' current rows) compile
    against the catalog now, else PostgreSQL's reason."""
    branches = branches or [sql.SQL("SELECT NULL::bigint AS event_id")]
    probe = sql.SQL(_q("match_probe")).format(
        branches=sql.SQL("\nUNION ALL\n").join(branches),
        current_row=current_row or sql.SQL("NULL::jsonb"),
    )
    return await db.statement_error(conn, probe, {})


async def find_broken(
    conn: psycopg.AsyncConnection[Any],
    rows: list[dict[str, Any]],
    entities: dict[str, catalog.EntitySchema],
) -> dict[int, str]:
    """The workflow versions among ``rows`` that do not compile against the catalog as it
    is now: workflow id → reason. One probe when all compile (the common case); else
    one per entity, then one per workflow of the entities that fail."""
    broken: dict[int, str] = {}
    healthy: list[dict[str, Any]] = []
    missing: dict[str, dict[str, Any]] | None = None
    for row in rows:
        et = row["entity_type"]
        if et is not None and et not in entities:
            if missing is None:
                missing = {s["entity_type"]: s for s in await catalog.entity_states(conn)}
            state = missing.get(et)
            if state is None:
                reason = f"{et!r} is no longer a watched entity"
            elif state["captured_on"]:
                reason = (
                    f"its table {state['table_schema']}.{state['table_name']} (entity {et!r}) "
                    f"was renamed to {state['captured_on']}; it compiles again once capture "
                    "follows the rename (the worker heals it within seconds)"
                )
            else:
                reason = (
                    f"its table {state['table_schema']}.{state['table_name']} (entity {et!r}) "
                    "no longer exists"
                )
            broken[row["workflow_id"]] = reason
        else:
            healthy.append(row)
    by_entity = _by_entity(healthy)
    if not by_entity:
        return broken
    everything = [_branch(et, v, entities) for et, v in by_entity.items()]
    in_use = [entities[et] for et in by_entity if et is not None]
    if await _compiles(conn, everything, _current_row(in_use)) is None:
        return broken
    for et, versions in by_entity.items():
        if et is not None:
            unreadable = await _compiles(conn, [], _current_row([entities[et]]))
            if unreadable is not None:  # its rows cannot be read by their key
                for v in versions:
                    broken[v["workflow_id"]] = (
                        f"the rows of {entities[et].qualified_name} cannot be read by their "
                        f"key: {unreadable}"
                    )
                continue
        if await _compiles(conn, [_branch(et, versions, entities)]) is None:
            continue
        for v in versions:
            failure = await _compiles(conn, [_branch(et, [v], entities)])
            if failure is not None:
                broken[v["workflow_id"]] = f"its conditions no longer compile: {failure}"
    return broken


async def build_plan(
    conn: psycopg.AsyncConnection[Any],
    generation: int,
    log_changes: bool = True,
    environment: str | None = None,
) -> MatchPlan:
    """The match statement of the active workflows that compile; the others are left
    out, their broken state in ``changes`` (see :func:`record_broken`). With an
    ``environment``, only that environment's workflows are matched; the others' entity
    types are in ``elsewhere`` (their events are queued for them)."""
    rows = await (await conn.execute(_q("active_event_workflows"), {})).fetchall()
    entities = await catalog.load_entities(conn)
    broken = await find_broken(conn, rows, entities)
    healthy = [r for r in rows if r["workflow_id"] not in broken]
    elsewhere: list[tuple[str, str | None]] = []
    if environment is not None:
        elsewhere = sorted(
            {
                (workflow_environment(r), r["entity_type"])
                for r in healthy
                if workflow_environment(r) != environment
            },
            key=lambda pair: (pair[0], pair[1] or ""),
        )
        healthy = [r for r in healthy if workflow_environment(r) == environment]
    changes = [
        (r["workflow_id"], broken.get(r["workflow_id"]))
        for r in rows
        if r["broken_reason"] != broken.get(r["workflow_id"])
    ]
    for wf_id, reason in changes if log_changes else []:
        if reason:
            log.warning("workflow %d is broken and left out of matching: %s", wf_id, reason)
        else:
            log.warning("workflow %d compiles again and is matched", wf_id)
    return MatchPlan(
        generation,
        compose(conn, healthy, entities),
        workflows=len(healthy),
        entity_types=sorted({e for r in healthy if (e := r["entity_type"])}),
        versions={r["version_id"]: r for r in rows},
        entities=entities,
        broken=broken,
        changes=changes,
        elsewhere=elsewhere,
        queued_statement=(
            compose(conn, healthy, entities, processed="environment_processed")
            if environment is not None
            else None
        ),
    )
