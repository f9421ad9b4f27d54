"""The external actions against real servers: send_email (a real SMTP server),
http_request and enrich_lead (a real HTTP server); retries, permanent failures,
signatures, SSRF policy, and at-least-once delivery with a stable idempotency key.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from engine import netpolicy
from engine.actions.http_request import HttpRequest, sign
from engine.actions.send_email import SendEmail
from engine.config import Settings
from engine.matcher import Matcher
from engine.model import DefinitionError
from engine.runtime import Runner, StepRetryLater
from engine.worker import running_worker
from tests.helpers import (
    SEED_QUALIFY,
    apply,
    drive,
    execution_ids,
    fetch,
    run_job,
    steps,
    value,
    wait_executions_settled,
)
from tests.servers import Reply, SmtpServer, WebServer

Conn = psycopg.AsyncConnection[Any]

LEAD_CREATED = {"type": "entity_created", "entity_type": "lead"}
SECRET = "whsec-test-1234"


def with_settings(settings: Settings, **changes: Any) -> Settings:
    """The test settings with changes, validated (a secret given as text is a SecretStr)."""
    return Settings.model_validate({**settings.model_dump(), **changes})


def runner_with(pool: AsyncConnectionPool, settings: Settings, **changes: Any) -> Runner:
    return Runner(pool, with_settings(settings, **changes))


def smtp_runner(pool: AsyncConnectionPool, settings: Settings, smtp: SmtpServer) -> Runner:
    return runner_with(pool, settings, smtp_host="127.0.0.1", smtp_port=smtp.port)


async def new_lead(conn: Conn, **columns: Any) -> int:
    columns = {"name": "Bob Lead", **columns}
    names = ", ".join(columns)
    marks = ", ".join(["%s"] * len(columns))
    return await value(
        conn, f"INSERT INTO leads ({names}) VALUES ({marks}) RETURNING id", *columns.values()
    )


async def run_one(conn: Conn, matcher: Matcher, runner: Runner) -> tuple[dict[str, Any], list]:
    await matcher.drain()
    [execution_id] = await execution_ids(conn)
    ex = await drive(runner, conn, execution_id)
    return ex, await steps(conn, execution_id)


async def workflow(conn: Conn, *actions: dict[str, Any], **extra: Any) -> int:
    return await apply(
        conn, {"name": "External", "trigger": LEAD_CREATED, "actions": list(actions), **extra}
    )


def refused(exc: pytest.ExceptionInfo[DefinitionError]) -> dict[str, str]:
    return {i.path: i.message for i in exc.value.issues}


def content(part: Any) -> str:
    """A text part's content, with the line ends SMTP carried (CRLF) made plain again."""
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


class Crash(BaseException):
    """The worker dies here (not an error the runner handles)."""


# ───────────────────────────── send_email ─────────────────────────────


async def test_send_email_delivers_the_rendered_message(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings, smtp: SmtpServer
) -> None:
    await workflow(
        crm,
        {
            "type": "send_email",
            "to": "{{ entity.email }}",
            "cc": "owner",
            "subject": "Welcome {{ entity.name }}\r\nBcc: victim@evil.test",
            "body": "Hi {{ entity.name }},\nthanks for choosing us at {{ entity.company }}.",
            "reply_to": "sales@acme.test",
        },
    )
    await new_lead(crm, name="Eve", email="eve@initech.test", company="Initech", owner_id=1)
    ex, [step] = await run_one(crm, matcher, smtp_runner(pool, settings, smtp))
    assert ex["status"] == "completed", ex["error"]
    [mail] = smtp.received
    key = f"crmflow-{ex['id']}-send_email"
    message = mail.message
    assert message["To"] == "eve@initech.test"
    assert message["Cc"] == "ann@acme.test"
    assert message["From"] == "crmflow@localhost"
    assert message["Reply-To"] == "sales@acme.test"
    # Rendered, and on one line: a header cannot be smuggled in through a template.
    assert message["Subject"] == "Welcome Eve Bcc: victim@evil.test"
    assert message["Bcc"] is None
    assert content(message) == "Hi Eve,\nthanks for choosing us at Initech.\n"
    assert message["Message-ID"] == f"<{key}@localhost>"
    assert message["X-Crmflow-Idempotency-Key"] == key
    assert sorted(mail.rcpt_tos) == ["ann@acme.test", "eve@initech.test"]
    assert mail.mail_from == "crmflow@localhost"
    assert step["result"] == {
        "message_id": f"<{key}@localhost>",
        "to": ["eve@initech.test"],
        "cc": ["ann@acme.test"],
    }
    assert step["attempts"] == 1


