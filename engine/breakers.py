"""Circuit breakers for the external actions, one per target host.

A host that keeps failing (connection errors, timeouts, 5xx, 429: see :func:`verdict`)
is not called again for a while: its steps wait instead of failing or hammering it.

- **closed**: calls go. Each process counts the host's consecutive failures in memory,
  with no database round trip; a success resets the count.
- **open**: ``CRMFLOW_BREAKER_FAILURES`` consecutive failures seen by one process open
  it, in ``crmflow.circuit_breakers``, for ``CRMFLOW_BREAKER_OPEN_SECONDS``. Calls are
  not made: :meth:`Breakers.admit` answers the time to come back (the executor
  reschedules the step then, without using an attempt).
- **half_open**: once the open period is over, the first caller (of any process: the
  row is claimed) is let through as the probe; the others keep waiting, until the
  probe's deadline (``CRMFLOW_BREAKER_PROBE_TIMEOUT``; after it another process may
  probe). The probe's success closes the breaker; its failure opens it again for twice
  the last period, at most ``CRMFLOW_BREAKER_MAX_OPEN_SECONDS``.

Every process reads the breakers that are not closed from the table at most once a
second (on an :meth:`~Breakers.admit`), so a breaker one worker opened holds all of
them back within a second, and the API shows it (``/health``, ``/metrics``, the
dashboard). The table is written only on transitions. When the database cannot be
reached the breakers go on in memory, for this process.

The executor's external-step path::

    host = action.target_host(params, ctx)
    wait_until = await breakers.admit(host)
    if wait_until is not None:
        ...  # do not call: reschedule the step at wait_until, attempt not used
    try:
        result = await action.run(ctx, params)
    except BaseException as exc:
        await breakers.record(host, verdict(exc), error=describe(exc))
        raise
    await breakers.record(host, True)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

import psycopg

from engine import db, metrics
from engine.config import Settings

log = logging.getLogger(__name__)

State = Literal["closed", "open", "half_open"]
CLOSED: State = "closed"
OPEN: State = "open"
HALF_OPEN: State = "half_open"
# How often a process reads the other processes' breakers (seconds, at most).
REFRESH_SECONDS = 1.0
MAX_ERROR = 500  # characters of the last error kept
_DEFAULT_PORTS = {"http": 80, "https": 443}


_q = db.Queries("breakers.sql")


def now() -> datetime:
    return datetime.now(UTC)


def url_host(url: str | None) -> str | None:
    """A URL's breaker key: its host, lower-cased, with the port when it is not the
    scheme's default (``api.example.com``, ``10.0.0.5:8080``); None for no URL."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    host = host.rstrip(".")
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        return f"{host}:{port}"
    return host


def verdict(exc: BaseException | None) -> bool | None:
    """What a call's outcome says about its host: True (it answered: success, or a 4xx
    and other permanent refusals), False (a failure that opens the breaker: connection
    errors, timeouts, 5xx, 429/503, transient SMTP refusals), None (no call was made or
    it says nothing about the host: skipped, a template error, cancelled, a refusal of
    the SSRF policy, a bug)."""
    from engine import netpolicy, templates
    from engine.actions.base import PermanentError, Skip

    if exc is None:
        return True
    if isinstance(exc, Skip | templates.TemplateProblem | asyncio.CancelledError):
        return None
    if isinstance(exc, netpolicy.HostNotAllowed) or isinstance(
        exc.__context__, netpolicy.HostNotAllowed
    ):
        return None  # refused before any connection
    if isinstance(exc, PermanentError):
        return True
    if isinstance(exc, (*_retry_after(), TimeoutError, OSError, RuntimeError)):
        return False  # the actions' connection errors and 5xx (RuntimeError), timeouts
    import aiosmtplib
    import httpx

    if isinstance(exc, httpx.TransportError | aiosmtplib.SMTPException):
        return False
    return None


