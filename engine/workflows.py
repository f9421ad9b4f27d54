"""Workflows: validate a definition against the live catalog, compile it, store versions.

This is the one implementation behind ``crmflow workflow apply`` and the API's
``POST/PUT /workflows``: both get the same checks and the same error paths.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from engine import audit, catalog, db, lifecycle, prefilter
from engine.catalog import EntitySchema
from engine.conditions import (
    NEW,
    OLD,
    Compiler,
    Group,
    uses_transitions,
)
from engine.model import (
    EVENT_TRIGGERS,
    DefinitionError,
    Issue,
    WorkflowDefinition,
    normalise_name,
    parse_definition,
)
from engine.statuses import WorkflowChange
from engine.workflow_checks import check_in_database, check_steps, check_trigger
from engine.workflow_checks import trigger_predicate as trigger_predicate

T = TypeVar("T")


class WorkflowNotFound(LookupError):
    pass


class ReplayRefused(ValueError):
    """``replay-events`` cannot run for this workflow (paused, not event-triggered)."""


class StillBroken(ReplayRefused):
    """``replay-events`` on a workflow whose predicate still does not compile."""


@dataclass
class CompiledWorkflow:
    definition: WorkflowDefinition
    stored: dict[str, Any]  # the definition as stored (the user's JSON without "status")
    predicate: str
    entity: EntitySchema | None
    definition_hash: str
    # Which captured rows it could match (engine/prefilter.py), per operation.
    capture_filter: dict[str, Any] | None = None


def definition_hash(stored: dict[str, Any]) -> str:
    canonical = json.dumps(stored, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def compile_workflow(conn: psycopg.AsyncConnection[Any], raw: Any) -> CompiledWorkflow:
    """Parse, check against the catalog, compile. Raises :class:`DefinitionError`."""
    wf = parse_definition(raw)
    issues: list[Issue] = []
    entities = await catalog.load_entities(conn)
    entity: EntitySchema | None = None
    if wf.entity_type:
        entity = entities.get(wf.entity_type)
        if entity is None:
            watched = ", ".join(sorted(entities)) or "none yet"
            issues.append(
                Issue(
                    "trigger.entity_type",
                    f"{wf.entity_type!r} is not a watched entity (watched: {watched}); "
                    "run `crmflow watch TABLE` first",
                )
            )
            raise DefinitionError(issues)

    kind = wf.trigger_type
    on_updates = kind in ("entity_updated", "field_updated")
    if wf.edge_triggered and kind not in ("entity_created", "entity_updated", "field_updated"):
        issues.append(
            Issue(
                "edge_triggered",
                "edge_triggered applies to entity_created/updated and field_updated",
            )
        )
    compiler = Compiler(entity, allow_transitions=on_updates and not wf.edge_triggered)
    conditions = wf.parsed_conditions
    has_conditions = not (isinstance(conditions, Group) and not conditions.items)
    if has_conditions and entity is None:
        issues.append(Issue("conditions", "conditions need a trigger with an entity_type"))
    if uses_transitions(conditions) and not on_updates:
        compiler.allow_transitions = False  # the compiler reports each offending leaf

    predicate_parts: list[sql.Composable] = []
    if kind in EVENT_TRIGGERS:
        predicate_parts.append(trigger_predicate(wf, compiler, issues))
    if entity is not None:
        predicate_parts.append(compiler.compile(conditions, NEW))
        if wf.edge_triggered:
            before = compiler.compile(conditions, OLD)
            predicate_parts.append(sql.SQL("NOT (ev.op = 'update' AND {})").format(before))

    check_trigger(wf, entity, issues)
    check_steps(wf, entity, compiler, issues)
    lifecycle.check(wf, entity, compiler, issues)  # goal, exit_when, wait_until
    issues.extend(Issue(p, m) for p, m in compiler.issues)
    if issues:
        raise DefinitionError(issues)

    predicate = sql.SQL(" AND ").join(predicate_parts) if predicate_parts else sql.SQL("true")
    predicate_text = predicate.as_string(conn)
    await check_in_database(conn, compiler, entity, predicate_text)

    facts = await prefilter.column_facts(conn, entity) if entity is not None else {}
    capture_filter = prefilter.compile_filter(wf, entity, facts)
    capture_filter = lifecycle.capture_filter(wf, entity, capture_filter)

    # The name as normalised (NFKC), so the definition and the workflow agree.
    stored = {k: wf.name if k == "name" else v for k, v in raw.items() if k != "status"}
    return CompiledWorkflow(
        wf, stored, predicate_text, entity, definition_hash(stored), capture_filter
    )


# ───────────────────────────── storage ─────────────────────────────


@dataclass
class SaveResult:
    id: int
    name: str
    version: int
    status: str
    created: bool
    new_version: bool


async def apply(
    conn: psycopg.AsyncConnection[Any], raw: Any, *, actor: str | None = None
) -> SaveResult:
    """Create or update a workflow by name; a changed definition becomes a new version.
    ``actor`` is who the audit trail names (engine/audit.py: else the context's, else
    the OS user)."""
    compiled = await compile_workflow(conn, raw)

    async def save() -> SaveResult:
        existing = await (
            await conn.execute(
                db.query("lock_workflow_by_name", "workflows.sql"),
                {"name": compiled.definition.name},
            )
        ).fetchone()
        if existing is None:
            return await refreshed(conn, await _create(conn, compiled, raw, actor))
        return await refreshed(conn, await _new_version(conn, existing["id"], compiled, raw, actor))

    return await db.retry_lock_timeouts(conn, save, f"saving workflow {compiled.definition.name!r}")


async def update(
    conn: psycopg.AsyncConnection[Any], workflow_id: int, raw: Any, *, actor: str | None = None
) -> SaveResult:
    """Replace the definition of workflow ``workflow_id`` (a rename included)."""
    compiled = await compile_workflow(conn, raw)

    async def save() -> SaveResult:
        existing = await (
            await conn.execute(db.query("lock_workflow", "workflows.sql"), {"id": workflow_id})
        ).fetchone()
        if existing is None or existing["status"] == "archived":
            raise WorkflowNotFound(workflow_id)
        return await refreshed(conn, await _new_version(conn, workflow_id, compiled, raw, actor))

    return await db.retry_lock_timeouts(conn, save, f"saving workflow {workflow_id}")


async def create(
    conn: psycopg.AsyncConnection[Any], raw: Any, *, actor: str | None = None
) -> SaveResult:
    """Create a new workflow; its name must be free."""
    compiled = await compile_workflow(conn, raw)

    async def save() -> SaveResult:
        return await refreshed(conn, await _create(conn, compiled, raw, actor))

    return await db.retry_lock_timeouts(conn, save, f"saving workflow {compiled.definition.name!r}")


class NameTaken(ValueError):
    pass


async def refreshed(conn: psycopg.AsyncConnection[Any], result: T) -> T:
    """Regenerate the capture of the entities this save touched, in its transaction
    (crmflow.refresh_capture; docs/design.md, "Capture keeps what can match"). Inside
    the save's lock-timeout retries: it waits for writers still filtering with the old
    capture. The deferred triggers of migration 0018 would do it at commit otherwise."""
    await conn.execute("SELECT crmflow.refresh_capture()")
    return result


async def _create(
    conn: psycopg.AsyncConnection[Any],
    compiled: CompiledWorkflow,
    raw: dict[str, Any],
    actor: str | None = None,
) -> SaveResult:
    wf = compiled.definition
    row = await (
        await conn.execute(
            db.query("insert_workflow", "workflows.sql"),
            {
                "name": wf.name,
                "status": raw.get("status", "paused"),
            },
        )
    ).fetchone()
    if row is None:
        raise NameTaken(f"a workflow named {wf.name!r} already exists")
    await _insert_version(conn, row["id"], 1, compiled)
    await audit.record(
        conn,
        row["id"],
        1,
        WorkflowChange.CREATE,
        audit.diff(None, audit.state(compiled.stored, row["status"])),
        actor,
    )
    return SaveResult(row["id"], wf.name, 1, row["status"], created=True, new_version=True)


async def _new_version(
    conn: psycopg.AsyncConnection[Any],
    workflow_id: int,
    compiled: CompiledWorkflow,
    raw: dict[str, Any],
    actor: str | None = None,
) -> SaveResult:
    before = await audit.snapshot(conn, workflow_id)
    current = await (
        await conn.execute(db.query("current_version", "workflows.sql"), {"id": workflow_id})
    ).fetchone()
    assert current is not None
    version = current["version"]
    # The same definition compiled against a changed catalog (a type renamed, say) is a
    # new version too: re-applying is how a broken workflow is repaired.
    changed = (
        current["definition_hash"] != compiled.definition_hash
        or current["predicate"] != compiled.predicate
    )
    if changed:
        version += 1
        await _insert_version(conn, workflow_id, version, compiled)
    elif current["capture_filter"] != compiled.capture_filter:
        # Derived from the definition and the catalog, like the predicate, but no reason
        # for a new version (a version saved before capture filters existed, say).
        from psycopg.types.json import Jsonb

        await conn.execute(
            db.query("set_version_capture_filter", "workflows.sql"),
            {"id": current["id"], "capture_filter": Jsonb(compiled.capture_filter)},
        )
    try:
        row = await (
            await conn.execute(
                db.query("update_workflow_head", "workflows.sql"),
                {
                    "id": workflow_id,
                    "name": compiled.definition.name,
                    "version": version,
                    "status": raw.get("status"),
                },
            )
        ).fetchone()
    except psycopg.errors.UniqueViolation:
        raise NameTaken(f"a workflow named {compiled.definition.name!r} already exists") from None
    assert row is not None
    if before is not None and (changed or before["status"] != row["status"]):
        await audit.record(
            conn,
            workflow_id,
            version,
            WorkflowChange.UPDATE if changed else audit.STATUS_ACTIONS[row["status"]],
            audit.diff(
                audit.state(before["definition"], before["status"]),
                audit.state(compiled.stored, row["status"]),
            ),
            actor,
        )
    return SaveResult(
        workflow_id, row["name"], version, row["status"], created=False, new_version=changed
    )


async def _insert_version(
    conn: psycopg.AsyncConnection[Any], workflow_id: int, version: int, c: CompiledWorkflow
) -> None:
    from psycopg.types.json import Jsonb

    await conn.execute(
        db.query("insert_workflow_version", "workflows.sql"),
        {
            "workflow_id": workflow_id,
            "version": version,
            "definition": Jsonb(c.stored),
            "definition_hash": c.definition_hash,
            "trigger_type": c.definition.trigger_type,
            "entity_type": c.definition.entity_type,
            "priority": c.definition.priority,
            "limits": Jsonb(c.definition.limits.model_dump(exclude_none=True)),
            "predicate": c.predicate,
            "capture_filter": None if c.capture_filter is None else Jsonb(c.capture_filter),
        },
    )


async def set_status(
    conn: psycopg.AsyncConnection[Any],
    workflow_id: int,
    status: str,
    *,
    actor: str | None = None,
) -> dict[str, Any]:
    async def save() -> Any:
        before = await audit.snapshot(conn, workflow_id)
        row = await (
            await conn.execute(
                db.query("set_workflow_status", "workflows.sql"),
                {"id": workflow_id, "status": status},
            )
        ).fetchone()
        if row is not None and before is not None and before["status"] != row["status"]:
            await audit.record(
                conn,
                workflow_id,
                before["version"],
                audit.STATUS_ACTIONS[row["status"]],
                [{"path": "status", "before": before["status"], "after": row["status"]}],
                actor,
            )
        return await refreshed(conn, row)

    row: dict[str, Any] | None = await db.retry_lock_timeouts(
        conn, save, f"setting workflow {workflow_id} {status}"
    )
    if row is None:
        raise WorkflowNotFound(workflow_id)
    return row


async def list_workflows(
    conn: psycopg.AsyncConnection[Any], include_archived: bool = False
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = await (
        await conn.execute(
            db.query("list_workflows", "workflows.sql"), {"include_archived": include_archived}
        )
    ).fetchall()
    return rows


async def get_workflow(conn: psycopg.AsyncConnection[Any], workflow_id: int) -> dict[str, Any]:
    row: dict[str, Any] | None = await (
        await conn.execute(db.query("get_workflow", "workflows.sql"), {"id": workflow_id})
    ).fetchone()
    if row is None:
        raise WorkflowNotFound(workflow_id)
    return row


async def find_workflow(conn: psycopg.AsyncConnection[Any], ref: str) -> dict[str, Any]:
    """A workflow by id or by name (the CLI accepts either)."""
    if ref.isdigit():
        return await get_workflow(conn, int(ref))
    try:
        name = normalise_name(ref)
    except ValueError:
        raise WorkflowNotFound(ref) from None
    row: dict[str, Any] | None = await (
        await conn.execute(db.query("get_workflow_by_name", "workflows.sql"), {"name": name})
    ).fetchone()
    if row is None:
        raise WorkflowNotFound(ref)
    return row


async def list_versions(
    conn: psycopg.AsyncConnection[Any], workflow_id: int
) -> list[dict[str, Any]]:
    await get_workflow(conn, workflow_id)
    return await (
        await conn.execute(db.query("list_workflow_versions", "workflows.sql"), {"id": workflow_id})
    ).fetchall()
