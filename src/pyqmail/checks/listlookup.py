"""Asking the DNS lists of ``pyqmail.checks.dnsbl`` about one client: one worker's resolver.

Why its own module: the lists' files, their parsing and the verdict are ``dnsbl``'s, read
by every pyqmail-smtpd; this part imports dnspython, which only a listener with lists
loads (``pyqmail.checks.libraries``, group ``lists``). Every list and allow list is asked
at once with dnspython's asyncio resolver (``A``, then ``TXT`` for the lists that
answered), all within the lists' timeout; answers are cached per worker for their TTL.
"""

from __future__ import annotations

import asyncio

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from pyqmail.checks import dnsbl
from pyqmail.checks.resolver import point_at

CACHE_SIZE = 20_000  # answers per worker (dnspython's LRU cache, each kept for its TTL)


def async_resolver(servers: tuple[tuple[str, int], ...]) -> dns.asyncresolver.Resolver:
    """A worker's asyncio resolver asking ``servers`` (``control/dnsresolver``; none: the
    system's, or a resolver on 127.0.0.1 without /etc/resolv.conf), its answers cached for
    their TTL. The lists' lookups and the client's host name (``pyqmail.smtpd.remotehost``)
    use one each."""
    if servers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        point_at(resolver, servers)
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:  # no resolv.conf: a local resolver
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
    resolver.cache = dns.resolver.LRUCache(CACHE_SIZE)
    resolver.retry_servfail = False
    return resolver


class Lookup:
    """One worker's resolver and answer cache, set up from ``Settings.nameservers``."""

    def __init__(self, settings: dnsbl.Settings) -> None:
        self.nameservers = settings.nameservers
        self.resolver = async_resolver(settings.nameservers)

    def configure(self, settings: dnsbl.Settings) -> None:
        """HUP: other name servers mean another resolver (and a fresh cache)."""
        if settings.nameservers != self.nameservers:
            self.nameservers = settings.nameservers
            self.resolver = async_resolver(settings.nameservers)

    async def _ask(self, qname: str, rdtype: str, timeout: float) -> list[str] | None:
        """The answers; [] for "not listed" (NXDOMAIN, no data); None: no useful answer."""
        try:
            answer = await self.resolver.resolve(
                dns.name.from_text(qname), rdtype, lifetime=timeout, search=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.DNSException, OSError, ValueError):
            return None
        if rdtype == "TXT":
            return ["".join(s.decode("ascii", "replace") for s in r.strings) for r in answer]
        return [r.to_text() for r in answer]

    async def _listed(self, ip: str, zone: str, timeout: float) -> str | bool | None:
        """The A answer in 127.0.0.0/8 if listed, False if not, None if it failed."""
        answers = await self._ask(dnsbl.query_name(ip, zone), "A", timeout)
        if answers is None:
            return None
        if not answers:
            return False
        good = [a for a in answers if a.startswith("127.") and not a.startswith("127.255.255.")]
        return good[0] if good else None  # outside 127/8 or a list's error code: garbage

    async def check(self, ip: str, settings: dnsbl.Settings) -> dnsbl.Result:
        """Ask every list and allow list at once, within ``settings.timeout`` in all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.timeout
        zones = [zone for zone, _ in settings.lists] + list(settings.allow)
        tasks = [asyncio.ensure_future(self._listed(ip, z, settings.timeout)) for z in zones]
        done, pending = await asyncio.wait(tasks, timeout=settings.timeout)
        for task in pending:
            task.cancel()
        status = {z: (t.result() if t in done else None) for z, t in zip(zones, tasks, strict=True)}
        allowed = next((z for z in settings.allow if isinstance(status[z], str)), None)
        weights = dict(settings.lists)
        hit_zones = [z for z, _ in settings.lists if isinstance(status[z], str)]
        failed = tuple(z for z in zones if status[z] is None)
        texts: dict[str, str] = {}
        if hit_zones and allowed is None:
            left = max(deadline - loop.time(), 0.1)
            txts = await asyncio.gather(
                *(self._ask(dnsbl.query_name(ip, z), "TXT", left) for z in hit_zones)
            )
            texts = {
                z: dnsbl.printable(t[0]) if t else "" for z, t in zip(hit_zones, txts, strict=True)
            }
        hits = tuple((z, str(status[z]), texts.get(z, "")) for z in hit_zones)
        score = sum(weights[z] for z in hit_zones)
        return dnsbl.Result(hits, allowed, failed, score, weights)
