"""http_request: a webhook out (external action: at-least-once, signed, idempotent).

Headers sent besides the step's own:
  ``Idempotency-Key``: the step's key, identical on every attempt;
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

from engine import netpolicy, templates
from engine.actions.base import Action, Params, PermanentError
from engine.actions.crm import check_templates
from engine.model import Duration, Issue
from engine.runtime import RetryAfter, StepContext, now

MAX_RESPONSE_KEPT = 10_000


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
            if key.lower() in ("host", "content-length", "transfer-encoding"):
                issues.append(Issue(f"{path}.headers.{key}", "this header is set by crmflow"))
        return issues

    def default_body(self, ctx: StepContext) -> dict[str, Any]:
        context = ctx.template_context()
        return {
            "execution": context["execution"],
            "event": context["event"],
            "entity": ctx.row,
        }

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        url = ctx.render(params.url) or ""
        try:
            await netpolicy.check_url(url, ctx.settings)
        except netpolicy.HostNotAllowed as exc:
            raise PermanentError(str(exc)) from None
        headers = {k: ctx.render(v) or "" for k, v in params.headers.items()}
        payload = (
            ctx.render_value(params.body) if params.body is not None else self.default_body(ctx)
        )
        body = b"" if params.method == "GET" else json.dumps(payload, default=str).encode()
        headers.setdefault("Content-Type", "application/json")
        headers["Idempotency-Key"] = ctx.idempotency_key
        headers["X-Crmflow-Execution"] = str(ctx.execution_id)
        secret = ctx.settings.webhook_secret
        if params.sign and secret is not None:
            timestamp = str(int(time.time()))
            headers["X-Crmflow-Timestamp"] = timestamp
            headers["X-Crmflow-Signature"] = sign(secret.get_secret_value(), timestamp, body)
        timeout = params.timeout or ctx.settings.http_timeout
        async with httpx.AsyncClient(follow_redirects=False, timeout=timeout) as client:
            response = await client.request(
                params.method, url, content=body or None, headers=headers
            )
        text = response.text[:MAX_RESPONSE_KEPT]
        if response.status_code == 429 or response.status_code == 503:
            raise RetryAfter(
                f"HTTP {response.status_code} from {url}",
                retry_after_seconds(response.headers.get("Retry-After")),
            )
        if response.status_code >= 500:
            raise RuntimeError(f"HTTP {response.status_code} from {url}: {text[:300]}")
        if response.status_code >= 400:
            raise PermanentError(f"HTTP {response.status_code} from {url}: {text[:300]}")
        try:
            data: Any = response.json()
        except ValueError:
            data = text
        return {"status": response.status_code, "response": data}


ACTION = HttpRequest()
