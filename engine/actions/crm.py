"""Helpers shared by the actions that write to the example CRM's tables."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, LiteralString

import psycopg
from psycopg import sql

from engine import templates
from engine.model import Issue

if TYPE_CHECKING:
    from engine.catalog import EntitySchema
    from engine.executor.context import StepContext


def crm_table(ctx: StepContext, name: str) -> sql.Identifier:
    return sql.Identifier(ctx.settings.crm_schema, name)


def check_templates(values: dict[str, Any], path: str) -> list[Issue]:
    issues = []
    for key, value in values.items():
        try:
            templates.check_value(value)
        except templates.TemplateProblem as exc:
            issues.append(Issue(f"{path}.{key}", str(exc)))
    return issues


def check_owner_field(entity: EntitySchema | None, field: str, path: str, what: str) -> list[Issue]:
    if entity is None:
        return [Issue(path, f"{what} 'owner' needs a trigger with an entity_type")]
    if field not in entity.columns:
        return [
            Issue(
                path,
                f"{what} 'owner' reads {entity.entity_type}.{field}, which does not "
                "exist; give a user id or set owner_field",
            )
        ]
    return []


def check_who(who: Any, path: str, what: str) -> list[Issue]:
    """``who`` names users: "owner", a user id, a list of ids, or "role:<role>"."""
    if who is None or isinstance(who, int | list) or who == "owner":
        return []
    if isinstance(who, str) and (who.isdigit() or (who.startswith("role:") and len(who) > 5)):
        return []
    return [Issue(path, f"{what} is 'owner', a user id, a list of ids or 'role:<role>'")]


async def fetch_all(
    ctx: StepContext, query: sql.SQL | sql.Composed | LiteralString, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """A read on the step's transaction when there is one, else on a pooled connection."""
    rows: list[dict[str, Any]]
    if ctx.conn is not None:
        rows = await (await ctx.conn.execute(query, params)).fetchall()
        return rows
    async with ctx.runner.pool.connection() as conn:
        rows = await (await conn.execute(query, params)).fetchall()
        return rows


async def resolve_users(
    ctx: StepContext, who: int | str | list[int] | None, owner_field: str = "owner_id"
) -> list[dict[str, Any]]:
    """Users named by ``who``: a user id, a list of ids, "owner" (the entity's owner),
    or "role:<role>" (every active user with that role)."""
    users = crm_table(ctx, "users")
    if who is None:
        return []
    if who == "owner":
        owner = (ctx.row or {}).get(owner_field)
        if owner is None:
            return []
        ids = [owner]
    elif isinstance(who, str) and who.startswith("role:"):
        query = sql.SQL(
            "SELECT id, name, email FROM {} WHERE role = %(role)s AND active ORDER BY id"
        ).format(users)
        return await fetch_all(ctx, query, {"role": who[5:]})
    elif isinstance(who, list):
        ids = who
    else:
        ids = [who]
    query = sql.SQL("SELECT id, name, email FROM {} WHERE id = ANY(%(ids)s) ORDER BY id").format(
        users
    )
    try:
        return await fetch_all(ctx, query, {"ids": [int(i) for i in ids]})
    except (ValueError, psycopg.DataError):
        return []
