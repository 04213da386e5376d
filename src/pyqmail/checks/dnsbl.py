"""DNS blocklists and allow lists (RFC 5782), in rblsmtpd's spirit.

Control files (each line read by ``pyqmail.control.reader``; ``#`` and blank lines ignored):

=================  ===========================================================================
``dnsbl``          blocklist zones, one per line, ``zone[=weight]`` (weight 1 to 100, default
                   1). Absent or empty: no blocklists
``dnswl``          allow list zones, one per line: a client listed on any of them skips the
                   blocklists and greylisting
``dnsblthreshold`` the sum of the weights of the lists a client is on that refuses it;
                   default 1 (any one list refuses it, as rblsmtpd), 1 to 1000
``dnsbltimeout``   seconds every lookup of one client has together; default 5, 1 to 60. A
                   list that has not answered by then counts as not answering. It also
                   bounds the client's host-name lookup for tcprules ``=host`` rules
                   (``pyqmail.smtpd.remotehost``, on every listener), which comes first
``dnsbltempfail``  1: a list that did not answer (timeout, SERVFAIL, refusal, an answer
                   outside 127.0.0.0/8) gives ``451 4.7.1`` instead of letting the mail
                   through; default 0 (a failing lookup never blocks mail)
``dnsresolver``    the name servers pyqmail-smtpd's checks ask, ``host[@port]`` per line (an
                   IP address; port default 53). Absent: the system's (``/etc/resolv.conf``).
                   The host names of ``=host`` rules are asked there too
=================  ===========================================================================

How it runs: on the ``smtp`` listener, when the connection is admitted, every list and allow
list is asked at once (``pyqmail.checks.listlookup``, dnspython's asyncio resolver; ``A``
under the list's zone for the reversed IPv4 octets or IPv6 nibbles, then ``TXT`` for the
lists that answered), all within ``dnsbltimeout``; answers are cached by the worker for
their TTL (negative ones by the zone's SOA, as dnspython does). The 220 greeting waits for
the lookups (as rblsmtpd runs before qmail-smtpd greets): a client cannot send MAIL before
the verdict exists.

Where the refusal comes: at MAIL, as rblsmtpd (which greets, accepts HELO and refuses
every MAIL): ``554 5.7.1 Service unavailable; client [ip] blocked using <list>[; <TXT>]``,
counted towards ``maxerrors``. Postfix refuses at RCPT (``reject_rbl_client``); at MAIL
the log line still has the HELO name and the sender, and one round trip less is spent.
Relay clients and authenticated sessions are never refused (the core asks only for
clients that may not relay).

The client's tcprules environment decides first, as rblsmtpd: ``RBLSMTPD`` set and empty:
no lookups for this client (and no greylisting: a known host); set to a text: every MAIL
is refused with it, ``451 4.7.1 <text>``, or ``553 5.7.1 <text>`` when the text starts
with ``-`` (the ``-`` dropped).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail.checks.verdict import Verdict
from pyqmail.control.parsers import is_domain, nameservers
from pyqmail.control.reader import ControlError, Line, read_lines

TXT_MAX = 200  # characters of a list's TXT record in a reply
WEIGHT_MAX = 100


@dataclass(frozen=True)
class Settings:
    """The control files above, parsed."""

    lists: tuple[tuple[str, int], ...] = ()  # (zone, weight)
    allow: tuple[str, ...] = ()
    threshold: int = 1
    timeout: int = 5
    tempfail: bool = False
    nameservers: tuple[tuple[str, int], ...] = ()  # () = the system's

    @property
    def active(self) -> bool:
        """Whether there is anything to ask."""
        return bool(self.lists or self.allow)


def _zone(line: Line, text: str) -> str:
    """A list's zone: a domain name (no trailing dot), lower case."""
    zone = text.strip().lower().removesuffix(".")
    if not is_domain(zone) or "." not in zone:
        raise ControlError(f"{line.where}: not a DNS list zone (a domain name): {text!r}")
    return zone


