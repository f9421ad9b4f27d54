"""Dry run (``POST /workflows/{id}/test``): would this workflow fire for this entity?

The workflow's current compiled predicate (what the matcher runs) is evaluated on one
simulated event, built the way the matcher builds typed rows from the outbox: ``n``
the entity's row, ``o`` the row before an update, ``ev`` the event. Each top-level
condition is compiled and evaluated on its own too, so a user sees which one failed.

Nothing is written: the evaluation runs in a read-only transaction that is rolled
back, and no event, execution or job is created.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.types.json import Jsonb

from engine import catalog, db, rows, workflow_checks, workflows
from engine.catalog import EntitySchema
from engine.conditions import NEW, Compiler, Condition, Group, parse_conditions
from engine.model import EVENT_TRIGGERS, DefinitionError, Issue, parse_definition

# The operation each trigger reacts to (the others are not matched on events).
TRIGGER_OPS = {
    "entity_created": "insert",
    "entity_updated": "update",
    "field_updated": "update",
    "entity_deleted": "delete",
    "event": "event",
}
STATEMENT_TIMEOUT_MS = 5000


class DryRunError(ValueError):
    """The input does not fit the workflow (``status`` 422), or names no entity (404)."""

    def __init__(self, issues: list[Issue], status: int = 422) -> None:
        self.issues = issues
        self.status = status
        super().__init__("; ".join(str(i) for i in issues))


def top_level(raw: Any, tree: Condition) -> list[tuple[Condition, Any]]:
    """The top-level conditions with their JSON: the items of the outer list or group."""
    if isinstance(tree, Group) and isinstance(raw, list):
        return list(zip(tree.items, raw, strict=True))
    if isinstance(tree, Group) and isinstance(raw, dict) and tree.mode in raw:
        return list(zip(tree.items, raw[tree.mode], strict=True))
    if raw is None:
        return []
    return [(tree, raw)]


async def _row_of(
    conn: psycopg.AsyncConnection[Any],
    entity: EntitySchema,
    entity_id: Any,
    row: dict[str, Any] | None,
) -> dict[str, Any]:
    if entity_id is not None and row is not None:
        raise DryRunError([Issue("row", "give entity_id or row, not both")])
    if row is not None:
        _check_fields(entity, row, "row")
        return row
    if entity_id is None:
        raise DryRunError(
            [Issue("entity_id", f"give the id of a {entity.entity_type} or a row to test")]
        )
    try:
        found = await rows.fetch_row(conn, entity, entity_id)
    except rows.BadEntityId as exc:
        raise DryRunError([Issue("entity_id", str(exc))]) from None
    if found is None:
        raise DryRunError(
            [Issue("entity_id", f"there is no {entity.entity_type} {entity_id!r}")], status=404
        )
    return found


def _check_fields(entity: EntitySchema, row: dict[str, Any], path: str) -> None:
    unknown = [k for k in row if k not in entity.columns]
    if unknown:
        raise DryRunError(
            [Issue(f"{path}.{k}", f"{entity.qualified_name} has no column {k!r}") for k in unknown]
        )


async def dry_run(
    conn: psycopg.AsyncConnection[Any],
    workflow_id: int,
    *,
    entity_id: Any = None,
    row: dict[str, Any] | None = None,
    old_row: dict[str, Any] | None = None,
    payload: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate workflow ``workflow_id`` on an entity (by id) or a given row.

    ``old_row`` (updates only) holds the values the changed fields had before; the
    fields it leaves out had the values of the row. Without it, the simulated update
    comes from a row whose fields were all empty, so every field counts as changed.
    """
    wf = await workflows.get_workflow(conn, workflow_id)
    definition = parse_definition(wf["definition"])
    entity = await _entity_of(conn, wf)
    op = TRIGGER_OPS.get(wf["trigger_type"])
    new, old = await _rows(conn, wf, entity, op, entity_id, row, old_row)
    items, compiled, trigger = _compile(wf, definition, entity)
    event = _event(wf, definition, entity, op, new, old, payload)
    predicate = wf["predicate"]
    columns = [
        sql.SQL("coalesce(({}), false) AS matches").format(db.stored_sql(predicate)),
        sql.SQL("coalesce(({}), false) AS trigger_matches").format(trigger),
        *(
            sql.SQL("coalesce(({}), false) AS {}").format(c, sql.Identifier(f"c{i}"))
            for i, c in enumerate(compiled)
        ),
    ]
    if entity is not None:
        query = db.template("dry_run", "dryrun.sql").format(
            columns=sql.SQL(", ").join(columns), table=entity.table
        )
    else:
        query = db.template("dry_run_no_entity", "dryrun.sql").format(
            columns=sql.SQL(", ").join(columns)
        )
    result = await _evaluate(conn, query, event)
    return {
        "workflow_id": wf["id"],
        "workflow_version": wf["version"],
        "trigger_type": wf["trigger_type"],
        "entity_type": wf["entity_type"],
        "op": op,
        "matches": result["matches"],
        "trigger_matches": result["trigger_matches"],
        "conditions": [
            {
                "path": cond.path,
                "condition": raw,
                "matches": result[f"c{i}"],
                "sql": text.as_string(conn),
            }
            for i, ((cond, raw), text) in enumerate(zip(items, compiled, strict=True))
        ],
        "sql": predicate,
        "row": result["evaluated_row"],
        "old_row": old,
    }


