"""Dashboard sessions: the ``crmflow_ui`` cookie is a server-side session (a random token
stored as its SHA-256, linked to the API key, expiring), never the API key itself. Log
out deletes the session, revoking the key ends its sessions, and an open live stream
closes within seconds once its session is gone.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest

from engine import apikeys
from engine.config import Settings
from tests.helpers import fetch

ORIGIN = {"Origin": "http://testserver"}


def ui_client(app: Any, base_url: str = "http://testserver") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=base_url, follow_redirects=False
    )


def cookie(value: str) -> dict[str, str]:
    return {"Cookie": f"crmflow_ui={value}"}


async def log_in(client: httpx.AsyncClient, key: str) -> httpx.Response:
    origin = {"Origin": str(client.base_url).rstrip("/")}
    response = await client.post("/ui/login", data={"key": key}, headers=origin)
    assert response.status_code == 303, response.text
    return response


async def sessions(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    return await fetch(conn, "SELECT * FROM crmflow.ui_sessions ORDER BY id")


async def test_the_cookie_is_a_session_not_the_key(
    api_app: Any, api_keys: dict[str, str], conn: psycopg.AsyncConnection[Any], settings: Settings
) -> None:
    key = api_keys["write"]
    async with ui_client(api_app) as client:
        response = await log_in(client, key)
        token = client.cookies["crmflow_ui"]
        header = response.headers["set-cookie"]
        assert "HttpOnly" in header and "SameSite=strict" in header and "Path=/ui" in header
        assert "Secure" not in header  # plain http here; see the https test below
        assert f"Max-Age={int(settings.ui_session_ttl)}" in header
        assert (await client.get("/ui/workflows")).status_code == 200

    # Neither the key nor its secret is in the cookie; the token is stored only hashed.
    secret = key.split("_", 2)[2]
    assert token != key and secret not in token and len(token) >= 40
    [session] = await sessions(conn)
    assert session["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in str(session)
    [row] = await fetch(conn, "SELECT id FROM crmflow.api_keys WHERE name = 'test write'")
    assert session["api_key_id"] == row["id"]
    lifetime = session["expires_at"] - session["created_at"]
    assert lifetime == timedelta(seconds=settings.ui_session_ttl)
    assert settings.ui_session_ttl == Settings.model_fields["ui_session_ttl"].default == 43200

    # The cookie is no bearer key: the API refuses it.
    async with ui_client(api_app) as api:
        for path in ("/workflows", "/executions", "/apikeys"):
            refused = await api.get(path, headers={"Authorization": f"Bearer {token}"})
            assert refused.status_code == 401, path
        # ... and a raw API key in the cookie is no session either.
        page = await api.get("/ui/workflows", headers=cookie(key))
        assert page.status_code == 303 and 'crmflow_ui=""' in page.headers["set-cookie"]


async def test_the_cookie_is_secure_over_https(api_app: Any, api_keys: dict[str, str]) -> None:
    async with ui_client(api_app, "https://testserver") as client:
        response = await log_in(client, api_keys["read"])
    assert "Secure" in response.headers["set-cookie"]


async def test_log_out_ends_the_session(
    api_app: Any, api_keys: dict[str, str], conn: psycopg.AsyncConnection[Any]
) -> None:
    async with ui_client(api_app) as client, ui_client(api_app) as other:
        await log_in(client, api_keys["write"])
        await log_in(other, api_keys["write"])  # another browser, same key
        token = client.cookies["crmflow_ui"]
        assert len(await sessions(conn)) == 2
        response = await client.post("/ui/logout", headers=ORIGIN)
        assert response.status_code == 303 and response.headers["location"] == "/ui/login"
        # Only this browser's session is gone.
        [left] = await sessions(conn)
        assert left["token_hash"] != hashlib.sha256(token.encode()).hexdigest()
        assert (await other.get("/ui/workflows")).status_code == 200

    # The old cookie, replayed (a copy the attacker kept): the login page, or 401.
    async with ui_client(api_app) as replayed:
        page = await replayed.get("/ui/workflows", headers=cookie(token))
        assert page.status_code == 303 and page.headers["location"].startswith("/ui/login")
        assert 'crmflow_ui=""' in page.headers["set-cookie"]
        pause = await replayed.post("/ui/workflows/1/pause", headers={**ORIGIN, **cookie(token)})
        assert pause.status_code == 401
        stream = await replayed.get("/ui/executions/stream", headers=cookie(token))
        assert stream.status_code == 303


async def test_revoking_the_key_ends_its_sessions(
    api_app: Any, api_keys: dict[str, str], conn: psycopg.AsyncConnection[Any]
) -> None:
    async with ui_client(api_app) as write, ui_client(api_app) as read:
        await log_in(write, api_keys["write"])
        await log_in(read, api_keys["read"])
        [row] = await fetch(conn, "SELECT id FROM crmflow.api_keys WHERE name = 'test write'")
        admin = {"Authorization": f"Bearer {api_keys['admin']}"}
        async with ui_client(api_app) as api:
            assert (await api.delete(f"/apikeys/{row['id']}", headers=admin)).status_code == 200
        # Its sessions are deleted with it; the other key's stays.
        assert [s["api_key_id"] for s in await sessions(conn)] != []
        assert row["id"] not in [s["api_key_id"] for s in await sessions(conn)]
        assert (await write.get("/ui/workflows")).status_code == 303
        assert (await read.get("/ui/workflows")).status_code == 200

        # A key revoked behind the API's back (straight in the table): refused at lookup.
        await conn.execute("UPDATE crmflow.api_keys SET revoked_at = now()")
        assert (await read.get("/ui/workflows")).status_code == 303

    # A key deleted outright takes its sessions with it (ON DELETE CASCADE).
    async with ui_client(api_app) as client:
        created, key = await apikeys.create(conn, "short-lived", "read")
        await log_in(client, key)
        assert len(await sessions(conn)) == 2
        await conn.execute("DELETE FROM crmflow.api_keys WHERE id = %s", [created["id"]])
        assert created["id"] not in [s["api_key_id"] for s in await sessions(conn)]


async def test_sessions_expire(
    api_app: Any, api_keys: dict[str, str], conn: psycopg.AsyncConnection[Any]
) -> None:
    async with ui_client(api_app) as client:
        await log_in(client, api_keys["read"])
        assert (await client.get("/ui/workflows")).status_code == 200
        await conn.execute(
            "UPDATE crmflow.ui_sessions SET expires_at = now() - interval '1 second'"
        )
        page = await client.get("/ui/workflows")
        assert page.status_code == 303 and page.headers["location"].startswith("/ui/login")
    # Expired sessions are cleaned up at the next login.
    async with ui_client(api_app) as client:
        await log_in(client, api_keys["read"])
    assert [s["expires_at"] > s["created_at"] for s in await sessions(conn)] == [True]


async def test_the_session_lifetime_is_a_setting(
    settings: Settings, pool: Any, api_keys: dict[str, str], conn: psycopg.AsyncConnection[Any]
) -> None:
    from api.main import create_app

    assert Settings(ui_session_ttl="2h").ui_session_ttl == 7200
    short = settings.model_copy(update={"ui_session_ttl": 1.0})
    app = create_app(short, pool=pool)
    async with app.router.lifespan_context(app), ui_client(app) as client:
        await log_in(client, api_keys["read"])
        assert (await client.get("/ui/workflows")).status_code == 200
        await asyncio.sleep(1.2)
        assert (await client.get("/ui/workflows")).status_code == 303


# ───────────────────────────── open streams ─────────────────────────────


@pytest.mark.parametrize("ending", ["revoke", "logout"])
def test_an_open_stream_closes_when_its_session_ends(
    db_url: str, settings: Settings, ending: str
) -> None:
    from tests.api.test_dashboard import in_a_thread, sql_value, start_api, wait_for

    keys: dict[str, Any] = {}

    async def make_key() -> None:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as c:
            c.row_factory = psycopg.rows.dict_row
            keys["row"], keys["key"] = await apikeys.create(c, "viewer", "read")

    in_a_thread(make_key)
    api = start_api(settings)
    lines: list[str] = []
    ended: list[float] = []
    try:
        with httpx.Client(base_url=api.url, timeout=30, follow_redirects=False) as client:
            login = client.post("/ui/login", data={"key": keys["key"]}, headers={"Origin": api.url})
            assert login.status_code == 303

            def follow() -> None:
                with client.stream("GET", "/ui/executions/stream") as response:
                    assert response.headers["content-type"].startswith("text/event-stream")
                    for line in response.iter_lines():
                        lines.append(line)
                ended.append(time.monotonic())

            thread = threading.Thread(target=follow, daemon=True)
            thread.start()
            wait_for(lambda: lines, what="the stream to open")
            time.sleep(0.5)
            assert not ended

            started = time.monotonic()
            if ending == "revoke":
                sql_value(
                    db_url,
                    "UPDATE crmflow.api_keys SET revoked_at = now() WHERE id = %s RETURNING id",
                    keys["row"]["id"],
                )
            else:
                assert client.post("/ui/logout", headers={"Origin": api.url}).status_code == 303
            thread.join(10)
            assert ended, "the stream is still open after its session ended"
            took = ended[0] - started
            assert took < 6, f"the stream closed {took:.1f} s after its session ended"
            assert "event: logout" in lines
            # and reconnecting gets the login redirect, not a new stream
            assert client.get("/ui/executions/stream").status_code == 303
    finally:
        api.stop()
