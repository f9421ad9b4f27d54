"""Which hosts outgoing HTTP may reach (against SSRF).

With ``CRMFLOW_HTTP_ALLOWED_HOSTS`` set, only those hosts (``api.example.com``, or
``.example.com`` for a domain and its subdomains) are reachable, whatever their
addresses. Without it, any host whose every address is public is: every range of the
IANA special-purpose address registries (IPv4 and IPv6; private, loopback, link-local,
documentation, benchmarking, shared, reserved...), multicast, IPv6 outside global unicast,
and IPv6 addresses that embed a refused IPv4 address (IPv4-mapped, NAT64, 6to4) are
refused unless ``CRMFLOW_HTTP_ALLOW_PRIVATE`` is true. Redirects are not followed.

Checking a name's addresses before the request is not enough on its own: the name
can resolve to another address when the connection is made (DNS rebinding). So the
client from :func:`http_client` (and the shared ones of ``engine/http.py``) checks again
at connect time, and connects to the very address it checked; a kept-alive connection
stays with that address. It ignores proxy settings from the environment
(``HTTP_PROXY``...): a proxy would make the checked address meaningless.
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


# Addresses outgoing HTTP may not reach unless allowed explicitly. The complete IANA
# registries, as of 2025:
# - "IANA IPv4 Special-Purpose Address Registry" (RFC 6890 and its updates), every row,
#   and 224.0.0.0/4 (multicast, "IPv4 Multicast Address Space Registry");
# - "IANA IPv6 Special-Purpose Address Registry", every row, and from the "IPv6 Address
#   Space" registry everything outside 2000::/3 (global unicast): loopback, IPv4-compatible,
#   fc00::/7, fe80::/10, the deprecated site-local fec0::/10, multicast ff00::/8, and the
#   blocks reserved by the IETF.
# Rows the registries mark "globally reachable" (anycast services such as PCP, TURN, AS112,
# AMT, ORCHIDv2) are refused too: none of them is a webhook endpoint. The three IPv6 forms
# that reach an IPv4 address are judged by that address: IPv4-mapped ::ffff:0:0/96 (the
# socket connects over IPv4), the NAT64 well-known prefix 64:ff9b::/96 (RFC 6052) and
# 6to4 2002::/16 (RFC 3056, the IPv4 address in bits 16-47). The local-use NAT64 prefix
# 64:ff9b:1::/48 (RFC 8215) is refused whatever it embeds: where the IPv4 address sits in
# it is the local network's choice, and it is not globally reachable. Teredo 2001::/32 is
# refused (inside 2001::/23).
_SPECIAL_IPV4 = [
    ("0.0.0.0/8", '"this network" (RFC 791); 0.0.0.0/32 "this host"'),
    ("10.0.0.0/8", "private use (RFC 1918)"),
    ("100.64.0.0/10", "shared address space, carrier-grade NAT (RFC 6598)"),
    ("127.0.0.0/8", "loopback (RFC 1122)"),
    ("169.254.0.0/16", "link local (RFC 3927), cloud metadata"),
    ("172.16.0.0/12", "private use (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments (RFC 6890)"),
    # inside 192.0.0.0/24: 192.0.0.0/29 IPv4 service continuity (RFC 7335), 192.0.0.8/32
    # IPv4 dummy address (RFC 7600), 192.0.0.9/32 PCP anycast (RFC 7723), 192.0.0.10/32
    # TURN anycast (RFC 8155), 192.0.0.170-171/32 NAT64/DNS64 discovery (RFC 7050)
    ("192.0.2.0/24", "documentation, TEST-NET-1 (RFC 5737)"),
    ("192.31.196.0/24", "AS112-v4 (RFC 7535)"),
    ("192.52.193.0/24", "AMT (RFC 7450)"),
    ("192.88.99.0/24", "deprecated 6to4 relay anycast (RFC 7526)"),
    ("192.168.0.0/16", "private use (RFC 1918)"),
    ("192.175.48.0/24", "direct delegation AS112 service (RFC 7534)"),
    ("198.18.0.0/15", "benchmarking (RFC 2544)"),
    ("198.51.100.0/24", "documentation, TEST-NET-2 (RFC 5737)"),
    ("203.0.113.0/24", "documentation, TEST-NET-3 (RFC 5737)"),
    ("224.0.0.0/4", "multicast (RFC 5771)"),
    ("240.0.0.0/4", "reserved (RFC 1112)"),
    ("255.255.255.255/32", "limited broadcast (RFC 919)"),
]
_SPECIAL_IPV6 = [
    ("::/128", "unspecified (RFC 4291)"),
    ("::1/128", "loopback (RFC 4291)"),
    ("64:ff9b:1::/48", "local-use IPv4/IPv6 translation (RFC 8215)"),
    ("100::/64", "discard-only (RFC 6666)"),
    ("100:0:0:1::/64", "dummy IPv6 prefix (RFC 9780)"),
    ("2001::/23", "IETF protocol assignments (RFC 2928)"),
    # inside 2001::/23: 2001::/32 Teredo (RFC 4380), 2001:1::1-3/128 PCP, TURN and
    # DNS-SD SRP anycast, 2001:2::/48 benchmarking (RFC 5180), 2001:3::/32 AMT,
    # 2001:4:112::/48 AS112-v6, 2001:10::/28 deprecated ORCHID (RFC 4843), 2001:20::/28
    # ORCHIDv2 (RFC 7343), 2001:30::/28 drone remote ID DETs (RFC 9374)
    ("2001:db8::/32", "documentation (RFC 3849)"),
    ("2620:4f:8000::/48", "direct delegation AS112 service (RFC 7534)"),
    ("3fff::/20", "documentation (RFC 9637)"),
    ("5f00::/16", "segment routing SIDs (RFC 9602)"),
    ("fc00::/7", "unique local (RFC 4193)"),
    ("fe80::/10", "link-local unicast (RFC 4291)"),
    ("fec0::/10", "deprecated site-local (RFC 3879)"),
    ("ff00::/8", "multicast (RFC 4291)"),
]
_REFUSED_V4 = [ipaddress.IPv4Network(net) for net, _ in _SPECIAL_IPV4]
_REFUSED_V6 = [ipaddress.IPv6Network(net) for net, _ in _SPECIAL_IPV6]
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches: IPv4-mapped, NAT64 (64:ff9b::/96) or
    6to4 (2002::/16); None for any other address."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return None


def _public(address: str) -> bool:
    """Whether an address is outside every special-purpose range above (after unwrapping
    an IPv4 address embedded in an IPv6 one)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is None:
            return ip in _GLOBAL_UNICAST and not any(ip in net for net in _REFUSED_V6)
        ip = embedded
    return not any(ip in net for net in _REFUSED_V4)


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


