"""Scheduled (cron) and date-relative workflows, and runs by hand.

Next run times live in ``crmflow.schedules``. Each worker looks for due rows with
``FOR UPDATE SKIP LOCKED``: a tick is taken by one worker, enrolls the matching rows
under a key naming the tick (``tick:<time>:<pk>``), and moves ``next_run_at`` on, in
one transaction. A tick missed while no worker ran fires once, not once per miss.

A scheduled workflow's conditions select the rows that enroll: the same compiled
predicate the matcher uses on events runs here as a scan ``FROM table AS n``.
Date-relative workflows ("3 days before renewal_date") scan every
``date_relative_interval`` for rows whose moment has come within the look-back
window, and enroll each row once per value of the date (``date:<value>:<pk>``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from croniter import croniter
from psycopg import sql
from psycopg.types.json import Jsonb

from engine import catalog, db, suppressions, tracing
from engine.config import Settings, get_settings
from engine.model import DateRelative, Scheduled, parse_definition

log = logging.getLogger(__name__)

DATE_RELATIVE_INTERVAL = 60.0


_q = db.Queries("scheduler.sql")


class NotRunnable(ValueError):
    pass


def cron_iter(expression: str, start: datetime, timezone: str) -> croniter:
    seconds_first = len(expression.split()) == 6
    return croniter(
        expression, start.astimezone(ZoneInfo(timezone)), second_at_beginning=seconds_first
    )


def next_fire(trigger: Scheduled, after: datetime) -> datetime:
    result: datetime = cron_iter(trigger.schedule, after, trigger.timezone).get_next(datetime)
    return result.astimezone(UTC)


def smallest_interval(trigger: Scheduled, samples: int = 6) -> float:
    """The shortest gap between the next few fires (to refuse every-second schedules)."""
    it = cron_iter(trigger.schedule, datetime.now(UTC), trigger.timezone)
    times: list[datetime] = [it.get_next(datetime) for _ in range(samples)]
    return min((b - a).total_seconds() for a, b in itertools.pairwise(times))


def _next_run(definition: dict[str, Any], after: datetime) -> datetime:
    trigger = parse_definition(definition).parsed_trigger
    if isinstance(trigger, Scheduled):
        return next_fire(trigger, after)
    return after + timedelta(seconds=DATE_RELATIVE_INTERVAL)


async def enroll(
    conn: psycopg.AsyncConnection[Any],
    wf: dict[str, Any],
    *,
    key_prefix: str,
    triggered_at: datetime,
    settings: Settings,
    input: dict[str, Any] | None = None,
    entity_id: Any = None,
) -> list[int]:
    """Enroll the rows the workflow's conditions select (or the one ``entity_id``).

    ``wf`` carries workflow_id, version_id, version, entity_type, priority, predicate,
    limits and definition. Returns the ids of the new executions.
    """
    base = {
        "workflow_id": wf["workflow_id"],
        "version_id": wf["version_id"],
        "version": wf["version"],
        "priority": wf["priority"],
        "input": Jsonb(input),
        "triggered_at": triggered_at,
        "queue": settings.queue_name,
    }
    entity = await catalog.load_entity(conn, wf["entity_type"]) if wf["entity_type"] else None
    if entity is None:
        if wf["entity_type"]:
            raise NotRunnable(f"entity {wf['entity_type']!r} is not watched")
        row = await (
            await conn.execute(_q("enroll_nothing"), {**base, "key": key_prefix})
        ).fetchone()
        return list(row["execution_ids"] or []) if row else []

    pk = entity.pk_object("n")
    params: dict[str, Any] = {**base, "entity_type": entity.entity_type}
    extra = _reenrollment_filter(pk, wf.get("limits") or {}, params)
    if wf["definition"].get("suppress"):  # its suppression lists (engine/suppressions.py)
        extra.append(
            suppressions.not_suppressed(
                suppressions.lists_literal(wf["definition"]),
                sql.Literal(entity.entity_type),
                pk,
                sql.SQL("to_jsonb(n)"),
            )
        )
    key: sql.Composable = sql.SQL("{} || {}::text").format(sql.Literal(key_prefix), pk)
    trigger = parse_definition(wf["definition"]).parsed_trigger
    if isinstance(trigger, DateRelative) and entity_id is None:
        extra.append(_date_relative_filter(trigger, params))
        key = sql.SQL("'date:' || {}::text || ':' || {}::text").format(
            sql.Identifier("n", trigger.field), pk
        )
    if entity_id is not None:
        extra.append(_entity_filter(entity, pk, entity_id, params))
    query = sql.SQL(_q("enroll_rows")).format(
        key=key,
        pk=pk,
        table=entity.table,
        predicate=db.stored_sql(wf["predicate"]),
        extra=sql.SQL(" AND ").join(extra) if extra else sql.SQL("true"),
        pk_order=sql.SQL(", ").join(sql.Identifier("n", c) for c in entity.pk_columns),
    )
    row = await (await conn.execute(query, params)).fetchone()
    return list(row["execution_ids"] or []) if row else []


def _reenrollment_filter(
    pk: sql.Composable, limits: dict[str, Any], params: dict[str, Any]
) -> list[sql.Composable]:
    """The filter that keeps out rows the workflow's re-enrollment limit refuses (none
    for ``always``); its parameters go into ``params``."""
    reenrollment = limits.get("reenrollment", "always")
    if reenrollment == "always":
        return []
    params["reenrollment"] = reenrollment
    params["reenroll_after"] = float(limits.get("reenroll_after") or 0)
    return [
        sql.SQL(
            "NOT EXISTS (SELECT 1 FROM crmflow.executions AS x"
            " WHERE x.workflow_id = %(workflow_id)s AND x.entity_type = %(entity_type)s"
            " AND x.entity_pk = {pk} AND (%(reenrollment)s = 'never'"
            " OR x.created_at > now() - make_interval(secs => %(reenroll_after)s)))"
        ).format(pk=pk)
    ]


def _date_relative_filter(trigger: DateRelative, params: dict[str, Any]) -> sql.Composable:
    """Rows whose moment (the date field plus the offset) has come within the look-back."""
    moment = sql.SQL("(CAST({} AS timestamptz) + make_interval(secs => %(offset)s))").format(
        sql.Identifier("n", trigger.field)
    )
    params["offset"] = trigger.offset
    params["lookback"] = trigger.lookback
    return sql.SQL(
        "{m} <= clock_timestamp() AND {m} > clock_timestamp() - make_interval(secs => %(lookback)s)"
    ).format(m=moment)


def _entity_filter(
    entity: catalog.EntitySchema, pk: sql.Composable, entity_id: Any, params: dict[str, Any]
) -> sql.Composable:
    """The one row ``entity_id`` names: its key column's text, or the whole key object."""
    if len(entity.pk_columns) == 1:
        params["entity_id"] = str(entity_id)
        return sql.SQL("CAST({} AS text) = %(entity_id)s").format(
            sql.Identifier("n", entity.pk_columns[0])
        )
    params["entity_pk"] = Jsonb(entity_id)
    return sql.SQL("{} = %(entity_pk)s::jsonb").format(pk)