async def _entity_of(conn: psycopg.AsyncConnection[Any], wf: dict[str, Any]) -> EntitySchema | None:
    if not wf["entity_type"]:
        return None
    entity = await catalog.load_entity(conn, wf["entity_type"])
    if entity is None:
        raise DryRunError([Issue("", f"{wf['entity_type']!r} is no longer watched")], status=409)
    return entity


async def _rows(
    conn: psycopg.AsyncConnection[Any],
    wf: dict[str, Any],
    entity: EntitySchema | None,
    op: str | None,
    entity_id: Any,
    row: dict[str, Any] | None,
    old_row: dict[str, Any] | None,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The simulated event's new and old rows."""
    new: dict[str, Any] | None = None
    old: dict[str, Any] | None = None
    if entity is None:
        if entity_id is not None or row is not None:
            raise DryRunError([Issue("entity_id", "this workflow is about no entity")])
    else:
        new = await _row_of(conn, entity, entity_id, row)
    if old_row is not None:
        if op != "update" or entity is None:
            raise DryRunError(
                [Issue("old_row", f"old_row applies to update triggers, not {wf['trigger_type']}")]
            )
        _check_fields(entity, old_row, "old_row")
        old = {**(new or {}), **old_row}
    if op == "delete":
        new, old = None, new
    return new, old


def _compile(
    wf: dict[str, Any], definition: Any, entity: EntitySchema | None
) -> tuple[list[tuple[Condition, Any]], list[sql.Composable], sql.Composable]:
    """Each top-level condition compiled on its own (to say which one failed), and the
    trigger's own predicate."""
    compiler = Compiler(
        entity,
        allow_transitions=wf["trigger_type"] in ("entity_updated", "field_updated")
        and not definition.edge_triggered,
    )
    raw_conditions = wf["definition"].get("conditions", [])
    items = top_level(raw_conditions, parse_conditions(raw_conditions, "conditions"))
    compiled = [compiler.compile(cond, NEW) for cond, _ in items]
    issues: list[Issue] = []
    trigger: sql.Composable = sql.SQL("true")
    if wf["trigger_type"] in EVENT_TRIGGERS:
        trigger = workflow_checks.trigger_predicate(definition, compiler, issues)
    issues += [Issue(p, m) for p, m in compiler.issues]
    if issues:  # the catalog changed since the workflow was saved
        raise DefinitionError(issues)
    return items, compiled, trigger


def _event(
    wf: dict[str, Any],
    definition: Any,
    entity: EntitySchema | None,
    op: str | None,
    new: dict[str, Any] | None,
    old: dict[str, Any] | None,
    payload: dict[str, Any] | None,
) -> dict[str, Any]:
    state = new if new is not None else old
    pk = {c: state.get(c) for c in entity.pk_columns} if entity and state else None
    changed = None
    if op == "update" and new is not None:
        changed = sorted(k for k in new if (old or {}).get(k) != new.get(k))
    return {
        "id": 0,
        "entity_type": wf["entity_type"],
        "op": op,
        "pk": pk,
        "new_row": new,
        "old_row": old,
        "changed": changed,
        "event_name": getattr(definition.parsed_trigger, "event", None),
        "payload": payload,
        "depth": 0,
        "captured_at": datetime.now(UTC).isoformat(),
    }


async def _evaluate(
    conn: psycopg.AsyncConnection[Any], query: sql.Composed, event: dict[str, Any]
) -> dict[str, Any]:
    """Run the evaluation read-only, under a timeout, in a transaction rolled back."""
    outer = conn.info.transaction_status == pq.TransactionStatus.IDLE
    try:
        async with conn.transaction(force_rollback=True):
            if outer:  # a transaction of our own (not a savepoint): make it read-only too
                await conn.execute("SET TRANSACTION READ ONLY")
            await conn.execute(
                sql.SQL("SET LOCAL statement_timeout = {}").format(
                    sql.Literal(STATEMENT_TIMEOUT_MS)
                )
            )
            result: dict[str, Any] | None = await (
                await conn.execute(query, {"event": Jsonb(event)})
            ).fetchone()
    except psycopg.DataError as exc:  # a value of the row that does not fit its column
        reason = exc.diag.message_primary or str(exc)
        raise DryRunError([Issue("row", f"the row does not fit the table: {reason}")]) from None
    except psycopg.errors.QueryCanceled:
        raise DryRunError(
            [Issue("", f"the evaluation took longer than {STATEMENT_TIMEOUT_MS} ms")]
        ) from None
    assert result is not None
    return result
