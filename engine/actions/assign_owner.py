"""assign_owner: set the entity's owner by round robin over active users, or by rules.

Round robin keeps, per workflow and pool of users, the last user picked
(crmflow.assignment_cursors); the row lock on that cursor makes concurrent
assignments take turns, and it commits with the assignment (database action).
"""

from __future__ import annotations

from typing import Any, Literal

from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field

from engine.actions.base import Action, Params, PermanentError, Skip
from engine.actions.crm import crm_table
from engine.conditions import Compiler, ConditionError, ValueCheck, parse_conditions
from engine.executor.context import StepContext
from engine.model import Issue


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    when: Any
    user_id: int


class AssignOwnerParams(Params):
    strategy: Literal["round_robin", "rule"] = "round_robin"
    role: str | None = None  # pool: active users with this role (None: all active users)
    field: str = "owner_id"
    rules: list[Rule] = Field(default_factory=list)
    fallback: Literal["round_robin", "none"] = "round_robin"  # when no rule matches
    only_if_unassigned: bool = False


class AssignOwner(Action):
    name = "assign_owner"
    Params = AssignOwnerParams
    inline = True
    compensable = True
    needs_entity = True
    description = "Assign an owner: round robin among active users of a role, or rules."

    def check_entity(self, params: Any, entity: Any, path: str) -> list[Issue]:
        issues = []
        if params.field not in entity.columns:
            issues.append(
                Issue(f"{path}.field", f"{entity.entity_type} has no column {params.field!r}")
            )
        if params.strategy == "rule" and not params.rules:
            issues.append(Issue(f"{path}.rules", "the rule strategy needs at least one rule"))
        for i, rule in enumerate(params.rules):
            try:
                tree = parse_conditions(rule.when, f"{path}.rules[{i}].when")
            except ConditionError as exc:
                issues += [Issue(p, m) for p, m in exc.issues]
                continue
            compiler = Compiler(entity, allow_transitions=False)
            compiler.compile(tree)
            issues += [Issue(p, m) for p, m in compiler.issues]
        return issues

    def value_checks(self, params: Any, entity: Any, path: str) -> list[ValueCheck]:
        """The rules' values, checked against their columns' types when the workflow is saved
        (otherwise a bad value would only fail, and fail every time, when the step runs)."""
        compiler = Compiler(entity, allow_transitions=False)
        for i, rule in enumerate(params.rules):
            compiler.compile(parse_conditions(rule.when, f"{path}.rules[{i}].when"))
        return compiler.checks

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        row = await ctx.lock_entity_row() or {}
        if params.only_if_unassigned and row.get(params.field) is not None:
            raise Skip(f"already assigned to {row[params.field]}")
        user_id = None
        how = None
        if params.strategy == "rule":
            for i, rule in enumerate(params.rules):
                if await ctx.matches(rule.when):
                    user_id, how = rule.user_id, f"rule {i}"
                    break
        if user_id is None and (
            params.strategy == "round_robin" or params.fallback == "round_robin"
        ):
            user_id, how = await self._next_in_turn(ctx, params.role), "round robin"
        if user_id is None:
            raise PermanentError(
                "no rule matched"
                if params.fallback == "none"
                else f"no active user to assign (role {params.role!r})"
            )
        old = await ctx.update_entity({params.field: user_id})
        return {"field": params.field, "user_id": user_id, "old": old[params.field], "by": how}

    async def _next_in_turn(self, ctx: StepContext, role: str | None) -> int | None:
        conn = ctx.require_conn()
        pool = f"role:{role}" if role else "all"
        await conn.execute(
            "INSERT INTO crmflow.assignment_cursors (workflow_id, pool) VALUES (%s, %s) "
            "ON CONFLICT DO NOTHING",
            [ctx.workflow_id, pool],
        )
        cursor = await (
            await conn.execute(
                "SELECT last_user FROM crmflow.assignment_cursors "
                "WHERE workflow_id = %s AND pool = %s FOR UPDATE",
                [ctx.workflow_id, pool],
            )
        ).fetchone()
        users = crm_table(ctx, "users")
        # The next id after the last one picked, wrapping around to the smallest.
        query = sql.SQL(
            "SELECT id FROM {users} WHERE active AND (%(role)s::text IS NULL OR role = %(role)s)"
            " ORDER BY (id <= coalesce(%(last)s::bigint, -1)), id LIMIT 1"
        ).format(users=users)
        last = cursor["last_user"] if cursor else None
        picked = await (await conn.execute(query, {"role": role, "last": last})).fetchone()
        if picked is None:
            return None
        await conn.execute(
            "UPDATE crmflow.assignment_cursors SET last_user = %s"
            " WHERE workflow_id = %s AND pool = %s",
            [str(picked["id"]), ctx.workflow_id, pool],
        )
        return int(picked["id"])

    async def compensate(self, ctx: StepContext, params: Any, result: dict[str, Any]) -> None:
        await ctx.update_entity({result["field"]: result["old"]})


ACTION = AssignOwner()
