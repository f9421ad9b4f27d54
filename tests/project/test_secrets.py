"""Secrets stay secret: API keys are stored hashed, compared in constant time and
revocable; the SMTP password, the webhook secret, the enrichment token and the events
HMAC secret are used but never logged, returned by the API or stored in the history."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from engine import apikeys
from engine.actions.http_request import sign
from engine.config import Settings
from engine.matcher import Matcher
from engine.runtime import Runner
from tests.helpers import apply, drive, execution_ids, fetch, steps
from tests.servers import Reply, SmtpServer, WebServer

Conn = psycopg.AsyncConnection[Any]

SECRETS = {
    "smtp_password": "smtp-pw-7f3a9c1e",
    "webhook_secret": "whsec-2b8d4e6f0a",
    "enrichment_token": "enrich-tok-91c3e5a7",
    "events_hmac_secret": "events-hmac-5d7f9b1c",
}


# ───────────────────────────── API keys ─────────────────────────────


async def test_api_keys_are_stored_hashed(conn: Conn) -> None:
    row, key = await apikeys.create(conn, "ops", "admin")
    secret = key.split("_", 2)[2]
    [stored] = await fetch(conn, "SELECT * FROM crmflow.api_keys WHERE id = %s", row["id"])
    assert stored["hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in json.dumps(stored, default=str)
    assert "hash" not in row and secret not in json.dumps(row, default=str)
    listed = await apikeys.list_keys(conn)
    assert secret not in json.dumps(listed, default=str)
    assert all("hash" not in k for k in listed)


async def test_api_keys_are_compared_in_constant_time(
    conn: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every presented key of the right shape costs one hmac.compare_digest, whether its
    prefix is known or not, right or wrong: no early exit that timing could reveal."""
    _, key = await apikeys.create(conn, "ops", "read")
    prefix = key.split("_")[1]
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(apikeys.hmac, "compare_digest", spy)
    assert await apikeys.verify(conn, key) is not None
    assert await apikeys.verify(conn, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert await apikeys.verify(conn, f"cf_000000000000_{'x' * 43}") is None  # unknown prefix
    assert len(compared) == 3
    assert all(len(a) == len(b) == 64 for a, b in compared)
    assert await apikeys.verify(conn, "not-a-key") is None  # malformed: no lookup at all
    assert await apikeys.verify(conn, key + "\n") is None  # a trailing newline is not the key
    assert len(compared) == 3
    assert prefix in key


async def test_revoked_keys_stop_working(
    api_app: Any, api_keys: dict[str, str], conn: Conn
) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api_app), base_url="http://testserver"
    ) as client:
        admin = {"Authorization": f"Bearer {api_keys['admin']}"}
        created = await client.post(
            "/apikeys", json={"name": "temp", "scope": "read"}, headers=admin
        )
        assert created.status_code == 201
        key, key_id = created.json()["key"], created.json()["id"]
        mine = {"Authorization": f"Bearer {key}"}
        assert (await client.get("/workflows", headers=mine)).status_code == 200
        assert (await client.delete(f"/apikeys/{key_id}", headers=admin)).status_code == 200
        refused = await client.get("/workflows", headers=mine)
        assert refused.status_code == 401
        assert key not in refused.text
        listed = await client.get("/apikeys", headers=admin)
        assert key.split("_", 2)[2] not in listed.text
        [row] = [k for k in listed.json() if k["id"] == key_id]
        assert row["revoked_at"] is not None


# ───────────────────────────── configured secrets ─────────────────────────────


