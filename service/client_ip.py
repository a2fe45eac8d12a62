"""The client's IP address, as audit rows and log lines record it (SPEC §5).

It is the connecting address, unless that address is in ``TRUSTED_PROXIES``:
then it is the rightmost ``X-Forwarded-For`` address that is not a trusted
proxy. Each proxy appends the address it was connected from, so walking the
header from the right through our own proxies stops at the first address that
none of them vouches for; everything left of it was written by the client and
is never believed.

A malformed entry (``unknown``, garbage, an empty item) is skipped: a trusted
proxy only appends well-formed addresses, so garbage can only stand in the
client's own part of the header, and skipping it never reaches past a real
address. When every entry is in ``TRUSTED_PROXIES`` the answer is the leftmost
one, the farthest hop we know (a caller inside a trusted range, such as a pod
calling through the ingress); with no usable entry, the connecting proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from aiohttp import web

from service import keys

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_ip(request: web.Request) -> str | None:
    """The client IP of ``request`` under this app's ``TRUSTED_PROXIES``.

    Worked out once per request: the audit row, the ``audit`` line and the
    access line all ask for it.
    """
    if keys.CLIENT_IP in request:
        return request[keys.CLIENT_IP]
    trusted = request.app[keys.SETTINGS].trusted_proxies
    if not trusted:
        found = request.remote  # nothing to believe: no need to look at the header
    else:
        found = resolve(request.remote, request.headers.getall("X-Forwarded-For", ()), trusted)
    request[keys.CLIENT_IP] = found
    return found


def resolve(
    peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]
) -> str | None:
    """The client IP from the connecting address and the ``X-Forwarded-For`` values.

    ``forwarded_for`` holds the header's values in the order received (a
    request may carry the header more than once: they form one list).
    """
    peer_address = parse_address(peer) if peer else None
    if peer_address is None or not _is_trusted(peer_address, trusted):
        return peer
    farthest = peer_address
    entries = [item for value in forwarded_for for item in value.split(",")]
    for entry in reversed(entries):
        address = parse_address(entry)
        if address is None:
            continue
        if not _is_trusted(address, trusted):
            return str(address)
        farthest = address
    return str(farthest)


def parse_address(text: str) -> Address | None:
    """One address as proxies write it (``203.0.113.7``, ``203.0.113.7:4711``,
    ``2001:db8::1``, ``[2001:db8::1]:4711``), normalised; None if it is not one.

    An IPv4-mapped IPv6 address is the IPv4 address it maps (a dual-stack
    socket reports IPv4 peers that way), and an IPv6 zone is dropped (it means
    nothing off this host, and Postgres' ``inet`` refuses it).
    """
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not _is_port(rest)):
            return None
        text = host
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not _is_port(":" + port):
            return None
        text = host
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(text.partition("%")[0])
    return address


def _is_port(text: str) -> bool:
    return text.startswith(":") and text[1:].isascii() and text[1:].isdigit() and len(text) <= 6


def _is_trusted(address: Address, trusted: Sequence[Network]) -> bool:
    # An IPv4 address is never in an IPv6 network (and vice versa): `in` says False.
    return any(address in network for network in trusted)
