"""SPF (RFC 7208) on the envelope sender and the HELO name, through pyspf (python3-spf).

Why at the end of DATA and not at MAIL: no SPF result refuses mail on its own here (DMARC,
which needs the DKIM results of the message too, decides), so both identities are checked
in the same worker thread and time budget as DKIM and DMARC, and the SMTP dialogue never
waits on DNS before DATA.

pyspf looks names up through its module-level ``DNSLookup``; it is replaced once by
``_lookup``, which asks the resolver of the calling thread (``_local``): the checks run in
a thread pool, each job with the resolver of its daemon (``control/dnsresolver``), and the
deadline of the whole evaluation bounds every lookup. The 10-lookup and 2-void-lookup
limits are pyspf's (RFC 7208 4.6.4).

A name that cannot be a DNS name (over 253 characters, an empty or over-long label) has no
records (``resolver.dns_name``): an identity that is such a name is ``none`` (RFC 7208
4.3), and a name an SPF record or its macros make too long is looked up as one without
records. It was a temperror: a HELO of 254 characters ending in ``.bank.example``, with
the null sender, made the aligned SPF result of a spoof of bank.example a temperror, which
DMARC accepts. A HELO with its trailing dot (``mx.example.``, which pyqmail-smtpd accepts)
is checked without it: pyspf found no record for such a name.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.resolver
import spf

from pyqmail.checks.resolver import dns_name

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")
_local = threading.local()


@dataclass(frozen=True)
class SpfResult:
    """One identity's result: ``result`` is one of RESULTS; ``domain`` the domain checked."""

    identity: str  # "mailfrom" or "helo"
    result: str
    domain: str
    reason: str = ""


def _answer_rows(name: str, qtype: str, answer: Any) -> list[tuple[tuple[str, str], Any]]:
    """dnspython's answer in the (name, type), value rows pyspf's cache takes."""
    rows: list[tuple[tuple[str, str], Any]] = []
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            rows.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            rows.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            rows.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            rows.append(((name, qtype), list(rdata.strings)))
    return rows


def _lookup(
    name: str, qtype: str, strict: object = True, timeout: float = 20
) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's DNS hook: the thread's resolver, within what is left of its deadline."""
    del strict
    res: dns.resolver.Resolver = _local.resolver
    left = _local.deadline - time.monotonic()
    if left <= 0:
        raise spf.TempError("DNS: the SPF time budget is spent")
    qname = dns_name(name)
    if qname is None:  # no such name can hold a record: not a temporary error
        return []
    try:
        answer = res.resolve(qname, qtype, search=False, lifetime=min(left, timeout))
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as exc:
        raise spf.TempError(f"DNS {type(exc).__name__}: {exc}") from None
    return _answer_rows(name, qtype, answer)


spf.DNSLookup = _lookup


def domain_of(address: str) -> str:
    """The domain part of a mailbox, lower case ('' when there is none)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


def _is_fqdn(helo: str) -> bool:
    """Whether the HELO name can have an SPF record: a dotted name, not an address literal."""
    if not helo or helo.startswith("[") or "." not in helo.strip("."):
        return False
    try:
        ipaddress.ip_address(helo)
    except ValueError:
        return True
    return False


def _run(ip: str, sender: str, helo: str, budget: float) -> tuple[str, str]:
    """One pyspf evaluation (result, explanation); an unexpected library error is a
    temperror, never a crash of the session."""
    q = spf.query(i=ip, s=sender, h=helo, querytime=budget)
    try:
        result, _code, reason = q.check()
    except (spf.TempError, dns.exception.DNSException) as exc:
        return "temperror", str(exc)
    except Exception as exc:  # noqa: BLE001 - pyspf raises assorted errors on odd input
        return "permerror", f"{type(exc).__name__}: {exc}"
    return (str(result) if result in RESULTS else "permerror"), str(reason)


def check(
    res: dns.resolver.Resolver, ip: str, sender: str, helo: str, budget: float = 10.0
) -> tuple[SpfResult, SpfResult]:
    """The HELO and MAIL FROM results (RFC 7208 2.3/2.4) for a client at ``ip``, within
    ``budget`` seconds in all. A null sender is checked as postmaster@HELO (section 2.4).

    The HELO check gets half the budget at most: the client names its HELO, so DNS for it
    that never answers must not leave the MAIL FROM check of a domain it forges without
    time (its temperror, aligned with the From domain, would turn a DMARC reject into
    accept); the MAIL FROM check gets what is left, half at least. An identity that is no
    DNS name is ``none`` (RFC 7208 4.3: a malformed domain), unasked."""
    _local.resolver = res
    start = time.monotonic()
    _local.deadline = start + budget / 2
    helo = helo.rstrip(".") if _is_fqdn(helo) else helo
    try:
        if not _is_fqdn(helo):
            helo_result = SpfResult("helo", "none", helo.lower(), "HELO is not a domain name")
        elif dns_name(helo) is None:
            helo_result = SpfResult("helo", "none", helo.lower(), "HELO is no DNS name")
        else:
            result, why = _run(ip, "", helo, budget / 2)
            helo_result = SpfResult("helo", result, helo.lower(), why)
        if not sender:
            mail = SpfResult("mailfrom", helo_result.result, helo_result.domain, "null sender")
        elif not domain_of(sender):
            mail = SpfResult("mailfrom", "none", "", "sender has no domain")
        elif dns_name(domain_of(sender)) is None:
            mail = SpfResult("mailfrom", "none", domain_of(sender), "domain is no DNS name")
        else:
            _local.deadline = start + budget
            left = max(_local.deadline - time.monotonic(), 0.001)
            result, why = _run(ip, sender, helo, left)
            mail = SpfResult("mailfrom", result, domain_of(sender), why)
    finally:
        _local.resolver = None
    return helo_result, mail
