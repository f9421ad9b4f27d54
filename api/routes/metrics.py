"""``GET /metrics``: Prometheus text format (a read key; scrapers send it as a bearer
token). The database-wide figures of engine/metrics.py."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import PoolDep, require
from api.problems import problem_responses
from engine import db, metrics

router = APIRouter(tags=["metrics"], dependencies=[Depends(require("read"))])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            "description": "metrics in the Prometheus text format",
        },
        **problem_responses(401, 403),
    },
)
async def prometheus_metrics(pool: PoolDep) -> Response:
    body = await asyncio.to_thread(metrics.render, db.pool_conninfo(pool))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
