"""The client's host name for tcprules' ``=host`` rules: its PTR name, forward-confirmed.

Why: a ``=host`` rule (``=mx.example.org``, ``=.example.org``, ``=``) matches tcpserver's
TCPREMOTEHOST, which tcpserver finds by asking DNS for the client address's PTR record.
Whoever owns an address owns its PTR record, so a PTR name alone proves nothing: an
attacker can point his own address at ``trusted.example.org`` and be given that rule's
RELAYCLIENT. So the name counts only if it is *forward-confirmed* (FCrDNS, tcpserver's
``-p``, "paranoid"; Postfix's and Sendmail's verified names): its A records (AAAA for an
IPv6 client) must include the client's address, and those belong to the name's owner.

What counts as no name (no ``=`` rule matches, the address rules still do, as in
tcpserver): no PTR record, a PTR name that is not a host name the rules could name (``_``
and odd bytes aside, one that ends in a number), a name whose addresses do not include the
client's, and any failure: a timeout, SERVFAIL, a refusal. A failure fails *open* for a
``=host:deny`` rule (the client is let in under the address rules) and closed for a
``=host:allow,RELAYCLIENT=""`` rule (no relaying), exactly as tcpserver; a temporary
failure is logged (``host-fail``) so an admin can tell a DNS outage from a stranger.
Only the first PTR name is tried, as tcpserver and Postfix do (an address with several
PTR records gets whichever the resolver lists first).

When: for a rules cdb with a host-name key (``pyqmail.rules.Rules.names``, found once
per load), and for a client whose mail rspamd may scan (its ``Hostname``:
``pyqmail.smtpd.intake``); otherwise nothing here runs, nothing is imported (dnspython is
the ``hosts`` group of ``pyqmail.checks.libraries``), and the Received header says
``unknown`` (it names only what the rules looked up). Asked with dnspython's asyncio
resolver on the worker's loop, the name servers of ``control/dnsresolver`` (the checks'
own; absent: /etc/resolv.conf), both queries within ``dnsbltimeout`` seconds together;
answers are cached for their TTL, so a client that comes back costs no query.
"""

from __future__ import annotations

import asyncio
import ipaddress

import dns.exception
import dns.name
import dns.resolver
import dns.reversename

from pyqmail.checks.listlookup import async_resolver
from pyqmail.log import log
from pyqmail.rules import address_problem

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_address(ip: str) -> Address | None:
    """The address a PTR is asked for: IPv4-mapped IPv6 as IPv4, any ``%scope`` dropped."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def usable(name: dns.name.Name) -> str | None:
    """A PTR target as a rule names it (lower case, no trailing dot), or None when no rule
    could name it (``pyqmail.rules.address_problem``: bytes that are no host name's)."""
    text = name.to_text(omit_final_dot=True).lower()
    if not text or text == "@" or address_problem("=" + text) is not None:
        return None
    return text


class HostNames:
    """One worker's resolver for client names (made the first time a cdb has ``=`` keys)."""

    def __init__(self, servers: tuple[tuple[str, int], ...]) -> None:
        self.servers = servers
        self.resolver = async_resolver(servers)

    def configure(self, servers: tuple[tuple[str, int], ...]) -> None:
        """HUP: other name servers mean another resolver (and a fresh cache)."""
        if servers != self.servers:
            self.servers = servers
            self.resolver = async_resolver(servers)

    async def name(self, ip: str, timeout: float) -> str | None:
        """The client's forward-confirmed host name, or None (see the module docstring);
        never longer than ``timeout`` seconds."""
        addr = client_address(ip)
        if addr is None:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            return await asyncio.wait_for(self._confirmed(addr, deadline), timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (TimeoutError, dns.exception.DNSException, OSError) as exc:
            log("host-fail", ip=ip, error=type(exc).__name__)
            return None

    async def _confirmed(self, addr: Address, deadline: float) -> str | None:
        """The PTR name if its A/AAAA records include ``addr``; NXDOMAIN and NoAnswer for
        a name (or address) without records, other DNSExceptions for failures."""
        loop = asyncio.get_running_loop()
        reverse = dns.reversename.from_address(str(addr))
        ptr = await self.resolver.resolve(
            reverse, "PTR", search=False, lifetime=max(deadline - loop.time(), 0.01)
        )
        name = usable(ptr[0].target)
        if name is None:
            return None
        rdtype = "A" if isinstance(addr, ipaddress.IPv4Address) else "AAAA"
        forward = await self.resolver.resolve(
            dns.name.from_text(name),
            rdtype,
            search=False,
            lifetime=max(deadline - loop.time(), 0.01),
        )
        if any(ipaddress.ip_address(rdata.address) == addr for rdata in forward):
            return name
        return None
