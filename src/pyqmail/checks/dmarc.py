"""DMARC (RFC 7489): the header From domain's policy, applied to the SPF and DKIM results.

Alignment (3.1) is relaxed (same organisational domain) or strict (same domain) per
identifier (``adkim``, ``aspf``); the organisational domain comes from the public suffix
list (publicsuffix2, python3-publicsuffix2; a name under no listed suffix follows the
list's default rule ``*``: its last label is the suffix). The record is looked up at
``_dmarc.<From domain>``; only when there is none there, at ``_dmarc.<organisational
domain>``, where ``sp`` (when given) is the policy for subdomains; more than one record at
either name stops DMARC: no policy (6.6.3). ``pct`` below 100 applies the policy to that
share of failing mail only; the rest gets the next weaker one (6.6.4).

The header From (6.6.1, ``from_domains``): no From is no DMARC identity (``none``); a From
of several mailboxes is judged per domain, the strictest failing policy applies; more than
one From field is refused as a p=reject failure would be. A From the address grammar
cannot read (``user@example.com <user@example.com>``, the legacy Japanese mobile
``taro..yamada@docomo.ne.jp``) is judged on every domain a mail client may show in it
(``headers.shown_domains``: after each at sign, in comments, quoted strings and encoded
words too), the strictest failing policy applies, so ``ceo@bank.example <x@evil.example>``
gets bank.example's whichever a client shows; one naming no domain at all (RFC 6854's
``Automated System:;``, a bare ``MAILER-DAEMON``) is a permerror that is accepted, as no
From is (nothing shown to protect); one with no safe reading (an at sign before no word,
bidirectional overrides or isolates, a domain that is no host name or holds a format
character) is refused. A display name's words after an at sign count as domains shown
(``Joe @ bank.example <joe@example.com>``: RFC 5322 4.4 allows blanks around "@"), so such
a From is judged on what bank.example and example.com publish. The author domain (6.6.1:
the address in angle brackets, example.com) gives the result; a domain only shown counts
only when it tightens it (a failing p=reject or p=quarantine gets the message refused or
sent to Junk, ``_rank``): its ``none`` (no record) never replaces the author's pass. A
public suffix shown (the dotless ``Home`` of ``Joe @ Home``, ``Yahoo`` of ``News @
Yahoo!``) is no one's domain and is not looked up. A zero-width joiner or right-to-left mark
in a display name is harmless. Those Froms were refused unasked before (session 35).

``np`` (RFC 9091 3.2, kept by DMARCbis): a failing message whose From domain is a subdomain
with no record of its own and does not exist gets the organisational domain's ``np`` (when
valid), else its ``sp``, else ``p``. Does not exist: an A query for it is answered
NXDOMAIN. That is DMARCbis's definition (RFC 8020, as Stalwart's mail-auth reads it), not
RFC 9091 2.1's broader NXDOMAIN-or-NODATA for A, AAAA and MX, which DMARCbis dropped: a
subdomain that sends mail with only SPF and DKIM records (no address, no MX) exists and is
its owner's, and the broader test cost three lookups. So a name without an A record, an
empty non-terminal, a wildcard's match and a CNAME to nowhere exist (``resolver.exists``);
so does every name of a zone signed with compact denial (RFC 9824 answers NODATA, never
NXDOMAIN): there ``np`` never applies, a limit of DMARCbis's definition itself.

The lookup is made only when it can change the outcome (the record came from the
organisational domain, the verdict is fail, ``np`` is valid and differs from what
``sp``/``p`` give); when it fails (timeout, SERVFAIL, no budget left) ``sp``/``p`` apply,
as before ``np`` was read, so a DNS failure makes the verdict neither weaker nor stronger.
``DmarcResult.tag`` names the tag applied (``np=reject`` in the Authentication-Results
comment). Public suffix domains' own records (``_dmarc.<suffix>``, the rest of RFC 9091)
are not looked up.

Domains are compared, looked up and cut to their organisational domain as A-labels (RFC
8616 4: a From of ``bücher.example`` is signed as ``d=xn--bcher-kva.example``). The
conversion is Python's ``idna`` codec (IDNA 2003: the ``idna`` package of IDNA 2008 is not
a dependency): it maps a few characters IDNA 2008 keeps (``straße.de`` becomes
``strasse.de``), so such a From domain is looked up and aligned as the name IDNA 2003
gives. A From domain that has no A-label form (an empty or over-long label) is a permerror
that is refused as a p=reject failure (``check``). A From domain whose ``_dmarc`` name
cannot be a DNS name (250 characters and more: no such name can hold a record,
``resolver.dns_name``) has no record of its own: its organisational domain's record
applies, as for any subdomain without one. It was a temperror, and the message accepted.

The record lookups and the existence lookup share the check's ``budget`` (``deadline``):
DNS that never answers costs the message what is left of its checks' time, not the
resolver's lifetime for each lookup, so one message's checks cannot hold their thread past
``authtimeout``.
"""

