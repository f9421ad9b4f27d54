"""The dashboard's live feed: one LISTEN connection per app, fanned out to every browser.

Migration 0007 makes each statement that inserts or updates ``crmflow.executions`` send
a hint on ``crmflow_executions``. :class:`ExecutionFeed` listens on one connection of
its own and, on each hint or every ``poll_interval`` seconds when none comes (a hint
can be lost while it reconnects), reads the newest executions once and publishes that
snapshot to all subscribers. Each SSE stream (``/ui/executions/stream``) keeps what it
last sent per execution and sends only rows that are new or changed, so a hundred open
dashboards cost one connection and one query per change, not a hundred.

The listener runs while someone is subscribed. :meth:`ExecutionFeed.close` ends every
subscription at once, so a server can stop while browsers are connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import psycopg

from engine import db, executions

log = logging.getLogger(__name__)

CHANNEL = "crmflow_executions"
# The listener's name in pg_stat_activity.
APPLICATION_NAME = "crmflow dashboard feed"
# How many of the newest executions a snapshot holds (the page shows fewer).
WINDOW = 100
# Bursts of hints (a matcher batch, a busy runner) make one read per interval at most.
MIN_INTERVAL = 0.2
# While it listens the feed tells writers so (crmflow.feed_state) every ANNOUNCE_EVERY
# seconds, for ANNOUNCE_FOR seconds: with no dashboard open nothing notifies.
ANNOUNCE_EVERY = 10.0
ANNOUNCE_FOR = 30.0


class ExecutionFeed:
    """Snapshots of the newest executions, published on each change."""

    def __init__(self, conninfo: str, *, poll_interval: float = 2.0) -> None:
        self.conninfo = conninfo
        self.poll_interval = poll_interval
        self.snapshot: list[dict[str, Any]] = []
        self.version = 0  # bumped on each published snapshot
        self.closed = False
        self._changed = asyncio.Condition()
        self._subscribers = 0
        self._task: asyncio.Task[None] | None = None

    async def follow(self) -> AsyncGenerator[list[dict[str, Any]], None]:
        """Each new snapshot (newest execution first) until the feed closes; the first
        one as soon as the listener has read it."""
        self._subscribers += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._listen(), name="crmflow-ui-feed")
        try:
            seen = 0
            while True:
                async with self._changed:
                    await self._changed.wait_for(self._past(seen))
                if self.closed:
                    return
                seen = self.version
                yield self.snapshot
        finally:
            self._subscribers -= 1
            if self._subscribers == 0 and self._task is not None:
                # Nobody is watching: give the connection back until someone is.
                self._task.cancel()
                self._task = None

    def _past(self, seen: int) -> Callable[[], bool]:
        return lambda: self.closed or self.version > seen

    async def close(self) -> None:
        """End every subscription and stop listening."""
        self.closed = True
        async with self._changed:
            self._changed.notify_all()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _publish(self, snapshot: list[dict[str, Any]]) -> None:
        async with self._changed:
            self.snapshot = snapshot
            self.version += 1
            self._changed.notify_all()

    async def _listen(self) -> None:
        while not self.closed:
            try:
                async with await db.connect(
                    self.conninfo, autocommit=True, application_name=APPLICATION_NAME
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    announced = 0.0
                    while not self.closed:
                        started = time.monotonic()
                        if started - announced > ANNOUNCE_EVERY:
                            # Writers notify only while this is in the future (0007).
                            await conn.execute(
                                "UPDATE crmflow.feed_state SET listening_until ="
                                " greatest(listening_until, now() + make_interval(secs => %s))",
                                [ANNOUNCE_FOR],
                            )
                            announced = started
                        await self._publish(await executions.list_executions(conn, limit=WINDOW))
                        # Hints that came during the read are kept by psycopg and end
                        # this wait at once; otherwise it is the poll fallback.
                        # (Iterated to its end, not broken out of: the generator holds
                        # the connection's lock until it finishes.)
                        async for _ in conn.notifies(timeout=self.poll_interval, stop_after=1):
                            pass
                        await asyncio.sleep(max(0.0, MIN_INTERVAL - (time.monotonic() - started)))
            except psycopg.Error as exc:
                log.warning("dashboard feed: %s; reconnecting in %.1f s", exc, self.poll_interval)
                await asyncio.sleep(self.poll_interval)
