"""The dashboard at /ui, driven in headless Chromium (Debian's, through Playwright) against
the real API served by uvicorn on a free port and a real ``crmflow worker`` process.

Plain (non-async) tests: Playwright's sync API runs its own event loop, and the server
runs in a thread with its own, so neither meets pytest-asyncio's.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from api.live import APPLICATION_NAME
from api.main import ApiServer, create_app, serve
from engine import apikeys, capture, db
from engine.config import Settings
from engine.seed import WATCHED
from tests.helpers import apply
from tests.servers import Reply, WebServer, free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (./dev test installs it)"
)

QUALIFY = {
    "name": "Qualify website leads",
    "trigger": {"type": "entity_created", "entity_type": "lead"},
    "conditions": [{"field": "source", "operator": "equals", "value": "website_form"}],
    "actions": [{"type": "qualify_lead"}],
    "priority": 5,
}


def webhook(url: str) -> dict[str, Any]:
    return {
        "name": "Tell the billing system about deals",
        "trigger": {"type": "entity_created", "entity_type": "deal"},
        "actions": [{"id": "billing", "type": "http_request", "url": url, "retry": 1}],
    }


# ───────────────────────────── fixtures ─────────────────────────────


def sql_rows(db_url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        cursor = conn.execute(query, args)
        return cursor.fetchall() if cursor.description else []


def sql_value(db_url: str, query: str, *args: Any) -> Any:
    rows = sql_rows(db_url, query, *args)
    return next(iter(rows[0].values())) if rows else None


def wait_for(check: Callable[[], Any], timeout: float = 15.0, what: str = "a condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def in_a_thread(coroutine: Callable[[], Any]) -> None:
    """Run ``coroutine()`` to its end on an event loop of its own thread: Playwright's
    sync API keeps a loop running on the test's thread, so asyncio.run() cannot be used."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(coroutine())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@dataclass
class Served:
    url: str
    server: ApiServer
    thread: threading.Thread

    def stop(self, timeout: float = 15.0) -> float:
        """Stops the server; returns how long it took."""
        started = time.monotonic()
        self.server.should_exit = True
        self.thread.join(timeout)
        return time.monotonic() - started


def start_api(settings: Settings) -> Served:
    port = free_port()
    server = serve(create_app(settings), "127.0.0.1", port, log_level="warning")
    thread = threading.Thread(target=server.run, name="dashboard-api", daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="uvicorn to start")
    return Served(f"http://127.0.0.1:{port}", server, thread)


@dataclass
class Dashboard:
    url: str
    db_url: str
    keys: dict[str, str]
    workflows: dict[str, int]
    web: WebServer
    api: Served


