"""The DNS resolver the inbound checks ask: the system's, or ``control/dnsresolver``.

Why a control file: a test (or a host with a local validating resolver on another port)
must be able to point the checks at one server without touching /etc/resolv.conf. Each
line of ``control/dnsresolver`` is ``host`` or ``host@port`` (IPv4 or IPv6 address; parsed
by ``pyqmail.control.parsers.nameservers``); without the file the system's resolver
configuration is used. Every lookup is bounded by
``timeout`` seconds in all (dnspython's ``lifetime``); answers are cached for their TTL.

A name that cannot be a DNS name (over 253 characters, an empty or over-long label: what a
sender writes in a From, a HELO or an SPF macro) has no records and does not exist
(``dns_name``): it is never a temporary error. Were it one, a sender could turn any
domain's DMARC reject into the accept a temperror gets by making the name it is looked up
under too long (``_dmarc.`` + a 250-character subdomain of the domain). Only DNS that does
not answer (timeout, SERVFAIL) is temporary.
"""

from __future__ import annotations

from collections.abc import Sequence

import dns.exception
import dns.name
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


def _bounded(res: dns.resolver.Resolver, lifetime: float | None) -> float | None:
    """What one lookup may take: what is left of the caller's deadline (``lifetime``),
    capped by the resolver's own lifetime; None: the resolver's own (no caller's deadline).
    Raises dns.exception.Timeout when nothing is left (the lookup is not even sent)."""
    if lifetime is None:
        return None
    if lifetime <= 0:
        raise dns.exception.Timeout
    return min(lifetime, res.lifetime)


def dns_name(text: str) -> dns.name.Name | None:
    """``text`` as an absolute DNS name; None when it cannot be one (RFC 1035 2.3.4: 255
    octets in wire form, 253 characters of text; a label of 1 to 63 octets; IDNA that does
    not encode), so the caller answers "no such name" without asking."""
    try:
        return dns.name.from_text(text, origin=dns.name.root)
    except (dns.exception.DNSException, UnicodeError):
        return None


def txt(res: dns.resolver.Resolver, name: str, lifetime: float | None = None) -> list[bytes] | None:
    """The TXT records of ``name``, each joined from its strings; [] when there are none
    (also when ``name`` cannot be a DNS name: ``dns_name``), None when the lookup failed
    (timeout, SERVFAIL: a temporary error). ``lifetime``: what is left of the caller's
    deadline (none left: None without asking); the lookup takes no longer than that nor
    than the resolver's own lifetime."""
    qname = dns_name(name)
    if qname is None:
        return []
    try:
        answer = res.resolve(qname, "TXT", search=False, lifetime=_bounded(res, lifetime))
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException:
        return None
    return [b"".join(rdata.strings) for rdata in answer]


def exists(res: dns.resolver.Resolver, name: str, lifetime: float | None = None) -> bool | None:
    """Whether ``name`` exists in DNS: False only when an A query for it is answered
    NXDOMAIN (RFC 8020: nothing there, nor under it); a name with no address (NODATA), an
    empty non-terminal, a wildcard's match and an alias (CNAME) whose target does not exist
    do exist. A name that cannot be a DNS name (``dns_name``) does not. None when the lookup
    failed (timeout, SERVFAIL) or ``lifetime`` (what is left of the caller's deadline, as
    for ``txt``) ran out."""
    qname = dns_name(name)
    if qname is None:
        return False
    try:
        res.resolve(
            qname, "A", search=False, lifetime=_bounded(res, lifetime), raise_on_no_answer=False
        )
    except dns.resolver.NXDOMAIN as exc:
        # RFC 6604 3: the code speaks of the last name of a CNAME chain; the first is there.
        return bool(exc.canonical_name != qname)
    except dns.exception.DNSException:
        return None
    return True
