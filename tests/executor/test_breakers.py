"""Circuit breakers of the external actions (engine/breakers.py), on real PostgreSQL and
a real local HTTP server: the state machine (closed, open, half-open probe, growing open
periods), the state shared by processes through crmflow.circuit_breakers (and no
database round trip per call while closed), what counts as a failure, each action's
target host, and the state in /health, /metrics and the dashboard."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import aiosmtplib
import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from engine import breakers, http, metrics, templates
from engine.actions.base import PermanentError, Skip
from engine.actions.enrich_lead import EnrichLead
from engine.actions.http_request import HttpRequest, RetryAfter
from engine.actions.send_email import SendEmail
from engine.breakers import Breakers, verdict
from engine.config import Settings
from tests.helpers import fetch
from tests.servers import Reply, WebServer, free_port

Conn = psycopg.AsyncConnection[Any]
HOST = "api.partner.test"


def breaker_settings(settings: Settings, **changes: Any) -> Settings:
    values = {
        "breaker_failures": 3,
        "breaker_open_seconds": 0.5,
        "breaker_max_open_seconds": 1.2,
        "breaker_probe_timeout": 2.0,
        **changes,
    }
    return settings.model_copy(update=values)


async def row(conn: Conn, host: str = HOST) -> dict[str, Any] | None:
    rows = await fetch(conn, "SELECT * FROM crmflow.circuit_breakers WHERE host = %s", host)
    return rows[0] if rows else None


async def fail(b: Breakers, times: int, host: str = HOST) -> None:
    for _ in range(times):
        assert await b.admit(host) is None
        await b.record(host, False, error="HTTP 500 from the test")


async def wait_past(moment: datetime) -> None:
    await asyncio.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()) + 0.05)


def transitions(host: str, state: str) -> float:
    return metrics.BREAKER_TRANSITIONS.labels(host, state)._value.get()


# ───────────────────────────── the state machine ─────────────────────────────


async def test_consecutive_failures_open_then_probe_reopens_longer_then_closes(
    pool: AsyncConnectionPool, settings: Settings, conn: Conn
) -> None:
    b = Breakers(pool, breaker_settings(settings))
    opened_before = transitions(HOST, "open")

    # Failures interrupted by a success do not open it; a 4xx is an answer, not a failure.
    await fail(b, 2)
    await b.record(HOST, verdict(PermanentError("HTTP 404 from the test")))
    await fail(b, 2)
    assert b.state(HOST) == "closed" and await row(conn) is None

    # The third consecutive failure opens it: no call, come back at the end of the period.
    started = datetime.now(UTC)
    await fail(b, 1)
    opened = await row(conn)
    assert opened is not None
    assert (opened["state"], opened["trips"], opened["failures"]) == ("open", 1, 3)
    assert opened["opened_total"] == 1 and opened["last_error"] == "HTTP 500 from the test"
    wait_until = await b.admit(HOST)
    assert wait_until == opened["retry_at"]
    assert started + timedelta(seconds=0.45) <= wait_until <= started + timedelta(seconds=1)
    assert transitions(HOST, "open") == opened_before + 1

    # After the period one call goes (the probe); the others wait for its deadline.
    await wait_past(wait_until)
    assert await b.admit(HOST) is None
    probing = await row(conn)
    assert probing is not None and probing["state"] == "half_open"
    assert probing["probe_owner"] == b.owner
    deadline = await b.admit(HOST)
    assert deadline == probing["retry_at"] and deadline > datetime.now(UTC) + timedelta(seconds=1)

    # The probe fails: open again, twice as long (0.5 s -> 1 s).
    await b.record(HOST, False, error="timed out")
    again = await row(conn)
    assert again is not None and (again["state"], again["trips"]) == ("open", 2)
    period = (again["retry_at"] - again["opened_at"]).total_seconds()
    assert period == pytest.approx(1.0, abs=0.01)

    # And again: twice as long, but at most the cap (1.2 s).
    await wait_past(again["retry_at"])
    assert await b.admit(HOST) is None
    await b.record(HOST, False)
    third = await row(conn)
    assert third is not None and (third["state"], third["trips"]) == ("open", 3)
    assert (third["retry_at"] - third["opened_at"]).total_seconds() == pytest.approx(1.2, abs=0.01)
    assert third["opened_total"] == 3

    # A successful probe closes it; calls go again, counting from zero.
    await wait_past(third["retry_at"])
    assert await b.admit(HOST) is None
    await b.record(HOST, True)
    closed = await row(conn)
    assert closed is not None and (closed["state"], closed["trips"]) == ("closed", 0)
    assert closed["retry_at"] is None and closed["opened_total"] == 3
    assert b.state(HOST) == "closed" and await b.admit(HOST) is None
    await fail(b, 2)
    assert (await row(conn) or {})["state"] == "closed"
    assert transitions(HOST, "closed") >= 1 and transitions(HOST, "half_open") >= 3


async def test_a_probe_that_makes_no_call_lets_the_next_caller_probe(
    pool: AsyncConnectionPool, settings: Settings, conn: Conn
) -> None:
    b = Breakers(pool, breaker_settings(settings))
    await fail(b, 3)
    await wait_past((await row(conn) or {})["retry_at"])
    assert await b.admit(HOST) is None  # the probe
    assert await b.admit(HOST) is not None
    await b.record(HOST, verdict(Skip("the lead has no email address")))
    assert await b.admit(HOST) is None  # the next probe, at once
    assert (await row(conn) or {})["state"] == "half_open"


async def test_breakers_off_and_calls_without_a_host(
    pool: AsyncConnectionPool, settings: Settings, conn: Conn
) -> None:
    off = Breakers(pool, breaker_settings(settings, breaker_failures=0))
    await fail(off, 10)
    assert await off.admit(HOST) is None
    on = Breakers(pool, breaker_settings(settings))
    for _ in range(10):
        assert await on.admit(None) is None
        await on.record(None, False)
    assert await fetch(conn, "SELECT * FROM crmflow.circuit_breakers") == []


# ───────────────────────────── shared by processes ─────────────────────────────


async def test_two_processes_share_an_opened_breaker_through_the_table(
    pool: AsyncConnectionPool, settings: Settings, conn: Conn
) -> None:
    s = breaker_settings(settings, breaker_open_seconds=1.5)
    a, b = Breakers(pool, s), Breakers(pool, s)
    assert await b.admit(HOST) is None  # b has read the table: nothing open
    await fail(a, 3)
    retry_at = (await row(conn) or {})["retry_at"]
    assert await a.admit(HOST) == retry_at
    # b reads the table at most once a second: within a second it waits too.
    assert await b.admit(HOST) is None
    await asyncio.sleep(breakers.REFRESH_SECONDS + 0.05)
    assert await b.admit(HOST) == retry_at

    # After the period exactly one of them probes; the other waits for the probe.
    await wait_past(retry_at)
    first, second = await asyncio.gather(a.admit(HOST), b.admit(HOST))
    assert [first, second].count(None) == 1
    prober, waiter = (a, b) if first is None else (b, a)
    assert await waiter.admit(HOST) is not None
    await prober.record(HOST, True)
    # The other process sees it closed at its next read.
    await asyncio.sleep(breakers.REFRESH_SECONDS + 0.05)
    assert await waiter.admit(HOST) is None
    assert waiter.state(HOST) == "closed"


async def test_a_probe_whose_process_died_is_taken_over_after_its_deadline(
    pool: AsyncConnectionPool, settings: Settings, conn: Conn
) -> None:
    s = breaker_settings(settings, breaker_probe_timeout=0.6)
    gone, alive = Breakers(pool, s), Breakers(pool, s)
    await fail(gone, 3)
    await wait_past((await row(conn) or {})["retry_at"])
    assert await gone.admit(HOST) is None  # the probe; then its process dies
    del gone
    deadline = await alive.admit(HOST)
    assert deadline is not None
    await wait_past(deadline)
    assert await alive.admit(HOST) is None
    assert (await row(conn) or {})["probe_owner"] == alive.owner


async def test_never_a_time_in_the_past_a_slow_probe_past_its_deadline_lets_another_go(
    pool: AsyncConnectionPool, settings: Settings, conn: Conn
) -> None:
    b = Breakers(pool, breaker_settings(settings, breaker_probe_timeout=0.3))
    await fail(b, 3)
    await wait_past((await row(conn) or {})["retry_at"])
    assert await b.admit(HOST) is None  # the probe, still out after its deadline
    deadline = await b.admit(HOST)
    assert deadline is not None and deadline > datetime.now(UTC)
    await wait_past(deadline)
    assert await b.admit(HOST) is None  # a second probe, not "come back in the past"
    await b.record(HOST, True)
    assert b.state(HOST) == "closed"


async def test_no_database_round_trip_per_call_while_closed(
    pool: AsyncConnectionPool, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = Breakers(pool, breaker_settings(settings))
    used = 0
    real = breakers.db.autocommit

    def counting(p: AsyncConnectionPool) -> Any:
        nonlocal used
        used += 1
        return real(p)

    monkeypatch.setattr(breakers.db, "autocommit", counting)
    started = time.monotonic()
    for i in range(2000):
        host = f"host{i % 20}.test"
        assert await b.admit(host) is None
        await b.record(host, i % 3 != 0)  # failures, never three in a row
    assert time.monotonic() - started < breakers.REFRESH_SECONDS
    assert used <= 1  # the one read of the other processes' breakers


async def test_without_the_database_the_breaker_works_in_memory(
    settings: Settings,
) -> None:
    from engine import db

    unreachable = db.create_pool(
        "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=1", settings, min_size=0
    )
    await unreachable.open(wait=False)
    try:
        b = Breakers(unreachable, breaker_settings(settings))
        b.pool.timeout = 0.2
        await fail(b, 3)
        assert b.state(HOST) == "open"
        assert await b.admit(HOST) is not None
    finally:
        await unreachable.close()


# ───────────────────────────── a real failing server ─────────────────────────────


def fake_ctx(settings: Settings, **extra: Any) -> Any:
    """What HttpRequest.run and EnrichLead.run read of their step context."""
    context = {"execution": {"id": 1}, "event": {}, "entity": {}}
    return SimpleNamespace(
        settings=settings,
        idempotency_key="crmflow-1-hook",
        execution_id=1,
        step=SimpleNamespace(timeout=None),
        row={"email": "e@shop.test"},
        render=lambda text: templates.render(text, context) if text is not None else None,
        render_value=lambda value: templates.render_value(value, context),
        template_context=lambda: context,
        **extra,
    )


async def call(b: Breakers, action: Any, params: Any, ctx: Any) -> datetime | None:
    """One external step as the executor runs it: admit, call, record."""
    host = action.target_host(params, ctx)
    wait_until = await b.admit(host)
    if wait_until is not None:
        return wait_until
    try:
        await action.run(ctx, params)
    except BaseException as exc:
        await b.record(host, verdict(exc), error=str(exc))
        return None
    await b.record(host, True)
    return None


async def test_a_failing_server_gets_no_requests_while_open_until_the_probe(
    pool: AsyncConnectionPool, settings: Settings, conn: Conn, web: WebServer
) -> None:
    web.default = Reply(500, {"error": "down"})
    s = breaker_settings(settings, breaker_failures=5, breaker_open_seconds=1.0)
    b = Breakers(pool, s)
    action = HttpRequest()
    params = action.parse({"url": web.url("/hook?n={{ execution.id }}")})
    ctx = fake_ctx(s)
    host = action.target_host(params, ctx)
    assert host == f"127.0.0.1:{web.port}"

    for _ in range(5):
        assert await call(b, action, params, ctx) is None
    assert len(web.requests) == 5
    waits = [await call(b, action, params, ctx) for _ in range(50)]
    assert all(w is not None for w in waits) and len(set(waits)) == 1
    assert len(web.requests) == 5  # no request while open
    opened = await row(conn, host)
    assert opened is not None and opened["state"] == "open"
    assert "HTTP 500" in opened["last_error"]

    # The server recovers; after the open period one probe reaches it, and closes it.
    web.default = Reply(200, {"ok": True})
    await wait_past(waits[0])
    assert await call(b, action, params, ctx) is None
    assert len(web.requests) == 6
    assert (await row(conn, host) or {})["state"] == "closed"
    for _ in range(3):
        assert await call(b, action, params, ctx) is None
    assert len(web.requests) == 9
    await http.close_clients()


async def test_4xx_answers_do_not_open_it_but_refused_connections_and_timeouts_do(
    pool: AsyncConnectionPool, settings: Settings, conn: Conn, web: WebServer
) -> None:
    web.default = Reply(404, {"error": "nope"})
    s = breaker_settings(settings)
    b = Breakers(pool, s)
    action = HttpRequest()
    ctx = fake_ctx(s)
    not_found = action.parse({"url": web.url()})
    for _ in range(6):
        assert await call(b, action, not_found, ctx) is None
    assert len(web.requests) == 6 and await row(conn, f"127.0.0.1:{web.port}") is None

    refused = action.parse({"url": f"http://127.0.0.1:{free_port()}/"})
    for _ in range(3):
        assert await call(b, action, refused, ctx) is None
    assert await call(b, action, refused, ctx) is not None

    web.default = Reply(200, delay=2)
    slow = action.parse({"url": web.url("/slow"), "timeout": 0.2})
    for _ in range(3):
        assert await call(b, action, slow, ctx) is None
    assert await call(b, action, slow, ctx) is not None
    assert (await row(conn, f"127.0.0.1:{web.port}") or {})["state"] == "open"
    await http.close_clients()


async def test_enrichment_endpoint_breaker(
    pool: AsyncConnectionPool, settings: Settings, web: WebServer
) -> None:
    web.default = Reply(503, {})
    s = breaker_settings(settings).model_copy(update={"enrichment_url": web.url("/enrich")})
    b = Breakers(pool, s)
    action = EnrichLead()
    params = action.parse({})
    ctx = fake_ctx(s)
    assert action.target_host(params, ctx) == f"127.0.0.1:{web.port}"
    for _ in range(3):
        assert await call(b, action, params, ctx) is None
    assert await call(b, action, params, ctx) is not None
    assert len(web.requests) == 3
    await http.close_clients()


# ───────────────────────────── verdicts and hosts ─────────────────────────────


def test_what_counts_as_a_failure() -> None:
    from engine import netpolicy

    assert verdict(None) is True
    assert verdict(PermanentError("HTTP 404 from x")) is True
    for failure in (
        RetryAfter("HTTP 429 from x", 30),
        TimeoutError("timed out"),
        RuntimeError("ConnectError calling x"),
        RuntimeError("HTTP 502 from x"),
        ConnectionRefusedError(),
        httpx.ConnectError("refused"),
        aiosmtplib.SMTPConnectError("no"),
        aiosmtplib.SMTPResponseException(421, "try later"),
    ):
        assert verdict(failure) is False, failure
    for neutral in (
        Skip("no endpoint"),
        templates.TemplateProblem("bad template"),
        asyncio.CancelledError(),
        netpolicy.HostNotAllowed("non-public address"),
        KeyError("a bug"),
    ):
        assert verdict(neutral) is None, neutral
    try:
        try:
            raise netpolicy.HostNotAllowed("10.0.0.1 resolves to a non-public address")
        except netpolicy.HostNotAllowed as exc:
            raise PermanentError(str(exc)) from None
    except PermanentError as refused:
        assert verdict(refused) is None  # refused before any connection


def test_target_hosts(settings: Settings) -> None:
    assert breakers.url_host("https://API.Example.com/x") == "api.example.com"
    assert breakers.url_host("https://api.example.com:443/x") == "api.example.com"
    assert breakers.url_host("http://api.example.com:8080/x") == "api.example.com:8080"
    assert breakers.url_host("http://[2001:db8::1]:81/") == "[2001:db8::1]:81"
    assert breakers.url_host("http://host.test./") == "host.test"
    assert breakers.url_host(None) is None and breakers.url_host("not a url") is None
    ctx = fake_ctx(settings)
    hook = HttpRequest()
    templated = hook.parse({"url": "https://{{ entity.missing.deeper }}.test/"})
    assert hook.target_host(hook.parse({"url": "https://h.test/a"}), ctx) == "h.test"
    assert hook.target_host(templated, ctx) in (None, ".test")
    enrich = EnrichLead()
    assert enrich.target_host(enrich.parse({}), ctx) is None  # no endpoint: skipped
    mail = SendEmail()
    smtp = fake_ctx(settings.model_copy(update={"smtp_host": "Mail.Test", "smtp_port": 587}))
    params = mail.parse({"to": "a@b.test", "subject": "s", "body": "b"})
    assert mail.target_host(params, smtp) == "mail.test:587"
    from engine.actions.base import Action

    assert Action().target_host(None, ctx) is None


# ───────────────────────────── /health, /metrics, dashboard ─────────────────────────────


async def test_health_metrics_and_dashboard_show_an_open_breaker(
    pool: AsyncConnectionPool,
    settings: Settings,
    conn: Conn,
    client: httpx.AsyncClient,
    api_app: Any,
    api_keys: dict[str, str],
) -> None:
    await conn.execute("INSERT INTO crmflow.workers (hostname, pid) VALUES ('h', 1)")
    healthy = (await client.get("/health")).json()
    assert healthy["status"] == "ok" and healthy["circuit_breakers"] == []

    b = Breakers(pool, breaker_settings(settings, breaker_open_seconds=60))
    await fail(b, 3)
    await fail(b, 3, host="mail.test:25")
    body = (await client.get("/health")).json()
    assert body["status"] == "degraded"
    listed = {x["host"]: x for x in body["circuit_breakers"]}
    assert set(listed) == {HOST, "mail.test:25"}
    assert listed[HOST]["state"] == "open" and listed[HOST]["trips"] == 1
    assert listed[HOST]["last_error"] == "HTTP 500 from the test"
    assert datetime.fromisoformat(listed[HOST]["retry_at"]) > datetime.now(UTC)

    text = (await client.get("/metrics")).text
    assert f'crmflow_circuit_breaker_state{{host="{HOST}"}} 2.0' in text
    assert f'crmflow_circuit_breaker_opened_total{{host="{HOST}"}} 1.0' in text

    from tests.api.test_ui_sessions import log_in, ui_client

    async with ui_client(api_app) as ui:
        await log_in(ui, api_keys["read"])
        page = (await ui.get("/ui")).text
        assert "Circuit breakers" in page and HOST in page and "mail.test:25" in page
        assert "open" in page and "HTTP 500 from the test" in page

    # Closed again: /health is ok, the dashboard section is gone, the gauge says 0.
    for host in (HOST, "mail.test:25"):
        await conn.execute(
            "UPDATE crmflow.circuit_breakers SET retry_at = now() WHERE host = %s", [host]
        )
        b._hosts[host].retry_at = datetime.now(UTC)
        assert await b.admit(host) is None
        await b.record(host, True)
    body = (await client.get("/health")).json()
    assert body["status"] == "ok" and body["circuit_breakers"] == []
    async with ui_client(api_app) as ui:
        await log_in(ui, api_keys["read"])
        assert "Circuit breakers" not in (await ui.get("/ui")).text
    text = (await client.get("/metrics")).text
    assert f'crmflow_circuit_breaker_state{{host="{HOST}"}} 0.0' in text