@pytest.fixture
def dashboard(db_url: str, settings: Settings, web: WebServer) -> Iterator[Dashboard]:
    """The example CRM watched, two workflows, a key per scope, the API and a worker."""
    keys: dict[str, str] = {}
    ids: dict[str, int] = {}

    async def prepare() -> None:
        async with await db.connect(db_url, autocommit=True) as conn:
            for table, derived in WATCHED.items():
                await capture.watch(conn, f"public.{table}", derived=derived)
            for scope in apikeys.SCOPES:
                _, keys[scope] = await apikeys.create(conn, f"{scope} key", scope)
            ids["qualify"] = await apply(conn, QUALIFY)
            ids["webhook"] = await apply(conn, webhook(web.url()))

    in_a_thread(prepare)
    worker = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "worker", "--concurrency", "2"],
        env={
            **os.environ,
            "CRMFLOW_DATABASE_URL": db_url,
            "CRMFLOW_MATCHER_POLL_INTERVAL": "0.1",
            "CRMFLOW_HTTP_ALLOWED_HOSTS": '["127.0.0.1"]',
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = start_api(settings)
    try:
        yield Dashboard(api.url, db_url, keys, ids, web, api)
    finally:
        api.stop()
        worker.terminate()
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(15_000)
    yield context.new_page()
    context.close()


def log_in(page: Any, dash: Dashboard, scope: str, path: str = "/ui") -> None:
    page.goto(dash.url + path)
    assert "/ui/login" in page.url  # no cookie yet: the form
    page.fill("input[name=key]", dash.keys[scope])
    page.click("button[type=submit]")
    page.wait_for_url(dash.url + path)


def workflow_status(dash: Dashboard, name: str) -> str:
    return str(sql_value(dash.db_url, "SELECT status FROM crmflow.workflows WHERE id = %s", name))


# ───────────────────────────── tests ─────────────────────────────


def test_dashboard_in_a_browser(page: Any, dashboard: Dashboard) -> None:
    dash = dashboard
    from playwright.sync_api import expect

    log_in(page, dash, "write")
    # The browser holds a session token, not the key (tests/api/test_ui_sessions.py).
    [session_cookie] = [c for c in page.context.cookies() if c["name"] == "crmflow_ui"]
    assert session_cookie["httpOnly"] and session_cookie["sameSite"] == "Strict"
    assert dash.keys["write"].split("_", 2)[2] not in session_cookie["value"]
    rows = page.locator("#workflows tbody tr")
    expect(rows).to_have_count(2)
    # Higher priority first
    expect(rows.nth(0)).to_contain_text("Qualify website leads")
    expect(rows.nth(0)).to_contain_text("v1")

    # Pause, then activate: the page and the database agree.
    qualify = page.locator(f"tr[data-workflow-id='{dash.workflows['qualify']}']")
    qualify.get_by_role("button", name="Pause").click()
    expect(qualify.locator("[data-field=status]")).to_have_text("paused")
    assert workflow_status(dash, str(dash.workflows["qualify"])) == "paused"
    qualify.get_by_role("button", name="Activate").click()
    expect(qualify.locator("[data-field=status]")).to_have_text("active")
    assert workflow_status(dash, str(dash.workflows["qualify"])) == "active"

    # A write to a watched table: its execution appears in the live list, no reload.
    page.goto(dash.url + "/ui/executions")
    expect(page.locator("#live-state")).to_have_text("live updates: connected")
    page.evaluate("window.notReloaded = true")
    sql_rows(dash.db_url, "INSERT INTO leads (name, source) VALUES ('Grace', 'website_form')")
    execution_id = wait_for(
        lambda: sql_value(dash.db_url, "SELECT max(id) FROM crmflow.executions"),
        what="the matcher to enroll the lead",
    )
    live_row = page.locator(f"#executions tr[data-execution-id='{execution_id}']")
    expect(live_row).to_contain_text("Qualify website leads")
    expect(live_row).to_contain_text("completed")  # the update came through as well
    assert page.evaluate("window.notReloaded") is True

    # Its timeline.
    live_row.get_by_role("link", name=str(execution_id)).click()
    page.wait_for_url(f"{dash.url}/ui/executions/{execution_id}")
    expect(page.locator("#execution-status")).to_have_text("completed")
    step = page.locator("#timeline li.step")
    expect(step).to_have_count(1)
    expect(step).to_contain_text("qualify_lead")
    expect(step).to_contain_text("succeeded")
    expect(step).to_contain_text("1 attempt")
    expect(step.locator(".duration")).to_contain_text(" ms")

    # A failed webhook: on the failures page, replay it once the endpoint is back.
    dash.web.default = Reply(status=500, body={"error": "billing is down"})
    sql_rows(dash.db_url, "INSERT INTO deals (name) VALUES ('Hooli platform')")
    failed_id = wait_for(
        lambda: sql_value(
            dash.db_url, "SELECT id FROM crmflow.executions WHERE status = 'failed' LIMIT 1"
        ),
        what="the webhook's execution to fail",
    )
    page.goto(dash.url + "/ui/failures")
    failure = page.locator(f"#failures tr[data-execution-id='{failed_id}']")
    expect(failure).to_contain_text("billing")
    expect(failure).to_contain_text("500")
    dash.web.default = Reply(status=200)
    failure.get_by_role("button", name="Replay").click()
    expect(page.locator("#flash")).to_contain_text(f"Execution {failed_id} is replaying")
    wait_for(
        lambda: sql_value(
            dash.db_url,
            "SELECT status = 'completed' AND replays = 1 FROM crmflow.executions WHERE id = %s",
            failed_id,
        ),
        what="the replayed execution to complete",
    )
    assert [r.method for r in dash.web.requests] == ["POST", "POST"]

    # The SLA report: one row per metric, each passed or failed.
    page.goto(dash.url + "/ui/sla")
    sla = page.locator("#sla tbody tr")
    expect(sla).to_have_count(4)
    expect(page.locator("#sla tr[data-metric=execution_success_rate]")).to_contain_text("%")
    for i in range(4):
        assert sla.nth(i).locator(".badge").inner_text() in ("pass", "fail")

    # The latency chart: an SVG per workflow with p50 and p95 lines through today's point.
    page.goto(dash.url + "/ui/latency")
    chart = page.locator(f".chart[data-workflow-id='{dash.workflows['qualify']}'] svg")
    expect(chart).to_be_visible()
    for series in ("p50", "p95"):
        points = chart.locator(f"polyline.{series}").get_attribute("points")
        assert points and len(points.split()) == 1  # one day of history: one point
        x, y = (float(v) for v in points.split(","))
        assert 0 < x <= 560 and 0 < y <= 180
        expect(chart.locator(f"circle.{series}")).to_have_count(1)

    # Logging out ends the session: on the server too, so a copy of the cookie is dead.
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(f"{dash.url}/ui/login")
    page.goto(dash.url + "/ui/workflows")
    assert "/ui/login" in page.url
    assert sql_value(dash.db_url, "SELECT count(*) FROM crmflow.ui_sessions") == 0
    replayed = httpx.get(
        dash.url + "/ui/workflows",
        headers={"Cookie": f"crmflow_ui={session_cookie['value']}"},
        follow_redirects=False,
    )
    assert replayed.status_code == 303 and "/ui/login" in replayed.headers["location"]


def test_the_live_list_leaves_when_the_key_is_revoked(page: Any, dashboard: Dashboard) -> None:
    """An open page's live stream closes within seconds of the key's revocation, and the
    page goes to the login form."""
    from playwright.sync_api import expect

    dash = dashboard
    log_in(page, dash, "read", "/ui/executions")
    expect(page.locator("#live-state")).to_have_text("live updates: connected")
    sql_rows(dash.db_url, "UPDATE crmflow.api_keys SET revoked_at = now() WHERE name = 'read key'")
    started = time.monotonic()
    page.wait_for_url(f"{dash.url}/ui/login?next=%2Fui%2Fexecutions", timeout=10_000)
    assert time.monotonic() - started < 6


def test_a_read_key_can_look_but_not_pause(page: Any, dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    dash = dashboard
    log_in(page, dash, "read", "/ui/workflows")
    qualify = page.locator(f"tr[data-workflow-id='{dash.workflows['qualify']}']")
    qualify.get_by_role("button", name="Pause").click()
    expect(page.locator("#flash")).to_contain_text("this needs a write key")
    expect(qualify.locator("[data-field=status]")).to_have_text("active")
    assert workflow_status(dash, str(dash.workflows["qualify"])) == "active"


def test_pages_refuse_without_a_valid_login(dashboard: Dashboard) -> None:
    dash = dashboard
    with httpx.Client(base_url=dash.url, follow_redirects=False) as client:
        for path in ("/ui", "/ui/workflows", "/ui/failures", "/ui/executions/stream"):
            response = client.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"].startswith("/ui/login?next=%2Fui")
        assert client.post("/ui/workflows/1/pause").status_code == 401

        # A wrong key: the form again, no cookie.
        origin = {"Origin": dash.url}
        response = client.post("/ui/login", data={"key": "cf_nope"}, headers=origin)
        assert response.status_code == 401 and "not valid" in response.text
        assert "crmflow_ui" not in response.cookies

        # A good key from another site's form: refused (login CSRF).
        evil = {"Origin": "http://evil.example"}
        response = client.post("/ui/login", data={"key": dash.keys["write"]}, headers=evil)
        assert response.status_code == 403

        # Logged in: the cookie is HttpOnly and SameSite=Strict, and holds a session.
        response = client.post(
            "/ui/login", data={"key": dash.keys["write"], "next": "//evil.example"}, headers=origin
        )
        assert response.status_code == 303 and response.headers["location"] == "/ui"
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
        assert client.get("/ui/workflows").status_code == 200

        # Changes from another origin, or with no origin at all, are refused.
        wf = dash.workflows["qualify"]
        assert client.post(f"/ui/workflows/{wf}/pause", headers=evil).status_code == 403
        assert client.post(f"/ui/workflows/{wf}/pause").status_code == 403
        assert workflow_status(dash, str(wf)) == "active"
        assert client.post(f"/ui/workflows/{wf}/pause", headers=origin).json() == {
            "id": wf,
            "status": "paused",
        }

        # A revoked key logs the browser out at its next request.
        sql_rows(dash.db_url, "UPDATE crmflow.api_keys SET revoked_at = now()")
        response = client.get("/ui/workflows")
        assert response.status_code == 303
        assert 'crmflow_ui=""' in response.headers["set-cookie"]


def test_streams_share_one_listener_and_do_not_hold_the_server(dashboard: Dashboard) -> None:
    dash = dashboard
    listeners = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s"
    )
    with httpx.Client(base_url=dash.url, follow_redirects=False) as login:
        response = login.post(
            "/ui/login", data={"key": dash.keys["read"]}, headers={"Origin": dash.url}
        )
        assert response.status_code == 303
        cookies = {"crmflow_ui": login.cookies["crmflow_ui"]}
    received: list[list[str]] = [[] for _ in range(3)]

    def follow(lines: list[str]) -> None:
        try:
            with (
                httpx.Client(base_url=dash.url, cookies=cookies, timeout=30) as client,
                client.stream("GET", "/ui/executions/stream") as response,
            ):
                assert response.headers["content-type"].startswith("text/event-stream")
                for line in response.iter_lines():
                    lines.append(line)
        except httpx.HTTPError:
            pass  # the server went away

    threads = [threading.Thread(target=follow, args=(lines,), daemon=True) for lines in received]
    for t in threads:
        t.start()
    wait_for(lambda: all(lines for lines in received), what="three streams to open")
    sql_rows(dash.db_url, "INSERT INTO leads (name, source) VALUES ('Ada', 'website_form')")
    wait_for(
        lambda: all("event: execution" in lines for lines in received),
        what="every stream to get the execution",
    )
    assert sql_value(dash.db_url, listeners, APPLICATION_NAME) == 1

    took = dash.api.stop()
    assert not dash.api.thread.is_alive()
    assert took < 5, f"the server took {took:.1f} s to stop with streams open"
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    # The listener's connection was closed with the app.
    wait_for(
        lambda: sql_value(dash.db_url, listeners, APPLICATION_NAME) == 0,
        what="the listener to disconnect",
    )


def test_executions_notify_once_per_statement(db_url: str) -> None:
    trigger = sql_rows(
        db_url,
        "SELECT tgtype & 1 AS per_row, pg_get_triggerdef(oid) AS definition FROM pg_trigger"
        " WHERE tgname = 'executions_notify'",
    )
    assert len(trigger) == 1 and trigger[0]["per_row"] == 0
    assert "AFTER INSERT OR UPDATE" in trigger[0]["definition"]
    assert "FOR EACH STATEMENT" in trigger[0]["definition"]

    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN crmflow_executions")
        # No dashboard has announced itself: writers stay quiet.
        sql_rows(db_url, "UPDATE crmflow.executions SET status = status")
        assert list(listener.notifies(timeout=0.5)) == []
        listener.execute(
            "UPDATE crmflow.feed_state SET listening_until = now() + interval '30 seconds'"
        )
        # Two statements in two transactions: two hints, and empty ones (never the data).
        sql_rows(db_url, "UPDATE crmflow.executions SET status = status")
        sql_rows(db_url, "UPDATE crmflow.executions SET status = status")
        hints = list(listener.notifies(timeout=1.0))
    assert [(n.channel, n.payload) for n in hints] == [("crmflow_executions", "")] * 2


def test_the_api_docs_work_offline(page: Any, settings: Settings) -> None:
    """Swagger UI renders in Chromium with every request to another host blocked: its
    assets are served by the app (api/docs.py), not a CDN."""
    from urllib.parse import urlsplit

    from playwright.sync_api import expect

    api = start_api(settings)
    own = urlsplit(api.url).netloc
    elsewhere: list[str] = []

    def only_own_host(route: Any) -> None:
        url = route.request.url
        if urlsplit(url).netloc == own or url.startswith("data:"):
            route.continue_()
        else:
            elsewhere.append(url)
            route.abort()

    try:
        page.route("**/*", only_own_host)
        page.goto(api.url + "/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("crmflow")
        expect(page.locator(".opblock-tag-section").first).to_be_visible()
        page.goto(api.url + "/ui/login")
        expect(page.locator("input[name=key]")).to_be_visible()
        assert elsewhere == []
    finally:
        api.stop()
