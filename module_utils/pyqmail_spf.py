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
message (4.6), so a name is checked as the RFC's domain-spec (7.1): a macro-string, then a
domain-end, which is a macro or ``.`` and a toplabel (letters and digits with a letter, or
letters, digits and ``-`` with a ``-`` neither first nor last: ``host.123-456`` is a name,
``a:192.0.2.1`` is none, ``ip4:`` says it), with the root's dot allowed after it. A macro is
``%{letter...}`` with a letter a domain may use: s l o d i p h v (c, r and t are for ``exp=``
text only, 7.3; any other is unknown). Beside a macro every macro-literal is allowed (each
visible character but ``%``: ``exists:%{l}@%{d}.rate.example``); a name without a macro is a
host name (letters, digits, ``-``, ``_``, dots), as another character (``a:mx@example.org``)
is a mistake in a name no host has. ``%%``, ``%_`` and ``%-`` are valid but put ``%`` or a
space into a name; they are refused as no name a mail domain publishes has them.

An ``include:`` of the record itself is a loop that every receiver ends with permerror (RFC
7208 4.6.4; pyspf: "include has trivial recursion"): ``include:%{d}`` (``%{d}`` is the
domain whose record is read) and ``include:%{o}`` (the sender's domain: that same domain
when mail from it is checked) are refused here; ``include:`` of a domain whose record gets
the term, and ``include:%{d2}`` for a two-label domain, where the domains are known
(``check_spf_extra``, the zone filter's ``pyqmail_dns_host``: ``self_include``; a domain the
host is only backup MX for gets a record only when another host of the run has it as its
own, which the zone filter's ``pyqmail_dns_zone`` alone knows).

A loop can also run across the records of several hosts: host A puts ``include:b.example`` in
the SPF of a.example, host B ``include:a.example`` in that of b.example. No term alone shows
it, and no one host's variables: only the zone filter (``pyqmail_dns_zone``) sees every host's
own ``pyqmail_dns_host`` result, each templated in its own host's context (play vars, role
vars, ``hostvars[...]`` all as that host sees them), and the records it writes from them. It
hands those records to ``include_loops``, which finds the strongly connected components of
the include graph (Tarjan: linear in records and includes) and tells each once, naming its
records, hosts and terms; the filter refuses the zone of each host that holds one of them.
The preflight does not: another host's variables read from one host's context miss that
host's play and role variables and cannot template its ``hostvars[...]``. pyspf passes an
address the records list before the include (``ip4:``/``ip6:`` come first), but for any other
(the outside provider's servers the include is there for) it follows the loop until its 11th
lookup and ends with permerror ("Too many DNS lookups"), so that mail fails SPF, and DMARC
with it. Only records the run writes are followed: what another domain's published record
includes is not asked (no DNS), and with ``--limit`` the hosts left out are not seen.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

MAX_LOOKUPS = 10
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?"
# RFC 7208 7.1 toplabel = ( *alphanum ALPHA *alphanum ) / ( 1*alphanum "-" *( alphanum / "-" )
# alphanum ), a DNS label (at most 63 characters)
_TOP = r"(?=[a-z0-9-]{1,63}(?![a-z0-9-]))([a-z0-9]*[a-z][a-z0-9]*|[a-z0-9]+-[a-z0-9-]*[a-z0-9])"
TOP_RULE = (
    "the last label of a domain is 1 to 63 letters and digits with at least one letter, or "
    "letters, digits and '-' with a '-' neither first nor last (RFC 7208 7.1 toplabel)"
)
_NAME = rf"({_LABEL}\.)+{_TOP}\.?"
# a macro a domain-spec may hold (RFC 7208 7.1-7.3): letter, digits, r, delimiters
_MACRO = r"%\{[slodiphv][0-9]*r?[-.+,/_=]*\}"
# macro-literal = %x21-24 / %x26-7E (RFC 7208 7.1): each visible character but '%'
_LITERAL = r"[\x21-\x24\x26-\x7e]"
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
_TOP_FULL_RE = re.compile(rf"{_TOP}\Z")
_HOST_CHAR_RE = re.compile(r"[^a-z0-9_.-]")
# a domain-spec without a macro (a name that needs no host name rule to be valid SPF)
_PLAIN_SPEC_RES = {
    True: re.compile(rf"({_LITERAL}*\.{_TOP}\.?){_CIDR}\Z"),
    False: re.compile(rf"({_LITERAL}*\.{_TOP}\.?)\Z"),
}
_SELF_MACRO_RE = re.compile(r"%\{([do])([0-9]*)(r?)([-.+,/_=]*)\}")
# an include: spec that is the domain itself for both (one with '-' and '_', one of 127 labels)
# is it for every domain: %{d}, %{o}, %{d.}, %{d127}; not %{d2}, %{d-} or %{dr}
_SAMPLES = ("mx-1_a.example", "b" + ".a" * 126)


def _name_problem(kind: str, rest: str) -> str | None:
    """What makes the name of an a:, mx:, include: or exists: term no domain-spec, told
    precisely for the mistakes an admin makes: an address, a macro letter, a last label that
    is no toplabel, a character no host name has."""
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
    if top and top.group(1) and not _TOP_FULL_RE.match(top.group(1)):
        return f"ends with the label {top.group(1)!r}: {TOP_RULE}"
    plain = _PLAIN_SPEC_RES[kind in ("a", "mx")].match(rest)
    odd = _HOST_CHAR_RE.search(plain.group(1)) if plain else None
    if odd:
        return (
            f"has {odd.group()!r} in a name without a macro: a host name has letters, digits, "
            "'-', '_' and dots (other characters only beside a macro: exists:%{l}@%{d}.example)"
        )
    return None


def _expand(spec: str, domain: str) -> str | None:
    """``spec`` with its macros expanded (RFC 7208 7.3) where ``domain`` is both the domain
    whose record is read (%{d}) and the sender's (%{o}); None when it has another macro."""
    out, end = [], 0
    for macro in _SELF_MACRO_RE.finditer(spec):
        letter_digits, reverse, delimiters = macro.group(2), macro.group(3), macro.group(4)
        parts = re.split(f"[{re.escape(delimiters or '.')}]", domain)
        parts = parts[::-1] if reverse else parts
        if letter_digits:
            parts = parts[-int(letter_digits) :] if int(letter_digits) else parts
        out += [spec[end : macro.start()], ".".join(parts)]
        end = macro.end()
    out.append(spec[end:])
    if any("%" in piece for piece in out[::2]):
        return None
    return "".join(out).rstrip(".")


def _loops(term: str, domain: str) -> bool:
    """Whether ``term`` in the SPF record of ``domain`` includes that record itself."""
    kind, _colon, spec = term.lower().partition(":")
    return kind == "include" and _expand(spec, domain) == domain.lower().rstrip(".")


def self_include(term: Any, domains: Mapping[str, str]) -> str | None:
    """Why ``term`` is a loop in the record of one of ``domains`` (domain -> the variable
    that puts the domain's record in the zone), or None."""
    for domain, where in domains.items():
        if isinstance(term, str) and isinstance(domain, str) and _loops(term, domain):
            return (
                f"includes, in the SPF record of {domain.lower().rstrip('.')} ({where}), that "
                "record itself: a loop, which every receiver ends with permerror (RFC 7208 4.6.4)"
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
        if all(_loops(text, sample) for sample in _SAMPLES):
            return (
                "includes the record it is in (%{d} is the domain whose record is read, %{o} "
                "the sender's, the same domain for its own mail): a loop, which every receiver "
                "ends with permerror (RFC 7208 4.6.4)"
            )
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


def own_domains(values: Mapping[str, Any]) -> dict[str, str]:
    """The domains whose SPF record gets the host's terms (pyqmail_dns: its name, the domains it
    receives, sends or signs for), each -> the variable naming it.

    Not the domains it is only backup MX for (pyqmail_control__relay_domains): pyqmail_dns
    writes no SPF record for a domain whose primary is elsewhere, and ``include:`` of the
    partner a backup MX relays for is how it sends through the partner's smarthost. Whether
    another host of the run writes that domain's record only the zone filter knows (its
    ``pyqmail_dns_zone`` refuses the loop then)."""
    keys = ["pyqmail_control__locals", "pyqmail_dns__send_domains"]
    if values.get("pyqmail_dkim__enabled"):
        keys.append("pyqmail_dkim__domains")
    named: list[tuple[str, Any]] = [("pyqmail__me", [values.get("pyqmail__me")])]
    named += [(key, values.get(key)) for key in keys]
    out: dict[str, str] = {}
    for key, domains in named:
        for domain in domains if isinstance(domains, (list, tuple)) else []:
            if isinstance(domain, str) and domain:
                out.setdefault(domain.lower().rstrip("."), key)
    return out


def check_spf_extra(name: str, value: Any, values: Mapping[str, Any]) -> Iterator[str]:
    """pyqmail_dns__spf_extra: each an SPF term, none including the record it is in, and at
    most 10 lookups in all."""
    own = own_domains(values)
    for index, term in enumerate(value):
        problem = term_problem(term) or self_include(term, own)
        if problem:
            yield f"{name}[{index}]: {term!r} {problem}"
    count = lookups(str(t) for t in value)
    if count > MAX_LOOKUPS:
        yield f"{name}: {too_many(count)}"


Edges = dict[str, dict[str, dict[str, set[str]]]]


def _edges(records: Mapping[str, Mapping[str, Any]]) -> Edges:
    """domain -> included domain -> term -> hosts whose term it is: the include: terms of the
    records ``records`` that name another of them (an include of the record itself is
    ``self_include``'s; a name no host of the run writes is not followed, no DNS is asked)."""
    edges: Edges = {}
    for domain, record in records.items():
        for host, terms in record["terms"].items():
            for term in terms:
                kind, _colon, spec = term.lower().partition(":")
                target = _expand(spec, domain) if kind == "include" else None
                if target and target != domain and target in records:
                    by_term = edges.setdefault(domain, {}).setdefault(target, {})
                    by_term.setdefault(term, set()).add(host)
    return edges


def _components(edges: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """The strongly connected components of two or more records (each reaches every other
    through includes: every record on a loop is in one), each sorted: Tarjan's algorithm,
    O(records + includes), iterative so a chain of thousands of records needs no recursion."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(edges.get(root, {})))]
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(edges.get(target, {}))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while not component or component[-1] != node:
                        component.append(stack.pop())
                        on_stack.discard(component[-1])
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


LOOP_END = (
    "a receiver that follows it, for any address these records do not list before it (the "
    "servers of an outside provider an include: is there for), ends with permerror (RFC 7208 "
    '4.6.4; pyspf: "Too many DNS lookups"): drop one of these include: terms, or put the other '
    "host's ip4:/ip6: in place of its include:"
)


def _loop_message(edges: Mapping[str, Mapping[str, Any]], component: list[str], name: str) -> str:
    """The message for one component: every include: term by which a record of it includes
    another of it, with the record it is in and the hosts that give it."""
    members = set(component)
    parts = []
    for at in component:
        by_term: dict[str, set[str]] = {}
        for target, terms in edges[at].items():
            if target in members:
                for term, hosts in terms.items():
                    by_term.setdefault(term, set()).update(hosts)
        shown = [f"{t!r} (of {', '.join(sorted(h))})" for t, h in sorted(by_term.items())]
        parts.append(f"that of {at} has {' and '.join(shown)}")
    return (
        f"{name}: an include loop across the SPF records {', '.join(component)}, which this run "
        f"writes: {', '.join(parts)}; {LOOP_END}"
    )


def include_loops(
    records: Mapping[str, Mapping[str, Any]], name: str = "pyqmail_dns__spf_extra"
) -> list[tuple[set[str], str]]:
    """The include: loops across the SPF records a run writes, as (the hosts whose zone file
    holds a record on it, the message naming every record, host and include: term of it).
    ``records``: domain -> ``terms`` (host -> its terms, every host whose terms the record
    gets) and ``writers`` (the hosts whose zone holds it), as the zone filter writes them.

    A loop of two or more records is no trivial recursion a term alone shows: a.example
    includes b.example, whose record includes a.example. pyspf passes an address the records
    list before the include (ip4:/ip6: come first), but one they do not (the outside provider's
    servers the include: is there for) takes it round the loop until its 11th lookup: permerror
    (RFC 7208 4.6.4), SPF fails, and DMARC with it. Loops sharing records are one strongly
    connected component, told once; its message names each include: from one of its records
    to another (an include: leaving it is on no loop and is not named)."""
    edges = _edges(records)
    out = []
    for component in _components(edges):
        writers = {h for d in component for h in records[d]["writers"]}
        out.append((writers, _loop_message(edges, component, name)))
    return out
