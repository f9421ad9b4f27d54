"""``/entities``: the watched tables with their fields, for building editors."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path

from api.deps import Conn, by_method
from api.problems import ApiError, problem_responses
from api.schemas import Entity
from engine import catalog
from engine.catalog import EntitySchema, FieldSpec
from engine.conditions import ALLOWED_BY_KIND

router = APIRouter(
    prefix="/entities",
    tags=["entities"],
    dependencies=[Depends(by_method)],
    responses=problem_responses(401, 403, 422, 503),
)


def _field(spec: FieldSpec) -> dict[str, Any]:
    labels = spec.enum_labels or spec.elem_enum_labels
    return {
        "name": spec.name,
        "type": spec.display_type,
        "kind": spec.kind,
        "nullable": spec.nullable,
        "operators": sorted(ALLOWED_BY_KIND.get(spec.kind, ())),
        "enum_values": list(labels) if labels else None,
        "expression": spec.derived_source,
    }


def _entity(entity: EntitySchema) -> dict[str, Any]:
    return {
        "entity_type": entity.entity_type,
        "table_schema": entity.table_schema,
        "table_name": entity.table_name,
        "pk_columns": entity.pk_columns,
        "fields": [_field(f) for f in entity.columns.values()],
        "derived_fields": [_field(f) for f in entity.derived.values()],
    }


@router.get("", response_model=list[Entity], summary="Watched entities and their fields")
async def list_entities(conn: Conn) -> Any:
    entities = await catalog.load_entities(conn)
    return [_entity(e) for e in entities.values()]


@router.get(
    "/{entity_type}",
    response_model=Entity,
    summary="One watched entity",
    responses=problem_responses(404),
)
async def get_entity(
    conn: Conn, entity_type: Annotated[str, Path(pattern=r"^[a-z_][a-z0-9_]{0,39}$")]
) -> Any:
    entity = await catalog.load_entity(conn, entity_type)
    if entity is None:
        raise ApiError(404, f"{entity_type!r} is not a watched entity")
    return _entity(entity)
