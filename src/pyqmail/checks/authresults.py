"""The one Authentication-Results header (RFC 8601) and what the verdicts mean for a message.

``header`` writes SPF (both identities), every DKIM signature and DMARC into one field
with the server's authserv-id (``control/me`` unless configured); values are quoted by
authres (python3-authres). ``strip_ours`` removes every incoming field that claims our
authserv-id (RFC 8601 5: a sender must not be able to forge our verdicts), whatever its
case or the comments before the id; other hosts' fields stay. ``decide`` maps the DMARC
result to the configured action: refuse (550 5.7.1), quarantine (the message goes to the
mailbox's Junk folder, carried to pyqmail-send by the queue meta ``junk``) or accept.
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
_COMMENT = re.compile(rb"\((?:[^()\\]|\\.)*\)")


@dataclass(frozen=True)
class Results:
    """Every result of one message."""

    helo: SpfResult
    mailfrom: SpfResult
    dkim: list[DkimResult]
    dmarc: DmarcResult
    arc: ArcResult = field(default_factory=lambda: ArcResult("none"))


def _authserv_id(value: bytes) -> bytes:
    """The authserv-id a field value starts with (comments and folding skipped)."""
    text = value
    for _ in range(4):  # nested comments, bounded
        text = _COMMENT.sub(b" ", text)
    return re.split(rb"[\s;]+", text.strip(), maxsplit=1)[0].lower().rstrip(b".")


def strip_ours(head: bytes, authserv_id: str) -> tuple[bytes, int]:
    """``head`` (a header section) without the Authentication-Results fields that claim
    ``authserv_id``; and how many went."""
    ours = authserv_id.lower().rstrip(".").encode()
    removed = 0

    def drop(m: re.Match[bytes]) -> bytes:
        nonlocal removed
        if _authserv_id(m.group(1)) == ours:
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
    comment = f"p={dm.published} dis={dm.policy}" if dm.published else None
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


def decide(
    dmarc: DmarcResult, on_reject: str = "reject", on_quarantine: str = "quarantine"
) -> tuple[Verdict, bool]:
    """The verdict for the message and whether it goes to Junk. ``on_reject`` and
    ``on_quarantine`` (one of ``settings.ACTIONS``) are what a failing p=reject and p=quarantine
    domain get here (control/dmarcreject, control/dmarcquarantine)."""
    action = {"reject": on_reject, "quarantine": on_quarantine}.get(
        dmarc.policy if dmarc.result == "fail" else "none", "none"
    )
    log = f"dmarc_policy={dmarc.policy} dmarc_action={action}"
    if action == "reject":
        text = f"5.7.1 DMARC policy of {dmarc.header_from} rejects this message"
        return Verdict("refuse", 550, text, log), False
    return Verdict("accept", 250, "", log), action == "quarantine"
