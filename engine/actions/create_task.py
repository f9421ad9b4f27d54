"""create_task: a task in the CRM's ``tasks`` table, about the entity (database action)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from psycopg import sql
from pydantic import Field

from engine.actions.base import Action, Params
from engine.actions.crm import (
    check_owner_field,
    check_templates,
    check_who,
    crm_table,
    resolve_users,
)
from engine.model import Duration, Issue
from engine.runtime import StepContext, now


class CreateTaskParams(Params):
    title: str = Field(min_length=1, max_length=500)
    description: str | None = Field(None, max_length=10_000)
    priority: Literal["low", "normal", "medium", "high", "urgent"] = "normal"
    due: Duration | None = None  # due this long after the step runs ("2d")
    assignee: int | str | None = "owner"  # "owner", a user id, "role:<role>" (first one), None
    owner_field: str = "owner_id"


class CreateTask(Action):
    name = "create_task"
    Params = CreateTaskParams
    compensable = True
    description = "Create a task in the CRM, assigned to the entity's owner by default."

    def check_entity(self, params: Any, entity: Any, path: str) -> list[Issue]:
        issues = check_templates({"title": params.title, "description": params.description}, path)
        issues += check_who(params.assignee, f"{path}.assignee", "assignee")
        if params.assignee == "owner" and entity is not None:
            issues += check_owner_field(entity, params.owner_field, f"{path}.assignee", "assignee")
        return issues

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
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

    async def compensate(self, ctx: StepContext, params: Any, result: dict[str, Any]) -> None:
        await ctx.require_conn().execute(
            sql.SQL("DELETE FROM {} WHERE id = %(id)s").format(crm_table(ctx, "tasks")),
            {"id": result["task_id"]},
        )


ACTION = CreateTask()
