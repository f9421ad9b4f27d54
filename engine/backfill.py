"""Backfill: enroll the rows of an event workflow's entity that match it now.

``crmflow workflow backfill ID`` and ``POST /workflows/{id}/backfill``. An event
workflow fires on changes from its activation on; a backfill runs it once over the rows
that already exist, as if each had just been created (or updated) to what it is now.

- Which workflows: active ones triggered by ``entity_created``, ``entity_updated`` or
  ``field_updated``. The conditions are evaluated on each row as it is now, with no
  previous row: ``changed``/``changed_from``/``changed_to`` and ``field_updated``'s
  ``from`` cannot be decided and are refused (naming the path); ``field_updated``'s
  ``to`` is required of the row's current value. ``edge_triggered`` is ignored (the
  row meets the conditions now).
- Set-based in batches: one ``INSERT ... SELECT`` per batch of ``batch_size`` rows in
  primary-key order, a transaction each, the next batch after the last key seen. Rows
  are read, never locked (a CRM writer is never blocked by a backfill); no statement
  runs longer than a batch, so a schema change of the table never waits long behind it.
- Idempotent: each row enrolls once per workflow (key ``backfill:<pk>``, unique per
  workflow whatever the version): a second run enrolls nothing new.
- The workflow's limits: the re-enrollment policy (``never``, ``after``) is applied as
  the scheduler applies it; ``max_per_minute`` and ``max_concurrent`` hold the
  executions back when they start, as any other (engine/executor/flow.py). ``limit``
  caps how many this run enrolls.
- Suppression lists (``suppress``) keep their entities out, as on every enrollment path;
  a workflow of another ``environment`` than this process's is refused.
- A dry run counts what would enroll and writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from engine import catalog, db, suppressions, tracing
from engine.catalog import EntitySchema
from engine.conditions import NEW, Compiler, FieldCondition, Group
from engine.config import Settings, get_settings
from engine.model import UNSET, FieldUpdated, parse_definition
from engine.statuses import WorkflowStatus

ALLOWED_TRIGGERS = ("entity_created", "entity_updated", "field_updated")
BATCH_SIZE = 1000


_q = db.Queries("backfill.sql")


class BackfillRefused(ValueError):
    """This workflow cannot be backfilled; ``path`` names the part of its definition."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


@dataclass
class Batch:
    scanned: int
    matched: int
    enrolled: int


@dataclass
class Report:
    workflow_id: int
    dry_run: bool
    scanned: int = 0
    matched: int = 0  # rows meeting the conditions
    enrolled: int = 0  # executions enrolled (a dry run: that would be)
    batches: int = 0
    limit: int | None = None
    execution_ids: list[int] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        """Matching rows left out: enrolled before, re-enrollment policy, the limit."""
        return self.matched - self.enrolled

    def as_dict(self) -> dict[str, Any]:
        return {
            "workflow_id": self.workflow_id,
            "dry_run": self.dry_run,
            "scanned": self.scanned,
            "matched": self.matched,
            "enrolled": self.enrolled,
            "skipped": self.skipped,
            "batches": self.batches,
            "limit": self.limit,
        }


@dataclass
class Plan:
    workflow: dict[str, Any]
    entity: EntitySchema
    predicate: str

    @property
    def workflow_id(self) -> int:
        value: int = self.workflow["workflow_id"]
        return value


def _pk_object(entity: EntitySchema, alias: str) -> sql.Composable:
    return sql.SQL("jsonb_build_object({})").format(
        sql.SQL(", ").join(
            sql.SQL("{}, {}").format(sql.Literal(c), sql.Identifier(alias, c))
            for c in entity.pk_columns
        )
    )


def _predicate(definition: dict[str, Any], entity: EntitySchema, conn: Any) -> str:
    """The workflow's conditions on the row as it is now (``n``), or BackfillRefused."""
    wf = parse_definition(definition)
    compiler = Compiler(entity, allow_transitions=False)
    parts: list[sql.Composable] = [compiler.compile(wf.parsed_conditions, NEW)]
    trigger = wf.parsed_trigger
    if isinstance(trigger, FieldUpdated):
        if trigger.from_ is not UNSET:
            raise BackfillRefused(
                "a backfill reads each row as it is now, without its previous values: "
                "a field_updated trigger with 'from' cannot be backfilled",
                "trigger.from",
            )
        if trigger.to is not UNSET:
            name = trigger.watched_fields[0]
            parts.append(
                compiler.compile(
                    Group(
                        "trigger",
                        "all",
                        (
                            FieldCondition(
                                "trigger",
                                name,
                                "equals",
                                trigger.to,
                                field_path="trigger.field",
                                value_path="trigger.to",
                            ),
                        ),
                    ),
                    NEW,
                )
            )
    if compiler.issues:
        path, message = compiler.issues[0]
        raise BackfillRefused(
            "a backfill reads each row as it is now, without its previous values: "
            f"{path}: {message}",
            path,
        )
    return sql.SQL(" AND ").join(parts).as_string(conn)


