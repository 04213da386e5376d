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

A term that breaks the syntax of RFC 7208 makes the whole record a permerror for every
message (4.6), so a name is checked as the RFC's domain-spec (7.1): its last label has a letter
(``a:192.0.2.1`` is no name: ``ip4:`` says it; an all-digit top label is refused as pyspf
refuses it), it may end with the root's dot, and a macro is ``%{letter...}`` with a letter a
domain may use: s l o d i p h v (c, r and t are for ``exp=`` text only, 7.3; any other is
unknown). ``%%``, ``%_`` and ``%-`` are valid but put ``%`` or a space into a name; they are
refused as no name a mail domain publishes has them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

MAX_LOOKUPS = 10
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?"
# RFC 7208 7.1 toplabel: letters, digits and '-', at least one letter (not a number)
_TOP = r"(?=[a-z0-9-]*[a-z])[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_NAME = rf"({_LABEL}\.)+{_TOP}\.?"
# a macro a domain-spec may hold (RFC 7208 7.1-7.3): letter, digits, r, delimiters
_MACRO = r"%\{[slodiphv][0-9]*r?[-.+,/_=]*\}"
_LITERAL = r"[a-z0-9_.+=-]"
# a domain-spec with macros, for exists: (and accepted in the others): it ends with a
# macro or with '.' toplabel (domain-end)
_SPEC = rf"({_LITERAL}|{_MACRO})*{_MACRO}({_LITERAL}*\.{_TOP}\.?)?"
_CIDR = r"(/(3[0-2]|[12]?[0-9]))?(//(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?"
TERM_RES = (
    re.compile(rf"(a|mx)(:({_NAME}|{_SPEC}))?{_CIDR}\Z"),
    re.compile(rf"(include|exists):({_NAME}|{_SPEC})\Z"),
)
LOOKUP_RE = re.compile(r"(a|mx|include|exists)(\Z|[:/])")
_MACRO_LETTER_RE = re.compile(r"%\{(.?)")
_TOP_RE = re.compile(r"\.([^.%{}/]*)\.?(/[0-9/]*)?\Z")


def _name_problem(kind: str, rest: str) -> str | None:
    """What makes the name of an a:, mx:, include: or exists: term no domain-spec, told
    precisely for the mistakes an admin makes: an address, a macro letter, a number."""
    address = rest.split("/", 1)[0] if kind in ("a", "mx") else rest
    with contextlib.suppress(ValueError):
        version = ipaddress.ip_address(address).version
        return (
            f"names an IP address, not a domain: write ip{version}:{rest} "
            "(RFC 7208 5: a:, mx:, include: and exists: take a domain name)"
        )
    for letter in _MACRO_LETTER_RE.findall(rest):
        if letter not in "slodiphv":
            return (
                f"has the macro %{{{letter}...}}: a domain takes only the macro letters "
                "s l o d i p h v (RFC 7208 7.2, 7.3)"
            )
    top = _TOP_RE.search(rest)
    if top and top.group(1) and not re.search(r"[a-z]", top.group(1)):
        return (
            f"ends with the label {top.group(1)!r}: the last label of a domain needs a "
            "letter (RFC 7208 7.1)"
        )
    return None


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
    if kind in ("a", "mx", "include", "exists") and rest:
        problem = _name_problem(kind, rest)
        if problem:
            return problem
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
