"""The least-privilege setup of docs/operations.md, run as written: an owner role
migrates and watches a database it owns, a runtime role with only the granted DML runs
a real worker (matcher, step runner, actions) and the API, and DDL is refused to it.

Roles are cluster-global: their names carry this run's id, and they are dropped at the
end (DROP OWNED, DROP ROLE) with the database the test created.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import psycopg
import pytest
from psycopg import sql

from engine import apikeys, capture, db
from engine.config import Settings
from engine.migrations import migrate
from engine.seed import WATCHED, install_example_crm
from engine.worker import running_worker
from tests.conftest import RUN_ID, with_dbname
from tests.helpers import fetch, wait_until
from tests.paths import REPO

DOC = REPO / "docs" / "operations.md"


def doc_sql_blocks() -> list[str]:
    """The two ```sql blocks of the section "A least-privilege database role"."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("### A least-privilege database role", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sql\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 2, "the section has a roles block and a grants block"
    return blocks


def statements(block: str, names: dict[str, str]) -> list[str]:
    """The block's statements with this test's role and database names."""
    for generic, mine in names.items():
        block = re.sub(rf"\b{generic}\b", mine, block)
    text = "\n".join(line.split("--")[0] for line in block.splitlines())
    return [s.strip() for s in text.split(";") if s.strip()]


@pytest.fixture
def roles(server_url: str) -> Iterator[dict[str, str]]:
    suffix = f"{RUN_ID}_{uuid.uuid4().hex[:6]}"
    names = {
        "crmflow_owner": f"crmflow_owner_{suffix}",
        "crmflow_runtime": f"crmflow_runtime_{suffix}",
        "crm_app": f"crm_app_{suffix}",
        "crm": f"crmflow_lp_{suffix}",
    }
    roles_block, _ = doc_sql_blocks()
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(names["crm_app"])))
        for statement in statements(roles_block, names):
            admin.execute(statement.encode())
    try:
        yield names
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(names["crm"])
                )
            )
            for key in ("crm_app", "crmflow_runtime", "crmflow_owner"):
                role = sql.Identifier(names[key])
                admin.execute(sql.SQL("DROP OWNED BY {}").format(role))
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(role))


def url_as(server_url: str, names: dict[str, str], role: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(with_dbname(server_url, names["crm"]))
    params["user"] = names[role]
    params.pop("password", None)
    return make_conninfo("", **params)


@pytest.fixture
async def owned_db(server_url: str, roles: dict[str, str]) -> AsyncIterator[dict[str, str]]:
    """As the owner: migrate, create the example CRM, watch it, then run the grants."""
    owner_url = url_as(server_url, roles, "crmflow_owner")
    _, grants_block = doc_sql_blocks()
    async with await db.connect(owner_url, autocommit=True) as conn:
        assert (await (await conn.execute("SELECT current_user AS u")).fetchone())["u"] == roles[
            "crmflow_owner"
        ]
        await migrate(conn)
        await install_example_crm(conn, Settings(database_url=owner_url))
        for table, derived in WATCHED.items():
            # leads keep every row (the tests below read the outbox for what capture
            # records); the others filter, with workflows saved by the runtime role.
            await capture.watch(conn, f"public.{table}", derived=derived, all_rows=table == "leads")
        await conn.execute(
            "INSERT INTO users (id, name, email, role) VALUES (1, 'Ann Rep', 'ann@acme.test',"
            " 'sales_rep')"
        )
        for statement in statements(grants_block, roles):
            await conn.execute(statement.encode())
        # The CRM's own grant to its application (not crmflow's business).
        await conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE ON leads TO {}").format(
                sql.Identifier(roles["crm_app"])
            )
        )
    yield roles


DDL = [
    "CREATE TABLE crmflow.evil (id int)",
    "CREATE TABLE public.evil (id int)",
    "CREATE SCHEMA evil",
    "ALTER TABLE leads ADD COLUMN evil int",
    "ALTER TABLE crmflow.outbox DISABLE TRIGGER ALL",
    "DROP TABLE crmflow.outbox",
    "DROP VIEW crmflow.execution_report",
    "CREATE INDEX ON leads (name)",
    "TRUNCATE crmflow.outbox",
    "DROP TRIGGER tg_crmflow__insert ON leads",
    "CREATE FUNCTION crmflow.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
]


async def test_runtime_role_runs_worker_and_api_without_ddl(
    server_url: str, owned_db: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="engine.matcher")
    runtime_url = url_as(server_url, owned_db, "crmflow_runtime")
    app_url = url_as(server_url, owned_db, "crm_app")
    settings = Settings(  # the default path: immediate steps inline, in the matcher
        database_url=runtime_url,
        matcher_poll_interval=0.05,
        heartbeat_interval=0.5,
    )

    async with await db.connect(runtime_url, autocommit=True) as conn:
        who = await (
            await conn.execute(
                "SELECT current_user AS u, usesuper FROM pg_user WHERE usename = current_user"
            )
        ).fetchone()
        assert who == {"u": owned_db["crmflow_runtime"], "usesuper": False}

        # DDL is refused, whatever the object.
        for statement in DDL:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await conn.execute(statement)
        with pytest.raises(capture.CaptureError, match=r"cannot capture public\.users"):
            await capture.watch(conn, "public.users")

        # The API, on a pool of the runtime role.
        from api.main import create_app

        pool = db.create_pool(runtime_url, settings, min_size=1, max_size=4)
        await pool.open(wait=True)
        _, key = await apikeys.create(conn, "least privilege", "write")
        app = create_app(settings, pool=pool)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://testserver",
                headers={"Authorization": f"Bearer {key}"},
            ) as client,
        ):
            created = await client.post(
                "/workflows",
                json={
                    "name": "Qualify as the runtime role",
                    "trigger": {"type": "entity_created", "entity_type": "lead"},
                    "conditions": [
                        {"field": "source", "operator": "equals", "value": "website_form"}
                    ],
                    "actions": [
                        {"type": "update_field", "field": "status", "value": "contacted"},
                        {"type": "create_task", "title": "Call {{ lead.name }}", "assignee": 1},
                    ],
                    "status": "active",
                },
            )
            assert created.status_code == 201, created.text
            # A dashboard login: its session is a row the runtime role writes.
            login = await client.post(
                "/ui/login", data={"key": key}, headers={"Origin": "http://testserver"}
            )
            assert login.status_code == 303, login.text
            assert (await client.get("/ui/workflows")).status_code == 200

            # A real worker as the runtime role; the CRM application writes leads as its own.
            async with running_worker(runtime_url, settings=settings, concurrency=4):
                async with await db.connect(app_url, autocommit=True) as app_conn:
                    await app_conn.execute(
                        "INSERT INTO leads (name, source) SELECT 'Lead ' || i, 'website_form'"
                        " FROM generate_series(1, 120) AS i"
                    )

                async def all_done() -> bool:
                    rows = await fetch(
                        conn,
                        "SELECT count(*) AS n FROM crmflow.executions WHERE status = 'completed'",
                    )
                    return rows[0]["n"] == 120

                await wait_until(all_done, timeout=60)

            listed = await client.get("/executions", params={"limit": 5})
            assert listed.status_code == 200 and len(listed.json()["items"]) == 5
            health = await client.get("/health")
            assert health.status_code == 200
        await pool.close()

        leads = await fetch(conn, "SELECT DISTINCT status FROM leads")
        assert leads == [{"status": "contacted"}]
        tasks = await fetch(conn, "SELECT count(*) AS n, min(title) AS t FROM tasks")
        assert tasks == [{"n": 120, "t": "Call Lead 1"}]
        failed = await fetch(conn, "SELECT * FROM crmflow.execution_steps WHERE error IS NOT NULL")
        assert failed == []
        # The engine's own writes carry its signed context: depth 1, the execution as actor.
        updates = await fetch(
            conn,
            "SELECT DISTINCT depth, actor LIKE 'crmflow:execution%%' AS engine FROM crmflow.outbox"
            " WHERE op = 'update'",
        )
        assert updates == [{"depth": 1, "engine": True}]

    # The burst of 120 events asked for a statistics refresh, which this role may not do.
    assert any("not refreshing the queue tables' statistics" in r.message for r in caplog.records)


async def test_app_role_writes_are_captured_but_it_reads_nothing_else(
    server_url: str, owned_db: dict[str, str]
) -> None:
    app_url = url_as(server_url, owned_db, "crm_app")
    owner_url = url_as(server_url, owned_db, "crmflow_owner")
    async with await db.connect(owner_url, autocommit=True) as owner:
        async with await db.connect(app_url, autocommit=True) as app:
            await app.execute("INSERT INTO leads (name) VALUES ('Captured')")
            async with app.transaction():  # a writer cannot opt out of automation
                await app.execute("SELECT set_config('crmflow.depth', '99', true)")
                await app.execute("UPDATE leads SET score = 5 WHERE name = 'Captured'")
            for forbidden in (
                "SELECT * FROM crmflow.outbox",
                "SELECT * FROM crmflow.workflows",
                "DELETE FROM crmflow.outbox",
                "SELECT * FROM crmflow.api_keys",
                # forging an event for a row that does not exist, as the engine
                "INSERT INTO crmflow.outbox (entity_type, op, pk, actor)"
                " VALUES ('lead', 'insert', '{\"id\": 999}', 'crmflow:execution:1')",
                "SELECT crmflow.set_write_context(1, 'crmflow:execution:1')",
                "SELECT * FROM crmflow.write_context_key",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    await app.execute(forbidden)
        events = await fetch(owner, "SELECT op, actor, depth FROM crmflow.outbox ORDER BY id")
        assert events == [
            {"op": "insert", "actor": owned_db["crm_app"], "depth": 0},
            {"op": "update", "actor": owned_db["crm_app"], "depth": 0},
        ]