async def test_secrets_are_never_logged_returned_or_stored(
    crm: Conn,
    matcher: Matcher,
    pool: AsyncConnectionPool,
    settings: Settings,
    smtp: SmtpServer,
    web: WebServer,
    api_keys: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret_settings = Settings.model_validate(
        {
            **settings.model_dump(),
            **SECRETS,
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp.port,
            "smtp_username": "crmflow",
            "enrichment_url": web.url("/enrich"),
        }
    )
    web.reply(Reply(500, {"error": "down"}), Reply(200, {"ok": True}))
    web.default = Reply(200, {"industry": "Software"})
    await apply(
        crm,
        {
            "name": "Everything with a secret",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "actions": [
                {"type": "http_request", "url": web.url(), "on_failure": "continue"},
                {"type": "enrich_lead", "on_failure": "continue"},
                # The test server offers no AUTH: the login fails, the password is not shown.
                {
                    "type": "send_email",
                    "to": "eve@initech.test",
                    "subject": "Hi",
                    "body": "Hello",
                    "on_failure": "continue",
                },
            ],
        },
    )
    await crm.execute("INSERT INTO leads (name, email) VALUES ('Eve', 'eve@initech.test')")
    await matcher.drain()
    [execution_id] = await execution_ids(crm)
    ex = await drive(Runner(pool, secret_settings), crm, execution_id)
    http_step, enrich_step, email_step = await steps(crm, execution_id)
    # The secrets were used: the webhook was signed, the token sent, the login tried.
    hook = next(r for r in web.requests if r.path == "/hook")
    enrich = next(r for r in web.requests if r.path == "/enrich")
    timestamp = hook.headers["x-crmflow-timestamp"]
    expected = sign(SECRETS["webhook_secret"], timestamp, hook.body)
    assert hook.headers["x-crmflow-signature"] == expected
    assert enrich.headers["authorization"] == f"Bearer {SECRETS['enrichment_token']}"
    assert http_step["status"] == "succeeded" and enrich_step["status"] == "succeeded"
    assert email_step["status"] == "failed" and "AUTH" in email_step["error"], email_step
    assert ex["status"] == "completed"

    # The API, with the events HMAC secret set.
    from api.main import create_app

    app = create_app(secret_settings, pool=pool)
    responses: list[str] = []
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://testserver",
            headers={"Authorization": f"Bearer {api_keys['admin']}"},
        ) as client,
    ):
        body = json.dumps({"entity_type": "lead", "entity_id": 1}).encode()
        good = hmac.new(SECRETS["events_hmac_secret"].encode(), body, hashlib.sha256).hexdigest()
        for method, url, extra in [
            ("GET", "/health", {}),
            ("GET", "/openapi.json", {}),
            ("GET", "/workflows", {}),
            ("GET", f"/executions/{execution_id}", {}),
            ("GET", "/executions", {}),
            ("GET", "/entities", {}),
            ("GET", "/apikeys", {}),
            ("POST", "/events/signed", {"x-crmflow-signature": f"sha256={good}"}),
            ("POST", "/events/signed", {"x-crmflow-signature": "sha256=" + "0" * 64}),
            ("POST", "/events/signed", {}),
        ]:
            response = await client.request(
                method,
                url,
                content=body if method == "POST" else None,
                headers={"content-type": "application/json", **extra},
            )
            assert response.status_code < 500, (url, response.text)
            responses.append(f"{url} {response.status_code} {response.headers} {response.text}")
        statuses = [r.split()[1] for r in responses[-3:]]
        assert statuses[0] in ("200", "201", "202") and statuses[1:] == ["401", "401"]

    stored = await fetch(
        crm,
        "SELECT (SELECT json_agg(s)::text FROM crmflow.execution_steps AS s) AS steps,"
        " (SELECT json_agg(x)::text FROM crmflow.executions AS x) AS executions,"
        " (SELECT json_agg(o)::text FROM crmflow.outbox AS o) AS outbox",
    )
    everything = "\n".join(
        [
            caplog.text,
            *(str(r.args) for r in caplog.records),
            *responses,
            json.dumps(stored),
            repr(secret_settings),
            str(secret_settings.model_dump()),
        ]
    )
    for name, secret in SECRETS.items():
        assert secret not in everything, f"{name} leaked"
    assert "**********" in repr(secret_settings)
