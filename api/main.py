"""The management API: ``create_app()`` (served by ``crmflow api``).

One psycopg pool, opened in the lifespan and shared with the engine code the routes
call (workflows, executions, the runner's retry/cancel); routers under ``api.routes``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from api import deps, docs, problems
from api.live import ExecutionFeed
from api.middleware import BodySizeLimit
from api.routes import ROUTERS, ui, ui_risk
from engine import db
from engine.config import Settings, get_settings
from engine.embedded import resolve_database_url
from engine.executor.runner import Runner

DESCRIPTION = """\
Manage crmflow workflows, their executions, custom events and API keys.

Send an API key as `Authorization: Bearer <key>` (`crmflow apikey create --name N
--scope read|write|admin`). Reads need a `read` key, changes a `write` key, API key
management an `admin` key. Errors are `application/problem+json`:
`{"type", "title", "status", "detail", "errors": [{"path", "message"}]}`.
"""


def create_app(settings: Settings | None = None, *, pool: db.Pool | None = None) -> FastAPI:
    """The FastAPI app. ``pool``: an open pool to use (and leave open) instead of the
    app's own, for a process that already has one."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = pool is None
        if pool is None:
            url = await asyncio.to_thread(resolve_database_url, settings)
            app.state.pool = db.create_pool(url, settings)
            # Not waiting: the API starts while the database is away, and says so (503).
            await app.state.pool.open(wait=False)
        else:
            app.state.pool = pool
        app.state.runner = Runner(app.state.pool, settings)
        app.state.execution_feed = ExecutionFeed(app.state.pool.conninfo)
        try:
            yield
        finally:
            await app.state.execution_feed.close()
            if own:
                await app.state.pool.close()

    app = FastAPI(
        title="crmflow",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(deps.known_query_only)],
        # FastAPI's own /docs and /redoc load Swagger UI and ReDoc from a CDN: api.docs
        # serves /docs from the package instead (or not at all: CRMFLOW_API_DOCS=false).
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    if settings.api_docs:
        docs.install(app)
    problems.install(app)
    for router in ROUTERS:
        app.include_router(router)
    ui.install(app)
    app.include_router(ui_risk.router)  # /ui/risk
    # Added last = outermost: CORS headers go on every answer, the 413 included.
    app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Crmflow-Signature"],
            max_age=600,
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = problems.openapi_problems(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


class ApiServer(uvicorn.Server):
    """uvicorn's server, which first ends the dashboard's live streams when it stops:
    uvicorn waits for open responses before the app's shutdown, and a server-sent
    event stream stays open as long as its page does."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        feed = getattr(getattr(app, "state", None), "execution_feed", None)
        if isinstance(feed, ExecutionFeed):
            await feed.close()
        await super().shutdown(sockets)


def serve(app: FastAPI, host: str, port: int, **options: Any) -> ApiServer:
    """A server for ``app`` (``.run()`` it, or ``await .serve()``); a stop waits at most
    10 s for requests still running."""
    options.setdefault("timeout_graceful_shutdown", 10)
    return ApiServer(uvicorn.Config(app, host=host, port=port, **options))
