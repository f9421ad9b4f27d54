"""Which hosts outgoing HTTP may reach (against SSRF).

With ``CRMFLOW_HTTP_ALLOWED_HOSTS`` set, only those hosts (``api.example.com``, or
``.example.com`` for a domain and its subdomains) are reachable, whatever their
addresses. Without it, any host whose every address is public is; private, loopback,
link-local, multicast and reserved addresses are refused unless
``CRMFLOW_HTTP_ALLOW_PRIVATE`` is true. Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

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
    return not (
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