async def test_send_email_named_template_to_the_owner(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings, smtp: SmtpServer
) -> None:
    await crm.execute(
        "INSERT INTO crmflow.email_templates (name, subject, body_text, body_html) VALUES"
        " ('new-lead', 'New lead: {{ entity.name }}',"
        "  'Call {{ entity.name }} ({{ entity.email }})', '<p>Call <b>{{ entity.name }}</b></p>')"
    )
    await workflow(crm, {"type": "send_email", "to": "owner", "template": "new-lead"})
    await new_lead(crm, name="Zed <b>&amp; co</b>", email="zed@x.test", owner_id=2)
    ex, _ = await run_one(crm, matcher, smtp_runner(pool, settings, smtp))
    assert ex["status"] == "completed", ex["error"]
    [mail] = smtp.received
    assert mail.rcpt_tos == ["carl@acme.test"]
    assert mail.message["To"] == "carl@acme.test"
    assert mail.message["Subject"] == "New lead: Zed <b>&amp; co</b>"
    text = mail.message.get_body(("plain",))
    html = mail.message.get_body(("html",))
    assert content(text) == "Call Zed <b>&amp; co</b> (zed@x.test)\n"
    # In the HTML part, values are escaped: what a lead typed cannot add markup.
    assert content(html) == "<p>Call <b>Zed &lt;b&gt;&amp;amp; co&lt;/b&gt;</b></p>\n"


async def test_send_email_role_recipients_and_template_override(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings, smtp: SmtpServer
) -> None:
    await crm.execute(
        "INSERT INTO crmflow.email_templates (name, subject, body_text) VALUES"
        " ('digest', 'Digest', 'Lead {{ entity.name }}')"
    )
    await crm.execute(
        "INSERT INTO users (id, name, email, role) VALUES (4, 'Max', 'max@acme.test', 'manager')"
    )
    await workflow(
        crm,
        {"type": "send_email", "to": "role:manager", "template": "digest", "subject": "Custom"},
    )
    await new_lead(crm, name="Ida")
    ex, _ = await run_one(crm, matcher, smtp_runner(pool, settings, smtp))
    assert ex["status"] == "completed", ex["error"]
    [mail] = smtp.received
    assert sorted(mail.rcpt_tos) == ["max@acme.test", "mia@acme.test"]
    assert mail.message["Subject"] == "Custom"
    assert content(mail.message) == "Lead Ida\n"


@pytest.mark.parametrize(
    ("action", "lead", "error"),
    [
        ({"to": "owner", "template": "missing"}, {"owner_id": 1}, "no email template"),
        ({"to": "owner", "subject": "s", "body": "b"}, {}, "no recipient"),
        ({"to": "{{ entity.email }}", "subject": "s", "body": "b"}, {}, "no recipient"),
        (
            {"to": "{{ entity.email }}", "subject": "s", "body": "b"},
            {"email": "not-an-address"},
            "not an email address",
        ),
        ({"to": "x@y.test", "subject": "{{ entity.nope }}", "body": "b"}, {}, "template"),
    ],
)
async def test_send_email_permanent_failures_are_not_retried(
    crm: Conn,
    matcher: Matcher,
    pool: AsyncConnectionPool,
    settings: Settings,
    smtp: SmtpServer,
    action: dict[str, Any],
    lead: dict[str, Any],
    error: str,
) -> None:
    await workflow(crm, {"type": "send_email", **action})
    await new_lead(crm, **lead)
    ex, [step] = await run_one(crm, matcher, smtp_runner(pool, settings, smtp))
    assert ex["status"] == "failed"
    assert step["status"] == "failed" and step["attempts"] == 1
    assert error in step["error"]
    assert smtp.received == []


async def test_send_email_5xx_refusal_is_permanent(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings, smtp: SmtpServer
) -> None:
    smtp.refuse_data = ["554 5.7.1 Message rejected as spam"] * 5
    await workflow(
        crm, {"type": "send_email", "to": "eve@x.test", "subject": "s", "body": "b", "retry": 5}
    )
    await new_lead(crm)
    ex, [step] = await run_one(crm, matcher, smtp_runner(pool, settings, smtp))
    assert ex["status"] == "failed"
    assert step["attempts"] == 1 and smtp.refused == 1
    assert "554" in step["error"] and "rejected as spam" in step["error"]


async def test_send_email_refused_recipients(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings, smtp: SmtpServer
) -> None:
    smtp.refuse_rcpt = {"gone@x.test": "550 5.1.1 No such user"}
    await workflow(
        crm,
        {
            "id": "some",
            "type": "send_email",
            "to": "gone@x.test, here@x.test",
            "subject": "s",
            "body": "b",
        },
        {"id": "all", "type": "send_email", "to": "gone@x.test", "subject": "s", "body": "b"},
    )
    await new_lead(crm)
    ex, [some, everyone] = await run_one(crm, matcher, smtp_runner(pool, settings, smtp))
    # Partly refused: sent to the others, the refusal kept in the result.
    assert some["status"] == "succeeded"
    assert some["result"]["refused"] == {"gone@x.test": "550 5.1.1 No such user"}
    assert [m.rcpt_tos for m in smtp.received] == [["here@x.test"]]
    # Entirely refused with a 5xx: permanent.
    assert everyone["status"] == "failed" and everyone["attempts"] == 1
    assert "No such user" in everyone["error"]
    assert ex["status"] == "failed"


