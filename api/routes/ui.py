"""The dashboard at ``/ui``: server-rendered pages (Jinja2, ``api/ui/templates``), one CSS
and one JS file (``api/ui/static``), no external resources.

Login: the form posts an API key; a valid one opens a server-side session
(``crmflow.ui_sessions``: a random token stored as its SHA-256, linked to the key,
expiring after ``CRMFLOW_UI_SESSION_TTL``) and the HttpOnly, SameSite=Strict cookie
(path ``/ui``) holds the token, never the key: the cookie is no bearer key for the API.
The session is checked on every request and every few seconds by an open live stream,
so logging out (the row is deleted) or revoking the key logs the browser out and
closes its stream. ``read`` keys can look; pausing, activating and replaying need
``write``.
POSTs must come from the dashboard's own origin (the Origin header, else Referer):
with the SameSite cookie, that is the CSRF defence.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.parse
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from psycopg_pool import PoolTimeout

from api.deps import CONNECTION_TIMEOUT, Conn, PoolDep, RunnerDep, SettingsDep
from api.live import ExecutionFeed
from api.routes.params import Id, ObjectId
from api.ui.chart import build_charts
from engine import apikeys, audit, db, executions, lifecycle, workflows
from engine.breakers import list_breakers

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
COOKIE = "crmflow_ui"
COOKIE_PATH = "/ui"
# How many days the latency chart spans, and how many rows the lists show.
CHART_DAYS = 14
RECENT = 25
FAILURES = 100
# The page JS keeps at most this many rows in the live list.
LIVE_ROWS = 100
# A comment line this often keeps proxies from closing a quiet stream.
KEEPALIVE_SECONDS = 15.0
# An open stream checks its session again this often (on the feed's next snapshot, which
# comes at least every 2 s): a logged-out or revoked session's stream closes within seconds.
SESSION_CHECK_SECONDS = 2.0

templates = Jinja2Templates(directory=UI_DIR / "templates")
router = APIRouter(prefix="/ui", include_in_schema=False)


class LoginRequired(Exception):
    """No valid key in the cookie: the handler redirects to the login form."""

    def __init__(self, next_path: str, clear_cookie: bool) -> None:
        self.next_path = next_path
        self.clear_cookie = clear_cookie


def install(app: FastAPI) -> None:
    """The router, the static files and the login redirect, on ``app``."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=UI_DIR / "static"), name="ui-static")
    app.add_exception_handler(LoginRequired, _to_login)  # type: ignore[arg-type]


async def _to_login(request: Request, exc: LoginRequired) -> Response:
    if request.method != "GET":  # a fetch from the page: it reloads, then lands on the form
        response: Response = JSONResponse({"detail": "log in again"}, status_code=401)
    else:
        query = urllib.parse.urlencode({"next": exc.next_path})
        response = RedirectResponse(f"/ui/login?{query}", status_code=303)
    if exc.clear_cookie:
        response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response


async def _cookie_key(
    request: Request, conn: psycopg.AsyncConnection[Any], *, touch: bool = True
) -> dict[str, Any]:
    presented = request.cookies.get(COOKIE)
    key = await apikeys.session_key(conn, presented, touch=touch) if presented else None
    if key is None:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(path, clear_cookie=presented is not None)
    return key


async def ui_key(request: Request, conn: Conn) -> dict[str, Any]:
    """The logged-in browser's API key (its session, from the cookie), checked now."""
    return await _cookie_key(request, conn)


UiKey = Annotated[dict[str, Any], Depends(ui_key)]


