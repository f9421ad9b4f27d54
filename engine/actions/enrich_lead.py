"""enrich_lead: ask the enrichment endpoint about a lead; write back the fields it knows.

The endpoint (``CRMFLOW_ENRICHMENT_URL``) receives ``POST {"email", "domain"}`` with
an ``Idempotency-Key`` header (and ``traceparent`` when tracing is on) and answers
a JSON object. The call is at-least-once;
the write-back commits with the step record, so it happens exactly once. Only
columns of the lead are written, empty ones unless ``overwrite`` is set, and only
values their column's type accepts (the others are reported as ``invalid``). With no
endpoint configured the step is skipped, with that reason.
"""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from pydantic import Field

from engine import breakers, http, tracing
from engine.actions.base import Action, Params, PermanentError, Skip
from engine.actions.http_request import retry_after_seconds
from engine.executor.context import StepContext
from engine.executor.errors import RetryAfter
from engine.model import Issue

PROTECTED = frozenset({"id", "owner_id", "score", "status", "created_at", "updated_at"})


class EnrichLeadParams(Params):
    fields: list[str] | None = None  # columns that may be written (default: any it returns)
    overwrite: bool = False
    email_field: str = "email"
    timeout: float = Field(10.0, gt=0, le=120)


class EnrichLead(Action):
    name = "enrich_lead"
    Params = EnrichLeadParams
    kind = "external"
    compensable = True
    needs_entity = True
    description = "Enrich a lead from CRMFLOW_ENRICHMENT_URL; skipped when none is set."

    def check_entity(self, params: Any, entity: Any, path: str) -> list[Issue]:
        issues = []
        if params.email_field not in entity.columns:
            issues.append(
                Issue(
                    f"{path}.email_field",
                    f"{entity.entity_type} has no column {params.email_field!r}",
                )
            )
        for i, name in enumerate(params.fields or []):
            if name not in entity.columns:
                issues.append(
                    Issue(f"{path}.fields[{i}]", f"{entity.entity_type} has no column {name!r}")
                )
        return issues

    def target_host(self, params: Any, ctx: StepContext) -> str | None:
        return breakers.url_host(ctx.settings.enrichment_url)

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        settings = ctx.settings
        if not settings.enrichment_url:
            raise Skip("no enrichment endpoint configured (CRMFLOW_ENRICHMENT_URL)")
        email = str((ctx.row or {}).get(params.email_field) or "")
        if "@" not in email:
            raise Skip(f"the lead has no email address in {params.email_field}")
        headers = {"Idempotency-Key": ctx.idempotency_key}
        if settings.enrichment_token:
            headers["Authorization"] = f"Bearer {settings.enrichment_token.get_secret_value()}"
        # The operator's endpoint: the shared client without the public-only check, as
        # before (kept-alive connections; no redirects, no proxies from the environment).
        try:
            with tracing.call_span(self.name, "POST", settings.enrichment_url) as call:
                if call.traceparent:  # W3C trace context: the endpoint joins the trace
                    headers["traceparent"] = call.traceparent
                response = await http.get_client(False).post(
                    settings.enrichment_url,
                    json={"email": email, "domain": email.rpartition("@")[2].lower()},
                    headers=headers,
                    timeout=params.timeout,
                )
                call.status(response.status_code)
        except httpx.TimeoutException:
            raise TimeoutError(f"enrichment timed out after {params.timeout:g}s") from None
        except httpx.RequestError as exc:
            raise RuntimeError(f"enrichment {type(exc).__name__}: {exc}") from None
        if response.status_code in (429, 503):
            raise RetryAfter(
                f"enrichment HTTP {response.status_code}",
                retry_after_seconds(response.headers.get("Retry-After")),
            )
        if response.status_code == 404:
            raise Skip("the enrichment endpoint knows nothing about this lead")
        if response.status_code >= 500:
            raise RuntimeError(f"enrichment HTTP {response.status_code}")
        if response.status_code >= 400:
            raise PermanentError(f"enrichment HTTP {response.status_code}: {response.text[:300]}")
        if response.status_code >= 300:
            raise PermanentError(
                f"enrichment HTTP {response.status_code}: redirects are not followed"
            )
        try:
            data = response.json()
        except ValueError:
            raise PermanentError("the enrichment endpoint did not answer JSON") from None
        if not isinstance(data, dict):
            raise PermanentError("the enrichment endpoint did not answer a JSON object")
        return {"response": data}

    async def commit(self, ctx: StepContext, params: Any, result: dict[str, Any]) -> dict[str, Any]:
        entity = ctx.require_entity()
        current = await ctx.lock_entity_row() or {}
        allowed = set(params.fields) if params.fields is not None else set(entity.columns)
        allowed -= PROTECTED | set(entity.pk_columns)
        values, ignored, invalid = {}, [], []
        for key, value in result["response"].items():
            if key not in allowed or key not in entity.columns:
                ignored.append(key)
            elif value is None or not (params.overwrite or current.get(key) in (None, "", [])):
                continue
            elif await _fits(ctx, key, value):
                values[key] = value
            else:
                invalid.append(key)
        old = await ctx.update_entity(values) if values else {}
        return {"updated": values, "old": old, "ignored": sorted(ignored), "invalid": invalid}

    async def compensate(self, ctx: StepContext, params: Any, result: dict[str, Any]) -> None:
        if result.get("old"):
            await ctx.update_entity(result["old"])


async def _fits(ctx: StepContext, column: str, value: Any) -> bool:
    """Whether the column's type accepts the value (as the write-back will convert it)."""
    entity = ctx.require_entity()
    query = sql.SQL("SELECT (jsonb_populate_record(NULL::{}, %s::jsonb)).{}").format(
        entity.table, sql.Identifier(column)
    )
    try:
        async with ctx.require_conn().transaction():
            await ctx.require_conn().execute(query, [Jsonb({column: value})])
    except psycopg.DataError:
        return False
    return True


ACTION = EnrichLead()