from __future__ import annotations

import encodings.idna  # publicsuffix2's codecs, imported before the daemon
import encodings.punycode  # noqa: F401 - drops privileges (it may not read them afterwards)
import functools
import random
import re
import time
from dataclasses import dataclass

import dns.resolver
import publicsuffix2

from pyqmail.checks.dkimverify import DkimResult
from pyqmail.checks.resolver import exists, txt
from pyqmail.checks.spf import SpfResult
from pyqmail.headers import header_values, mailbox_addresses, shown_domains

MAX_FROM_DOMAINS = 5  # distinct domains of one From judged; more: the From is not judged
NO_DOMAIN = "header From names no domain"  # from_domains: accepted, a permerror
_HOST = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")  # a domain shown, as A-labels
# A domain the address grammar reads (atext) with ASCII punctuation no host name holds, not
# an address literal: ``ceo@bank.test!``, ``=?utf-8?q?ceo@bank.test?=`` (bank.test?=).
_PUNCTUATED = re.compile(r"(?!\[).*?[!-,/:-@\[-^`{-~]", re.DOTALL)
POLICIES = ("none", "quarantine", "reject")
_WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_TAG = re.compile(r"^\s*([a-z]+)\s*=\s*(.*?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class DmarcResult:
    """``result`` (pass, fail, none, temperror, permerror); ``policy``: what the domain asks
    for this message (after pct, sp and np); ``published``: the policy of the record's tag
    that applies, as written (none for an invalid p=); ``tag``: that tag, p, sp or np.
    A ``permerror`` with the policy ``reject``: a header From DMARC cannot judge
    (``check``), refused like a p=reject failure, ``reason`` says why; with the policy
    ``none``: a From naming no domain (``NO_DOMAIN``), accepted."""

    result: str
    header_from: str = ""
    policy: str = "none"
    published: str = ""
    reason: str = ""
    tag: str = "p"


@functools.cache
def _psl() -> publicsuffix2.PublicSuffixList:
    """The public suffix list, parsed once per process."""
    return publicsuffix2.PublicSuffixList()


def _suffix(domain: str) -> str:
    """The public suffix of ``domain`` (lower case, no trailing dot): the list's, else its
    last label (the default rule ``*``)."""
    return _psl().get_tld(domain, strict=True) or domain.rpartition(".")[2]


def org_domain(domain: str) -> str:
    """The organisational domain (RFC 7489 3.2): one label more than the public suffix."""
    domain = domain.lower().rstrip(".")
    labels = domain.split(".")
    count = _suffix(domain).count(".") + 2
    return ".".join(labels[-count:]) if len(labels) >= count else domain


def public_suffix(domain: str) -> bool:
    """Whether ``domain`` is a public suffix itself, so no one's organisational domain
    (``com``, ``co.uk``, and under the default rule every dotless name: ``yahoo``)."""
    domain = domain.lower().rstrip(".")
    return _suffix(domain) == domain


def ace(domain: str) -> str | None:
    """``domain`` in lower-case A-labels (IDNA), without a trailing dot; None when it has
    no such form."""
    try:
        name = domain.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    return name or None


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """Whether an authenticated domain aligns with the From domain (strict or relaxed),
    both compared as A-labels (RFC 8616 4)."""
    a, b = ace(identifier), ace(from_domain)
    if a is None or b is None:
        return False
    if mode == "s":
        return a == b
    return org_domain(a) == org_domain(b)


def from_domains(head: bytes) -> list[str] | str:
    """The distinct domains of the header From judged (RFC 7489 6.6.1), lower case, in
    order (``_judged``); [] when there is no From; a str, why DMARC cannot judge the From
    (``NO_DOMAIN`` when it names none)."""
    judged = _judged(head)
    return judged if isinstance(judged, str) else judged[0]


def _judged(head: bytes) -> tuple[list[str], list[str]] | str:
    """(the domains of the header From judged, the author domains among them); ([], [])
    when there is no From; a str, why DMARC cannot judge the From, when there is more than
    one From field, one naming more than ``MAX_FROM_DOMAINS`` domains, or one with no safe
    reading (``_shown``); ``NO_DOMAIN`` when it names none. Read as the sender rules read
    From (``pyqmail.headers``), over the whole header section: a From past 100 KiB is a
    From; the domains of the addresses it reads are the author domains. One that reading
    cannot read, or reads with ASCII punctuation in a domain (``ceo@bank.test!``: it looked
    up ``_dmarc.bank.test!``, no record, and accepted), is judged on every domain a client
    may show in it but public suffixes (``_shown``); its author domain is the one of the
    address in angle brackets it ends with (``_author``), else every domain judged is."""
    values = header_values(head, "from", limit=len(head))
    if not values:
        return [], []
    if len(values) > 1:
        return "more than one header From field"
    addresses = mailbox_addresses(values[0]) or []
    domains = list(dict.fromkeys(a.rpartition("@")[2].lower().rstrip(".") for a in addresses))
    authors = domains
    if not domains or any(_PUNCTUATED.match(d) for d in domains):
        shown = _shown(values[0])
        if isinstance(shown, str):
            return shown
        author = _author(values[0])
        authors = [author] if author in shown else []
        domains = [d for d in shown if d in authors or not public_suffix(ace(d) or d)]
        authors = authors or domains
        if not domains:
            return NO_DOMAIN
    if len(domains) > MAX_FROM_DOMAINS:
        return f"header From names more than {MAX_FROM_DOMAINS} domains"
    return domains, authors


def _author(value: str) -> str | None:
    """The author domain of a From the address grammar cannot read (RFC 7489 6.6.1: the
    address in angle brackets): the domain shown in the angle brackets the value ends with
    (``News @ Yahoo! <news@yahoo.com>``: yahoo.com); None when it does not end with them,
    or they hold other than one at sign and one domain shown. The other domains shown are
    only shown: their failing policy tightens the result, their ``none`` or pass does not
    stand for the message (``_rank``)."""
    value = value.rstrip()
    start = value.rfind("<")
    inner = value[start + 1 : -1]
    if start < 0 or not value.endswith(">") or ">" in inner or inner.count("@") != 1:
        return None
    shown = shown_domains(inner)
    return shown[0] if shown and len(shown) == 1 else None


def _shown(value: str) -> list[str] | str:
    """The domains of a From the address grammar cannot read (or a group with no member),
    as a client may show them (``headers.shown_domains``); ``NO_DOMAIN`` when there is
    none; "header From not understood" when there is no safe reading, or a domain shown is
    no host name (``bank..test``, a name IDNA refuses; ``[192.0.2.1]`` has none: the name
    looked up would not be the one a reader sees). A word is cut at ASCII punctuation no
    host name holds before (``shown_domains``): ``Marketing @ AT&T <news@att.example>``,
    ``News @ Yahoo! <...>``, ``Sales @ 24/7 <...>`` were refused here, unasked, for it;
    now at, yahoo and 24 are dropped (``_judged``) as the dotless ``Home`` of ``Joe @
    Home``: a public suffix is no one's domain, and looking them up asked a TLD's DMARC
    record for every such message (``_dmarc.at.``), its ``none`` reported in place of the
    address's pass. ``Ops @ example.com/team`` and ``=?utf-8?q?ceo@bank.test?=`` are
    judged on example.com and bank.test. Why not refuse them all,
    as at first: legitimate senders write such Froms (RFC 6854 groups, ``MAILER-DAEMON``,
    the sloppy ``a@b.example <a@b.example>``, Japanese mobile local parts with '..',
    ``Joe @ Home <joe@b.example>``, an unquoted comma in a display name), and judging every
    domain shown keeps each of those domains' policy."""
    shown = shown_domains(value)
    if shown is None or any(not _HOST.fullmatch(ace(d) or "") for d in shown):
        return "header From not understood"
    return shown or NO_DOMAIN


def parse_record(text: str) -> dict[str, str]:
    """A DMARC record's tags; ValueError when it is not one (no v=DMARC1 first)."""
    tags = {}
    for part in text.split(";"):
        m = _TAG.match(part)
        if m:
            tags[m.group(1).lower()] = m.group(2)
    if not text.lstrip().startswith("v=DMARC1") or tags.get("v") != "DMARC1":
        raise ValueError("not a DMARC record")
    return tags


def _record(res: dns.resolver.Resolver, name: str, deadline: float) -> dict[str, str] | str | None:
    """The DMARC record at _dmarc.``name``: its tags, None when there is none, "several"
    when there is more than one (RFC 7489 6.6.3: no policy, and no looking further up),
    "temperror" when the lookup failed or ``deadline`` came first."""
    records = txt(res, f"_dmarc.{name}.", lifetime=deadline - time.monotonic())
    if records is None:
        return "temperror"
    found = []
    for raw in records:
        try:
            found.append(parse_record(raw.decode("utf-8", "replace")))
        except ValueError:
            continue
    if len(found) > 1:
        return "several"
    return found[0] if found else None


def _authenticated(
    tags: dict[str, str], domain: str, spf: SpfResult, dkim: list[DkimResult]
) -> str:
    """ "pass" when an aligned SPF or DKIM pass authenticates the From domain (any one is
    enough, RFC 7489 6.6.2); else "temperror" when an aligned identifier could not be
    checked for a temporary reason, even next to an aligned fail (a DNS timeout must not
    turn into a DMARC failure and a refusal); else "fail". A DKIM temperror names its d=
    only when that domain's DNS failed (``dkimverify``), so a signer cannot make one."""
    adkim, aspf = tags.get("adkim", "r").lower(), tags.get("aspf", "r").lower()
    dkim_aligned = [d.result for d in dkim if aligned(d.domain, domain, adkim)]
    spf_aligned = spf.result if aligned(spf.domain, domain, aspf) else "none"
    if "pass" in dkim_aligned or spf_aligned == "pass":
        return "pass"
    if "temperror" in dkim_aligned or spf_aligned == "temperror":
        return "temperror"
    return "fail"


def _published(tags: dict[str, str], subdomain: bool, nonexistent: bool) -> tuple[str, str]:
    """(the tag that applies, its policy): np= for a subdomain that does not exist, sp= for
    a subdomain, p= else; an absent or invalid np= or sp= gives way to the next."""
    if subdomain and nonexistent and tags.get("np", "").lower() in POLICIES:
        return "np", tags["np"].lower()
    if subdomain and tags.get("sp", "").lower() in POLICIES:
        return "sp", tags["sp"].lower()
    published = tags.get("p", "").lower()
    # 6.6.3: an invalid p= with a valid record is treated as none
    return "p", published if published in POLICIES else "none"


def _sampled(tags: dict[str, str], published: str, roll: int) -> str:
    """The policy for this message after pct=: ``published`` for ``roll`` (0-99) below
    pct, the next weaker one above (6.6.4)."""
    pct_text = tags.get("pct", "100")  # not ASCII digits (pct=²): the default (6.3)
    pct = int(pct_text) if re.fullmatch(r"[0-9]+", pct_text, re.ASCII) else 100
    return published if roll < min(pct, 100) else _WEAKER[published]


def _nonexistent(
    res: dns.resolver.Resolver, name: str, tags: dict[str, str], deadline: float
) -> bool:
    """Whether np= applies to a failing message from ``name``, a subdomain with no record
    of its own: np= is valid and asks for something else than sp=/p= (else no lookup), and
    ``name`` does not exist. A failed lookup is False: sp=/p=, as before np= was read."""
    if _published(tags, True, True)[1] == _published(tags, True, False)[1]:
        return False
    return exists(res, f"{name}.", lifetime=deadline - time.monotonic()) is False


def _domain(
    res: dns.resolver.Resolver,
    domain: str,
    spf: SpfResult,
    dkim: list[DkimResult],
    *,
    draw: int,
    deadline: float,
) -> DmarcResult:
    """The DMARC result of one From domain (``ace`` form known to exist), its lookups done
    by ``deadline``; ``draw`` (0-99) is the pct draw."""
    name = ace(domain) or domain
    org = org_domain(name)
    tags = _record(res, name, deadline)
    subdomain = False
    if tags is None and org != name:
        tags, subdomain = _record(res, org, deadline), True
    if tags == "temperror":
        return DmarcResult("temperror", domain, reason="DMARC record lookup failed")
    if tags == "several":
        return DmarcResult("none", domain, reason="more than one DMARC record")
    if not isinstance(tags, dict):
        return DmarcResult("none", domain, reason="no DMARC record")
    verdict = _authenticated(tags, domain, spf, dkim)
    if verdict != "fail":
        tag, published = _published(tags, subdomain, nonexistent=False)
        return DmarcResult(verdict, domain, "none", published, tag=tag)
    nonexistent = subdomain and _nonexistent(res, name, tags, deadline)
    tag, published = _published(tags, subdomain, nonexistent)
    return DmarcResult("fail", domain, _sampled(tags, published, draw), published, tag=tag)


def _rank(r: DmarcResult, author: bool = True) -> tuple[int, int, int]:
    """Which of several From domains' results stands for the message (the lowest): a
    failure with a policy, the strictest first (RFC 7489 6.6.1); a temperror (which
    ``inbound`` may defer); a failure without one; no policy; a pass last; on a tie, an
    author domain's. A domain only shown (``_judged``: ``Joe @ bank.example <joe@b.example>``)
    stands only with a failure with a policy or a temperror (its DNS failing, or its share
    of the budget spent, must not let a forged domain through): it may tighten the result,
    never replace the author domain's pass with its ``none`` or a failure without a policy."""
    order = ("reject", "quarantine", "none")
    tie = 0 if author else 1
    if r.result == "fail" and r.policy != "none":
        return 0, order.index(r.policy), tie
    if not author and r.result != "temperror":
        return 5, 0, tie
    return {"temperror": 1, "fail": 2, "none": 3, "pass": 4}.get(r.result, 3), 0, tie


def check(
    res: dns.resolver.Resolver,
    head: bytes,
    spf: SpfResult,
    dkim: list[DkimResult],
    *,
    roll: int | None = None,
    budget: float = 10.0,
) -> DmarcResult:
    """The DMARC result of a message whose header section is ``head``, its lookups within
    ``budget`` seconds in all. ``roll`` (0-99) is the pct draw; random unless given (tests).

    No From: nothing to protect, ``none``; a From naming no domain neither: ``permerror``
    (why, in the header) with no policy, accepted. A From DMARC cannot judge
    (``from_domains``), or one with a domain that has no A-label form: ``permerror`` with
    the policy ``reject`` (RFC 5322 3.6 asks for exactly one From; RFC 7489 6.6.1 says such
    mail is typically rejected), which ``authresults.decide`` treats as a p=reject failure;
    before, it was accepted, so a second ``From: x@evil.test`` switched off any domain's
    p=reject. A From of several domains (or showing several): each domain's result, the
    strictest failing policy applies, a domain only shown stands only when it tightens the
    result (``_rank``); each domain's lookups get an equal share
    of what is left of the budget, so the DNS of a domain the sender owns cannot spend the
    time of the one it forges."""
    deadline = time.monotonic() + budget
    judged = _judged(head)
    if judged == NO_DOMAIN:
        return DmarcResult("permerror", reason=NO_DOMAIN)
    if isinstance(judged, str):
        return DmarcResult("permerror", policy="reject", reason=judged)
    domains, authors = judged
    if not domains:
        return DmarcResult("none", reason="no header From")
    if any(ace(d) is None for d in domains):
        reason = "header From domain is no domain name"
        return DmarcResult("permerror", policy="reject", reason=reason)
    draw = random.randrange(100) if roll is None else roll  # noqa: S311 - a sampling rate
    results = []
    for i, domain in enumerate(domains):
        share = time.monotonic() + (deadline - time.monotonic()) / (len(domains) - i)
        result = _domain(res, domain, spf, dkim, draw=draw, deadline=share)
        results.append((_rank(result, domain in authors), result))
    return min(results, key=lambda ranked: ranked[0])[1]
