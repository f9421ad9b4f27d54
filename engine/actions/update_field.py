"""update_field: set a column of the entity (database action; compensation restores it)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field

from engine import templates
from engine.actions.base import Action, Params
from engine.conditions import ValueCheck, value_text
from engine.executor.context import StepContext
from engine.model import Issue


class UpdateFieldParams(Params):
    field: str = Field(min_length=1)
    value: Any = None  # JSON value, or a template string; null clears the field


class UpdateField(Action):
    name = "update_field"
    Params = UpdateFieldParams
    inline = True
    compensable = True
    needs_entity = True
    description = "Set one column of the entity; values are type-checked when saved."

    def check_entity(self, params: Any, entity: Any, path: str) -> list[Issue]:
        if params.field not in entity.columns:
            return [Issue(f"{path}.field", f"{entity.entity_type} has no column {params.field!r}")]
        if params.field in entity.pk_columns:
            return [
                Issue(f"{path}.field", "the primary key identifies the entity; it cannot be set")
            ]
        if params.value is None and not entity.columns[params.field].nullable:
            return [Issue(f"{path}.value", f"{params.field} is NOT NULL")]
        if isinstance(params.value, str):
            try:
                templates.check(params.value)
            except templates.TemplateProblem as exc:
                return [Issue(f"{path}.value", str(exc))]
        return []

    def value_checks(self, params: Any, entity: Any, path: str) -> list[ValueCheck]:
        spec = entity.columns[params.field]
        value = params.value
        if value is None or spec.kind == "array":
            return []
        if isinstance(value, str) and templates.is_template(value):
            return []
        text = json.dumps(value) if spec.kind == "json" else value_text(value)
        return [ValueCheck(f"{path}.value", text, spec.type_sql)]

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        value = params.value
        if isinstance(value, str):
            value = ctx.render(value)
        old = await ctx.update_entity({params.field: value})
        return {"field": params.field, "old": old[params.field], "new": value}

    async def compensate(self, ctx: StepContext, params: Any, result: dict[str, Any]) -> None:
        await ctx.update_entity({result["field"]: result["old"]})


ACTION = UpdateField()