async def test_send_email_4xx_is_retried_with_the_same_message_id(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings, smtp: SmtpServer
) -> None:
    smtp.refuse_data = ["451 4.3.0 Try again later"]
    await workflow(crm, {"type": "send_email", "to": "eve@x.test", "subject": "s", "body": "b"})
    await new_lead(crm)
    await matcher.drain()
    [execution_id] = await execution_ids(crm)
    runner = smtp_runner(pool, settings, smtp)
    with pytest.raises(StepRetryLater):
        await run_job(runner, crm, execution_id)
    [step] = await steps(crm, execution_id)
    assert step["status"] == "scheduled" and "451" in step["error"]
    ex = await drive(runner, crm, execution_id)
    assert ex["status"] == "completed"
    [step] = await steps(crm, execution_id)
    assert step["attempts"] == 2
    [mail] = smtp.received
    assert mail.message["Message-ID"] == f"<crmflow-{execution_id}-send_email@localhost>"


async def test_send_email_unreachable_server_is_retried(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings
) -> None:
    from tests.servers import free_port

    runner = runner_with(
        pool, settings, smtp_host="127.0.0.1", smtp_port=free_port(), smtp_timeout=2.0
    )
    await workflow(
        crm, {"type": "send_email", "to": "e@x.test", "subject": "s", "body": "b", "retry": 2}
    )
    await new_lead(crm)
    ex, [step] = await run_one(crm, matcher, runner)
    assert ex["status"] == "failed"
    assert step["attempts"] == 2