async def plan(
    conn: psycopg.AsyncConnection[Any], workflow_id: int, settings: Settings | None = None
) -> Plan:
    """What a backfill of the workflow enrolls; BackfillRefused with the reason."""
    from engine.workflows import WorkflowNotFound

    settings = settings or get_settings()
    wf = await (await conn.execute(_q("backfill_workflow"), {"id": workflow_id})).fetchone()
    if wf is None or wf["status"] == WorkflowStatus.ARCHIVED:
        raise WorkflowNotFound(workflow_id)
    kind = wf["trigger_type"]
    if kind not in ALLOWED_TRIGGERS:
        raise BackfillRefused(
            f"workflow {workflow_id} is triggered by {kind}: only {', '.join(ALLOWED_TRIGGERS)} "
            "workflows can be backfilled"
            + (
                " (scheduled, date_relative and manual ones enroll rows with "
                "`crmflow workflow run`)"
                if kind in ("scheduled", "date_relative", "manual")
                else ""
            ),
            "trigger.type",
        )
    if wf["status"] != WorkflowStatus.ACTIVE:
        raise BackfillRefused(
            f"workflow {workflow_id} is {wf['status']}: activate it to backfill", "status"
        )
    environment = wf["definition"].get("environment") or "production"
    if environment != settings.environment:
        raise BackfillRefused(
            f"workflow {workflow_id} belongs to the environment {environment!r}; this process "
            f"runs in {settings.environment!r} (CRMFLOW_ENVIRONMENT): backfill it there",
            "environment",
        )
    entity = await catalog.load_entity(conn, wf["entity_type"])
    if entity is None:
        raise BackfillRefused(f"entity {wf['entity_type']!r} is not watched", "trigger.entity_type")
    return Plan(wf, entity, _predicate(wf["definition"], entity, conn))


def _allowed(p: Plan) -> sql.Composable:
    """Not on the workflow's suppression lists (``suppress``, by key or by the row's
    email), tested on the row ``n`` as every other enrollment path tests it."""
    definition = p.workflow["definition"]
    if not definition.get("suppress"):
        return sql.SQL("true")
    return suppressions.not_suppressed(
        suppressions.lists_literal(definition),
        sql.Literal(p.entity.entity_type),
        _pk_object(p.entity, "n"),
        sql.SQL("to_jsonb(n)"),
    )


def statement(p: Plan, *, dry_run: bool, first: bool) -> sql.Composed:
    entity = p.entity
    limits = p.workflow["limits"] or {}
    reenrollment: sql.Composable = sql.SQL("true")
    if limits.get("reenrollment", "always") != "always":
        # The scheduler's test, as a lookup per row (see backfill_chosen).
        reenrollment = sql.SQL(
            "(SELECT x.id FROM crmflow.executions AS x"
            " WHERE x.workflow_id = %(workflow_id)s AND x.entity_type = %(entity_type)s"
            " AND x.entity_pk = s.pk AND (%(reenrollment)s = 'never'"
            " OR x.created_at > now() - make_interval(secs => %(reenroll_after)s))"
            " LIMIT 1) IS NULL"
        )
    keys = [sql.Identifier("n", c) for c in entity.pk_columns]
    aliases = [sql.Identifier(f"k{i}") for i in range(len(keys))]
    after: sql.Composable = sql.SQL("true")
    if not first:
        after = sql.SQL(
            "({keys}) > (SELECT {prev} FROM jsonb_populate_record(NULL::{table}, %(after)s) AS p)"
        ).format(
            keys=sql.SQL(", ").join(keys),
            prev=sql.SQL(", ").join(sql.Identifier("p", c) for c in entity.pk_columns),
            table=entity.table,
        )
    chosen = sql.SQL(_q("backfill_chosen")).format(
        pk=_pk_object(entity, "n"),
        predicate=db.stored_sql(p.predicate),
        pk_columns=sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(k, a) for k, a in zip(keys, aliases, strict=True)
        ),
        table=entity.table,
        after=after,
        pk_order=sql.SQL(", ").join(keys),
        reenrollment=reenrollment,
        allowed=_allowed(p),
        scanned_order=sql.SQL(", ").join(sql.SQL("s.{}").format(a) for a in aliases),
        scanned_order_desc=sql.SQL(", ").join(sql.SQL("s.{} DESC").format(a) for a in aliases),
    )
    return sql.SQL(_q("backfill_count" if dry_run else "backfill_enroll")).format(chosen=chosen)


