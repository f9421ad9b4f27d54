"""What an action sees while it runs: the execution, the entity, earlier steps' results.

Actions import this module (``from engine.executor.context import StepContext``); it
imports no action and nothing of the executor's loops, so there is no import cycle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from psycopg import sql
from psycopg.types.json import Jsonb

from engine import db, rows, templates
from engine.catalog import EntitySchema, FieldSpec
from engine.conditions import NEW, Compiler
from engine.config import Settings
from engine.executor.errors import PermanentError
from engine.model import Step

if TYPE_CHECKING:
    from engine.executor.runner import Runner


_q = db.Queries("runtime.sql")


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class StepContext:
    """What an action sees while it runs."""

    runner: Runner
    execution: dict[str, Any]
    step_id: str
    step: Step
    attempt: int
    entity: EntitySchema | None
    row: dict[str, Any] | None
    steps: dict[str, dict[str, Any]]
    settings: Settings
    conn: db.DictConnection | None = None
    # a wait_until step: how its wait ended (engine/lifecycle.py), kept in its result
    wait_outcome: str | None = None

    @property
    def execution_id(self) -> int:
        return int(self.execution["id"])

    @property
    def workflow_id(self) -> int:
        return int(self.execution["workflow_id"])

    @property
    def idempotency_key(self) -> str:
        """Stable across attempts of this step, unique across steps and executions."""
        return f"crmflow-{self.execution['id']}-{self.step_id}"

    @property
    def entity_pk(self) -> dict[str, Any] | None:
        return self.execution.get("entity_pk")

    @property
    def entity_id(self) -> Any:
        return entity_id_of(self.entity_pk)

    def template_context(self) -> dict[str, Any]:
        return template_context(self.execution, self.row, self.steps, self.entity_id)

    def render(self, text: str | None) -> str | None:
        if text is None:
            return None
        return templates.render(text, self.template_context())

    def render_value(self, value: Any) -> Any:
        return templates.render_value(value, self.template_context())

    def require_conn(self) -> db.DictConnection:
        if self.conn is None:
            raise RuntimeError("this action needs the step's transaction")
        return self.conn

    def require_entity(self) -> EntitySchema:
        if self.entity is None or self.entity_pk is None:
            raise PermanentError("this action needs an entity")
        return self.entity

    async def matches(self, raw_conditions: Any) -> bool:
        """Evaluate a condition tree (JSON) on the entity as it is now."""
        from engine.conditions import parse_conditions

        compiler = Compiler(with_steps(self.entity), allow_transitions=False)
        predicate = compiler.compile(parse_conditions(raw_conditions, "when"), NEW)
        if compiler.issues:
            raise PermanentError("; ".join(f"{p}: {m}" for p, m in compiler.issues))
        if self.conn is not None:
            return await self.runner.evaluate(
                self.conn, self.entity, self.row, self.steps, predicate.as_string(self.conn)
            )
        async with self.runner.pool.connection() as conn:
            return await self.runner.evaluate(
                conn, self.entity, self.row, self.steps, predicate.as_string(conn)
            )

    async def lock_entity_row(self) -> dict[str, Any] | None:
        """The entity's row, locked for the rest of the step's transaction."""
        entity = self.require_entity()
        query = rows.entity_row_query(entity, lock=True)
        row = await (
            await self.require_conn().execute(query, {"pk": Jsonb(self.entity_pk)})
        ).fetchone()
        return row["row"] if row else None

    async def update_entity(self, values: dict[str, Any]) -> dict[str, Any]:
        """Set columns of the entity's row (JSON values converted to the column types
        by PostgreSQL); returns the previous values of those columns."""
        entity = self.require_entity()
        for column in values:
            if column not in entity.columns:
                raise PermanentError(f"{entity.qualified_name} has no column {column!r}")
        before = await self.lock_entity_row()
        if before is None:
            raise PermanentError(f"{entity.entity_type} {self.entity_id} no longer exists")
        columns = list(values)
        query = sql.SQL(
            "UPDATE {table} AS t SET ({cols}) = (SELECT {vcols} FROM "
            "jsonb_populate_record(NULL::{table}, %(values)s::jsonb) AS v) "
            "FROM jsonb_populate_record(NULL::{table}, %(pk)s::jsonb) AS p WHERE {pk_match}"
        ).format(
            table=entity.table,
            cols=sql.SQL(", ").join(sql.Identifier(c) for c in columns),
            vcols=sql.SQL(", ").join(sql.Identifier("v", c) for c in columns),
            pk_match=entity.pk_match(),
        )
        # A 1-column row: "SET (a) = (SELECT ...)" needs ROW() in PostgreSQL.
        if len(columns) == 1:
            query = sql.SQL(
                "UPDATE {table} AS t SET {col} = (SELECT {vcol} FROM "
                "jsonb_populate_record(NULL::{table}, %(values)s::jsonb) AS v) "
                "FROM jsonb_populate_record(NULL::{table}, %(pk)s::jsonb) AS p WHERE {pk_match}"
            ).format(
                table=entity.table,
                col=sql.Identifier(columns[0]),
                vcol=sql.Identifier("v", columns[0]),
                pk_match=entity.pk_match(),
            )
        await self.require_conn().execute(
            query, {"values": Jsonb(values), "pk": Jsonb(self.entity_pk)}
        )
        self.row = {**before, **values}
        return {c: before.get(c) for c in columns}


def with_steps(entity: EntitySchema | None) -> EntitySchema:
    """The entity plus a ``steps`` JSON field, for ``when`` conditions on earlier results
    (``steps.qualify_lead.result.score``), read from the evaluation's alias ``s``."""
    steps_field = FieldSpec(
        name="steps",
        kind="json",
        type_sql="pg_catalog.jsonb",
        display_type="jsonb",
        column="steps",
        row_alias="s",
    )
    if entity is None:
        return EntitySchema("", "", "", [], {"steps": steps_field})
    return EntitySchema(
        entity.entity_type,
        entity.table_schema,
        entity.table_name,
        entity.pk_columns,
        {**entity.columns, "steps": steps_field},
        entity.derived,
    )


