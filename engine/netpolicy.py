"""Which hosts outgoing HTTP may reach (against SSRF).

With ``CRMFLOW_HTTP_ALLOWED_HOSTS`` set, only those hosts (``api.example.com``, or
``.example.com`` for a domain and its subdomains) are reachable, whatever their
addresses. Without it, any host whose every address is public is; private, loopback,
link-local, multicast and reserved addresses are refused unless
``CRMFLOW_HTTP_ALLOW_PRIVATE`` is true. Redirects are not followed.

Checking a name's addresses before the request is not enough on its own: the name
can resolve to another address when the connection is made (DNS rebinding). So the
client from :func:`http_client` checks again at connect time, and connects to the very
address it checked. It ignores proxy settings from the environment (``HTTP_PROXY``...):
a proxy would make the checked address meaningless.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from engine.config import Settings


class HostNotAllowed(ValueError):
    pass


def host_listed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().strip()
        if entry.startswith(".") and (host.endswith(entry) or host == entry[1:]):
            return True
        if host == entry:
            return True
    return False


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def check_url_shape(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise HostNotAllowed(f"only http and https URLs are allowed, not {parts.scheme or url!r}")
    if not parts.hostname:
        raise HostNotAllowed(f"{url!r} names no host")
    if parts.username or parts.password:
        raise HostNotAllowed("credentials in URLs are not allowed; use headers")
    return parts.hostname


async def check_url(url: str, settings: Settings) -> None:
    host = check_url_shape(url)
    if settings.http_allowed_hosts:
        if not host_listed(host, settings.http_allowed_hosts):
            raise HostNotAllowed(f"{host} is not in CRMFLOW_HTTP_ALLOWED_HOSTS")
        return
    if settings.http_allow_private:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise HostNotAllowed(f"cannot resolve {host}: {exc}") from None
    blocked = sorted({str(info[4][0]) for info in infos if not _public(str(info[4][0]))})
    if blocked:
        raise HostNotAllowed(
            f"{host} resolves to a non-public address ({', '.join(blocked)}); allow it with "
            "CRMFLOW_HTTP_ALLOWED_HOSTS"
        )


class _PublicOnlyBackend(httpcore.AsyncNetworkBackend):
    """Resolves the host at connect time, refuses non-public addresses, and connects
    to the address it checked (not to the name, which could resolve differently)."""

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM),
                timeout,
            )
        except socket.gaierror as exc:
            raise HostNotAllowed(f"cannot resolve {host}: {exc}") from None
        addresses = [str(info[4][0]) for info in infos]
        blocked = sorted({a for a in addresses if not _public(a)})
        if blocked or not addresses:
            raise HostNotAllowed(
                f"{host} resolves to a non-public address ({', '.join(blocked)}); allow it "
                "with CRMFLOW_HTTP_ALLOWED_HOSTS"
            )
        return await self._inner.connect_tcp(
            addresses[0],
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise HostNotAllowed("unix sockets are not reachable")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """One verifying SSL context per process. Building one loads the CA bundle, ~40 ms of
    CPU under the GIL: per request, that capped a worker at ~15 webhooks/s."""
    return httpx.create_ssl_context(trust_env=False)


class _PublicOnlyTransport(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__(verify=ssl_context(), trust_env=False)
        # The same pool httpx builds, with the checking network backend.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context(),
            network_backend=_PublicOnlyBackend(),
        )


def http_client(settings: Settings, timeout: float) -> httpx.AsyncClient:
    """An HTTP client for requests to URLs that :func:`check_url` accepted: no redirects,
    no proxies from the environment, and, when only public hosts are allowed, the
    address checked again when connecting."""
    public_only = not settings.http_allowed_hosts and not settings.http_allow_private
    return httpx.AsyncClient(
        verify=ssl_context(),
        follow_redirects=False,
        timeout=timeout,
        trust_env=False,
        transport=_PublicOnlyTransport() if public_only else None,
    )
