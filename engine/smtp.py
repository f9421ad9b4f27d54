"""The SMTP connections ``send_email`` shares: a few kept-open sessions per SMTP server
and event loop, so that emails do not each pay a TCP connection, EHLO, STARTTLS and AUTH.

A session sends one message at a time (SMTP has no pipelining of transactions); up to
:data:`MAX_CONNECTIONS` run at once per server, more sends wait for a free one (within
the step's timeout). A session is used again only when it is safe to:

- after a refusal the server answered (a 4xx/5xx reply, refused recipients), aiosmtplib
  has reset the envelope (RSET): the next message starts clean;
- after any other error (a connection lost, a timeout, a cancellation) it is closed, never
  reused: what state the server is in is unknown;
- one idle for more than :data:`IDLE_CHECK` seconds is checked with a NOOP first (a
  server closes idle sessions), one idle for more than :data:`MAX_IDLE` seconds, or that
  sent :data:`MAX_MESSAGES`, is closed and replaced.

A lost session therefore costs a reconnection, not a failed step; a failure after the
message was handed over is an ordinary failed attempt, and its retry carries the same
Message-ID (at-least-once, as before). :func:`close_connections` (called by
``engine.http.close_clients``) ends them with QUIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import aiosmtplib

MAX_CONNECTIONS = 4  # per SMTP server, event loop
IDLE_CHECK = 2.0  # seconds idle after which a NOOP checks the session before use
MAX_IDLE = 60.0  # seconds idle after which the session is replaced
MAX_MESSAGES = 100  # messages per session (servers limit them per session)
QUIT_TIMEOUT = 2.0


@dataclass
class _Session:
    smtp: aiosmtplib.SMTP
    last_used: float = field(default_factory=time.monotonic)
    sent: int = 0


class _Server:
    """The sessions to one SMTP server (one set of connection options)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.idle: list[_Session] = []
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self.opened = 0  # sessions connected so far (tests)

    async def send(self, message: EmailMessage) -> tuple[dict[str, Any], str]:
        async with self.slots:
            session = await self._take()
            try:
                result = await session.smtp.send_message(message)
            except (aiosmtplib.SMTPRecipientsRefused, aiosmtplib.SMTPResponseException):
                self._give_back(session)  # answered; the envelope was reset
                raise
            except BaseException:
                _close(session)
                raise
            session.sent += 1
            self._give_back(session)
            return result

    async def _take(self) -> _Session:
        while self.idle:
            session = self.idle.pop()  # the most recently used
            idle = time.monotonic() - session.last_used
            if not session.smtp.is_connected or idle > MAX_IDLE or session.sent >= MAX_MESSAGES:
                _close(session)
                continue
            if idle > IDLE_CHECK:
                try:
                    await session.smtp.noop()
                except (aiosmtplib.SMTPException, OSError):
                    _close(session)
                    continue
            return session
        smtp = aiosmtplib.SMTP(**self.options)
        await smtp.connect()
        self.opened += 1
        return _Session(smtp)

    def _give_back(self, session: _Session) -> None:
        if session.smtp.is_connected:
            session.last_used = time.monotonic()
            self.idle.append(session)

    async def close(self) -> None:
        idle, self.idle = self.idle, []
        for session in idle:
            await _quit(session)


def _close(session: _Session) -> None:
    with contextlib.suppress(Exception):
        session.smtp.close()


async def _quit(session: _Session) -> None:
    if session.smtp.is_connected:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.smtp.quit(), QUIT_TIMEOUT)
    _close(session)


_servers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], _Server]] = (
    weakref.WeakKeyDictionary()
)


def server(**options: Any) -> _Server:
    """This event loop's sessions to the SMTP server with these ``aiosmtplib.SMTP``
    options (host, port, TLS, credentials, timeout)."""
    loop = asyncio.get_running_loop()
    per_loop = _servers.get(loop)
    if per_loop is None:
        per_loop = _servers[loop] = {}
    key = tuple(sorted(options.items()))
    found = per_loop.get(key)
    if found is None:
        found = per_loop[key] = _Server(options)
    return found


async def send(message: EmailMessage, **options: Any) -> tuple[dict[str, Any], str]:
    """``aiosmtplib.send(message, **options)`` on a shared session: the same result,
    the same exceptions."""
    return await server(**options).send(message)


async def close_connections() -> None:
    """QUIT this event loop's idle SMTP sessions."""
    for found in _servers.pop(asyncio.get_running_loop(), {}).values():
        await found.close()
