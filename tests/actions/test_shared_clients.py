"""The external actions share one HTTP client per process (per event loop and network
policy): calls to the same host reuse a kept-alive connection instead of opening one per
call, and the SSRF policy still holds for every request (tests/actions/test_netpolicy.py and
tests/actions/test_actions_external.py test the policy itself)."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from engine import http, netpolicy
from engine.config import Settings
from engine.matcher import Matcher
from tests.actions.test_actions_external import LEAD_CREATED, new_lead, runner_with
from tests.helpers import apply, drive, execution_ids, steps
from tests.servers import WebServer

Conn = psycopg.AsyncConnection[Any]


async def test_http_request_steps_reuse_one_connection(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings, web: WebServer
) -> None:
    runner = runner_with(pool, settings)
    await apply(
        crm,
        {
            "name": "Hook",
            "trigger": LEAD_CREATED,
            "actions": [{"type": "http_request", "url": web.url()}],
        },
    )
    for i in range(3):
        await new_lead(crm, name=f"Lead {i}")
    await matcher.drain()
    for execution_id in await execution_ids(crm):
        ex = await drive(runner, crm, execution_id)
        assert ex["status"] == "completed", ex["error"]
    assert len(web.requests) == 3
    assert len({r.peer for r in web.requests}) == 1, [r.peer for r in web.requests]
    await http.close_clients()


async def test_enrich_lead_reuses_the_connection(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings, web: WebServer
) -> None:
    from tests.servers import Reply

    web.default = Reply(200, {"industry": "Retail"})
    runner = runner_with(pool, settings, enrichment_url=web.url("/enrich"))
    await apply(
        crm, {"name": "Enrich", "trigger": LEAD_CREATED, "actions": [{"type": "enrich_lead"}]}
    )
    for i in range(2):
        await new_lead(crm, name=f"Lead {i}", email=f"l{i}@shop.test")
    await matcher.drain()
    for execution_id in await execution_ids(crm):
        ex = await drive(runner, crm, execution_id)
        assert ex["status"] == "completed", ex["error"]
        [step] = await steps(crm, execution_id)
        assert step["result"]["updated"] == {"industry": "Retail"}
    assert len(web.requests) == 2 and len({r.peer for r in web.requests}) == 1
    await http.close_clients()


async def test_one_client_per_loop_and_policy_closed_at_stop() -> None:
    checked, unchecked = http.get_client(True), http.get_client(False)
    assert checked is not unchecked
    assert http.get_client(True) is checked and http.get_client(False) is unchecked
    assert not checked.follow_redirects and not unchecked.follow_redirects
    await http.close_clients()
    assert checked.is_closed and unchecked.is_closed
    fresh = http.get_client(True)
    assert fresh is not checked and not fresh.is_closed

    def in_another_loop() -> bool:
        async def other() -> bool:
            client = http.get_client(True)
            await http.close_clients()
            return client is not fresh

        return asyncio.run(other())

    assert await asyncio.to_thread(in_another_loop)
    await http.close_clients()


async def test_the_shared_checked_client_refuses_private_addresses_at_connect(
    web: WebServer,
) -> None:
    """The public-only client checks every new connection's address, however the name
    resolves (the DNS rebinding defence), shared or not."""
    client = http.get_client(netpolicy.public_only(Settings(http_allowed_hosts=[])))
    for url in (web.url(), f"http://localhost:{web.port}/"):
        with pytest.raises(netpolicy.HostNotAllowed):
            await client.get(url)
    assert web.requests == []
    assert not netpolicy.public_only(Settings(http_allowed_hosts=["127.0.0.1"]))
    assert not netpolicy.public_only(Settings(http_allow_private=True))
    await http.close_clients()


async def test_a_kept_alive_checked_connection_stays_with_its_checked_address(
    web: WebServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 127.0.0.1 taken for public, two requests share one connection; once it is
    refused again, http_request's per-request check (check_url) refuses the URL before
    any request, and a new connection is refused when connecting."""
    monkeypatch.setattr(netpolicy, "_public", lambda address: True)
    client = http.get_client(True)
    for _ in range(2):
        assert (await client.get(web.url())).status_code == 200
    assert len({r.peer for r in web.requests}) == 1
    monkeypatch.undo()
    public_only = Settings(http_allowed_hosts=[], http_allow_private=False)
    with pytest.raises(netpolicy.HostNotAllowed):
        await netpolicy.check_url(web.url(), public_only)
    await http.close_clients()
    with pytest.raises(netpolicy.HostNotAllowed):
        await http.get_client(True).get(web.url())
    assert len(web.requests) == 2
    await http.close_clients()