def entity_id_of(pk: Any) -> Any:
    """An entity's id as templates see it: the key's value, or the key as JSON."""
    if isinstance(pk, dict) and len(pk) == 1:
        return next(iter(pk.values()))
    return json.dumps(pk, sort_keys=True) if pk is not None else None


def template_context(
    ex: dict[str, Any],
    row: dict[str, Any] | None,
    steps: dict[str, dict[str, Any]],
    entity_id: Any = None,
) -> dict[str, Any]:
    """What templates see: the entity, the event, the input, earlier steps' results."""
    event = {
        "op": ex.get("event_op"),
        "name": ex.get("event_name"),
        "changed": ex.get("event_changed") or [],
        "new": ex.get("event_new_row"),
        "old": ex.get("event_old_row"),
        "payload": ex.get("event_payload"),
    }
    context: dict[str, Any] = {
        "entity": row or {},
        "event": event,
        "input": ex.get("input") or {},
        "steps": steps,
        "execution": {
            "id": ex["id"],
            "workflow_id": ex["workflow_id"],
            "workflow_name": ex.get("workflow_name"),
            "workflow_version": ex["workflow_version"],
            "triggered_at": ex["triggered_at"],
            "entity_type": ex.get("entity_type"),
            "entity_id": entity_id if entity_id is not None else entity_id_of(ex.get("entity_pk")),
        },
        "workflow": {"id": ex["workflow_id"], "name": ex.get("workflow_name")},
        "now": now(),
    }
    entity_type = ex.get("entity_type")
    if entity_type and entity_type not in context:
        context[entity_type] = row or {}
    return context
