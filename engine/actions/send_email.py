"""send_email: an email over SMTP (external action: at-least-once).

The Message-ID is derived from the step's idempotency key, and the key is also sent
as ``X-Crmflow-Idempotency-Key``, so a receiver can drop a duplicate sent again after
a crash. Named templates live in ``crmflow.email_templates``; subjects and bodies
render in the sandboxed Jinja2 environment, HTML bodies with autoescaping.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import Any

import aiosmtplib
from pydantic import Field, model_validator

from engine import db, smtp
from engine.actions.base import Action, Params, PermanentError, Skip
from engine.actions.crm import check_owner_field, check_templates, fetch_all, resolve_users
from engine.config import Settings
from engine.executor.context import StepContext
from engine.model import Issue


class SendEmailParams(Params):
    to: str = Field(min_length=1, max_length=1000)  # address template, "owner" or "role:<role>"
    cc: str | None = None
    subject: str | None = Field(None, max_length=1000)
    body: str | None = Field(None, max_length=100_000)
    html: str | None = Field(None, max_length=200_000)
    template: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    reply_to: str | None = None
    owner_field: str = "owner_id"

    @model_validator(mode="after")
    def _content(self) -> SendEmailParams:
        if self.template is None and (self.subject is None or self.body is None):
            raise ValueError("give a 'template' name, or a 'subject' and a 'body'")
        return self


class SendEmail(Action):
    name = "send_email"
    Params = SendEmailParams
    kind = "external"
    description = "Send an email over SMTP (CRMFLOW_SMTP_* settings)."

    def check_entity(self, params: Any, entity: Any, path: str) -> list[Issue]:
        issues = check_templates(
            {
                "to": params.to,
                "cc": params.cc,
                "subject": params.subject,
                "body": params.body,
                "html": params.html,
            },
            path,
        )
        if params.to == "owner":
            issues += check_owner_field(entity, params.owner_field, f"{path}.to", "to")
        return issues

    async def _recipients(self, ctx: StepContext, spec: str | None, owner_field: str) -> list[str]:
        if not spec:
            return []
        if spec == "owner" or spec.startswith("role:"):
            return [u["email"] for u in await resolve_users(ctx, spec, owner_field) if u["email"]]
        rendered = ctx.render(spec) or ""
        addresses = [a.strip() for a in rendered.split(",") if a.strip()]
        for address in addresses:
            if "\r" in address or "\n" in address or "@" not in parseaddr(address)[1]:
                raise PermanentError(f"{address[:200]!r} is not an email address")
        return addresses

    def target_host(self, params: Any, ctx: StepContext) -> str | None:
        """The SMTP server (host and port): every email goes through it."""
        return f"{ctx.settings.smtp_host.lower()}:{ctx.settings.smtp_port}"

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        subject, body, html = await _subject_and_bodies(ctx, params)
        to = await self._recipients(ctx, params.to, params.owner_field)
        if not to:
            raise PermanentError(f"no recipient for {params.to!r}")
        cc = await self._recipients(ctx, params.cc, params.owner_field)
        to, cc, suppressed = await _not_unsubscribed(ctx, to, cc)
        domain = ctx.settings.email_from.rpartition("@")[2] or "crmflow"
        message_id = f"<{ctx.idempotency_key}@{domain}>"
        message = _message(ctx, params, to, cc, subject, body, html, message_id)
        refused = await _send(ctx.settings, message)
        result: dict[str, Any] = {"message_id": message_id, "to": to, "cc": cc}
        if suppressed:
            result["suppressed"] = suppressed  # on the list "unsubscribed": not sent to
        if refused:  # some recipients refused, the others accepted: it was sent
            result["refused"] = {rcpt: f"{r.code} {r.message}" for rcpt, r in refused.items()}
        return result


async def _subject_and_bodies(
    ctx: StepContext, params: Any
) -> tuple[str | None, str | None, str | None]:
    """Subject, text and HTML body: the step's own, else its template's."""
    subject, body, html = params.subject, params.body, params.html
    if params.template:
        rows = await fetch_all(
            ctx,
            "SELECT subject, body_text, body_html FROM crmflow.email_templates WHERE name = %(n)s",
            {"n": params.template},
        )
        if not rows:
            raise PermanentError(f"no email template named {params.template!r}")
        subject = subject or rows[0]["subject"]
        body = body or rows[0]["body_text"]
        html = html or rows[0]["body_html"]
    return subject, body, html


async def _not_unsubscribed(
    ctx: StepContext, to: list[str], cc: list[str]
) -> tuple[list[str], list[str], list[str]]:
    """The recipients not on the list "unsubscribed" (engine/suppressions.py), and those
    left out; Skip when no "to" is left."""
    rows = await fetch_all(
        ctx,
        db.query("unsubscribed", "suppressions.sql"),
        {"addresses": [_address(a) for a in to + cc]},
    )
    unsubscribed = {r["address"] for r in rows}
    suppressed = [a for a in to + cc if _address(a) in unsubscribed]
    if suppressed:
        to = [a for a in to if _address(a) not in unsubscribed]
        cc = [a for a in cc if _address(a) not in unsubscribed]
        if not to:  # the copies alone are not worth a message meant for the others
            raise Skip(
                "suppressed: every recipient is on the list 'unsubscribed' "
                f"({', '.join(suppressed)[:500]}); nothing was sent"
            )
    return to, cc, suppressed


def _message(
    ctx: StepContext,
    params: Any,
    to: list[str],
    cc: list[str],
    subject: str | None,
    body: str | None,
    html: str | None,
    message_id: str,
) -> EmailMessage:
    """The message, its templates rendered; PermanentError for a header the email
    package refuses."""
    settings = ctx.settings
    try:
        message = EmailMessage()
        message["From"] = settings.email_from
        message["To"] = ", ".join(to)
        if cc:
            message["Cc"] = ", ".join(cc)
        if params.reply_to:
            message["Reply-To"] = _one_line(ctx.render(params.reply_to) or "")
        message["Subject"] = _one_line(ctx.render(subject) or "")
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = message_id
        message["X-Crmflow-Idempotency-Key"] = ctx.idempotency_key
        message.set_content(ctx.render(body) or "")
        if html:
            # Values are escaped in HTML: a lead named "<a href=...>" stays text.
            html_text = ctx.render("{% autoescape true %}" + html + "{% endautoescape %}")
            message.add_alternative(html_text or "", subtype="html")
    except (ValueError, TypeError) as exc:  # a header the email package refuses
        raise PermanentError(f"cannot build the message: {exc}") from None
    return message


async def _send(settings: Settings, message: EmailMessage) -> dict[str, Any]:
    """Send through the SMTP server; the recipients it refused while accepting others.
    A refusal of all (5xx) is permanent, a 4xx one is retried."""
    password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
    try:
        # A kept-open session to the server (engine/smtp.py), as aiosmtplib.send would.
        refused, _ = await smtp.send(
            message,
            hostname=settings.smtp_host,
            port=settings.smtp_port,
            username=settings.smtp_username,
            password=password,
            use_tls=settings.smtp_use_tls,
            start_tls=settings.smtp_start_tls or None,
            timeout=settings.smtp_timeout,
        )
    except aiosmtplib.SMTPRecipientsRefused as exc:
        codes = [r.code for r in exc.recipients]
        text = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
        if all(500 <= code < 600 for code in codes):
            raise PermanentError(f"SMTP refused the recipients: {text}") from None
        raise RuntimeError(f"SMTP refused the recipients for now: {text}") from None
    except aiosmtplib.SMTPResponseException as exc:
        if 500 <= exc.code < 600:
            raise PermanentError(f"SMTP refused the message: {exc.code} {exc.message}") from None
        raise
    return refused


def _address(text: str) -> str:
    """The bare address of "Name <a@b>" or "a@b", lowercased (as the list compares)."""
    return (parseaddr(text)[1] or text).strip().lower()


def _one_line(text: str) -> str:
    return " ".join(text.splitlines()).strip()


ACTION = SendEmail()
