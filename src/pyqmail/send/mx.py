"""Where mail for a domain goes (qmail-remote's routing), and never to this host.

An ``smtproutes`` relay if one matches (``control.send.Route``), else the MX hosts of the
domain in preference order (equal preferences shuffled); a domain without MX records is its
own implicit MX (RFC 5321 §5.1: its A/AAAA records; none at all bounces, 5.4.4, as
qmail-remote's "couldn't find a mail exchanger or IP address" and Postfix do, and so do MX
hosts of which none has an address, unless a lookup failed for now); a null MX
(RFC 7505) bounces with 5.1.10 ("recipient address has null MX", RFC 7505 section 4.2), a
non-existent domain with 5.1.2; DNS trouble defers. A host's addresses are its A and AAAA
records together: one type failing while the other answers uses what answered. An address literal
``[192.0.2.1]`` is used as is.

Never to this host (``Myself``; qmail-remote's ``ipme`` and Postfix's "mail for X loops back
to myself", a permanent 5.4.6 failure, so the sender gets a bounce that says so): an address
literal that is one of this host's addresses (``pyqmail.send.ipme``: every interface address and
``127.0.0.0/8``), an MX host named ``me``/``helohost``/one of ``locals`` or resolving to one of
our addresses (then only the MX hosts preferred to us are tried: we are a backup MX; none
left is the loop, unless a preferred host's lookup failed for now: then we defer, as
Postfix does, since a backup MX holds mail exactly while the primary is in trouble), an
smtproutes relay on our names or addresses on an SMTP port (25, 465, 587; other ports are
local filters and allowed), and any server that answers EHLO with our own host name
(Postfix's check, for NAT and port forwards).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import dns.exception
import dns.name
import dns.resolver

from pyqmail.control.send import Control, Route
from pyqmail.send.delivery import is_ip_literal
from pyqmail.send.ipme import LocalAddresses

MAX_ADDRESSES = 12
SMTP_PORTS = frozenset({25, 465, 587})


class DnsError(Exception):
    """No destination for a domain: ``permanent`` bounces, else the message is deferred;
    ``status`` is the enhanced code a bounce names when not remote delivery's default."""

    def __init__(self, message: str, permanent: bool, status: str = "") -> None:
        super().__init__(message)
        self.permanent = permanent
        self.status = status


class LoopError(DnsError):
    """The destination is this host: delivering there would loop (permanent, 5.4.6)."""

    def __init__(self, domain: str, why: str) -> None:
        super().__init__(f"mail for {domain} loops back to myself ({why})", permanent=True)


@dataclass(frozen=True)
class Myself:
    """What identifies this host to remote delivery: its host names (``me``, ``helohost``),
    its local domains (``locals``) and its addresses (``pyqmail.send.ipme``)."""

    hostnames: frozenset[str]
    domains: frozenset[str]
    is_local: Callable[[str], bool]

    @classmethod
    def of(cls, control: Control, addresses: LocalAddresses | None = None) -> Myself:
        hostnames = frozenset(n.lower() for n in (control.me, control.helohost) if n)
        return cls(hostnames, control.locals, (addresses or LocalAddresses()).is_local)

    def named(self, host: str) -> bool:
        """An MX or relay name that is one of ours (``me``, ``helohost`` or a local domain)."""
        name = host.lower().rstrip(".")
        return name in self.hostnames or name in self.domains

    def greeted_by_me(self, reply: bytes | str) -> bool:
        """A server whose EHLO/HELO reply starts with our own host name is this host
        (Postfix's check): it catches what addresses cannot (NAT, port forwards, a relay
        that routes back to us)."""
        text = reply.decode("ascii", "replace") if isinstance(reply, bytes) else reply
        words = text.split(None, 1)
        return bool(words) and words[0].lower().rstrip(".") in self.hostnames


class Resolver(Protocol):
    """What remote delivery asks DNS; tests inject a fake one."""

    def mx(self, domain: str) -> list[tuple[int, str]] | None:
        """MX records (preference, host; ``""`` for the root = null MX), None if none exist."""

    def addresses(self, host: str) -> list[str]:
        """A then AAAA addresses of ``host``."""