def same_origin(request: Request) -> bool:
    """Whether a POST comes from a page of this server (host and port as the browser
    addressed it)."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return False
    return urllib.parse.urlsplit(source).netloc == request.headers.get("host")


def _refuse(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _check_post(request: Request, key: dict[str, Any]) -> JSONResponse | None:
    """The refusal of a change, if any: foreign origin, or a key without write scope."""
    if not same_origin(request):
        return _refuse(403, "refused: the request does not come from this dashboard")
    if not apikeys.allows(key["scope"], "write"):
        return _refuse(403, f"this needs a write key; you are logged in with a {key['scope']} key")
    return None


def _page(request: Request, name: str, key: dict[str, Any] | None, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(
        request,
        name,
        {"key": key, "can_write": bool(key and apikeys.allows(key["scope"], "write")), **context},
        headers={"Cache-Control": "no-store"},
    )


# ───────────────────────────── login ─────────────────────────────


def _safe_next(next_path: str | None) -> str:
    """Only a path of the dashboard: never an open redirect to another site."""
    if next_path and next_path.startswith("/ui") and not next_path.startswith("//"):
        return next_path
    return "/ui"


@router.get("/login")
async def login_form(
    request: Request, next: Annotated[str | None, Query(max_length=500)] = None
) -> HTMLResponse:
    return _page(request, "login.html", None, next=_safe_next(next), error=None)


@router.post("/login")
async def login(request: Request, conn: Conn, settings: SettingsDep) -> Response:
    form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
    presented = (form.get("key") or [""])[0].strip()
    next_path = _safe_next((form.get("next") or [""])[0])
    if not same_origin(request):
        return _refuse(403, "refused: the login form was not posted from this dashboard")
    key = await apikeys.verify(conn, presented) if presented else None
    if key is None:
        refused = _page(request, "login.html", None, next=next_path, error="That key is not valid.")
        refused.status_code = 401
        return refused
    token = await apikeys.create_session(conn, key["id"], settings.ui_session_ttl)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        max_age=int(settings.ui_session_ttl),
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout(request: Request, conn: Conn) -> Response:
    if not same_origin(request):
        return _refuse(403, "refused: the request does not come from this dashboard")
    presented = request.cookies.get(COOKIE)
    if presented:
        await apikeys.end_session(conn, presented)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response


# ───────────────────────────── pages ─────────────────────────────


async def _rows(conn: psycopg.AsyncConnection[Any], name: str, **params: Any) -> list[Any]:
    return await (await conn.execute(db.query(name, "ui.sql"), params)).fetchall()


async def _charts(conn: psycopg.AsyncConnection[Any]) -> list[Any]:
    rows = await _rows(conn, "ui_latency", days=CHART_DAYS)
    return build_charts(rows, CHART_DAYS, datetime.now(UTC).date())


def _floor(items: list[dict[str, Any]]) -> int:
    """The oldest id the page shows: the live stream updates rows from there on."""
    return min((item["id"] for item in items), default=0)


@router.get("")
async def overview(request: Request, conn: Conn, key: UiKey) -> HTMLResponse:
    recent = await executions.list_executions(conn, limit=RECENT)
    return _page(
        request,
        "overview.html",
        key,
        breakers=await list_breakers(conn),
        workflows=await _rows(conn, "ui_workflows"),
        sla=await _rows(conn, "ui_sla"),
        charts=await _charts(conn),
        executions=recent,
        floor=_floor(recent),
        chart_days=CHART_DAYS,
    )


@router.get("/workflows")
async def workflows_page(request: Request, conn: Conn, key: UiKey) -> HTMLResponse:
    return _page(
        request,
        "workflows.html",
        key,
        workflows=await _rows(conn, "ui_workflows"),
        splits=await _rows(conn, "ui_splits"),  # split steps' paths (crmflow.split_report)
    )


@router.get("/workflows/{workflow_id}/enrollments")
async def enrollments_page(
    request: Request,
    conn: Conn,
    key: UiKey,
    workflow_id: ObjectId,
    state: lifecycle.EnrollmentState | None = None,
    before_id: Annotated[Id | None, Query()] = None,
) -> HTMLResponse:
    """A workflow's page: its enrollments, filtered by state, with its goal conversions,
    and its change history (engine/audit.py)."""
    workflow = await workflows.get_workflow(conn, workflow_id)
    page = await lifecycle.list_enrollments(
        conn, workflow_id, state=state, before_id=before_id, limit=LIVE_ROWS
    )
    [goals] = await _rows(conn, "ui_goal_conversions", workflow_id=workflow_id)
    history = await audit.history(conn, workflow_id)  # who changed it, when, what
    # its split steps' paths (crmflow.split_report)
    splits = await _rows(conn, "ui_workflow_splits", workflow_id=workflow_id)
    return _page(
        request,
        "enrollments.html",
        key,
        workflow=workflow,
        page=page,
        state=state,
        goals=goals,
        history=history,
        splits=splits,
    )


@router.get("/executions")
async def executions_page(request: Request, conn: Conn, key: UiKey) -> HTMLResponse:
    recent = await executions.list_executions(conn, limit=LIVE_ROWS)
    return _page(request, "executions.html", key, executions=recent, floor=_floor(recent))


@router.get("/executions/stream")
async def execution_stream(
    request: Request,
    pool: PoolDep,
    floor: Annotated[int, Query(ge=0, description="the oldest execution id shown")] = 0,
) -> Response:
    """Server-sent events: one ``execution`` event (the row as JSON) per new or changed
    execution with an id of at least ``floor``, the newest last; a ``logout`` event, and
    the end of the stream, once the session is gone (logged out, expired, key revoked)."""
    # The session is checked on a connection given back at once: a stream lasts as long
    # as the page is open, and must not hold one of the pool's connections meanwhile.
    async with pool.connection(timeout=CONNECTION_TIMEOUT) as conn:
        await _cookie_key(request, conn)
    feed: ExecutionFeed = request.app.state.execution_feed

    async def session_alive() -> bool:
        try:
            async with pool.connection(timeout=CONNECTION_TIMEOUT) as conn:
                await _cookie_key(request, conn, touch=False)
        except (LoginRequired, psycopg.Error, PoolTimeout):
            return False  # gone, or cannot be told: the page reconnects and finds out
        return True

    async def events() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"  # EventSource reconnects after 2 s if the stream breaks
        sent: dict[int, str] = {}
        quiet_since = datetime.now(UTC)
        checked = time.monotonic()
        async with contextlib.aclosing(feed.follow()) as snapshots:
            async for snapshot in snapshots:
                if time.monotonic() - checked >= SESSION_CHECK_SECONDS:
                    if not await session_alive():
                        yield "event: logout\ndata: {}\n\n"
                        return
                    checked = time.monotonic()
                out = []
                for row in reversed(snapshot):  # oldest first: the page prepends
                    if row["id"] < floor:
                        continue
                    data = json.dumps(row, default=_json_default)
                    if sent.get(row["id"]) != data:
                        sent[row["id"]] = data
                        out.append(f"event: execution\nid: {row['id']}\ndata: {data}\n\n")
                now = datetime.now(UTC)
                if out:
                    quiet_since = now
                    yield "".join(out)
                elif (now - quiet_since).total_seconds() >= KEEPALIVE_SECONDS:
                    quiet_since = now
                    yield ": keep-alive\n\n"
                # Forget rows that left the snapshot window: the memory stays bounded.
                if len(sent) > 4 * len(snapshot) + 100:
                    window = {row["id"] for row in snapshot}
                    sent = {k: v for k, v in sent.items() if k in window}

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.get("/executions/{execution_id}")
async def execution_page(
    request: Request, conn: Conn, key: UiKey, execution_id: ObjectId
) -> HTMLResponse:
    detail = await executions.get_execution(conn, execution_id)
    for step in detail["steps"]:
        start, end = step["started_at"], step["finished_at"]
        step["duration_s"] = (end - start).total_seconds() if start and end else None
    return _page(request, "execution.html", key, execution=detail)


@router.get("/failures")
async def failures_page(request: Request, conn: Conn, key: UiKey) -> HTMLResponse:
    rows = await _rows(conn, "ui_failures", limit=FAILURES)
    for row in rows:
        row["entity_id"] = executions.entity_id(row["entity_pk"])
    return _page(request, "failures.html", key, failures=rows)


@router.get("/sla")
async def sla_page(request: Request, conn: Conn, key: UiKey) -> HTMLResponse:
    return _page(request, "sla.html", key, sla=await _rows(conn, "ui_sla"))


@router.get("/latency")
async def latency_page(request: Request, conn: Conn, key: UiKey) -> HTMLResponse:
    return _page(request, "latency.html", key, charts=await _charts(conn), chart_days=CHART_DAYS)


# ───────────────────────────── changes ─────────────────────────────


async def _set_status(
    request: Request, conn: psycopg.AsyncConnection[Any], key: dict[str, Any], wf_id: int, to: str
) -> JSONResponse:
    refusal = _check_post(request, key)
    if refusal is not None:
        return refusal
    wf = await workflows.get_workflow(conn, wf_id)
    if wf["status"] == "archived":
        return _refuse(409, f"workflow {wf_id} is archived")
    await workflows.set_status(conn, wf_id, to, actor=key["name"])
    return JSONResponse({"id": wf_id, "status": to})


@router.post("/workflows/{workflow_id}/pause")
async def pause(request: Request, conn: Conn, key: UiKey, workflow_id: ObjectId) -> JSONResponse:
    return await _set_status(request, conn, key, workflow_id, "paused")


@router.post("/workflows/{workflow_id}/activate")
async def activate(request: Request, conn: Conn, key: UiKey, workflow_id: ObjectId) -> JSONResponse:
    return await _set_status(request, conn, key, workflow_id, "active")


@router.post("/executions/{execution_id}/replay")
async def replay(
    request: Request, conn: Conn, runner: RunnerDep, key: UiKey, execution_id: ObjectId
) -> JSONResponse:
    """The API's retry: replay a failed execution from its failed step(s)."""
    refusal = _check_post(request, key)
    if refusal is not None:
        return refusal
    current = await executions.get_execution(conn, execution_id)
    if not await runner.replay(execution_id):
        return _refuse(409, f"execution {execution_id} is {current['status']}; not replayed")
    after = await executions.get_execution(conn, execution_id)
    return JSONResponse({"id": execution_id, "status": after["status"]})


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"not JSON: {type(value).__name__}")
