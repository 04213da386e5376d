"""The one Authentication-Results header (RFC 8601) and what the verdicts mean for a message.

``header`` writes SPF (both identities), every DKIM signature and DMARC into one field
with the server's authserv-id (``control/me`` unless configured); values are quoted by
authres (python3-authres). ``strip_ours`` removes every incoming field that claims our
authserv-id (RFC 8601 5: a sender must not be able to forge our verdicts), whatever its
case or the comments before the id, and every field whose authserv-id cannot be read for
sure (fail closed); other hosts' fields stay. ``decide`` maps the DMARC
result to the configured action: refuse (550 5.7.1), quarantine (the message goes to the
mailbox's Junk folder, carried to pyqmail-send by the queue meta ``junk``) or accept; a
header From DMARC cannot judge (``dmarc.check``: two From fields, one with no safe
reading) is treated as a p=reject failure; one naming no domain is accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import authres
from authres.dmarc import DMARCAuthenticationResult

from pyqmail.checks.arcverify import ArcResult
from pyqmail.checks.dkimverify import DkimResult
from pyqmail.checks.dmarc import DmarcResult
from pyqmail.checks.spf import SpfResult
from pyqmail.checks.verdict import Verdict
from pyqmail.control.parsers import is_domain

_FIELD = re.compile(rb"(?im)^authentication-results[ \t]*:(.*(?:\r?\n[ \t].*)*)\r?\n")
_TOKEN = re.compile(rb"[^\x00-\x20\x7f()<>@,;:\\\"/\[\]?=]+")  # RFC 2045 token (and UTF-8)
_QUOTED = re.compile(rb'"((?:[^"\\]|\\.)*)"', re.S)
_ID_END = re.compile(rb"[\s;(]|\Z")  # what may follow the id: folding, ";", a comment
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class Results:
    """Every result of one message."""

    helo: SpfResult
    mailfrom: SpfResult
    dkim: list[DkimResult]
    dmarc: DmarcResult
    arc: ArcResult = field(default_factory=lambda: ArcResult("none"))


def _skip_comment(value: bytes, i: int) -> int | None:
    """The index after the comment that opens at ``value[i]`` (any depth, quoted-pairs
    skipped, RFC 5322 3.2.2); None when it never closes."""
    depth = 0
    while i < len(value):
        c = value[i]
        if c == 0x5C:  # backslash: the next byte is quoted, whatever it is
            i += 2
            continue
        depth += (c == 0x28) - (c == 0x29)
        i += 1
        if depth == 0:
            return i
    return None


def _authserv_id(value: bytes) -> bytes | None:
    """The authserv-id a field value starts with (comments and folding skipped); None when
    it cannot be told for sure (an unclosed comment or quote, an empty or odd id), so the
    caller strips the field: a parser more lenient than this one must not find ours in a
    field this one kept."""
    i = 0
    while i < len(value):
        if value[i : i + 1].isspace():
            i += 1
        elif value[i] == 0x28:  # (
            end = _skip_comment(value, i)
            if end is None:
                return None
            i = end
        else:
            break
    if value[i : i + 1] == b'"':  # a quoted-string value (RFC 8601 2.2: value)
        m = _QUOTED.match(value, i)
        ident = None if m is None else re.sub(rb"\\(.)", rb"\1", m.group(1), flags=re.S)
    else:
        m = _TOKEN.match(value, i)
        ident = m.group(0) if m else None
    if not ident or m is None or not _ID_END.match(value, m.end()):
        return None
    return ident.lower().rstrip(b".")


def strip_ours(head: bytes, authserv_id: str) -> tuple[bytes, int]:
    """``head`` (a header section) without the Authentication-Results fields that claim
    ``authserv_id``, or may claim it for a reader less strict than ``_authserv_id``; and
    how many went."""
    ours = authserv_id.lower().rstrip(".").encode()
    removed = 0

    def drop(m: re.Match[bytes]) -> bytes:
        nonlocal removed
        if _authserv_id(m.group(1)) in (ours, None):
            removed += 1
            return b""
        return m.group(0)

    return _FIELD.sub(drop, head), removed


def _results(r: Results) -> list[authres.AuthenticationResult]:
    """authres objects in the header's order: SPF (MAIL FROM, HELO), DKIM, DMARC."""
    out: list[authres.AuthenticationResult] = []
    if r.mailfrom.domain:
        out.append(
            authres.SPFAuthenticationResult(
                result=r.mailfrom.result, smtp_mailfrom=r.mailfrom.domain
            )
        )
    if r.helo.result != "none":
        out.append(authres.SPFAuthenticationResult(result=r.helo.result, smtp_helo=r.helo.domain))
    for d in r.dkim:
        result = authres.DKIMAuthenticationResult(
            result=d.result,
            reason=d.reason or None,
            header_d=d.domain or None,
            header_s=d.selector or None,
            header_a=d.algorithm or None,
        )
        if d.b:
            result.properties.append(authres.AuthenticationResultProperty("header", "b", d.b))
        out.append(result)
    if not r.dkim:
        out.append(authres.DKIMAuthenticationResult(result="none"))
    if r.arc.result != "none":
        out.append(
            authres.AuthenticationResult(
                method="arc", result=r.arc.result, result_comment=r.arc.reason or None
            )
        )
    dm = r.dmarc
    # The tag the policy came from: p=, or sp=/np= for a subdomain (np=: it does not exist)
    comment = f"{dm.tag}={dm.published} dis={dm.policy}" if dm.published else None
    if dm.result == "permerror":  # a From DMARC cannot judge: why
        comment = dm.reason or None
    out.append(
        DMARCAuthenticationResult(
            result=dm.result, result_comment=comment, header_from=dm.header_from or None
        )
    )
    return out


