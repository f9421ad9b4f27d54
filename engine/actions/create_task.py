"""create_task: a task in the CRM's ``tasks`` table, about the entity (database action)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from psycopg import sql
from pydantic import Field

from engine.actions import dedupe
from engine.actions.base import Action, Params, Skip
from engine.actions.crm import (
    check_owner_field,
    check_templates,
    check_who,
    crm_table,
    resolve_users,
)
from engine.executor.context import StepContext, now
from engine.model import Duration, Issue


class CreateTaskParams(Params):
    title: str = Field(min_length=1, max_length=500)
    description: str | None = Field(None, max_length=10_000)
    priority: Literal["low", "normal", "medium", "high", "urgent"] = "normal"
    due: Duration | None = None  # due this long after the step runs ("2d")
    assignee: int | str | None = "owner"  # "owner", a user id, "role:<role>" (first one), None
    owner_field: str = "owner_id"
    # A template ("{{ entity.account_id }}:churn"): while a task made under the same key
    # is open (not completed), it is updated instead of another being added.
    dedupe_key: str | None = Field(None, min_length=1, max_length=500)


class CreateTask(Action):
    name = "create_task"
    Params = CreateTaskParams
    inline = True
    compensable = True
    description = "Create a task in the CRM, assigned to the entity's owner by default."

    def check_entity(self, params: Any, entity: Any, path: str) -> list[Issue]:
        issues = check_templates(
            {
                "title": params.title,
                "description": params.description,
                "dedupe_key": params.dedupe_key,
            },
            path,
        )
        issues += check_who(params.assignee, f"{path}.assignee", "assignee")
        if params.assignee == "owner" and entity is not None:
            issues += check_owner_field(entity, params.owner_field, f"{path}.assignee", "assignee")
        return issues

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        if params.dedupe_key is not None:
            key = dedupe.render_key(ctx, params.dedupe_key)
            await dedupe.lock_keys([ctx], KIND, [key])
            return await self._deduped(ctx, params, key)
        return await self._insert(ctx, params)

    async def _deduped(self, ctx: StepContext, params: Any, key: str) -> dict[str, Any]:
        """The key's open task updated (title, description, priority, due date), else a
        new task remembered under the key. The key's row is locked already."""
        table = crm_table(ctx, "tasks")
        open_ids = await dedupe.open_items(ctx, KIND, key, table, "completed_at")
        if not open_ids:
            result = await self._insert(ctx, params)
            await dedupe.remember(ctx, KIND, key, [result["task_id"]], updated=False)
            return {**result, "dedupe_key": key, "deduped": False}
        due_at = now() + timedelta(seconds=params.due) if params.due is not None else None
        row = await (
            await ctx.require_conn().execute(
                sql.SQL(
                    "WITH before AS (SELECT id, title, description, priority, due_at FROM {t}"
                    " WHERE id = %(id)s)"
                    " UPDATE {t} AS t SET title = %(title)s,"
                    " description = coalesce(%(description)s, t.description),"
                    " priority = %(priority)s, due_at = coalesce(%(due_at)s, t.due_at)"
                    " FROM before AS b WHERE t.id = b.id"
                    " RETURNING t.id, t.assignee_id, b.title, b.description, b.priority,"
                    " b.due_at"
                ).format(t=table),
                {
                    "id": open_ids[0],
                    "title": ctx.render(params.title),
                    "description": ctx.render(params.description),
                    "priority": params.priority,
                    "due_at": due_at,
                },
            )
        ).fetchone()
        assert row is not None
        await dedupe.remember(ctx, KIND, key, open_ids, updated=True)
        return {
            "task_id": row["id"],
            "assignee_id": row["assignee_id"],
            "dedupe_key": key,
            "deduped": True,
            # What compensation puts back (an update is undone, not the task deleted).
            "previous": {
                "title": row["title"],
                "description": row["description"],
                "priority": row["priority"],
                "due_at": row["due_at"].isoformat() if row["due_at"] else None,
            },
        }

    async def _insert(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        assignees = await resolve_users(ctx, params.assignee, params.owner_field)
        assignee_id = assignees[0]["id"] if assignees else None
        due_at = now() + timedelta(seconds=params.due) if params.due is not None else None
        query = sql.SQL(
            "INSERT INTO {} (title, description, priority, entity_type, entity_id, assignee_id,"
            " due_at) VALUES (%(title)s, %(description)s, %(priority)s, %(entity_type)s,"
            " %(entity_id)s, %(assignee_id)s, %(due_at)s) RETURNING id"
        ).format(crm_table(ctx, "tasks"))
        row = await (
            await ctx.require_conn().execute(
                query,
                {
                    "title": ctx.render(params.title),
                    "description": ctx.render(params.description),
                    "priority": params.priority,
                    "entity_type": ctx.execution.get("entity_type"),
                    "entity_id": None if ctx.entity_id is None else str(ctx.entity_id),
                    "assignee_id": assignee_id,
                    "due_at": due_at,
                },
            )
        ).fetchone()
        assert row is not None
        return {"task_id": row["id"], "assignee_id": assignee_id}

    async def run_batch(
        self, contexts: list[StepContext], params: Any
    ) -> list[dict[str, Any] | Skip]:
        """One INSERT for the whole batch (titles rendered per entity in Python)."""
        if not contexts:
            return []
        if params.dedupe_key is not None:
            # Every key of the batch locked first, in key order (no deadlock with a
            # concurrent batch), then each step updates or inserts in turn: two steps of
            # the batch with one key make one task.
            keys = [dedupe.render_key(c, params.dedupe_key) for c in contexts]
            await dedupe.lock_keys(contexts, KIND, keys)
            return [await self._deduped(c, params, k) for c, k in zip(contexts, keys, strict=True)]
        if params.assignee == "owner":
            assignees = [(c.row or {}).get(params.owner_field) for c in contexts]
        else:
            found = await resolve_users(contexts[0], params.assignee, params.owner_field)
            assignees = [found[0]["id"] if found else None] * len(contexts)
        due_at = now() + timedelta(seconds=params.due) if params.due is not None else None
        query = sql.SQL(
            "INSERT INTO {} (title, description, priority, entity_type, entity_id, assignee_id,"
            " due_at) SELECT t, d, %(priority)s, et, ei, a, %(due_at)s"
            " FROM unnest(%(titles)s::text[], %(descriptions)s::text[], %(types)s::text[],"
            " %(ids)s::text[], %(assignees)s::bigint[]) WITH ORDINALITY AS u(t, d, et, ei, a, n)"
            " ORDER BY n RETURNING id"
        ).format(crm_table(contexts[0], "tasks"))
        rows = await (
            await contexts[0]
            .require_conn()
            .execute(
                query,
                {
                    "priority": params.priority,
                    "due_at": due_at,
                    "titles": [c.render(params.title) for c in contexts],
                    "descriptions": [c.render(params.description) for c in contexts],
                    "types": [c.execution.get("entity_type") for c in contexts],
                    "ids": [None if c.entity_id is None else str(c.entity_id) for c in contexts],
                    "assignees": assignees,
                },
            )
        ).fetchall()
        # INSERT ... SELECT ... ORDER BY inserts, and returns, rows in that order.
        return [
            {"task_id": r["id"], "assignee_id": a} for r, a in zip(rows, assignees, strict=True)
        ]

    async def compensate(self, ctx: StepContext, params: Any, result: dict[str, Any]) -> None:
        previous = result.get("previous")
        if result.get("deduped") and isinstance(previous, dict):
            await ctx.require_conn().execute(
                sql.SQL(
                    "UPDATE {} SET title = %(title)s, description = %(description)s,"
                    " priority = %(priority)s, due_at = %(due_at)s::timestamptz WHERE id = %(id)s"
                ).format(crm_table(ctx, "tasks")),
                {**previous, "id": result["task_id"]},
            )
            return
        await ctx.require_conn().execute(
            sql.SQL("DELETE FROM {} WHERE id = %(id)s").format(crm_table(ctx, "tasks")),
            {"id": result["task_id"]},
        )


KIND = "task"

ACTION = CreateTask()