def batch_params(
    p: Plan, settings: Settings, batch_size: int, triggered_at: datetime
) -> dict[str, Any]:
    """The parameters of a batch statement (``after``: the last key of the previous
    batch, None for the first; ``room``: how many more may enroll, None: no limit)."""
    wf = p.workflow
    limits = wf["limits"] or {}
    return {
        "workflow_id": wf["workflow_id"],
        "version_id": wf["version_id"],
        "version": wf["version"],
        "priority": wf["priority"],
        "entity_type": p.entity.entity_type,
        "triggered_at": triggered_at,
        "queue": settings.queue_name,
        "batch_size": batch_size,
        "reenrollment": limits.get("reenrollment", "always"),
        "reenroll_after": float(limits.get("reenroll_after") or 0),
        "after": None,
        "room": None,
    }


async def estimate(conn: psycopg.AsyncConnection[Any], p: Plan) -> int:
    """About how many rows the entity's table holds (for a progress bar)."""
    row = await (
        await conn.execute(_q("backfill_estimate"), {"table": p.entity.table.as_string(conn)})
    ).fetchone()
    if row is not None and row["estimate"] is not None:
        return int(row["estimate"])
    counted = await (
        await conn.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(p.entity.table))
    ).fetchone()
    return int(counted["n"]) if counted else 0


async def run(
    conn: psycopg.AsyncConnection[Any],
    workflow_id: int,
    *,
    dry_run: bool = False,
    limit: int | None = None,
    batch_size: int = BATCH_SIZE,
    settings: Settings | None = None,
    prepared: Plan | None = None,
    progress: Callable[[Batch], None] | None = None,
) -> Report:
    """Backfill workflow ``workflow_id`` (see the module's docstring). ``conn`` is in
    autocommit: each batch is a transaction of its own. ``progress`` is called after
    each batch."""
    settings = settings or get_settings()
    if limit is not None and limit < 1:
        raise BackfillRefused("limit must be at least 1", "limit")
    p = prepared or await plan(conn, workflow_id, settings)
    wf = p.workflow
    report = Report(workflow_id, dry_run, limit=limit)
    triggered_at = datetime.now(UTC)
    params = batch_params(p, settings, batch_size, triggered_at)
    first_statement = statement(p, dry_run=dry_run, first=True)
    next_statement = statement(p, dry_run=dry_run, first=False)
    after: Any = None
    while limit is None or report.enrolled < limit:
        params["after"] = None if after is None else Jsonb(after)
        params["room"] = None if limit is None else limit - report.enrolled
        stmt = first_statement if after is None else next_statement

        async def batch(stmt: sql.Composed = stmt) -> dict[str, Any] | None:
            # Still active at the same version: a pause or an edit stops the backfill.
            still = await (await conn.execute(_q("backfill_still_current"), params)).fetchone()
            if still is None or not still["current"]:
                raise BackfillRefused(
                    f"workflow {workflow_id} was paused, archived or changed during the "
                    f"backfill ({report.enrolled} enrolled until then); run it again to go on",
                    "status",
                )
            row: dict[str, Any] | None = await (await conn.execute(stmt, params)).fetchone()
            return row

        row = await db.retry_lock_timeouts(conn, batch, f"backfilling workflow {workflow_id}")
        if row is None or not row["scanned"]:
            break
        report.batches += 1
        report.scanned += row["scanned"]
        report.matched += row["matched"]
        report.enrolled += row["enrolled"]
        ids = list(row["execution_ids"] or [])
        report.execution_ids += ids
        tracing.enrolled_by("backfill", ids, triggered_at, wf["workflow_id"])
        if progress is not None:
            progress(Batch(row["scanned"], row["matched"], row["enrolled"]))
        if row["scanned"] < batch_size:
            break
        after = row["last_pk"]
    return report