def header(authserv_id: str, results: Results) -> bytes:
    """The Authentication-Results field, folded one result a line, CRLF-terminated."""
    if not is_domain(authserv_id):
        raise ValueError(f"authserv-id {authserv_id!r} is not a host name")
    lines = [f"Authentication-Results: {authserv_id}", *(str(x) for x in _results(results))]
    return (";\r\n\t".join(lines) + "\r\n").encode("utf-8", "replace")


def _reply_domain(domain: str) -> str:
    """``domain`` fit for a reply line, which is printable ASCII (RFC 5321 4.2; the core
    refuses anything else) and at most 512 octets (4.5.3.1.5): an internationalised name
    as its A-labels (IDNA), a name that has none or is longer than a DNS name (a From
    domain of 2,000 characters has an org domain, and so a policy) as a phrase."""
    try:
        ace = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return "the header From domain"
    fits = _PRINTABLE.fullmatch(ace) and len(ace) <= 253
    return ace if fits else "the header From domain"


def decide(
    dmarc: DmarcResult, on_reject: str = "reject", on_quarantine: str = "quarantine"
) -> tuple[Verdict, bool]:
    """The verdict for the message and whether it goes to Junk. ``on_reject`` and
    ``on_quarantine`` (one of ``settings.ACTIONS``) are what a failing p=reject and p=quarantine
    domain get here (control/dmarcreject, control/dmarcquarantine). A header From DMARC
    cannot judge (a ``permerror`` with the policy reject: two From fields, one with no safe
    reading) gets what a p=reject failure gets, its reply naming why; a ``permerror``
    without a policy (a From naming no domain: ``dmarc.NO_DOMAIN``) is accepted."""
    unjudged = dmarc.result == "permerror" and dmarc.policy == "reject"
    action = {"reject": on_reject, "quarantine": on_quarantine}.get(
        dmarc.policy if dmarc.result == "fail" or unjudged else "none", "none"
    )
    tag = dmarc.tag if dmarc.published else "-"
    log = f"dmarc_policy={dmarc.policy} dmarc_tag={tag} dmarc_action={action}"
    if action == "reject" and unjudged:
        text = f"5.7.1 DMARC cannot be applied: {dmarc.reason}"
        return Verdict("refuse", 550, text, log), False
    if action == "reject":
        text = f"5.7.1 DMARC policy of {_reply_domain(dmarc.header_from)} rejects this message"
        return Verdict("refuse", 550, text, log), False
    return Verdict("accept", 250, "", log), action == "quarantine"