def parse_lists(lines: list[Line]) -> tuple[tuple[str, int], ...]:
    """``dnsbl``: ``zone[=weight]`` per line; a repeated zone is an error (which weight?)."""
    out: dict[str, int] = {}
    for line in lines:
        name, eq, weight_text = line.text.partition("=")
        zone = _zone(line, name)
        weight = 1
        if eq:
            text = weight_text.strip()
            if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= WEIGHT_MAX:
                raise ControlError(
                    f"{line.where}: weight of {zone} must be 1 to {WEIGHT_MAX}: {weight_text!r}"
                )
            weight = int(text)
        if zone in out:
            raise ControlError(f"{line.where}: {zone} is listed twice")
        out[zone] = weight
    return tuple(out.items())


def parse_allow(lines: list[Line]) -> tuple[str, ...]:
    """``dnswl``: one zone per line."""
    return tuple(dict.fromkeys(_zone(line, line.text) for line in lines))


def load(control: Path, *, threshold: int, timeout: int, tempfail: bool) -> Settings:
    """Read ``dnsbl``, ``dnswl`` and ``dnsresolver`` (the numbers come from the table)."""
    return Settings(
        lists=parse_lists(read_lines(control / "dnsbl") or []),
        allow=parse_allow(read_lines(control / "dnswl") or []),
        threshold=threshold,
        timeout=timeout,
        tempfail=tempfail,
        nameservers=nameservers(read_lines(control / "dnsresolver") or []),
    )


def query_name(ip: str, zone: str) -> str:
    """RFC 5782 §2.1/§2.4: reversed IPv4 octets, or reversed IPv6 nibbles, under ``zone``."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        labels = reversed(str(addr).split("."))
    else:
        labels = reversed(addr.exploded.replace(":", ""))
    return ".".join(labels) + f".{zone}."


@dataclass(frozen=True)
class Result:
    """What the lists said about one client."""

    hits: tuple[tuple[str, str, str], ...] = ()  # (zone, first A answer, TXT text)
    allowed: str | None = None  # the allow list zone that listed it
    failed: tuple[str, ...] = ()  # zones that did not answer usefully
    score: int = 0
    weights: Mapping[str, int] = field(default_factory=dict)

    def log(self) -> str:
        """key=value pairs for the log line."""
        parts = []
        if self.allowed:
            parts.append(f"dnswl={self.allowed}")
        if self.hits:
            parts.append("dnsbl=" + ",".join(f"{z}:{a}" for z, a, _ in self.hits))
            parts.append(f"dnsbl_score={self.score}")
        if self.failed:
            parts.append("dnsbl_fail=" + ",".join(self.failed))
        return " ".join(parts)


def verdict(result: Result, settings: Settings, ip: str) -> Verdict:
    """The lists' answer as a verdict: refuse at the threshold, defer on failure if
    ``dnsbltempfail``, else accept (the log still names any hit below the threshold)."""
    log = result.log()
    if result.allowed is None and result.hits and result.score >= settings.threshold:
        named = ", ".join(zone for zone, _, _ in result.hits)
        txt = next((text for _, _, text in result.hits if text), "")
        text = f"Service unavailable; client [{ip}] blocked using {named}"
        return Verdict("refuse", 554, text + (f"; {txt}" if txt else ""), log)
    if result.allowed is None and result.failed and settings.tempfail:
        return Verdict("defer", 451, "Service unavailable; blocklist lookup failed, try later", log)
    return Verdict("accept", 250, "", log)


def printable(text: str) -> str:
    """A list's TXT text (or RBLSMTPD's) fit for a reply line: ASCII, bounded."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean[:TXT_MAX]


def rblsmtpd(env: Mapping[str, str]) -> Verdict | None:
    """The tcprules ``RBLSMTPD`` variable, as rblsmtpd reads it: None when unset; an accept
    (skip the lists) when empty; else a refusal with its text, 553 with a leading ``-``."""
    text = env.get("RBLSMTPD")
    if text is None:
        return None
    if not text:
        return Verdict("accept", 250, "", "rblsmtpd=skip")
    if text.startswith("-"):
        return Verdict("refuse", 553, printable(text[1:]), "rblsmtpd=553")
    return Verdict("defer", 451, printable(text), "rblsmtpd=451")