# ───────────────────────────── SMTP sessions ─────────────────────────────


async def send_emails(
    crm: Conn, matcher: Matcher, runner: Any, count: int, *, first: int = 0
) -> list[dict[str, Any]]:
    for i in range(first, first + count):
        await new_lead(crm, name=f"Lead {i}", email=f"lead{i}@initech.test")
    await matcher.drain()
    done = []
    for execution_id in sorted(await execution_ids(crm))[first:]:
        ex = await drive(runner, crm, execution_id)
        [step] = await steps(crm, execution_id)
        done.append({**ex, "step": step})
    return done


async def mail_workflow(crm: Conn) -> None:
    await apply(
        crm,
        {
            "name": "Welcome",
            "trigger": LEAD_CREATED,
            "actions": [
                {
                    "type": "send_email",
                    "to": "{{ entity.email }}",
                    "subject": "Hi {{ entity.name }}",
                    "body": "Welcome.",
                    "retry": {"max_attempts": 3, "backoff": 0.01},
                }
            ],
        },
    )


async def test_send_email_reuses_one_smtp_session(
    crm: Conn, matcher: Matcher, pool: AsyncConnectionPool, settings: Settings, smtp: Any
) -> None:
    runner = runner_with(pool, settings, smtp_host="127.0.0.1", smtp_port=smtp.port)
    await mail_workflow(crm)
    for ex in await send_emails(crm, matcher, runner, 3):
        assert ex["status"] == "completed", ex["error"]
    assert [m.rcpt_tos for m in smtp.received] == [[f"lead{i}@initech.test"] for i in range(3)]
    assert len({m.peer for m in smtp.received}) == 1, [m.peer for m in smtp.received]
    await http.close_clients()


async def test_a_refused_message_leaves_a_clean_session_and_a_lost_one_is_replaced(
    crm: Conn,
    matcher: Matcher,
    pool: AsyncConnectionPool,
    settings: Settings,
    smtp: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from engine import smtp as sessions

    runner = runner_with(pool, settings, smtp_host="127.0.0.1", smtp_port=smtp.port)
    await mail_workflow(crm)
    # A 4xx refusal of DATA: retried (same Message-ID) on the same session, whose
    # envelope was reset: the retry has only its own recipient.
    smtp.refuse_data = ["451 try again later"]
    [first] = await send_emails(crm, matcher, runner, 1)
    assert first["status"] == "completed" and first["step"]["attempts"] == 2
    [mail] = smtp.received
    assert mail.rcpt_tos == ["lead0@initech.test"]

    # A session the server or the network dropped is replaced, not a failed step.
    [server] = sessions._servers[asyncio.get_running_loop()].values()
    [session] = server.idle
    session.smtp.close()
    [second] = await send_emails(crm, matcher, runner, 1, first=1)
    assert second["status"] == "completed" and second["step"]["attempts"] == 1
    assert server.opened == 2 and smtp.received[1].peer != mail.peer

    # A session idle for a while is checked (NOOP) before it is used.
    monkeypatch.setattr(sessions, "IDLE_CHECK", 0.0)
    [third] = await send_emails(crm, matcher, runner, 1, first=2)
    assert third["status"] == "completed" and server.opened == 2
    assert smtp.received[2].peer == smtp.received[1].peer
    await http.close_clients()
    assert sessions._servers.get(asyncio.get_running_loop()) is None
