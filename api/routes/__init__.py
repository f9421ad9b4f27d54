"""One router per resource. A new resource is a module here and a line in ``ROUTERS``."""

from __future__ import annotations

from fastapi import APIRouter

from api.routes import (
    apikeys,
    enrollments,
    entities,
    events,
    executions,
    health,
    metrics,
    workflow_admin,
    workflows,
)
from api.routes import scorecards as scorecards_routes
from api.routes import suppressions as suppressions_routes

ROUTERS: list[APIRouter] = [
    workflows.router,
    workflow_admin.router,
    enrollments.router,
    executions.router,
    events.router,
    entities.router,
    apikeys.router,
    health.router,
    metrics.router,
    scorecards_routes.router,
    suppressions_routes.router,
]