class DnsResolver:
    """dnspython-backed Resolver."""

    def __init__(
        self, lifetime: float = 30.0, resolver: dns.resolver.Resolver | None = None
    ) -> None:
        """``resolver``: dnspython's, from /etc/resolv.conf unless given (the tests' asks
        their DNS server on loopback)."""
        self._resolver = resolver or dns.resolver.Resolver()
        self._resolver.lifetime = lifetime

    def _query(self, name: str, rdtype: str) -> list[object] | None:
        try:
            return list(self._resolver.resolve(name, rdtype))
        except dns.resolver.NXDOMAIN:
            raise DnsError(f"{name}: no such domain (NXDOMAIN)", permanent=True) from None
        except dns.resolver.NoAnswer:
            return None
        except (dns.exception.DNSException, OSError) as exc:
            raise DnsError(f"{name}: DNS lookup of {rdtype} failed: {exc}", False) from None

    def mx(self, domain: str) -> list[tuple[int, str]] | None:
        records = self._query(domain, "MX")
        if records is None:
            return None
        out = []
        for rec in records:
            exchange = rec.exchange  # type: ignore[attr-defined]
            host = "" if exchange == dns.name.root else exchange.to_text(omit_final_dot=True)
            out.append((int(rec.preference), str(host)))  # type: ignore[attr-defined]
        return out

    def addresses(self, host: str) -> list[str]:
        """A then AAAA. One type that answers is enough (Postfix's ``dns_lookup_x`` returns
        what any type found): a broken AAAA (a server that drops those queries, a
        SERVFAIL) must not throw away good A records and defer the mail, nor a broken A
        the AAAA. With neither found, a failed lookup is the error (temporary: the other
        type may have records tomorrow); an NXDOMAIN for A at once, as it holds for every type."""
        out: list[str] = []
        failed: DnsError | None = None
        for rdtype in ("A", "AAAA"):
            try:
                records = self._query(host, rdtype) or []
            except DnsError as exc:
                if exc.permanent and not out and failed is None:
                    raise  # NXDOMAIN, the first answer: the name does not exist
                failed = failed or exc
                continue
            out += [str(rec.address) for rec in records]  # type: ignore[attr-defined]
        if not out and failed is not None:
            raise failed
        return out


@dataclass(frozen=True)
class Destination:
    fqdn: str
    address: str
    port: int

    def __str__(self) -> str:
        addr = f"[{self.address}]" if ":" in self.address else self.address
        return (
            f"{self.fqdn}[{addr}]:{self.port}"
            if self.fqdn != self.address
            else f"{addr}:{self.port}"
        )


def destinations(
    domain: str, route: Route, resolver: Resolver, myself: Myself | None = None
) -> list[Destination]:
    """Hosts to try in order; raises DnsError, or LoopError when they lead back to ``myself``."""
    if route.host:
        return _relay(domain, route, resolver, myself)
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        literal = literal.removeprefix("IPv6:").removeprefix("ipv6:")
        if not is_ip_literal(literal):
            raise DnsError(f"bad address literal {domain}", permanent=True)
        if myself is not None and myself.is_local(literal):
            raise LoopError(domain, f"{literal} is an address of this host")
        return [Destination(literal, literal, 25)]
    records = resolver.mx(domain)
    if records is None:
        hosts = [(0, domain)]
    else:
        if any(host == "" for _, host in records):
            raise DnsError(
                f"{domain} does not accept mail (null MX, RFC 7505)",
                permanent=True,
                status="5.1.10",
            )
        by_pref: dict[int, list[str]] = {}
        for pref, host in records:
            by_pref.setdefault(pref, []).append(host)
        hosts = []
        for pref in sorted(by_pref):
            group = by_pref[pref]
            random.shuffle(group)
            hosts += [(pref, host) for host in group]
    return _mx_addresses(domain, hosts, records is None, resolver, myself)


