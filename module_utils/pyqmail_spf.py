# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The SPF terms an admin may add to the records pyqmail_dns writes (pyqmail_dns__spf_extra).

Why its own module: the preflight (``pyqmail_inventory``) refuses a bad term before any host
changes, and the zone filter (``filter_plugins/pyqmail_dns.py``) refuses the sum of every host's
terms for a domain; both must apply one rule, so both import it from here.

A term is one SPF mechanism that passes (RFC 7208 5): ``ip4:``, ``ip6:``, ``a``, ``mx``,
``a:``/``mx:`` (with optional ``/cidr``), ``include:``, ``exists:``. No qualifier (the
record's end, ``pyqmail_dns__spf_all``, says what fails), no ``all``, ``ptr`` (RFC 7208 5.5: do
not use) or ``redirect=`` (it would drop the other terms' meaning). ``a``, ``mx``,
``include:`` and ``exists:`` each make the receiver look a name up: a record needing more than
10 such lookups is a permerror (RFC 7208 4.6.4), and mail fails SPF at every receiver. The
terms pyqmail generates (``ip4:``/``ip6:``) need none; what an ``include:``d record looks up
counts too, and cannot be counted here.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

MAX_LOOKUPS = 10
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?"
_NAME = rf"({_LABEL}\.)+{_LABEL}"
# a domain-spec with macros (RFC 7208 7), for exists: (and accepted in the others)
_SPEC = r"[a-z0-9_.%{}+=-]*%\{[a-z][0-9]*r?[-.+,/_=]*\}[a-z0-9_.%{}+=-]*"
_CIDR = r"(/(3[0-2]|[12]?[0-9]))?(//(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?"
TERM_RES = (
    re.compile(rf"(a|mx)(:({_NAME}|{_SPEC}))?{_CIDR}\Z"),
    re.compile(rf"(include|exists):({_NAME}|{_SPEC})\Z"),
)
LOOKUP_RE = re.compile(r"(a|mx|include|exists)(\Z|[:/])")


def term_problem(term: Any) -> str | None:
    """Why ``term`` is not an SPF term pyqmail_dns accepts, or None."""
    text = term.lower() if isinstance(term, str) else ""
    if text[:1] in ("+", "-", "~", "?"):
        return "has a qualifier: give the term alone (pyqmail_dns__spf_all ends the record)"
    kind, _colon, rest = text.partition(":")
    if kind in ("ip4", "ip6"):
        try:
            net = ipaddress.ip_network(rest, strict=False)
        except ValueError:
            net = None
        if net is None or f"ip{net.version}" != kind:
            return f"is not {kind}:<IPv{kind[-1]} address or network>"
        return None
    if any(r.match(text) for r in TERM_RES):
        return None
    return (
        "is not an SPF term: ip4:, ip6:, a, mx, a:<name>, mx:<name> (each with /cidr), "
        "include:<name> or exists:<name> (no all, ptr or redirect=)"
    )


def lookups(terms: Iterable[str]) -> int:
    """How many DNS lookups the receiver makes for ``terms`` themselves (a, mx, include:,
    exists:), each counted once."""
    return len({t.lower() for t in terms if LOOKUP_RE.match(t.lower())})


def too_many(count: int) -> str:
    """The end of a message for ``count`` lookups over the limit."""
    return (
        f"{count} terms that need a DNS lookup (a, mx, include:, exists:); SPF allows "
        f"{MAX_LOOKUPS} in all, including those of the included records (RFC 7208 4.6.4), "
        "or every receiver fails the mail with permerror: use ip4:/ip6: or fewer include:"
    )


def check_spf_extra(name: str, value: Any, values: Mapping[str, Any]) -> Iterator[str]:
    """pyqmail_dns__spf_extra: each an SPF term, and at most 10 lookups in all."""
    del values
    for index, term in enumerate(value):
        problem = term_problem(term)
        if problem:
            yield f"{name}[{index}]: {term!r} {problem}"
    count = lookups(str(t) for t in value)
    if count > MAX_LOOKUPS:
        yield f"{name}: {too_many(count)}"
