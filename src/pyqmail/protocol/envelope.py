"""The mail transaction's envelope (RFC 5321 3.3): what MAIL FROM and RCPT TO may say, and
which recipients this client may send to.

``address`` judges the syntax of a path; this module makes the decisions about it: which
ESMTP parameters are honoured (SIZE, BODY, SMTPUTF8, AUTH on MAIL; none on RCPT: no DSN is
offered), and, for each recipient, the relay decision (``rcpthosts``, or a client allowed to
relay), the local mailbox check (``Policy.validrcptto``: ``pyqmail.checks.recipients``, and the
``validrcptto`` control file) and the recipient tricks refused outright
(``%`` and ``!`` route mail elsewhere). Every refusal is an ``AddressError`` carrying its
complete reply, so the connection answers them all the same way. The inbound checks that
come later (SPF, blocklists) belong between these decisions and the queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyqmail.protocol.address import (
    AddressError,
    Mailbox,
    a_labels,
    parse_mailbox,
    parse_params,
    split_path,
)
from pyqmail.protocol.events import Policy


@dataclass
class Transaction:
    """One mail transaction: from an accepted MAIL to the end of DATA, RSET or HELO."""

    sender: Mailbox
    params: dict[str, str]
    recipients: list[str] = field(default_factory=list)
    #: Some RCPT was tried, even if refused: DATA then says "no valid recipients".
    rcpt_attempted: bool = False
    #: RCPTs a check deferred (4xx: greylisting, a sending limit). They take a place under
    #: the recipient limit as accepted ones do (Postfix), so a transaction consults those
    #: checks at most that many times, however many RCPTs the client sends.
    deferred: int = 0
    #: RCPTs answered 452 because the limit was reached (``pyqmail.protocol.tally``).
    overshoot: int = 0

    @property
    def taken(self) -> int:
        """The places used under the recipient limit: accepted and deferred recipients."""
        return len(self.recipients) + self.deferred

    @property
    def utf8(self) -> bool:
        """The transaction declared SMTPUTF8 (RFC 6531): UTF-8 addresses are allowed."""
        return "SMTPUTF8" in self.params


def parse_mail(arg: str, databytes: int) -> Transaction:
    """MAIL's argument (after the verb) -> a new transaction; AddressError if refused."""
    path, ptext = split_path(arg, "FROM:", "5.1.7")
    params = mail_params(ptext, databytes)
    sender = parse_mailbox(path, "5.1.7", utf8="SMTPUTF8" in params, allow_null=True)
    return Transaction(sender, params)


def parse_rcpt(arg: str, policy: Policy, *, utf8: bool, may_relay: bool) -> Mailbox:
    """RCPT's argument -> the recipient to add (its domain in A-labels); AddressError if
    refused. A bare ``<postmaster>`` (RFC 5321 4.5.1) is this host's postmaster, always
    accepted: ``postmaster@`` a domain delivered here (``Policy.postmaster_domain``), so
    that delivery finds it local."""
    path, ptext = split_path(arg, "TO:", "5.1.3")
    rcpt_params(ptext)
    box = parse_mailbox(path, "5.1.3", utf8=utf8, allow_null=False)
    if box.domain == "":
        domain = policy.postmaster_domain or policy.hostname.lower()
        return Mailbox(f"postmaster@{domain}", "postmaster", domain)
    if "%" in box.local or "!" in box.local:
        raise AddressError("553 5.1.3 sorry, '%' and '!' are not accepted in recipients")
    box = a_labels(box, "5.1.3")
    local_domain = policy.rcpthosts(box.domain)
    if not local_domain and not may_relay:
        raise AddressError("553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts")
    check = policy.validrcptto
    if local_domain and check is not None and not check(box.address):
        raise AddressError("550 5.1.1 sorry, no mailbox here by that name")
    return box


def mail_params(text: str, databytes: int) -> dict[str, str]:
    """The MAIL FROM parameters the core offers (SIZE, BODY, SMTPUTF8, AUTH), checked;
    anything else is refused rather than ignored, so no extension is half honoured."""
    params: dict[str, str] = {}
    for key, value in parse_params(text):
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 15:
                raise AddressError("555 5.5.4 Bad SIZE parameter")
            if databytes and int(value) > databytes:
                raise AddressError("552 5.3.4 Message size exceeds fixed limit")
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise AddressError("555 5.5.4 Unsupported BODY parameter")
            params[key] = value.upper()
            continue
        elif key == "SMTPUTF8":
            if value is not None:
                raise AddressError("555 5.5.4 SMTPUTF8 takes no value")
        elif key == "AUTH":
            if value is None or len(value) > 500:
                raise AddressError("555 5.5.4 Bad AUTH parameter")
        else:
            raise AddressError(f"555 5.5.4 Unsupported option: {key[:40]}")
        params[key] = value or ""
    return params


def rcpt_params(text: str) -> None:
    """RCPT TO takes no parameters: no RCPT extension (DSN) is offered."""
    params = parse_params(text)
    if params:
        raise AddressError(f"555 5.5.4 Unsupported option: {params[0][0][:40]}")
