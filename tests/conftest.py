"""Real PostgreSQL for every test, through pytest-postgresql: a template database built
once per session (migrated, example CRM installed), cloned into a fresh database for each
test by its ``DatabaseJanitor``, which drops it afterwards.

The server is ``CRMFLOW_DATABASE_URL``'s when set (its database is only used to
create and drop the test databases); otherwise an embedded PostgreSQL (pgserver) is
started in a temporary directory. Either way pytest-postgresql gets it as a noproc
executor (``postgresql_server``): it starts and stops no server itself. Database names
carry this run's id, so runs sharing a server do not meet.
"""

from __future__ import annotations

import asyncio
import functools
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool
from pytest_postgresql.executors import NoopExecutor
from pytest_postgresql.janitor import DatabaseJanitor

from engine import db
from engine.config import Settings
from engine.matcher import Matcher
from engine.runtime import Runner

RUN_ID = uuid.uuid4().hex[:8]
# Test-only actions (slow and flaky steps), loaded the way users load plugins; worker
# processes started by tests inherit it.
os.environ.setdefault("CRMFLOW_PLUGINS", '["tests.plugins"]')


def with_dbname(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo("", **params)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    url = os.environ.get("CRMFLOW_DATABASE_URL")
    if url:
        yield url
        return
    from engine.embedded import start_embedded

    with tempfile.TemporaryDirectory(prefix="crmflow-pg-") as tmp:
        yield start_embedded(Path(tmp) / "data")


@pytest.fixture(scope="session")
def postgresql_server(server_url: str) -> NoopExecutor:
    """The server as pytest-postgresql sees it (a noproc executor: nothing to start or
    stop), its connection parameters resolved by libpq from ``server_url``. Its
    ``template_dbname`` is this run's template database."""
    with psycopg.connect(server_url) as conn:
        info = conn.info
        return NoopExecutor(
            host=info.host,
            port=info.port,
            user=info.user,
            password=info.password or None,
            options=info.get_parameters().get("options", ""),
            dbname=f"crmflow_{RUN_ID}",
            maintenance_dbname=info.dbname,
        )


def janitor(
    server: NoopExecutor, dbname: str, *, template: str | None = None, as_template: bool = False
) -> DatabaseJanitor:
    """pytest-postgresql's janitor for ``dbname`` on the test server: creates it (cloned
    from ``template`` when given), drops it after closing every connection to it."""
    return DatabaseJanitor(
        user=server.user,
        host=server.host,
        port=server.port,
        password=server.password,
        dbname=dbname,
        template_dbname=template,
        maintenance_dbname=server.maintenance_dbname,
        as_template=as_template,
    )


def _load_template(server_url: str, *, dbname: str, **_connection: Any) -> None:
    """The template's content (a pytest-postgresql loader): crmflow migrated and the
    example CRM installed (not watched)."""
    url = with_dbname(server_url, dbname)

    async def build() -> None:
        from engine.migrations import migrate
        from engine.seed import install_example_crm

        async with await db.connect(url, autocommit=True) as conn:
            await migrate(conn)
            await install_example_crm(conn, Settings(database_url=url))

    asyncio.run(build())


@pytest.fixture(scope="session")
def template_db(server_url: str, postgresql_server: NoopExecutor) -> Iterator[str]:
    """A migrated database with the example CRM tables (not watched), used as template:
    built once per session, as pytest-postgresql's noproc fixture builds its template."""
    name = postgresql_server.template_dbname
    with janitor(postgresql_server, name, as_template=True) as template:
        template.load(functools.partial(_load_template, server_url))
        yield name


@pytest.fixture
def db_url(server_url: str, postgresql_server: NoopExecutor, template_db: str) -> Iterator[str]:
    """A fresh database for this test, cloned from the template."""
    name = f"crmflow_t_{RUN_ID}_{uuid.uuid4().hex[:10]}"
    with janitor(postgresql_server, name, template=template_db):
        yield with_dbname(server_url, name)


@pytest.fixture
def empty_db(server_url: str, postgresql_server: NoopExecutor) -> Iterator[str]:
    """A database with nothing in it (not cloned from the migrated template), as on a
    fresh machine."""
    name = f"crmflow_empty_{RUN_ID}_{uuid.uuid4().hex[:10]}"
    with janitor(postgresql_server, name):
        yield with_dbname(server_url, name)


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(
        database_url=db_url,
        matcher_poll_interval=0.05,
        heartbeat_interval=0.5,
        stalled_worker_timeout=3.0,
        http_allowed_hosts=["127.0.0.1", "localhost"],
        # Most tests exercise the step runner, one job per execution; tests/match/test_inline.py
        # turns the matcher's inline steps (the production default) back on.
        inline_steps=False,
    )


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with await db.connect(db_url, autocommit=True) as c:
        yield c


@pytest.fixture
async def pool(db_url: str, settings: Settings) -> AsyncIterator[AsyncConnectionPool]:
    p = db.create_pool(db_url, settings, min_size=1, max_size=8)
    await p.open(wait=True)
    yield p
    await p.close()


@pytest.fixture
async def worker(db_url: str, settings: Settings) -> AsyncIterator[Any]:
    """A real worker (matcher, scheduler, procrastinate) running in this event loop."""
    from engine.worker import running_worker

    async with running_worker(db_url, settings=settings, concurrency=4) as w:
        yield w


@pytest.fixture
def matcher(pool: AsyncConnectionPool, settings: Settings) -> Matcher:
    return Matcher(pool, settings)


@pytest.fixture
def runner(pool: AsyncConnectionPool, settings: Settings) -> Runner:
    return Runner(pool, settings)


@pytest.fixture
async def crm(conn: psycopg.AsyncConnection[Any]) -> psycopg.AsyncConnection[Any]:
    """The example CRM watched (leads, deals, accounts, contacts) with three users:
    1 Ann (sales_rep), 2 Carl (csm), 3 Mia (manager)."""
    from tests.helpers import install_test_crm

    await install_test_crm(conn)
    return conn


@pytest.fixture
def smtp() -> Iterator[Any]:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 keeping what it receives."""
    from tests.servers import smtp_server

    yield from smtp_server()


@pytest.fixture
def web() -> Iterator[Any]:
    """A real HTTP server on 127.0.0.1 answering from a script and recording requests."""
    from tests.servers import web_server

    yield from web_server()


# ───────────────────────────── the management API ─────────────────────────────


@pytest.fixture
async def api_keys(conn: psycopg.AsyncConnection[Any]) -> dict[str, str]:
    """One API key per scope: {"read": "cf_...", "write": ..., "admin": ...}."""
    from engine import apikeys

    keys = {}
    for scope in apikeys.SCOPES:
        _, keys[scope] = await apikeys.create(conn, f"test {scope}", scope)
    return keys


@pytest.fixture
async def api_app(settings: Settings, pool: AsyncConnectionPool) -> AsyncIterator[Any]:
    """The API app on the test's pool (the one the matcher and runner fixtures use)."""
    from api.main import create_app

    app = create_app(settings, pool=pool)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(api_app: Any, api_keys: dict[str, str]) -> AsyncIterator[Any]:
    """An httpx client on the app, authenticated with the write key."""
    import httpx

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api_app),
        base_url="http://testserver",
        headers={"Authorization": f"Bearer {api_keys['write']}"},
    ) as c:
        yield c
