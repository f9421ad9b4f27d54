"""The SSRF policy against the IANA special-purpose address registries (both families),
the address-space registries' non-unicast parts, and the IPv6 forms that embed an IPv4
address (IPv4-mapped, NAT64, 6to4). No database: the policy is pure address logic, and
``check_url`` with an IP literal resolves locally."""

from __future__ import annotations

import ipaddress

import pytest

from engine import netpolicy
from engine.config import Settings

# Every range the policy must refuse, one entry per registry row (plus multicast, the
# deprecated site-local block and IPv6 outside global unicast): the network's first, a
# middle and its last address are checked. The rows that embed an IPv4 address
# (::ffff:0:0/96, 64:ff9b::/96, 2002::/16) are refused or not by that address: below.
REFUSED_RANGES = [
    # IANA IPv4 Special-Purpose Address Registry
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.0.0/29",
    "192.0.0.8/32",
    "192.0.0.9/32",
    "192.0.0.10/32",
    "192.0.0.170/32",
    "192.0.0.171/32",
    "192.0.2.0/24",
    "192.31.196.0/24",
    "192.52.193.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "192.175.48.0/24",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "240.0.0.0/4",
    "255.255.255.255/32",
    # IPv4 multicast
    "224.0.0.0/4",
    # IANA IPv6 Special-Purpose Address Registry
    "::1/128",
    "::/128",
    "64:ff9b:1::/48",
    "100::/64",
    "100:0:0:1::/64",
    "2001::/23",
    "2001::/32",
    "2001:1::1/128",
    "2001:1::2/128",
    "2001:1::3/128",
    "2001:2::/48",
    "2001:3::/32",
    "2001:4:112::/48",
    "2001:10::/28",
    "2001:20::/28",
    "2001:30::/28",
    "2001:db8::/32",
    "2620:4f:8000::/48",
    "3fff::/20",
    "5f00::/16",
    "fc00::/7",
    "fe80::/10",
    # IPv6 address space: deprecated site-local, multicast, not global unicast
    "fec0::/10",
    "ff00::/8",
    "::/96",
    "4000::/3",
    "e000::/4",
]


def _samples(cidr: str) -> list[str]:
    net = ipaddress.ip_network(cidr)
    return sorted({str(net[0]), str(net[net.num_addresses // 2]), str(net[-1])})


@pytest.mark.parametrize("cidr", REFUSED_RANGES)
def test_special_purpose_ranges_are_refused(cidr: str) -> None:
    for address in _samples(cidr):
        assert not netpolicy._public(address), address


@pytest.mark.parametrize(
    "address",
    [
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1 (the issue's example)
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254 (cloud metadata)
        "2002:c000:8::",  # 6to4 of 192.0.0.8
        "2002::1",  # 6to4 of 0.0.0.0
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b::c000:208",  # NAT64 of 192.0.2.8
        "64:ff9b:1::5db8:d70e",  # local-use NAT64, whatever it embeds
        "::ffff:127.0.0.1",
        "::ffff:192.0.0.8",
        "::127.0.0.1",  # IPv4-compatible (deprecated)
        "fec0::1",  # site-local (the issue's example)
        "192.0.0.8",  # IPv4 dummy address (the issue's example)
        "198.19.255.255",
        "fe80::1%eth0",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    ],
)
def test_addresses_from_the_issue_and_embedded_ipv4_are_refused(address: str) -> None:
    assert not netpolicy._public(address)


@pytest.mark.parametrize(
    "address",
    [
        "93.184.215.14",
        "1.1.1.1",
        "8.8.8.8",
        "192.0.1.1",  # next to 192.0.0.0/24
        "198.20.0.1",  # next to 198.18.0.0/15
        "100.128.0.1",  # next to 100.64.0.0/10
        "223.255.255.254",
        "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
        "2a00:1450:4001:81c::200e",
        "2002:5db8:d70e::1",  # 6to4 of a public address
        "64:ff9b::5db8:d70e",  # NAT64 of a public address
        "::ffff:93.184.215.14",  # IPv4-mapped public address
    ],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert netpolicy._public(address)


@pytest.mark.parametrize(
    "url",
    [
        "http://[2002:7f00:1::1]/",
        "http://[fec0::1]:8080/x",
        "http://192.0.0.8/",
        "http://[64:ff9b::7f00:1]/",
        "http://198.18.0.1/",
    ],
)
async def test_check_url_refuses_special_purpose_literals(url: str) -> None:
    settings = Settings(http_allowed_hosts=[], http_allow_private=False)
    with pytest.raises(netpolicy.HostNotAllowed, match="non-public address"):
        await netpolicy.check_url(url, settings)


async def test_allowlist_still_decides_alone() -> None:
    """With CRMFLOW_HTTP_ALLOWED_HOSTS set, only the listed hosts are reachable,
    whatever their addresses (the tests allow 127.0.0.1 this way)."""
    listed = Settings(http_allowed_hosts=["127.0.0.1", "[2002:7f00:1::1]", "2002:7f00:1::1"])
    await netpolicy.check_url("http://127.0.0.1:9/", listed)
    await netpolicy.check_url("http://[2002:7f00:1::1]/", listed)
    with pytest.raises(netpolicy.HostNotAllowed, match="not in CRMFLOW_HTTP_ALLOWED_HOSTS"):
        await netpolicy.check_url("http://192.0.0.8/", listed)
    await netpolicy.check_url("http://192.0.0.8/", Settings(http_allow_private=True))
