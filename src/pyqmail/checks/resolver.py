"""The DNS resolver the inbound checks ask: the system's, or ``control/dnsresolver``.

Why a control file: a test (or a host with a local validating resolver on another port)
must be able to point the checks at one server without touching /etc/resolv.conf. Each
line of ``control/dnsresolver`` is ``host`` or ``host@port`` (IPv4 or IPv6 address; parsed
by ``pyqmail.control.parsers.nameservers``); without the file the system's resolver
configuration is used. Every lookup is bounded by
``timeout`` seconds in all (dnspython's ``lifetime``); answers are cached for their TTL.
"""

from __future__ import annotations

from collections.abc import Sequence

import dns.exception
import dns.resolver

DEFAULT_TIMEOUT = 5.0
CACHE_SIZE = 20_000  # answers per process


def point_at(res: dns.resolver.BaseResolver, servers: Sequence[tuple[str, int]]) -> None:
    """Make ``res`` (synchronous or asyncio) ask exactly ``servers``.

    Addresses as strings plus a port map: the one form that both Debian 12's dnspython 2.3,
    which hosts run the daemon with, and later releases accept (``dns.nameserver`` objects
    only exist from 2.4 on; a daemon importing them does not start on a host)."""
    res.nameservers = [host for host, _ in servers]
    res.port = servers[0][1]
    res.nameserver_ports = dict(servers)


def make_resolver(
    servers: list[tuple[str, int]], timeout: float = DEFAULT_TIMEOUT
) -> dns.resolver.Resolver:
    """A resolver asking ``servers`` (the system's when empty), each lookup within
    ``timeout`` seconds."""
    if servers:
        res = dns.resolver.Resolver(configure=False)
        point_at(res, servers)
    else:
        res = dns.resolver.Resolver()
    res.timeout = res.lifetime = timeout
    # Answers kept for their TTL (negative ones for the zone's SOA minimum), per process and
    # shared by its check threads (dnspython's cache locks): what a caching resolver gives
    # every MTA, without which each message asked its SPF, DKIM key and DMARC record again.
    res.cache = dns.resolver.LRUCache(CACHE_SIZE)
    return res


def txt(res: dns.resolver.Resolver, name: str, lifetime: float | None = None) -> list[bytes] | None:
    """The TXT records of ``name``, each joined from its strings; [] when there are none,
    None when the lookup failed (timeout, SERVFAIL: a temporary error). ``lifetime``: what
    is left of the caller's deadline (none left: None without asking); the lookup takes no
    longer than that nor than the resolver's own lifetime."""
    if lifetime is not None:
        if lifetime <= 0:
            return None
        lifetime = min(lifetime, res.lifetime)
    try:
        answer = res.resolve(name, "TXT", search=False, lifetime=lifetime)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException:
        return None
    return [b"".join(rdata.strings) for rdata in answer]