@functools.cache
def _retry_after() -> tuple[type[BaseException], ...]:
    """The class(es) of "come back later" (HTTP 429/503), wherever the step runner
    defines it (engine.executor.errors, formerly engine.runtime)."""
    import importlib

    found = []
    for module in ("engine.executor.errors", "engine.runtime"):
        try:
            cls = getattr(importlib.import_module(module), "RetryAfter", None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


@dataclass
class _Host:
    state: State = CLOSED
    failures: int = 0  # consecutive failures this process saw
    retry_at: datetime | None = None
    trips: int = 0
    probing: bool = False  # this process holds the half-open probe
    version: int = 0  # bumped on each local change (a refresh does not undo a newer one)


class _Unavailable(Exception):
    """The table could not be reached: the breakers go on in this process's memory."""


class Breakers:
    """The breakers as one process sees them. One per process (the executor's), shared
    by all its concurrent calls; ``owner`` names the process in the table."""

    def __init__(self, pool: db.Pool, settings: Settings, *, owner: str | None = None) -> None:
        self.pool = pool
        self.settings = settings
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._hosts: dict[str, _Host] = {}
        self._refreshed = float("-inf")
        self._refresh_lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self.settings.breaker_failures > 0

    def state(self, host: str) -> State:
        """This process's view of the host's breaker (as of its last read)."""
        known = self._hosts.get(host)
        return known.state if known else CLOSED

    async def admit(self, host: str | None) -> datetime | None:
        """None: make the call. A time: the host's breaker is open (or another call is
        its half-open probe); do not call, come back then."""
        if host is None or not self.enabled:
            return None
        await self._refresh()
        known = self._hosts.get(host)
        if known is None or known.state == CLOSED:
            return None  # the healthy path: no database, no await
        at = now()
        if known.retry_at is not None and at < known.retry_at:
            return known.retry_at  # open, or a probe is out (this process's or another's)
        # The open period (or a probe's deadline, even our own) is over: try to probe.
        try:
            row = await self._write("breaker_claim_probe", host, at)
            if row is None:  # another process probes, or closed it: the row says which
                row = await self._write("breaker_get", host, at)
                self._set(host, row)
                if row is None or row["state"] == CLOSED:
                    return None
                retry_at: datetime = row["retry_at"]
                return retry_at if retry_at > at else at + timedelta(seconds=REFRESH_SECONDS)
        except _Unavailable:
            row = self._row(HALF_OPEN, at, self.settings.breaker_probe_timeout, known.trips)
        self._set(host, row)
        self._transition(host, HALF_OPEN)
        return None

    async def record(self, host: str | None, ok: bool | None, error: str | None = None) -> None:
        """The outcome of a call that :meth:`admit` let through: ``ok`` from
        :func:`verdict` (True: the host answered; False: a failure; None: no verdict),
        ``error`` what went wrong (kept in the table when it opens the breaker)."""
        if host is None or not self.enabled:
            return
        known = self._hosts.get(host)
        if known is None:
            if ok is not False:
                return  # closed and healthy: nothing to count, nothing to write
            known = self._hosts[host] = _Host()
        at = now()
        if ok is None:
            await self._no_verdict(host, known, at)
        elif ok:
            await self._answered(host, known, at)
        else:
            await self._failed(host, known, at, (error or "")[:MAX_ERROR] or None)

    async def _no_verdict(self, host: str, known: _Host, at: datetime) -> None:
        if known.probing:  # the probe made no call: the next caller may probe
            known.probing = False
            known.version += 1
            try:
                row = await self._write("breaker_release_probe", host, at)
            except _Unavailable:
                row = self._row(OPEN, at, 0, known.trips)
            if row is not None:
                self._set(host, row)

    async def _answered(self, host: str, known: _Host, at: datetime) -> None:
        if known.state == CLOSED:
            del self._hosts[host]  # healthy again: forget the count
            return
        try:
            closed = await self._write("breaker_close", host, at) is not None
        except _Unavailable:
            closed = True
        self._hosts.pop(host, None)
        if closed:
            self._transition(host, CLOSED)
            log.info("circuit breaker for %s closed", host)

    async def _failed(self, host: str, known: _Host, at: datetime, error: str | None) -> None:
        known.failures += 1
        known.version += 1
        if known.probing:
            try:
                row = await self._write("breaker_reopen", host, at, error=error, **self._periods())
                reopened = row is not None
                if row is None:  # the claim was lost (the row edited meanwhile)
                    row = await self._write("breaker_get", host, at)
            except _Unavailable:
                row, reopened = (
                    self._row(OPEN, at, self._period(known.trips + 1), known.trips + 1),
                    True,
                )
            self._set(host, row)
            if reopened and row is not None:
                self._transition(host, OPEN)
                log.warning(
                    "circuit breaker for %s open again until %s: its probe failed: %s",
                    host,
                    row["retry_at"],
                    error,
                )
            return
        if known.state == CLOSED and known.failures >= self.settings.breaker_failures:
            failures = known.failures
            try:
                row = await self._write(
                    "breaker_open", host, at, error=error, failures=failures, **self._periods()
                )
                opened = row is not None
                if row is None:  # another process opened it first
                    row = await self._write("breaker_get", host, at)
            except _Unavailable:
                row, opened = self._row(OPEN, at, self._period(1), 1), True
            self._set(host, row)
            if opened and row is not None:
                self._transition(host, OPEN)
                log.warning(
                    "circuit breaker for %s open until %s after %d consecutive failures: %s",
                    host,
                    row["retry_at"],
                    failures,
                    error,
                )

    # ───────── internals ─────────

    def _period(self, trips: int) -> float:
        """How long the breaker stays open at its ``trips``-th opening in a row."""
        cap = max(self.settings.breaker_max_open_seconds, self.settings.breaker_open_seconds)
        period: float = self.settings.breaker_open_seconds * 2 ** min(trips - 1, 30)
        return min(period, cap)

    def _periods(self) -> dict[str, float]:
        cap = max(self.settings.breaker_max_open_seconds, self.settings.breaker_open_seconds)
        return {"open_seconds": self.settings.breaker_open_seconds, "max_open_seconds": cap}

    def _row(self, state: State, at: datetime, seconds: float, trips: int) -> dict[str, Any]:
        """The row a transition would have written, when the table cannot be reached."""
        return {
            "state": state,
            "retry_at": at + timedelta(seconds=seconds),
            "trips": trips,
            "probe_owner": self.owner if state == HALF_OPEN else None,
        }

    def _set(self, host: str, row: dict[str, Any] | None) -> None:
        """Take the row as this process's view of the host."""
        known = self._hosts.get(host)
        if row is None or row["state"] == CLOSED:
            if known is not None and known.state != CLOSED:
                del self._hosts[host]
            return
        if known is None:
            known = self._hosts[host] = _Host()
        known.state = row["state"]
        known.retry_at = row["retry_at"]
        known.trips = row["trips"]
        known.probing = row["state"] == HALF_OPEN and row["probe_owner"] == self.owner
        known.version += 1

    def _transition(self, host: str, state: State) -> None:
        metrics.BREAKER_TRANSITIONS.labels(host, state).inc()

    async def _write(
        self, name: str, host: str, at: datetime, **params: Any
    ) -> dict[str, Any] | None:
        """One statement on the host's row: the row after it, None when it matched
        nothing. Raises _Unavailable when the database cannot be reached (logged)."""
        try:
            async with db.autocommit(self.pool) as conn:
                cursor = await conn.execute(
                    _q(name),
                    {
                        "host": host,
                        "now": at,
                        "owner": self.owner,
                        "probe_timeout": self.settings.breaker_probe_timeout,
                        **params,
                    },
                )
                return await cursor.fetchone()
        except (psycopg.Error, OSError) as exc:  # a PoolTimeout is a psycopg.Error
            log.warning("circuit breakers: cannot write %s's row (%s): %s", host, name, exc)
            raise _Unavailable from exc

    async def _refresh(self) -> None:
        """Read the breakers other processes opened or closed, at most once a second."""
        if time.monotonic() - self._refreshed < REFRESH_SECONDS:
            return
        async with self._refresh_lock:
            if time.monotonic() - self._refreshed < REFRESH_SECONDS:
                return
            versions = {host: known.version for host, known in self._hosts.items()}
            try:
                async with db.autocommit(self.pool) as conn:
                    rows = await (await conn.execute(_q("breakers_not_closed"), {})).fetchall()
            except (psycopg.Error, OSError) as exc:
                log.warning("circuit breakers: cannot read the shared state: %s", exc)
                rows = None
            self._refreshed = time.monotonic()
            if rows is None:
                return
            shared = {row["host"]: row for row in rows}
            for host in set(shared) | set(self._hosts):
                known = self._hosts.get(host)
                if known is not None and (known.probing or known.version != versions.get(host)):
                    continue  # changed here meanwhile, or our own probe: ours is newer
                self._set(host, shared.get(host))


async def list_breakers(
    conn: psycopg.AsyncConnection[Any], *, include_closed: bool = False
) -> list[dict[str, Any]]:
    """The breakers in the table (for /health, /metrics, the dashboard), the not-closed
    ones first; an empty list before the migration that creates the table."""
    exists = await (
        await conn.execute("SELECT to_regclass('crmflow.circuit_breakers') IS NOT NULL AS x")
    ).fetchone()
    if not exists or not exists["x"]:
        return []
    rows = await (await conn.execute(_q("breakers_list"), {})).fetchall()
    return [r for r in rows if include_closed or r["state"] != CLOSED]