# Connection pool bounds of a client (engine/http.py shares one per process and policy).
# Keep-alive connections idle this many seconds are closed (servers often close theirs
# after 5-60 s: reusing one the server is closing fails the request).
LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=5.0)


class _PublicOnlyTransport(httpx.AsyncHTTPTransport):
    def __init__(self, limits: httpx.Limits = LIMITS) -> None:
        super().__init__(verify=ssl_context(), trust_env=False, limits=limits)
        # The same pool httpx builds, with the checking network backend.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_PublicOnlyBackend(),
        )


def public_only(settings: Settings) -> bool:
    """Whether only public addresses are reachable (no allowlist, private not allowed):
    then the client checks each connection's address again when it connects."""
    return not settings.http_allowed_hosts and not settings.http_allow_private


def new_client(
    checked: bool, timeout: float | None = None, limits: httpx.Limits = LIMITS
) -> httpx.AsyncClient:
    """A client with no redirects and no proxies from the environment; ``checked``: every
    connection's address is checked when connecting (:func:`public_only` settings)."""
    return httpx.AsyncClient(
        verify=ssl_context(),
        follow_redirects=False,
        timeout=timeout,
        trust_env=False,
        limits=limits,
        transport=_PublicOnlyTransport(limits) if checked else None,
    )


def http_client(settings: Settings, timeout: float) -> httpx.AsyncClient:
    """A new HTTP client for requests to URLs that :func:`check_url` accepted: no
    redirects, no proxies from the environment, and, when only public hosts are allowed,
    the address checked again when connecting. The actions share one per process
    instead (:func:`engine.http.get_client`)."""
    return new_client(public_only(settings), timeout)
