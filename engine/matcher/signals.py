"""What the matcher's loop waits on and backs off from: NOTIFY hints, serialization
conflicts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

import psycopg
from psycopg import sql

from engine import db

log = logging.getLogger("engine.matcher")

OUTBOX_CHANNEL = "crmflow_outbox"
WORKFLOWS_CHANNEL = "crmflow_workflows"


def conflict_kind(exc: BaseException) -> str | None:
    """What kind of lock conflict rolled back a transaction: ``deadlock`` (40P01),
    ``serialization`` (the rest of class 40), ``lock_timeout`` (55P03),
    ``statement_timeout`` (57014); None for anything else (a lost connection...)."""
    state = getattr(exc, "sqlstate", None)
    if not state:
        return None
    if state == "40P01":
        return "deadlock"
    if state.startswith("40"):
        return "serialization"
    if state == "55P03":
        return "lock_timeout"
    if state == "57014":
        return "statement_timeout"
    return None


CONFLICT_BACKOFF = 0.01  # s, the first retry after a conflict


CONFLICT_BACKOFF_MAX = 1.0


def conflict_backoff(in_a_row: int) -> float:
    """10 ms, doubling with each conflict in a row up to 1 s, jittered by ±50 %."""
    base: float = min(CONFLICT_BACKOFF_MAX, CONFLICT_BACKOFF * 2 ** min(in_a_row - 1, 10))
    return base * random.uniform(0.5, 1.5)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class _Listener:
    """A LISTEN connection that reconnects on its own; losing it only slows to the poll."""

    def __init__(self, url: str, channels: list[str]) -> None:
        self.url = url
        self.channels = channels
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.backoff = 0.5

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await db.connect(self.url, autocommit=True)
        for channel in self.channels:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        self.backoff = 0.5
        return conn

    async def wait(self, timeout: float, stop: asyncio.Event) -> None:
        if self.conn is None or self.conn.closed:
            try:
                self.conn = await self._connect()
            except psycopg.Error as exc:
                log.warning("LISTEN connection failed (%s); polling", exc)
                self.conn = None
                await _sleep_or_stop(stop, min(timeout, self.backoff))
                self.backoff = min(self.backoff * 2, 30.0)
                return
        try:
            async for _ in self.conn.notifies(timeout=timeout, stop_after=1):
                break
        except psycopg.Error as exc:
            log.warning("LISTEN connection lost (%s); reconnecting", exc)
            await self.close()

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self.conn.close()
            self.conn = None
