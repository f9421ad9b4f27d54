"""One error shape for every error: RFC 9457 problem details (``application/problem+json``).

``{"type", "title", "status", "detail", "errors": [{"path", "message"}]}``: ``errors``
names the offending parts (``conditions[1].operator``, ``query.limit``) and is empty
when there is nothing to point at.
"""

from __future__ import annotations

import http
import logging
import re
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import apikeys, db, dryrun, events, executions, workflows
from engine.model import DefinitionError, format_loc
from engine.scheduler import NotRunnable

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:crmflow:problem:"


class ProblemIssue(BaseModel):
    path: str = Field(description="where: a path like conditions[1].operator or query.limit")
    message: str = Field(description="why")


class Problem(BaseModel):
    type: str = Field(description="a URI naming the kind of problem")
    title: str
    status: int
    detail: str
    errors: list[ProblemIssue] = Field(default_factory=list)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_SLUGS = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "payload-too-large",
    415: "unsupported-media-type",
    422: "validation-error",
    500: "internal-error",
    503: "unavailable",
}


def _title(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class ApiError(Exception):
    """An error the API answers with, in the problem shape."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        kind: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors or []
        self.kind = kind or _SLUGS.get(status, "error")
        self.title = title or _title(status)
        self.headers = headers


def problem_response(
    status: int,
    detail: str,
    *,
    errors: list[dict[str, str]] | None = None,
    kind: str | None = None,
    title: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "type": TYPE_PREFIX + (kind or _SLUGS.get(status, "error")),
        "title": title or _title(status),
        "status": status,
        "detail": detail,
        "errors": errors or [],
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type=MEDIA_TYPE)


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses (see :func:`openapi_problems`)."""
    return {code: {"model": Problem, "description": _title(code)} for code in codes}


def _issues(issues: list[Any]) -> list[dict[str, str]]:
    return [{"path": i.path, "message": i.message} for i in issues]


def _validation_errors(exc: RequestValidationError) -> list[dict[str, str]]:
    out = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        message = str(err.get("msg", "invalid"))
        if err.get("type") == "json_invalid":
            loc = loc[:1]
            reason = (err.get("ctx") or {}).get("error")
            message = f"not valid JSON ({reason})" if reason else "not valid JSON"
        elif err.get("type") == "extra_forbidden":
            message = "unknown field"
        out.append({"path": format_loc(loc), "message": message})
    return out


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return problem_response(
        exc.status,
        exc.detail,
        errors=exc.errors,
        kind=exc.kind,
        title=exc.title,
        headers=exc.headers,
    )


def _allowed_methods(request: Request) -> str:
    """Every documented method of this path (Starlette's 405 names one route's only)."""
    app = request.app
    table = getattr(app.state, "allowed_methods", None)
    if table is None:
        table = app.state.allowed_methods = [
            (
                re.compile("^" + re.sub(r"\\{[^}/]+\\}", "[^/]+", re.escape(path)) + "$"),
                {m.upper() for m in item if m.upper() in _METHODS},
            )
            for path, item in app.openapi().get("paths", {}).items()
        ]
    methods: set[str] = set()
    for pattern, documented in table:
        if pattern.match(request.url.path):
            methods |= documented
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else _title(exc.status_code)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    if exc.status_code == 400 and detail == _FASTAPI_BODY_ERROR:
        # FastAPI's answer when decoding the body raised something other than a JSON
        # syntax error: in practice a body nested too deeply for Python's parser.
        reason = "not valid JSON (nested too deeply, or not decodable)"
        return problem_response(
            400, f"the request body is {reason}", errors=[{"path": "body", "message": reason}]
        )
    return problem_response(exc.status_code, detail, headers=headers or None)


_FASTAPI_BODY_ERROR = "There was an error parsing the body"


async def _request_invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _validation_errors(exc)
    return problem_response(422, f"the request is invalid: {len(errors)} problem(s)", errors=errors)


async def _definition_invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DefinitionError)
    return problem_response(
        422,
        f"the workflow definition is invalid: {len(exc.issues)} problem(s)",
        errors=_issues(exc.issues),
        kind="invalid-workflow",
        title="Invalid workflow",
    )


async def _input_invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, events.EventError | dryrun.DryRunError)
    return problem_response(exc.status, str(exc), errors=_issues(exc.issues))


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    names: dict[type[Exception], str] = {
        workflows.WorkflowNotFound: "workflow",
        executions.ExecutionNotFound: "execution",
        apikeys.ApiKeyNotFound: "API key",
    }
    what = names.get(type(exc), "resource")
    return problem_response(404, f"no {what} {exc.args[0]!r}" if exc.args else f"no such {what}")


async def _conflict(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(409, str(exc))


async def _bad_value(request: Request, exc: Exception) -> JSONResponse:
    """A value PostgreSQL refused (class 22: data exception): the caller's input."""
    assert isinstance(exc, psycopg.DataError)
    reason = exc.diag.message_primary or str(exc)
    return problem_response(422, f"a value was refused by the database: {reason}")


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", exc)
    return problem_response(503, "the database is unavailable; try again shortly")


async def _busy(request: Request, exc: Exception) -> JSONResponse:
    """A lock stayed taken through every retry (engine.db.retry_lock_timeouts)."""
    return problem_response(503, str(exc), headers={"Retry-After": "5"})


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(500, "an internal error occurred; it has been logged")


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_invalid)
    app.add_exception_handler(DefinitionError, _definition_invalid)
    app.add_exception_handler(events.EventError, _input_invalid)
    app.add_exception_handler(dryrun.DryRunError, _input_invalid)
    for not_found in (
        workflows.WorkflowNotFound,
        executions.ExecutionNotFound,
        apikeys.ApiKeyNotFound,
    ):
        app.add_exception_handler(not_found, _not_found)
    app.add_exception_handler(workflows.NameTaken, _conflict)
    app.add_exception_handler(NotRunnable, _conflict)
    app.add_exception_handler(psycopg.DataError, _bad_value)
    app.add_exception_handler(db.Busy, _busy)
    app.add_exception_handler(PoolTimeout, _unavailable)
    app.add_exception_handler(psycopg.OperationalError, _unavailable)
    app.add_exception_handler(Exception, _internal)


def openapi_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Error responses are documented as ``application/problem+json`` with the Problem
    schema (FastAPI's own 422 schema is replaced: our handler answers those too)."""
    ref = {"$ref": "#/components/schemas/Problem"}
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            for code, response in operation.get("responses", {}).items():
                schemas = [c.get("schema", {}) for c in response.get("content", {}).values()]
                ours = any(
                    s.get("$ref", "").endswith(("/Problem", "/HTTPValidationError"))
                    for s in schemas
                )
                if code.isdigit() and int(code) >= 400 and ours:
                    response["content"] = {MEDIA_TYPE: {"schema": ref}}
                    if code == "422":
                        response["description"] = "Validation error"
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema
