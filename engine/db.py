"""Connections, the shared pool, and the named queries of ``sql/``.

Static SQL lives in ``sql/*.sql`` as blocks that start with ``-- name: <query_name>``,
the way procrastinate keeps its queries. :func:`queries` loads them into a dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, LiteralString, TypeVar, cast

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from engine.config import Settings, get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# The connections crmflow opens (connect(), create_pool()): rows come as dicts (dict_row).
DictConnection = psycopg.AsyncConnection[dict[str, Any]]
Pool = AsyncConnectionPool[DictConnection]

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


@functools.cache
def sql_file(filename: str) -> dict[str, str]:
    return parse_named_queries((resource_dir("sql") / filename).read_text(encoding="utf-8"))


@functools.cache
def install_script(filename: str) -> LiteralString:
    """A whole script of ``sql/install/`` (``CREATE OR REPLACE`` functions and views, the
    example CRM): SQL that is not a migration, applied without parameters."""
    text = (resource_dir("sql") / "install" / filename).read_text(encoding="utf-8")
    return cast(LiteralString, text)  # type: ignore[redundant-cast]


def query(name: str, filename: str) -> LiteralString:
    """A static named query; these files are ours, so they are as safe as literals in code."""
    # mypy takes LiteralString for str (a redundant cast to it); type checkers that tell
    # them apart need the cast.
    return cast(LiteralString, sql_file(filename)[name])  # type: ignore[redundant-cast]


class Queries:
    """The named blocks of one file of ``sql/``: a module says ``_q = db.Queries("matcher.sql")``
    once, then ``_q("claim_events")``."""

    __slots__ = ("filename",)

    def __init__(self, filename: str) -> None:
        self.filename = filename

    def __call__(self, name: str) -> LiteralString:
        return query(name, self.filename)


def stored_sql(text: str) -> sql.SQL:
    """SQL the engine compiled and stored earlier (a workflow's predicate), to embed in a
    statement that also takes ``%(name)s`` parameters: its ``%`` signs are escaped."""
    return sql.SQL(text.replace("%", "%%"))


def template(name: str, filename: str) -> sql.SQL:
    """A named block meant to be completed with ``sql.SQL.format`` (identifiers, literals)."""
    return sql.SQL(query(name, filename))


def engine_conninfo(url: str, settings: Settings | None = None) -> str:
    """The URL, with an application name so operators can tell crmflow's sessions apart."""
    settings = settings or get_settings()
    params = conninfo_to_dict(url)
    params.setdefault("application_name", "crmflow")
    # An unreachable server (a host down, packets dropped) fails fast instead of hanging
    # for the kernel's TCP timeout: reconnect loops and shutdown stay bounded.
    if settings.connect_timeout:
        params.setdefault("connect_timeout", str(settings.connect_timeout))
    return make_conninfo("", **params)


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms" if seconds > 0 else "0"


async def configure(conn: psycopg.AsyncConnection[Any], settings: Settings | None = None) -> None:
    """Session set-up of every engine connection.

    procrastinate's functions name their tables without a schema, so its schema is
    appended to the session's search_path, after the database's own default: the
    user's tables keep resolving first, exactly as in their own sessions.

    JIT is off: the engine runs short statements, and the match statement of many
    workflows (one CASE per workflow, a sub-select per entity type) is estimated above
    jit_above_cost although it runs in milliseconds. Measured with 1,000 workflows over
    50 tables: 11.2 s of JIT compilation for a 500-event batch that runs in 0.1 s
    without it (P5 fell to 40 events/s).

    Timeouts (docs/design.md, "The host comes first": no engine session may stop the
    others for long):
    ``statement_timeout``, ``lock_timeout`` (a wait for a row lock, such as the
    ``crmflow.matcher_state`` row a workflow save bumps, fails with 55P03 instead of
    waiting without end; the callers retry), and ``idle_in_transaction_session_timeout``:
    a process frozen inside a transaction (SIGSTOP, a paused VM) has its session ended
    by the server, which frees every lock it held.
    """
    settings = settings or get_settings()
    await conn.execute(
        "SELECT set_config('search_path', current_setting('search_path') || ', ' || "
        "quote_ident(%s), false), set_config('jit', 'off', false), "
        "set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false), "
        "set_config('idle_in_transaction_session_timeout', %s, false)",
        [
            settings.procrastinate_schema,
            _ms(settings.statement_timeout),
            _ms(settings.lock_timeout),
            _ms(settings.idle_in_transaction_timeout),
        ],
    )
    if not conn.autocommit:
        await conn.commit()


async def connect(url: str, settings: Settings | None = None, **kwargs: Any) -> DictConnection:
    conn = await psycopg.AsyncConnection.connect(
        engine_conninfo(url, settings), row_factory=dict_row, **kwargs
    )
    await configure(conn, settings)
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
async def autocommit(pool: Pool) -> AsyncIterator[DictConnection]:
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


def create_pool(url: str, settings: Settings | None = None, **kwargs: Any) -> Pool:
    """The async pool shared by the matcher, the runtime, procrastinate and the API."""
    settings = settings or get_settings()
    kwargs.setdefault("min_size", settings.pool_min_size)
    kwargs.setdefault("max_size", settings.pool_max_size)
    return AsyncConnectionPool[DictConnection](
        engine_conninfo(url, settings),
        kwargs={"row_factory": dict_row},
        configure=functools.partial(configure, settings=settings),
        # Hand out only live connections: after a PostgreSQL restart the pool
        # replaces dead ones instead of failing the next query.
        check=check_unless_just_used,
        reset=_note_returned,
        open=False,
        **kwargs,
    )


def pool_conninfo(pool: Pool) -> str:
    """The connection string of a pool from :func:`create_pool` (a string, never a
    callable there), for a connection of its own beside the pool."""
    if not isinstance(pool.conninfo, str):
        raise TypeError("expected a pool made by create_pool, with a conninfo string")
    return pool.conninfo


class Busy(Exception):
    """A row lock stayed taken through every attempt (``lock_timeout`` each)."""


# Attempts of a save whose lock wait timed out (lock_timeout each, 2 s by default): a
# frozen session holding the lock is ended by the server's
# idle_in_transaction_session_timeout (5 s) within them.
LOCK_ATTEMPTS = 6


async def retry_lock_timeouts(
    conn: psycopg.AsyncConnection[Any],
    body: Callable[[], Awaitable[T]],
    what: str,
    attempts: int = LOCK_ATTEMPTS,
) -> T:
    """``body`` in a transaction (a savepoint inside one), run again when a lock wait
    times out (55P03); after ``attempts`` tries, :class:`Busy` with a clear message.

    A workflow save bumps ``crmflow.matcher_state``, whose row a matcher holds for the
    length of a batch: the wait is bounded by lock_timeout, and a stuck holder is freed
    by the server's idle-in-transaction timeout."""
    for attempt in range(1, attempts + 1):
        try:
            async with conn.transaction():
                return await body()
        except psycopg.errors.LockNotAvailable as exc:
            if attempt == attempts:
                raise Busy(
                    f"{what}: a lock stayed taken by another session through {attempts} "
                    f"attempts ({exc.diag.message_primary or exc}); try again"
                ) from exc
            log.info("%s: lock wait timed out (attempt %d); retrying", what, attempt)
            await asyncio.sleep(random.uniform(0.05, 0.25) * attempt)
    raise AssertionError("unreachable")


async def statement_error(
    conn: psycopg.AsyncConnection[Any], statement: sql.Composed, params: dict[str, Any]
) -> str | None:
    """None if ``statement`` runs without an error (in a savepoint inside the caller's
    transaction), else PostgreSQL's reason; a lock or statement timeout or a lost
    connection is raised, being no workflow's fault."""
    try:
        async with conn.transaction():
            await conn.execute(statement, params)
    except psycopg.OperationalError:
        raise
    except psycopg.DatabaseError as exc:
        return exc.diag.message_primary or str(exc)
    return None
