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
given per request. A client belongs to the event loop that created it (its connections
do): a new loop gets its own. A process closes its clients, and send_email's SMTP
sessions (engine/smtp.py), with :func:`close_clients` when it stops (the worker does).
"""

from __future__ import annotations

import asyncio
import weakref

import httpx

from engine import netpolicy

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
        client = per_loop[checked] = netpolicy.new_client(checked)
    return client


async def close_clients() -> None:
    """Close this event loop's shared clients of the external actions: the HTTP clients
    (and their idle connections) and the SMTP sessions (engine/smtp.py)."""
    from engine import smtp

    per_loop = _clients.pop(asyncio.get_running_loop(), {})
    for client in per_loop.values():
        await client.aclose()
    await smtp.close_connections()