async def run_now(
    conn: psycopg.AsyncConnection[Any],
    workflow_id: int,
    *,
    settings: Settings | None = None,
    input: dict[str, Any] | None = None,
    entity_id: Any = None,
) -> list[int]:
    """``crmflow workflow run`` / ``POST /workflows/{id}/run``: enroll now, by hand."""
    settings = settings or get_settings()
    wf = await (
        await conn.execute(db.query("workflow_for_run", "scheduler.sql"), {"id": workflow_id})
    ).fetchone()
    if wf is None:
        raise NotRunnable(f"no workflow {workflow_id}")
    if wf["status"] == "archived":
        raise NotRunnable("the workflow is archived")
    if wf["trigger_type"] not in ("manual", "scheduled", "date_relative"):
        raise NotRunnable(
            f"a {wf['trigger_type']} workflow runs on events; only manual, scheduled and "
            "date_relative workflows can be run by hand"
        )
    environment = wf["definition"].get("environment") or "production"
    if environment != settings.environment:
        raise NotRunnable(
            f"workflow {workflow_id} belongs to the environment {environment!r}; this process "
            f"runs in {settings.environment!r} (CRMFLOW_ENVIRONMENT): run it there"
        )
    triggered_at = datetime.now(UTC)
    async with conn.transaction():
        ids = await enroll(
            conn,
            wf,
            key_prefix=f"manual:{uuid.uuid4()}:",
            triggered_at=triggered_at,
            settings=settings,
            input=input,
            entity_id=entity_id,
        )
    tracing.enrolled_by("manual run", ids, triggered_at, wf["workflow_id"])
    return ids


class Scheduler:
    def __init__(self, pool: db.Pool, settings: Settings | None = None) -> None:
        self.pool = pool
        self.settings = settings or get_settings()
        self.generation: int | None = None

    async def sync(self) -> None:
        """Make ``crmflow.schedules`` follow the active scheduled workflows."""
        async with self.pool.connection() as conn, conn.transaction():
            state = await (
                await conn.execute("SELECT generation FROM crmflow.matcher_state")
            ).fetchone()
            generation = state["generation"] if state else 0
            if generation == self.generation:
                return
            rows = await (await conn.execute(_q("active_timed_workflows"), {})).fetchall()
            current = datetime.now(UTC)
            for row in rows:
                if row["scheduled_version"] == row["version_id"]:
                    continue
                first = _next_run(row["definition"], current)
                if row["trigger_type"] == "date_relative":
                    first = current  # scan at once, then every interval
                await conn.execute(
                    _q("upsert_schedule"),
                    {
                        "workflow_id": row["workflow_id"],
                        "version_id": row["version_id"],
                        "next_run_at": first,
                    },
                )
            await conn.execute(_q("drop_inactive_schedules"), {})
            self.generation = generation

    async def tick(self) -> int:
        """Run every due schedule this worker can claim; returns executions enrolled."""
        total = 0
        async with self.pool.connection() as conn, conn.transaction():
            due = await (
                await conn.execute(
                    _q("claim_due_schedules"), {"environment": self.settings.environment}
                )
            ).fetchall()
            for wf in due:
                tick_at = wf["next_run_at"]
                ids = await enroll(
                    conn,
                    wf,
                    key_prefix=f"tick:{tick_at.isoformat()}:",
                    triggered_at=tick_at,
                    settings=self.settings,
                )
                after = max(datetime.now(UTC), tick_at)
                await conn.execute(
                    _q("schedule_ran"),
                    {
                        "workflow_id": wf["workflow_id"],
                        "enrolled": len(ids),
                        "next_run_at": _next_run(wf["definition"], after),
                    },
                )
                log.info("workflow %s tick %s enrolled %d", wf["workflow_id"], tick_at, len(ids))
                tracing.enrolled_by("schedule tick", ids, tick_at, wf["workflow_id"])
                total += len(ids)
        return total

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sync()
                await self.tick()
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                log.warning("scheduler lost the database (%s); retrying", exc)
            except Exception:
                log.exception("scheduler tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
