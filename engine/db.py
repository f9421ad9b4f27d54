"""Connections, the shared pool, and the named queries of ``sql/``.

Static SQL lives in ``sql/*.sql`` as blocks that start with ``-- name: <query_name>``,
the way procrastinate keeps its queries. :func:`queries` loads them into a dict.
"""

from __future__ import annotations

import contextlib
import re
import time
import weakref
from collections.abc import AsyncIterator
from functools import cache
from pathlib import Path
from typing import Any, LiteralString, cast

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from engine.config import Settings, get_settings

_NAME_RE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def resource_dir(name: str) -> Path:
    """``sql/`` or ``migrations/``: beside the packages in a checkout, inside them in a wheel."""
    packaged = Path(__file__).parent / "_data" / name
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / name


def parse_named_queries(text: str) -> dict[str, str]:
    """Split a ``.sql`` file into ``{name: query}`` on ``-- name:`` lines."""
    parts = _NAME_RE.split(text)
    blocks: dict[str, str] = {}
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in blocks:
            raise ValueError(f"query {name!r} is defined twice")
        blocks[name] = body.strip()
    return blocks


@cache
def sql_file(filename: str) -> dict[str, str]:
    return parse_named_queries((resource_dir("sql") / filename).read_text(encoding="utf-8"))


def query(name: str, filename: str = "queries.sql") -> LiteralString:
    """A static named query; these files are ours, so they are as safe as literals in code."""
    return cast(LiteralString, sql_file(filename)[name])


def template(name: str, filename: str) -> sql.SQL:
    """A named block meant to be completed with ``sql.SQL.format`` (identifiers, literals)."""
    return sql.SQL(query(name, filename))


def engine_conninfo(url: str, settings: Settings | None = None) -> str:
    """The URL, with an application name so operators can tell crmflow's sessions apart."""
    params = conninfo_to_dict(url)
    params.setdefault("application_name", "crmflow")
    return make_conninfo("", **params)


async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """Session set-up of every engine connection.

    procrastinate's functions name their tables without a schema, so its schema is
    appended to the session's search_path, after the database's own default: the
    user's tables keep resolving first, exactly as in their own sessions.

    JIT is off: the engine runs short statements, and the match statement of many
    workflows (one CASE per workflow, a sub-select per entity type) is estimated above
    jit_above_cost although it runs in milliseconds. Measured with 1,000 workflows over
    50 tables: 11.2 s of JIT compilation for a 500-event batch that runs in 0.1 s
    without it (P5 fell to 40 events/s).
    """
    schema = get_settings().procrastinate_schema
    await conn.execute(
        "SELECT set_config('search_path', current_setting('search_path') || ', ' || "
        "quote_ident(%s), false), set_config('jit', 'off', false)",
        [schema],
    )
    if not conn.autocommit:
        await conn.commit()


async def connect(url: str, **kwargs: Any) -> psycopg.AsyncConnection[dict[str, Any]]:
    conn = await psycopg.AsyncConnection.connect(
        engine_conninfo(url), row_factory=dict_row, **kwargs
    )
    await configure(conn)
    return conn


# Connections handed back to a pool, and when. WeakKeyDictionary: a connection the pool
# closes drops out by itself.
_returned_at: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = (
    weakref.WeakKeyDictionary()
)
JUST_USED = 1.0  # seconds


async def _note_returned(conn: psycopg.AsyncConnection[Any]) -> None:
    _returned_at[conn] = time.monotonic()


async def check_unless_just_used(conn: psycopg.AsyncConnection[Any]) -> None:
    """The pool's liveness check, skipped for a connection handed back within the last
    second. A check is a round trip, and a queued step checks out a connection ~8 times:
    a quarter of its statements were these pings. A connection that dies inside that
    second fails its next query instead, which every caller already handles (the
    runtime retries the job, the matcher its batch)."""
    returned = _returned_at.get(conn)
    if returned is not None and time.monotonic() - returned < JUST_USED and not conn.broken:
        return
    await AsyncConnectionPool.check_connection(conn)


@contextlib.asynccontextmanager
async def autocommit(pool: AsyncConnectionPool) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A pooled connection in autocommit, for reads and for writes of one statement.

    A pooled connection opens a transaction with its first statement: a BEGIN and a
    COMMIT, two more round trips around work that needs no transaction of its own (in
    READ COMMITTED each statement takes its own snapshot anyway; one statement is
    atomic by itself). The queued step runner reads an execution and its steps several
    times per job and sets its status in one statement (measured: a 3,000-execution
    queued drain went from 16.5 s to 13.3-13.9 s).
    Autocommit is a client-side flag in psycopg; it is put back before the connection
    returns to the pool.
    """
    async with pool.connection() as conn:
        await conn.set_autocommit(True)
        try:
            yield conn
        finally:
            with contextlib.suppress(psycopg.Error):  # a broken connection: the pool drops it
                await conn.set_autocommit(False)


def create_pool(url: str, settings: Settings | None = None, **kwargs: Any) -> AsyncConnectionPool:
    """The async pool shared by the matcher, the runtime, procrastinate and the API."""
    settings = settings or get_settings()
    kwargs.setdefault("min_size", settings.pool_min_size)
    kwargs.setdefault("max_size", settings.pool_max_size)
    return AsyncConnectionPool(
        engine_conninfo(url, settings),
        kwargs={"row_factory": dict_row},
        configure=configure,
        # Hand out only live connections: after a PostgreSQL restart the pool
        # replaces dead ones instead of failing the next query.
        check=check_unless_just_used,
        reset=_note_returned,
        open=False,
        **kwargs,
    )