def _relay(
    domain: str, route: Route, resolver: Resolver, myself: Myself | None
) -> list[Destination]:
    """An smtproutes relay. One of our own names or addresses on an SMTP port (25, 465, 587:
    where pyqmail-smtpd listens) is a loop; another port is a local filter or relay
    (Postfix's ``[127.0.0.1]:10025`` pattern) and allowed (the EHLO check still applies)."""
    if is_ip_literal(route.host):
        addrs = [route.host]
    else:
        addrs = resolver.addresses(route.host)
        if not addrs:
            raise DnsError(f"relay {route.host} has no A/AAAA records", permanent=False)
    if myself is not None and route.port in SMTP_PORTS:
        if myself.named(route.host):
            raise LoopError(domain, f"relay {route.host} is this host")
        for addr in addrs:
            if myself.is_local(addr):
                raise LoopError(domain, f"relay {route.host} is {addr}, an address of this host")
    return [Destination(route.host, a, route.port) for a in addrs][:MAX_ADDRESSES]


def _mx_addresses(
    domain: str,
    hosts: list[tuple[int, str]],
    implicit: bool,
    resolver: Resolver,
    myself: Myself | None,
) -> list[Destination]:
    """Addresses of the MX hosts in order, qmail-remote's way: when one of them is this host
    (by name or address), only the hosts preferred to it are kept (we are their backup);
    none left is a loop."""
    out: list[tuple[int, Destination]] = []
    failed: list[tuple[int, DnsError]] = []  # hosts whose lookup failed, with their preference
    for pref, host in hosts:
        if myself is not None and myself.named(host):
            return _before_me(domain, out, failed, pref, f"MX {host} is this host")
        try:
            addrs = resolver.addresses(host)
        except DnsError as exc:
            failed.append((pref, exc))
            continue
        mine = [a for a in addrs if myself is not None and myself.is_local(a)]
        if mine:
            why = f"MX {host} is {mine[0]}, an address of this host"
            return _before_me(domain, out, failed, pref, why)
        out += [(pref, Destination(host, a, 25)) for a in addrs]
        if len(out) >= MAX_ADDRESSES:
            break
    if not out:
        _no_addresses(domain, implicit, failed)
    return [dest for _, dest in out[:MAX_ADDRESSES]]


def _no_addresses(domain: str, implicit: bool, failed: list[tuple[int, DnsError]]) -> None:
    """Raise why no mail host of ``domain`` has an address. A lookup that failed for now
    defers; when every host is known to have none (its name does not exist, or it has no
    A/AAAA records) the mail bounces at once, 5.4.4, as qmail-remote (perm_nomx: its
    ``dns_mxip`` skips hard failures and is soft only when one was soft), Postfix ("Host
    or domain name not found") and Exim ("all relevant MX records point to non-existent
    hosts") do: a mistyped MX target would otherwise hold the mail for the whole queue
    lifetime before the sender hears of it."""
    if failed and implicit:
        raise failed[-1][1]
    if implicit:
        raise DnsError(
            f"{domain} has no MX and no A/AAAA records: no mail host (RFC 5321 5.1)",
            permanent=True,
            status="5.4.4",
        )
    soft = [exc for _, exc in failed if not exc.permanent]
    if soft:
        raise DnsError(f"no address found for the mail hosts of {domain}: {soft[0]}", False)
    why = f" ({failed[0][1]})" if failed else ""
    raise DnsError(
        f"none of the mail hosts of {domain} has an address{why} (RFC 5321 5.1)",
        permanent=True,
        status="5.4.4",
    )


def _before_me(
    domain: str,
    found: list[tuple[int, Destination]],
    failed: list[tuple[int, DnsError]],
    pref: int,
    why: str,
) -> list[Destination]:
    """The hosts preferred to this one (MX ``pref``): we are their backup. None is a loop,
    unless one of them could not be looked up for now: that defers (Postfix's "unable to
    find primary relay"), since bouncing would lose mail over a passing DNS fault."""
    better = [dest for p, dest in found if p < pref]
    if better:
        return better[:MAX_ADDRESSES]
    unknown = [exc for p, exc in failed if p < pref and not exc.permanent]
    if unknown:
        raise DnsError(
            f"mail for {domain}: this host is a backup MX and the hosts preferred to it "
            f"could not be looked up ({unknown[0]})",
            permanent=False,
        )
    raise LoopError(domain, why)
