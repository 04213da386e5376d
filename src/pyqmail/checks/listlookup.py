"""Asking the DNS lists of ``pyqmail.checks.dnsbl`` about one client: one worker's resolver.

Why its own module: the lists' files, their parsing and the verdict are ``dnsbl``'s, read
by every pyqmail-smtpd; this part imports dnspython, which only a listener with lists
loads (``pyqmail.checks.libraries``, group ``lists``). Every list and allow list is asked
at once with dnspython's asyncio resolver (``A``, then ``TXT`` for the lists that
answered), all within the lists' timeout; answers are cached per worker for their TTL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from pyqmail.checks import dnsbl
from pyqmail.checks.resolver import point_at
from pyqmail.log import log

CACHE_SIZE = 20_000  # answers per worker (dnspython's LRU cache, each kept for its TTL)
WARN_EVERY = 300.0  # seconds between two warnings of one list's error code, per worker
WARN_KEYS = 1000  # (zone, answer) pairs remembered for that


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
        self._warned: dict[
            tuple[str, str], tuple[float, int]
        ] = {}  # (zone, answer): when, left out

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

    async def check(self, ip: str, settings: dnsbl.Settings) -> dnsbl.Result:
        """Ask every zone once, at once, within ``settings.timeout`` in all; the answers
        mean what ``dnsbl.tally`` says; TXT only for the lists that count (none allowed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.timeout
        zones = settings.zones()
        tasks = [
            asyncio.ensure_future(self._ask(dnsbl.query_name(ip, z), "A", settings.timeout))
            for z in zones
        ]
        done, pending = await asyncio.wait(tasks, timeout=settings.timeout)
        for task in pending:
            task.cancel()
        answers = {
            z: (t.result() if t in done else None) for z, t in zip(zones, tasks, strict=True)
        }
        result = dnsbl.tally(settings, answers)
        self._warn(result.errors)
        if not result.hits or result.allowed is not None:
            return result
        left = max(deadline - loop.time(), 0.1)
        txts = await asyncio.gather(
            *(self._ask(dnsbl.query_name(ip, z), "TXT", left) for z, _, _ in result.hits)
        )
        hits = tuple(
            (z, a, dnsbl.printable(t[0]) if t else "")
            for (z, a, _), t in zip(result.hits, txts, strict=True)
        )
        return dataclasses.replace(result, hits=hits)

    def _warn(self, errors: tuple[tuple[str, str], ...]) -> None:
        """A list's error code (its answer to a blocked or public resolver) is worth a
        warning: it means the list is useless from here, for every client. Once per zone and
        answer every ``WARN_EVERY`` seconds per worker, with how many were left out."""
        now = time.monotonic()
        if len(self._warned) > WARN_KEYS:  # a list answering ever other garbage
            self._warned.clear()
        for zone, answer in errors:
            since, left_out = self._warned.get((zone, answer), (-WARN_EVERY, 0))
            if now - since < WARN_EVERY:
                self._warned[(zone, answer)] = (since, left_out + 1)
                continue
            self._warned[(zone, answer)] = (now, 0)
            log(
                "warning",
                text="DNS list answered an error code, not a listing (blocked resolver?)",
                zone=zone,
                answer=answer,
                left_out=left_out or None,
            )
