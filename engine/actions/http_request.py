"""http_request: a webhook out (external action: at-least-once, signed, idempotent).

Headers sent besides the step's own:
  ``Idempotency-Key``: the step's key, identical on every attempt;
  ``traceparent`` (W3C trace context, replacing the step's own) when tracing is on;
  ``X-Crmflow-Timestamp`` and ``X-Crmflow-Signature: sha256=<hex>``: HMAC-SHA256 with
  the webhook secret over ``"<timestamp>.<body>"`` (when a secret is configured).
5xx and 429 responses are retried (honouring Retry-After); other 4xx are final.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import httpx
from pydantic import Field

from engine import breakers, http, netpolicy, templates, tracing
from engine.actions.base import Action, Params, PermanentError
from engine.actions.crm import check_templates
from engine.executor.context import StepContext, now
from engine.executor.errors import RetryAfter
from engine.model import Duration, Issue

MAX_RESPONSE_KEPT = 10_000  # characters of the response kept in the step's result
MAX_RESPONSE_READ = 64_000  # bytes read from the response; the rest is not downloaded
RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "idempotency-key"})


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """The response's first ``limit`` bytes (a huge answer is not held in memory)."""
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - now()).total_seconds())
    except (TypeError, ValueError):
        return None


class HttpRequestParams(Params):
    url: str = Field(min_length=1, max_length=4000)
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    body: Any = None  # JSON; strings inside are templates. Default: the event and entity
    timeout: Duration | None = None
    sign: bool = True


class HttpRequest(Action):
    name = "http_request"
    Params = HttpRequestParams
    kind = "external"
    description = "Call a webhook: JSON body template, HMAC-SHA256 signature, host allowlist."

    def check_entity(self, params: Any, entity: Any, path: str) -> list[Issue]:
        issues = check_templates(
            {"url": params.url, "headers": params.headers, "body": params.body}, path
        )
        if not templates.is_template(params.url):
            try:
                netpolicy.check_url_shape(params.url)
            except netpolicy.HostNotAllowed as exc:
                issues.append(Issue(f"{path}.url", str(exc)))
        for key in params.headers:
            if key.lower() in RESERVED_HEADERS or key.lower().startswith("x-crmflow-"):
                issues.append(Issue(f"{path}.headers.{key}", "this header is set by crmflow"))
        return issues

    def default_body(self, ctx: StepContext) -> dict[str, Any]:
        context = ctx.template_context()
        return {
            "execution": context["execution"],
            "event": context["event"],
            "entity": ctx.row,
        }

    def target_host(self, params: Any, ctx: StepContext) -> str | None:
        try:
            return breakers.url_host(ctx.render(params.url))
        except Exception:
            return None  # run() fails the step with the template's error

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        url = ctx.render(params.url) or ""
        try:
            await netpolicy.check_url(url, ctx.settings)
        except netpolicy.HostNotAllowed as exc:
            raise PermanentError(str(exc)) from None
        headers = {
            k: ctx.render(v) or ""
            for k, v in params.headers.items()
            if k.lower() not in RESERVED_HEADERS and not k.lower().startswith("x-crmflow-")
        }
        payload = (
            ctx.render_value(params.body) if params.body is not None else self.default_body(ctx)
        )
        body = b"" if params.method == "GET" else json.dumps(payload, default=str).encode()
        if body and not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
        headers["Idempotency-Key"] = ctx.idempotency_key
        headers["X-Crmflow-Execution"] = str(ctx.execution_id)
        secret = ctx.settings.webhook_secret
        if params.sign and secret is not None:
            timestamp = str(int(time.time()))
            headers["X-Crmflow-Timestamp"] = timestamp
            headers["X-Crmflow-Signature"] = sign(secret.get_secret_value(), timestamp, body)
        # The step's own timeout bounds the request too (the runner's bound is the same).
        timeout = params.timeout or ctx.step.timeout or ctx.settings.http_timeout
        # The process's shared client (kept-alive connections), for this network policy.
        client = http.get_client(netpolicy.public_only(ctx.settings))
        try:
            with tracing.call_span(self.name, params.method, url) as call:
                if call.traceparent:  # W3C trace context: the receiver joins the trace
                    headers = {k: v for k, v in headers.items() if k.lower() != "traceparent"}
                    headers["traceparent"] = call.traceparent
                async with client.stream(
                    params.method, url, content=body or None, headers=headers, timeout=timeout
                ) as response:
                    raw = await _read_capped(response, MAX_RESPONSE_READ)
                call.status(response.status_code)
        except netpolicy.HostNotAllowed as exc:
            raise PermanentError(str(exc)) from None
        except httpx.TimeoutException:
            raise TimeoutError(f"timed out after {timeout:g}s calling {url}") from None
        except httpx.RequestError as exc:
            raise RuntimeError(f"{type(exc).__name__} calling {url}: {exc}") from None
        text = raw.decode(response.encoding or "utf-8", errors="replace")[:MAX_RESPONSE_KEPT]
        if response.status_code == 429 or response.status_code == 503:
            raise RetryAfter(
                f"HTTP {response.status_code} from {url}",
                retry_after_seconds(response.headers.get("Retry-After")),
            )
        if response.status_code >= 500:
            raise RuntimeError(f"HTTP {response.status_code} from {url}: {text[:300]}")
        if response.status_code >= 400:
            raise PermanentError(f"HTTP {response.status_code} from {url}: {text[:300]}")
        if response.status_code >= 300:
            location = response.headers.get("Location", "")
            raise PermanentError(
                f"HTTP {response.status_code} from {url}: redirects are not followed"
                + (f" (to {location[:300]})" if location else "")
            )
        try:
            data: Any = json.loads(raw) if len(raw) <= MAX_RESPONSE_KEPT else text
        except ValueError:
            data = text
        return {"status": response.status_code, "response": data}


ACTION = HttpRequest()