async def test_send_email_at_least_once_with_a_stable_key(
    crm: Conn,
    matcher: Matcher,
    pool: AsyncConnectionPool,
    settings: Settings,
    smtp: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker dies after the server took the message, before the step was recorded:
    the message is sent again, with the same Message-ID for the receiver to drop it."""
    await workflow(crm, {"type": "send_email", "to": "e@x.test", "subject": "s", "body": "b"})
    await new_lead(crm)
    await matcher.drain()
    [execution_id] = await execution_ids(crm)
    runner = smtp_runner(pool, settings, smtp)

    async def crash(self: SendEmail, ctx: Any, params: Any, result: Any) -> Any:
        raise Crash

    monkeypatch.setattr(SendEmail, "commit", crash)
    with pytest.raises(Crash):
        await run_job(runner, crm, execution_id)
    monkeypatch.undo()
    [step] = await steps(crm, execution_id)
    assert step["status"] == "running"  # as the dead worker left it
    assert await run_job(runner, crm, execution_id) == "completed"
    first, second = smtp.received
    key = f"crmflow-{execution_id}-send_email"
    assert first.message["Message-ID"] == second.message["Message-ID"] == f"<{key}@localhost>"
    assert first.message["X-Crmflow-Idempotency-Key"] == key
    assert second.message["X-Crmflow-Idempotency-Key"] == key
    [step] = await steps(crm, execution_id)
    assert (step["status"], step["attempts"]) == ("succeeded", 2)


async def test_send_email_checked_at_save(crm: Conn) -> None:
    for action, path in [
        ({"type": "send_email", "to": "x@y.test"}, "actions[0]"),
        ({"type": "send_email", "to": "x@y.test", "template": "bad name!"}, "actions[0].template"),
        ({"type": "send_email", "to": "{{ x", "subject": "s", "body": "b"}, "actions[0].to"),
        (
            {"type": "send_email", "to": "x@y.test", "subject": "{{ ''.__class__ }}", "body": "b"},
            "actions[0].subject",
        ),
    ]:
        with pytest.raises(DefinitionError) as exc:
            await workflow(crm, action)
        assert path in refused(exc), action
    with pytest.raises(DefinitionError) as exc:
        await apply(
            crm,
            {
                "name": "No entity",
                "trigger": {"type": "manual"},
                "actions": [{"type": "send_email", "to": "owner", "subject": "s", "body": "b"}],
            },
        )
    assert "actions[0].to" in refused(exc)


# ───────────────────────────── http_request ─────────────────────────────


def verify(request: Any, secret: str) -> bool:
    timestamp = request.headers["x-crmflow-timestamp"]
    expected = hmac.new(
        secret.encode(), timestamp.encode() + b"." + request.body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(request.headers["x-crmflow-signature"], "sha256=" + expected)


async def test_http_request_sends_the_rendered_signed_body(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings, web: WebServer
) -> None:
    await workflow(
        crm,
        {
            "type": "http_request",
            "url": web.url("/hooks/{{ entity.source }}"),
            "headers": {"X-Source": "crm-{{ entity.id }}", "Authorization": "Bearer t0k"},
            "body": {
                "lead": "{{ entity.name }}",
                "company": "{{ entity.company }}",
                "fixed": 5,
                "flags": [True, None, "{{ entity.email }}"],
                "nested": {"owner": "{{ entity.owner_id }}"},
            },
        },
    )
    web.default = Reply(201, {"received": True})
    lead_id = await new_lead(
        crm, name="Eve", company="Initech", source="website", email="e@i.test", owner_id=1
    )
    runner = runner_with(pool, settings, webhook_secret=SECRET)
    ex, [step] = await run_one(crm, matcher, runner)
    assert ex["status"] == "completed", ex["error"]
    [request] = web.requests
    assert (request.method, request.path) == ("POST", "/hooks/website")
    assert request.json() == {
        "lead": "Eve",
        "company": "Initech",
        "fixed": 5,
        "flags": [True, None, "e@i.test"],
        "nested": {"owner": "1"},
    }
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-source"] == f"crm-{lead_id}"
    assert request.headers["authorization"] == "Bearer t0k"
    assert request.headers["idempotency-key"] == f"crmflow-{ex['id']}-http_request"
    assert request.headers["x-crmflow-execution"] == str(ex["id"])
    # The signature: HMAC-SHA256 over "<timestamp>.<body>", checkable with the secret.
    timestamp = request.headers["x-crmflow-timestamp"]
    assert abs(int(timestamp) - time.time()) < 60
    assert request.headers["x-crmflow-signature"] == sign(SECRET, timestamp, request.body)
    assert verify(request, SECRET)
    assert not verify(request, "another secret")
    assert step["result"] == {"status": 201, "response": {"received": True}}


async def test_http_request_default_body_and_no_signature_without_secret(
    crm: Conn, matcher: Matcher, runner: Runner, web: WebServer
) -> None:
    await workflow(crm, {"type": "http_request", "url": web.url()})
    lead_id = await new_lead(crm, name="Eve")
    ex, _ = await run_one(crm, matcher, runner)
    assert ex["status"] == "completed", ex["error"]
    [request] = web.requests
    body = request.json()
    assert body["entity"]["name"] == "Eve" and body["entity"]["id"] == lead_id
    assert body["event"]["op"] == "insert"
    assert body["execution"]["id"] == ex["id"]
    assert body["execution"]["entity_type"] == "lead"
    assert "x-crmflow-signature" not in request.headers
    assert "idempotency-key" in request.headers


async def test_http_request_get_sends_no_body(
    crm: Conn, matcher: Matcher, runner: Runner, web: WebServer
) -> None:
    web.default = Reply(200, "plain text")
    await workflow(crm, {"type": "http_request", "method": "GET", "url": web.url("/p?q=1")})
    await new_lead(crm)
    ex, [step] = await run_one(crm, matcher, runner)
    assert ex["status"] == "completed"
    [request] = web.requests
    assert (request.method, request.path, request.body) == ("GET", "/p?q=1", b"")
    assert "content-type" not in request.headers
    assert step["result"] == {"status": 200, "response": "plain text"}


async def test_http_request_500_then_200_is_retried_by_the_worker(
    crm: Conn, db_url: str, settings: Settings, web: WebServer
) -> None:
    web.reply(Reply(500, {"error": "boom"}))
    await workflow(
        crm,
        {
            "type": "http_request",
            "url": web.url(),
            "retry": {"max_attempts": 3, "backoff": 0.1, "jitter": False},
        },
    )
    await new_lead(crm)
    worker_settings = with_settings(settings, webhook_secret=SECRET)
    async with running_worker(db_url, settings=worker_settings, concurrency=2):
        [ex] = await wait_executions_settled(crm, expected=1)
    assert ex["status"] == "completed", ex["error"]
    [step] = await steps(crm, ex["id"])
    assert (step["status"], step["attempts"]) == ("succeeded", 2)
    first, second = web.requests
    key = f"crmflow-{ex['id']}-http_request"
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"] == key
    assert first.body == second.body
    assert verify(first, SECRET) and verify(second, SECRET)


@pytest.mark.parametrize("status", [429, 503])
async def test_http_request_retry_after_is_honoured(
    crm: Conn, matcher: Matcher, runner: Runner, web: WebServer, status: int
) -> None:
    web.reply(Reply(status, {"error": "slow down"}, headers={"Retry-After": "30"}))
    await workflow(crm, {"type": "http_request", "url": web.url()})
    await new_lead(crm)
    await matcher.drain()
    [execution_id] = await execution_ids(crm)
    before = datetime.now(UTC)
    with pytest.raises(StepRetryLater) as retry:
        await run_job(runner, crm, execution_id)
    # Not earlier than the server asked (the back-off's jitter does not shorten it).
    assert retry.value.retry_at >= before + timedelta(seconds=29)
    [step] = await steps(crm, execution_id)
    assert step["status"] == "scheduled" and f"HTTP {status}" in step["error"]
    assert step["scheduled_at"] >= before + timedelta(seconds=29)
    ex = await drive(runner, crm, execution_id)
    assert ex["status"] == "completed"
    [step] = await steps(crm, execution_id)
    assert step["attempts"] == 2
    assert len({r.headers["idempotency-key"] for r in web.requests}) == 1


def test_retry_after_header_forms() -> None:
    from email.utils import format_datetime

    from engine.actions.http_request import retry_after_seconds

    assert retry_after_seconds("12") == 12
    assert retry_after_seconds("-3") == 0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    seconds = retry_after_seconds(later)
    assert seconds is not None and 100 < seconds <= 120


@pytest.mark.parametrize("status", [400, 404, 410, 422])
async def test_http_request_4xx_is_permanent(
    crm: Conn, matcher: Matcher, runner: Runner, web: WebServer, status: int
) -> None:
    web.default = Reply(status, {"error": "nope"})
    await workflow(crm, {"type": "http_request", "url": web.url(), "retry": 5})
    await new_lead(crm)
    ex, [step] = await run_one(crm, matcher, runner)
    assert ex["status"] == "failed"
    assert step["attempts"] == 1 and len(web.requests) == 1
    assert f"HTTP {status}" in step["error"] and "nope" in step["error"]


async def test_http_request_keeps_a_bounded_part_of_the_response(
    crm: Conn, matcher: Matcher, runner: Runner, web: WebServer
) -> None:
    web.default = Reply(200, "x" * 5_000_000)
    await workflow(crm, {"type": "http_request", "url": web.url()})
    await new_lead(crm)
    ex, [step] = await run_one(crm, matcher, runner)
    assert ex["status"] == "completed"
    assert step["result"]["response"] == "x" * 10_000


async def test_http_request_redirect_is_not_followed(
    crm: Conn, matcher: Matcher, runner: Runner, web: WebServer
) -> None:
    web.default = Reply(302, "", headers={"Location": "http://169.254.169.254/latest/meta-data"})
    await workflow(crm, {"type": "http_request", "url": web.url()})
    await new_lead(crm)
    ex, [step] = await run_one(crm, matcher, runner)
    assert ex["status"] == "failed"
    assert step["attempts"] == 1 and len(web.requests) == 1
    assert "redirects are not followed" in step["error"]


async def test_http_request_timeout_fails_the_attempt(
    crm: Conn, matcher: Matcher, runner: Runner, web: WebServer
) -> None:
    web.default = Reply(200, delay=10)
    await apply(
        crm,
        {
            "name": "Slow",
            "trigger": LEAD_CREATED,
            "actions": [
                {
                    "id": "step_timeout",
                    "type": "http_request",
                    "url": web.url(),
                    "timeout": 0.3,
                    "retry": {"max_attempts": 2, "backoff": 0.01},
                    "on_failure": "continue",
                },
                {
                    "id": "request_timeout",
                    "type": "http_request",
                    "url": web.url(),
                    "params": {"timeout": 0.3},
                    "retry": 1,
                },
            ],
        },
    )
    await new_lead(crm)
    started = time.monotonic()
    ex, [by_step, by_request] = await run_one(crm, matcher, runner)
    assert time.monotonic() - started < 5
    assert ex["status"] == "failed"
    assert (by_step["status"], by_step["attempts"], by_step["error"]) == ("failed", 2, "timed out")
    assert (by_request["status"], by_request["attempts"]) == ("failed", 1)
    assert by_request["error"] == "timed out"
    assert len(web.requests) == 3


async def test_http_request_unreachable_is_retried(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    from tests.servers import free_port

    await workflow(
        crm,
        {
            "type": "http_request",
            "url": f"http://127.0.0.1:{free_port()}/",
            "retry": {"max_attempts": 2, "backoff": 0.01},
        },
    )
    await new_lead(crm)
    ex, [step] = await run_one(crm, matcher, runner)
    assert ex["status"] == "failed"
    assert step["attempts"] == 2 and "ConnectError" in step["error"]


SSRF_URLS = [
    "http://127.0.0.1:{port}/hook",
    "http://localhost:{port}/hook",
    "http://[::ffff:127.0.0.1]:{port}/hook",
    "http://2130706433:{port}/hook",
    "http://127.1:{port}/hook",
    "http://{{{{ entity.company }}}}:{port}/hook",
]


async def test_http_request_ssrf_private_addresses_refused(
    crm: Conn,
    matcher: Matcher,
    pool: AsyncConnectionPool,
    settings: Settings,
    web: WebServer,
) -> None:
    """With no allowlist and private addresses not allowed, nothing reaches the local
    server, however its address is written; the refusal is permanent."""
    runner = runner_with(pool, settings, http_allowed_hosts=[], http_allow_private=False)
    for i, url in enumerate(SSRF_URLS):
        await apply(
            crm,
            {
                "name": f"SSRF {i}",
                "trigger": LEAD_CREATED,
                "actions": [{"type": "http_request", "url": url.format(port=web.port), "retry": 3}],
            },
        )
    await new_lead(crm, company="127.0.0.1")
    await matcher.drain()
    for execution_id in await execution_ids(crm):
        ex = await drive(runner, crm, execution_id)
        [step] = await steps(crm, execution_id)
        assert ex["status"] == "failed"
        assert step["attempts"] == 1  # permanent
        assert "non-public address" in step["error"]
    assert web.requests == []


async def test_http_request_allowlist_blocks_other_hosts(
    crm: Conn,
    matcher: Matcher,
    pool: AsyncConnectionPool,
    settings: Settings,
    web: WebServer,
) -> None:
    runner = runner_with(pool, settings, http_allowed_hosts=["hooks.example.com", ".partner.test"])
    await workflow(crm, {"type": "http_request", "url": web.url()})
    await new_lead(crm)
    ex, [step] = await run_one(crm, matcher, runner)
    assert ex["status"] == "failed" and step["attempts"] == 1
    assert "not in CRMFLOW_HTTP_ALLOWED_HOSTS" in step["error"]
    assert web.requests == []
    assert netpolicy.host_listed("api.partner.test", [".partner.test"])
    assert netpolicy.host_listed("partner.test", [".partner.test"])
    assert netpolicy.host_listed("HOOKS.example.com.", ["hooks.example.com"])
    assert not netpolicy.host_listed("evilpartner.test", [".partner.test"])
    assert not netpolicy.host_listed("hooks.example.com.evil.test", ["hooks.example.com"])


async def test_private_addresses_allowed_when_configured(
    crm: Conn,
    matcher: Matcher,
    pool: AsyncConnectionPool,
    settings: Settings,
    web: WebServer,
) -> None:
    runner = runner_with(pool, settings, http_allowed_hosts=[], http_allow_private=True)
    await workflow(crm, {"type": "http_request", "url": web.url()})
    await new_lead(crm)
    ex, _ = await run_one(crm, matcher, runner)
    assert ex["status"] == "completed", ex["error"]
    assert len(web.requests) == 1


async def test_public_only_client_checks_the_address_when_connecting(web: WebServer) -> None:
    """Even past check_url (a name that resolved to a public address a moment ago and
    now resolves to a private one), the connection itself is refused."""
    public_only = Settings(http_allowed_hosts=[], http_allow_private=False)
    for url in (web.url(), f"http://localhost:{web.port}/"):
        async with netpolicy.http_client(public_only, 5.0) as client:
            with pytest.raises(netpolicy.HostNotAllowed):
                await client.get(url)
    assert web.requests == []
    assert not netpolicy._public("169.254.169.254")
    assert not netpolicy._public("::ffff:10.0.0.1")
    assert not netpolicy._public("fd00::1")
    assert not netpolicy._public("0.0.0.0")
    assert not netpolicy._public("100.64.0.1")  # shared address space (carrier NAT)
    assert netpolicy._public("93.184.215.14")


async def test_http_request_checked_at_save(crm: Conn) -> None:
    for action, path in [
        ({"type": "http_request", "url": "file:///etc/passwd"}, "actions[0].url"),
        ({"type": "http_request", "url": "gopher://x/"}, "actions[0].url"),
        ({"type": "http_request", "url": "http://user:pw@hooks.test/"}, "actions[0].url"),
        ({"type": "http_request", "url": "http:///nohost"}, "actions[0].url"),
        ({"type": "http_request", "url": "http://h.test/", "method": "TRACE"}, "actions[0].method"),
        (
            {"type": "http_request", "url": "http://h.test/", "headers": {"Host": "x"}},
            "actions[0].headers.Host",
        ),
        (
            {"type": "http_request", "url": "http://h.test/", "headers": {"idempotency-key": "1"}},
            "actions[0].headers.idempotency-key",
        ),
        (
            {"type": "http_request", "url": "http://h.test/", "headers": {"X-Crmflow-Sig": "1"}},
            "actions[0].headers.X-Crmflow-Sig",
        ),
        (
            {"type": "http_request", "url": "http://h.test/", "body": {"a": ["{{ x.__init__ }}"]}},
            "actions[0].body",
        ),
    ]:
        with pytest.raises(DefinitionError) as exc:
            await workflow(crm, action)
        assert path in refused(exc), action


async def test_http_request_at_least_once_with_a_stable_key(
    crm: Conn,
    matcher: Matcher,
    runner: Runner,
    web: WebServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await workflow(crm, {"type": "http_request", "url": web.url()})
    await new_lead(crm)
    await matcher.drain()
    [execution_id] = await execution_ids(crm)

    async def crash(self: HttpRequest, ctx: Any, params: Any, result: Any) -> Any:
        raise Crash

    monkeypatch.setattr(HttpRequest, "commit", crash)
    with pytest.raises(Crash):
        await run_job(runner, crm, execution_id)
    monkeypatch.undo()
    assert await run_job(runner, crm, execution_id) == "completed"
    first, second = web.requests
    key = f"crmflow-{execution_id}-http_request"
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"] == key
    # Once the step is recorded, running the job again sends nothing.
    await crm.execute(
        "UPDATE crmflow.executions SET status = 'running' WHERE id = %s", [execution_id]
    )
    assert await run_job(runner, crm, execution_id) == "completed"
    assert len(web.requests) == 2


# ───────────────────────────── enrich_lead ─────────────────────────────


async def test_enrich_lead_without_endpoint_is_skipped(
    crm: Conn, matcher: Matcher, runner: Runner
) -> None:
    assert runner.settings.enrichment_url is None
    await workflow(crm, {"type": "enrich_lead"})
    await new_lead(crm, email="e@initech.test")
    ex, [step] = await run_one(crm, matcher, runner)
    assert ex["status"] == "completed"
    assert step["status"] == "skipped"
    assert "CRMFLOW_ENRICHMENT_URL" in step["result"]["reason"]


async def test_enrich_lead_writes_back_known_empty_columns(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings, web: WebServer
) -> None:
    web.default = Reply(
        200,
        {
            "company": "Initech",
            "title": "CTO",
            "employees": 250,
            "industry": "Software",
            "tags": ["saas", "b2b"],
            "phone": None,
            "score": 100,
            "owner_id": 3,
            "linkedin": "https://linkedin.test/initech",
        },
    )
    runner = runner_with(
        pool, settings, enrichment_url=web.url("/enrich"), enrichment_token="tok-123"
    )
    await workflow(crm, {"type": "enrich_lead"})
    lead_id = await new_lead(crm, email="Eve@Initech.test", title="Engineer", phone="+1 555")
    ex, [step] = await run_one(crm, matcher, runner)
    assert ex["status"] == "completed", ex["error"]
    [request] = web.requests
    assert (request.method, request.path) == ("POST", "/enrich")
    assert request.json() == {"email": "Eve@Initech.test", "domain": "initech.test"}
    assert request.headers["idempotency-key"] == f"crmflow-{ex['id']}-enrich_lead"
    assert request.headers["authorization"] == "Bearer tok-123"
    [row] = await fetch(crm, "SELECT * FROM leads WHERE id = %s", lead_id)
    assert row["company"] == "Initech"
    assert row["employees"] == 250
    assert row["industry"] == "Software"
    assert row["tags"] == ["saas", "b2b"]
    assert row["title"] == "Engineer"  # kept: it had a value
    assert row["phone"] == "+1 555"
    assert row["score"] is None and row["owner_id"] is None  # not the enricher's to set
    result = step["result"]
    assert result["updated"] == {
        "company": "Initech",
        "employees": 250,
        "industry": "Software",
        "tags": ["saas", "b2b"],
    }
    assert result["ignored"] == ["linkedin", "owner_id", "score"]
    assert result["old"] == {"company": None, "employees": None, "industry": None, "tags": []}


async def test_enrich_lead_overwrite_fields_and_bad_values(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings, web: WebServer
) -> None:
    web.default = Reply(
        200, {"title": "CTO", "employees": "lots", "company": "Initech", "country": "DE"}
    )
    runner = runner_with(pool, settings, enrichment_url=web.url("/enrich"))
    await workflow(
        crm,
        {"type": "enrich_lead", "overwrite": True, "fields": ["title", "employees", "company"]},
    )
    lead_id = await new_lead(crm, email="e@initech.test", title="Engineer", company="Old")
    ex, [step] = await run_one(crm, matcher, runner)
    assert ex["status"] == "completed", ex["error"]
    [row] = await fetch(crm, "SELECT * FROM leads WHERE id = %s", lead_id)
    assert (row["title"], row["company"], row["employees"], row["country"]) == (
        "CTO",
        "Initech",
        None,
        None,
    )
    assert step["result"]["invalid"] == ["employees"]
    assert step["result"]["ignored"] == ["country"]


@pytest.mark.parametrize(
    ("reply", "status", "attempts", "text"),
    [
        (Reply(404, {"error": "unknown"}), "skipped", 1, "knows nothing"),
        (Reply(200, "<html>not json</html>"), "failed", 1, "did not answer JSON"),
        (Reply(200, [1, 2]), "failed", 1, "JSON object"),
        (Reply(401, {"error": "bad token"}), "failed", 1, "401"),
        (Reply(500, {"error": "down"}), "failed", 2, "500"),
    ],
)
async def test_enrich_lead_endpoint_answers(
    crm: Conn,
    matcher: Matcher,
    pool: AsyncConnectionPool,
    settings: Settings,
    web: WebServer,
    reply: Reply,
    status: str,
    attempts: int,
    text: str,
) -> None:
    web.default = reply
    runner = runner_with(pool, settings, enrichment_url=web.url("/enrich"))
    await workflow(crm, {"type": "enrich_lead", "retry": {"max_attempts": 2, "backoff": 0.01}})
    await new_lead(crm, email="e@initech.test")
    _, [step] = await run_one(crm, matcher, runner)
    assert (step["status"], step["attempts"]) == (status, attempts)
    assert text in (step["error"] or step["result"]["reason"])


async def test_enrich_lead_retried_then_succeeds_with_the_same_key(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings, web: WebServer
) -> None:
    web.reply(Reply(503, {}, headers={"Retry-After": "1"}))
    web.default = Reply(200, {"industry": "Retail"})
    runner = runner_with(pool, settings, enrichment_url=web.url("/enrich"))
    await workflow(crm, {"type": "enrich_lead"})
    lead_id = await new_lead(crm, email="e@shop.test")
    ex, [step] = await run_one(crm, matcher, runner)
    assert ex["status"] == "completed"
    assert step["attempts"] == 2
    assert len({r.headers["idempotency-key"] for r in web.requests}) == 1
    assert await value(crm, "SELECT industry FROM leads WHERE id = %s", lead_id) == "Retail"


async def test_enrich_lead_without_email_is_skipped(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings, web: WebServer
) -> None:
    runner = runner_with(pool, settings, enrichment_url=web.url("/enrich"))
    await workflow(crm, {"type": "enrich_lead"})
    await new_lead(crm)
    _, [step] = await run_one(crm, matcher, runner)
    assert step["status"] == "skipped" and "no email" in step["result"]["reason"]
    assert web.requests == []


async def test_enrich_lead_compensation_restores(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings, web: WebServer
) -> None:
    web.default = Reply(200, {"industry": "Retail", "company": "Shop"})
    runner = runner_with(pool, settings, enrichment_url=web.url("/enrich"))
    await workflow(
        crm,
        {"type": "enrich_lead"},
        {
            "type": "update_field",
            "field": "employees",
            "value": "{{ entity.name }}",
            "retry": 1,
            "on_failure": "compensate",
        },
    )
    lead_id = await new_lead(crm, email="e@shop.test")
    ex, [enrich, _] = await run_one(crm, matcher, runner)
    assert ex["status"] == "failed"
    assert enrich["status"] == "compensated"
    [row] = await fetch(crm, "SELECT industry, company FROM leads WHERE id = %s", lead_id)
    assert row == {"industry": None, "company": None}


async def test_seed_workflow_qualifies_then_enriches(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings, web: WebServer
) -> None:
    web.default = Reply(200, {"employees": 120, "country": "FR"})
    runner = runner_with(pool, settings, enrichment_url=web.url("/enrich"))
    await apply(crm, SEED_QUALIFY)
    lead_id = await new_lead(
        crm, source="website_form", email="ana@acme.test", company="Acme", title="Head of IT"
    )
    await matcher.drain()
    [execution_id] = await execution_ids(crm)
    assert await run_job(runner, crm, execution_id) == "waiting"  # enrich_lead waits 60 s
    [qualify, enrich] = await steps(crm, execution_id)
    assert qualify["status"] == "succeeded" and enrich["status"] == "scheduled"
    assert web.requests == []
    ex = await drive(runner, crm, execution_id)
    assert ex["status"] == "completed"
    [row] = await fetch(
        crm, "SELECT score, status, employees, country FROM leads WHERE id = %s", lead_id
    )
    assert row == {"score": 80, "status": "qualified", "employees": 120, "country": "FR"}


async def test_external_actions_end_to_end_with_a_worker(
    crm: Conn,
    db_url: str,
    settings: Settings,
    smtp: SmtpServer,
    web: WebServer,
) -> None:
    await workflow(
        crm,
        {"type": "send_email", "to": "owner", "subject": "Lead {{ entity.name }}", "body": "b"},
        {"type": "http_request", "url": web.url(), "body": {"name": "{{ entity.name }}"}},
    )
    for i in range(4):
        await new_lead(crm, name=f"N{i}", owner_id=1)
    worker_settings = with_settings(
        settings, smtp_host="127.0.0.1", smtp_port=smtp.port, webhook_secret=SECRET
    )
    async with running_worker(db_url, settings=worker_settings, concurrency=4):
        executions = await wait_executions_settled(crm, expected=4)
    assert [e["status"] for e in executions] == ["completed"] * 4
    assert sorted(m.message["Subject"] for m in smtp.received) == [f"Lead N{i}" for i in range(4)]
    assert sorted(r.json()["name"] for r in web.requests) == [f"N{i}" for i in range(4)]
    assert all(verify(r, SECRET) for r in web.requests)
    keys = {r.headers["idempotency-key"] for r in web.requests}
    assert keys == {f"crmflow-{e['id']}-http_request" for e in executions}
