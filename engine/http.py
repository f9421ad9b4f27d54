"""The HTTP clients the external actions share: one ``httpx.AsyncClient`` per event loop
and network policy, so that calls to the same host reuse their connections (keep-alive)
instead of opening a TCP (and TLS) connection per call.

Two policies, two clients (never one for both: a connection opened without the
connect-time check must not serve a request that needs it):

- ``checked=True``: only public addresses (``netpolicy.public_only(settings)``); each new
  connection resolves its host again, refuses non-public addresses and connects to the
  address it checked (``netpolicy._PublicOnlyBackend``). ``http_request`` still checks
  every URL before its request (``netpolicy.check_url``), reused connection or not.
- ``checked=False``: an allowlist decides (checked per request by ``check_url``), or
  private addresses are allowed; and the enrichment endpoint, which the operator
  configures (``CRMFLOW_ENRICHMENT_URL``).

Both follow no redirects and ignore proxy settings from the environment. Timeouts are
given per request.

Each client's connections are spread over a few small pools (``SHARDS`` transports of
``SHARD_LIMITS``; a request goes to the first shard with room, so calls one after
another still reuse one connection). One big pool costs time quadratic in the calls in
flight: httpcore looks at every connection of the pool, and whether each has expired
(a socket check), for every request; with 64 calls in flight to one host that was
three quarters of a worker's time, and 4 calls in flight did twice the work of 64.

A client belongs to the event loop that created it (its connections
do): a new loop gets its own. A process closes its clients, and send_email's SMTP
sessions (engine/smtp.py), with :func:`close_clients` when it stops (the worker does).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Callable

import httpx

from engine import netpolicy

# Transports per client, and each one's pool (see above): 16 x 16 = 256 connections.
SHARDS = 16
SHARD_LIMITS = httpx.Limits(max_connections=16, max_keepalive_connections=4, keepalive_expiry=5.0)
# A shard takes more requests while it has fewer than this many in flight.
SHARD_ROOM = 4


class _Released(httpx.AsyncByteStream):
    """A response body that gives its shard's slot back when it is closed."""

    def __init__(self, inner: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


class ShardedTransport(httpx.AsyncBaseTransport):
    """Requests spread over up to ``SHARDS`` transports made by ``make``: the first with
    fewer than ``SHARD_ROOM`` requests in flight, else the least busy."""

    def __init__(self, make: Callable[[], httpx.AsyncBaseTransport]) -> None:
        self._make = make
        self._shards: list[httpx.AsyncBaseTransport] = []
        self._busy: list[int] = []

    def _pick(self) -> int:
        for i, busy in enumerate(self._busy):
            if busy < SHARD_ROOM:
                return i
        if len(self._shards) < SHARDS:
            self._shards.append(self._make())
            self._busy.append(0)
            return len(self._shards) - 1
        return min(range(len(self._busy)), key=self._busy.__getitem__)

    def _release(self, i: int) -> None:
        self._busy[i] -= 1

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        i = self._pick()
        self._busy[i] += 1
        try:
            response = await self._shards[i].handle_async_request(request)
        except BaseException:
            self._release(i)
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Released(response.stream, lambda: self._release(i))
        return response

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


def _new_client(checked: bool) -> httpx.AsyncClient:
    """A shared client: no redirects, no proxies from the environment, verified TLS, the
    connect-time address check when ``checked``, connections in small pools."""

    def make() -> httpx.AsyncBaseTransport:
        if checked:
            return netpolicy._PublicOnlyTransport(SHARD_LIMITS)
        return httpx.AsyncHTTPTransport(
            verify=netpolicy.ssl_context(), trust_env=False, limits=SHARD_LIMITS
        )

    return httpx.AsyncClient(
        follow_redirects=False, trust_env=False, transport=ShardedTransport(make)
    )


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[bool, httpx.AsyncClient]] = (
    weakref.WeakKeyDictionary()
)


def get_client(checked: bool) -> httpx.AsyncClient:
    """This event loop's shared client for the policy (created on first use)."""
    loop = asyncio.get_running_loop()
    per_loop = _clients.get(loop)
    if per_loop is None:
        per_loop = _clients[loop] = {}
    client = per_loop.get(checked)
    if client is None or client.is_closed:
        client = per_loop[checked] = _new_client(checked)
    return client


async def close_clients() -> None:
    """Close this event loop's shared clients of the external actions: the HTTP clients
    (and their idle connections) and the SMTP sessions (engine/smtp.py)."""
    from engine import smtp

    per_loop = _clients.pop(asyncio.get_running_loop(), {})
    for client in per_loop.values():
        await client.aclose()
    await smtp.close_connections()
