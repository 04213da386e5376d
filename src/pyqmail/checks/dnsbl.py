"""DNS blocklists and allow lists (RFC 5782), in rblsmtpd's spirit.

Control files (each line read by ``pyqmail.control.reader``; ``#`` and blank lines ignored):

=================  ===========================================================================
``dnsbl``          blocklist zones, one per line, ``zone[=filter][*weight]`` (Postfix's
                   ``postscreen_dnsbl_sites`` syntax, ``pyqmail.dnslistspec``; the older
                   ``zone=weight`` still reads): weight 1 to 100, default 1; a filter such as
                   ``127.0.0.[2..11]`` or ``127.0.[0..255].[1;3]`` makes only the answers it
                   matches a listing. Absent or empty: no blocklists
``dnswl``          allow list zones, one per line, ``zone[=filter]``: a client listed on any
                   of them skips the blocklists and greylisting
``dnsblthreshold`` the sum of the weights of the lists a client is on that refuses it;
                   default 1 (any one list refuses it, as rblsmtpd), 1 to 1000
``dnsbltimeout``   seconds every lookup of one client has together; default 5, 1 to 60. A
                   list that has not answered by then counts as not answering. It also
                   bounds the client's host-name lookup for tcprules ``=host`` rules
                   (``pyqmail.smtpd.remotehost``, on every listener), which comes first
``dnsbltempfail``  1: a blocklist that did not answer (timeout, SERVFAIL, refusal, an
                   answer outside 127.0.0.0/8 or an error code) gives ``451 4.7.1`` instead
                   of letting the mail through; default 0 (a failing lookup never blocks
                   mail). A failing allow list only allows nobody
``dnsresolver``    the name servers pyqmail-smtpd's checks ask, ``host[@port]`` per line (an
                   IP address; port default 53). Absent: the system's (``/etc/resolv.conf``).
                   The host names of ``=host`` rules are asked there too
=================  ===========================================================================

What an answer means (RFC 5782 §2.3: an A record in 127.0.0.0/8 is a listing): an answer
outside 127/8, and a list's error code, is a failed lookup (``dnsbl_fail=<zone>``), never a
listing: Spamhaus's ``127.255.255.x`` (query refused, public resolver, over the limit) on
every list; on an allow list also ``127.0.0.255``, dnswl.org's "your resolver is blocked"
(SpamAssassin's ``RCVD_IN_DNSWL_BLOCKED``), and on the zones of dnswl.org any answer but
``127.0.X.Y`` with Y, the trust level, 0 to 3. Those would otherwise allow every client: the
worker logs ``warning text="allow list answered an error code" zone=... answer=...`` (once
per zone and answer every ``WARN_EVERY`` seconds, with how many it left out). An answer
that matches none of its zone's filters is no listing, as in Postfix. A client's score is
the sum of the weights of every matching ``dnsbl`` line (the same zone may come with other
filters and weights).

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
from dataclasses import dataclass
from pathlib import Path

from pyqmail.checks.verdict import Verdict
from pyqmail.control.parsers import nameservers
from pyqmail.control.reader import ControlError, Line, read_lines
from pyqmail.dnslistspec import Entry, SpecError, entries, parse_filter

TXT_MAX = 200  # characters of a list's TXT record in a reply
DNSWL_ORG = "dnswl.org"  # its zones answer 127.0.X.Y, Y the trust level; 127.0.0.255: blocked
DNSWL_TRUST = parse_filter("127.0.[0..255].[0..3]", DNSWL_ORG)
DNSWL_BLOCKED = "127.0.0.255"


@dataclass(frozen=True)
class Settings:
    """The control files above, parsed."""

    lists: tuple[Entry, ...] = ()
    allow: tuple[Entry, ...] = ()
    threshold: int = 1
    timeout: int = 5
    tempfail: bool = False
    nameservers: tuple[tuple[str, int], ...] = ()  # () = the system's

    @property
    def active(self) -> bool:
        """Whether there is anything to ask."""
        return bool(self.lists or self.allow)

    def zones(self) -> list[str]:
        """Every zone to ask, once (a zone may be on both files, or on one with several
        filters: its answers serve every line)."""
        return list(dict.fromkeys(e.zone for e in (*self.lists, *self.allow)))


def _parse(lines: list[Line], *, allow: bool) -> tuple[Entry, ...]:
    """``dnsbl`` or ``dnswl``: each line by ``pyqmail.dnslistspec`` (the preflight's rule
    too); ControlError naming the file and line of the first bad one."""
    out = []
    for index, got in entries([line.text for line in lines], allow=allow):
        if isinstance(got, SpecError):
            raise ControlError(f"{lines[index].where}: {got}")
        out.append(got)
    return tuple(out)


def parse_lists(lines: list[Line]) -> tuple[Entry, ...]:
    """``dnsbl``: ``zone[=filter][*weight]`` or ``zone=weight`` per line."""
    return _parse(lines, allow=False)


def parse_allow(lines: list[Line]) -> tuple[Entry, ...]:
    """``dnswl``: ``zone[=filter]`` per line."""
    return _parse(lines, allow=True)


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


def error_code(answer: str, zone: str, *, allow: bool) -> bool:
    """Whether an A answer is a failed lookup rather than a listing (the module's
    docstring): outside 127/8, Spamhaus's 127.255.255.x; on an allow list dnswl.org's
    127.0.0.255 and, on its zones, a trust level outside 0 to 3."""
    if not answer.startswith("127.") or answer.startswith("127.255.255."):
        return True
    if not allow:
        return False
    if answer == DNSWL_BLOCKED:
        return True
    dnswl = zone == DNSWL_ORG or zone.endswith("." + DNSWL_ORG)
    return dnswl and not DNSWL_TRUST.matches(answer)


def classify(entry: Entry, answers: list[str] | None, *, allow: bool) -> tuple[str, str]:
    """One line's state for a client: ("hit", answer), ("no", ""), or ("fail", answer) ("" when
    nothing usable came back). A blocklist's matching answer wins over an error code beside
    it; on an allow list any error code fails the lookup: it never allows."""
    if answers is None:
        return "fail", ""
    errors = [a for a in answers if error_code(a, entry.zone, allow=allow)]
    matching = [a for a in answers if a not in errors and entry.matches(a)]
    if allow and errors:
        return "fail", errors[0]
    if matching:
        return "hit", matching[0]
    if errors:
        return "fail", errors[0]
    return "no", ""


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
    score: int = 0  # the weights of every matching dnsbl line
    errors: tuple[tuple[str, str], ...] = ()  # (zone, answer): error codes (warned of)

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


def tally(settings: Settings, answers: Mapping[str, list[str] | None]) -> Result:
    """The lists' A answers for one client (``None``: the lookup failed) as a Result, its
    hits without their TXT text yet (``listlookup`` asks for it only when it matters)."""
    allowed: str | None = None
    hits: dict[str, str] = {}
    failed: dict[str, bool] = {}
    errors: dict[tuple[str, str], bool] = {}
    score = 0
    for allow, group in ((True, settings.allow), (False, settings.lists)):
        for entry in group:
            state, answer = classify(entry, answers.get(entry.zone), allow=allow)
            if state == "fail":
                failed[entry.zone] = True
                if answer:
                    errors[(entry.zone, answer)] = True
            elif state == "hit" and allow:
                allowed = allowed or entry.zone
            elif state == "hit":
                hits.setdefault(entry.zone, answer)
                score += entry.weight
    listed = tuple((zone, answer, "") for zone, answer in hits.items())
    gone = tuple(zone for zone in failed if zone not in hits)  # another line of it matched
    return Result(listed, allowed, gone, score, tuple(errors))


def verdict(result: Result, settings: Settings, ip: str) -> Verdict:
    """The lists' answer as a verdict: refuse at the threshold, defer on failure if
    ``dnsbltempfail``, else accept (the log still names any hit below the threshold)."""
    log = result.log()
    if result.allowed is None and result.hits and result.score >= settings.threshold:
        named = ", ".join(zone for zone, _, _ in result.hits)
        txt = next((text for _, _, text in result.hits if text), "")
        text = f"Service unavailable; client [{ip}] blocked using {named}"
        return Verdict("refuse", 554, text + (f"; {txt}" if txt else ""), log)
    blocklists = {entry.zone for entry in settings.lists}
    failed = any(zone in blocklists for zone in result.failed)  # a failing allow list: no allow
    if result.allowed is None and failed and settings.tempfail:
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
