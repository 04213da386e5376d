"""Bounces: RFC 3464 delivery status notifications, qmail's bounce and double-bounce rules.

- A message with a normal sender that fails permanently (or expires) gets one DSN per
  message listing every failed recipient, sent from the null sender to that sender.
- A message from the null sender (a bounce) is never bounced back to it: the DSN goes to
  ``doublebounceto@doublebouncehost`` (postmaster by default) from qmail's ``#@[]``.
- A failed double bounce (sender ``#@[]``) is dropped and logged, as qmail does.

The DSN is multipart/report (RFC 6522): a human-readable part, a message/delivery-status
part (Reporting-MTA, Arrival-Date; per recipient Final-Recipient, Action, Status,
Remote-MTA, Diagnostic-Code, Last-Attempt-Date) and the original headers
(text/rfc822-headers: at most ``headers.HEADER_SIZE_LIMIT``, 100 KiB, cut at a line end).

RFC 6533's global types are used when the DSN is internationalized mail itself: a failed
recipient (``Final-Recipient: utf-8; ...``) or the DSN's To is not ASCII, or the original
came with SMTPUTF8 (its meta ``smtputf8``, ``1`` or ``client``: ``pyqmail.smtpd.intake``)
and its header is not ASCII. Then the report is message/global-delivery-status and the
headers message/global-headers (both 8bit, ``report-type=global-delivery-status``), and
such a DSN may only be sent with SMTPUTF8 (RFC 6531 3.4): ``needs_smtputf8`` says so, and
``pyqmail.send.finisher`` queues it with the meta ``smtputf8`` that remote delivery reads.
Otherwise the ASCII types above, and no SMTPUTF8: an original with raw 8-bit bytes in its
header that came without SMTPUTF8 (older mailers write them often) has them copied as they
came, as before; requiring SMTPUTF8 for its DSN made it fail 5.6.7 at a sender's MX without
it, a double bounce, and the sender never learnt of the failure.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate

from pyqmail.control.send import Control
from pyqmail.headers import header_section
from pyqmail.queue.format import Envelope
from pyqmail.send.delivery import DOUBLE_BOUNCE_SENDER, Result, one_line


@dataclass(frozen=True)
class Failure:
    recipient: str
    result: Result
    when: float
    expired: bool = False


@dataclass(frozen=True)
class BounceTarget:
    sender: str
    recipient: str
    double: bool


def bounce_target(env: Envelope, control: Control) -> BounceTarget | None:
    """Who gets the bounce for ``env``, or None when it must be dropped."""
    if env.sender == DOUBLE_BOUNCE_SENDER:
        return None
    if env.sender == "":
        if not control.doublebounceto:
            return None
        to = control.doublebounceto
        if "@" not in to:
            to = f"{to}@{control.doublebouncehost}"
        return BounceTarget(DOUBLE_BOUNCE_SENDER, to, True)
    return BounceTarget("", env.sender, False)


def _addr_type(address: str) -> str:
    return "rfc822" if address.isascii() else "utf-8"


def _ascii(text: str) -> str:
    return one_line(text, 1000).encode("ascii", "replace").decode("ascii")


def needs_smtputf8(dsn: bytes) -> bool:
    """Whether a DSN made by ``make_dsn`` must travel with SMTPUTF8: it uses the global
    types (``_global``). Not any 8-bit byte: the header of an original sent without
    SMTPUTF8 is copied as it came, in text/rfc822-headers, and such a DSN goes anywhere."""
    return b"; report-type=global-delivery-status;" in header_section(dsn)


def _global(env: Envelope, failures: Sequence[Failure], to: str, headers: bytes) -> bool:
    """Whether the DSN is internationalized mail (RFC 6533's types, sent with SMTPUTF8): an
    address in it that is not ASCII, or an original that came with SMTPUTF8 (meta
    ``smtputf8``: 1, or ``client`` from MAIL's parameter) and has a header that is not."""
    if not to.isascii() or not all(f.recipient.isascii() for f in failures):
        return True
    return env.meta.get("smtputf8", "") in ("1", "client") and not headers.isascii()


def _status_fields(env: Envelope, failures: Sequence[Failure], control: Control) -> list[str]:
    """The machine-readable report (RFC 3464 2.2, 2.3): the message's fields, then a group
    per failed recipient. Only ``Final-Recipient`` may hold raw UTF-8 (a global report)."""
    status = [
        f"Reporting-MTA: dns; {control.me}",
        f"X-Pyqmail-Queue-ID: {env.queue_id}",
        f"Arrival-Date: {formatdate(env.received)}",
    ]
    for f in failures:
        r = f.result
        code = "4.4.7" if f.expired else (r.status if r.status.startswith("5") else "5.0.0")
        status += [
            "",
            f"Final-Recipient: {_addr_type(f.recipient)}; {f.recipient}",
            "Action: failed",
            f"Status: {code}",
        ]
        if r.remote and r.remote != "local":
            status.append(f"Remote-MTA: dns; {_ascii(r.remote)}")
        diagnostic = r.diagnostic or f"x-pyqmail; {r.detail}"
        status.append(f"Diagnostic-Code: {_ascii(diagnostic)}")
        status.append(f"Last-Attempt-Date: {formatdate(f.when)}")
    return status


def make_dsn(
    env: Envelope,
    message: bytes,
    failures: Sequence[Failure],
    *,
    target: BounceTarget,
    control: Control,
    now: float | None = None,
) -> bytes:
    """The DSN message (CRLF line ends) reporting ``failures`` of ``env``."""
    now = time.time() if now is None else now
    boundary = f"pyqmail-dsn-{secrets.token_hex(12)}"
    author = f"{control.bouncefrom}@{control.bouncehost}"
    expired = any(f.expired for f in failures)
    human = [
        f"Hi. This is pyqmail-send on {control.me}.",
        "I'm afraid I wasn't able to deliver your message to the following addresses.",
        "This is a permanent error; I've given up. Sorry it didn't work out.",
    ]
    if expired:
        human.append("Some addresses kept failing temporarily until the queue lifetime ended.")
    if target.double:
        human.append(f"This message was a bounce itself (sender <{env.sender}>).")
    for f in failures:
        human += ["", f"<{_ascii(f.recipient)}>:", _ascii(f.result.detail)]
    status = _status_fields(env, failures, control)
    headers = header_section(message).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    utf8 = _global(env, failures, target.recipient, headers)
    report = "global-delivery-status" if utf8 else "delivery-status"
    encoding = ["Content-Transfer-Encoding: 8bit"] if utf8 else []
    subject = "failure notice" if not target.double else "double bounce: failure notice"
    top = [
        f"From: Mail Delivery System <{author}>",
        f"To: <{target.recipient}>",
        f"Subject: {subject}",
        f"Date: {formatdate(now)}",
        f"Message-ID: <{int(now)}.{secrets.token_hex(8)}.dsn@{control.me}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type={report}; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        *human,
        "",
        f"--{boundary}",
        f"Content-Type: message/{report}",
        *encoding,
        "Content-Description: Delivery report",
        "",
        *status,
        "",
        f"--{boundary}",
        "Content-Type: message/global-headers" if utf8 else "Content-Type: text/rfc822-headers",
        *encoding,
        "Content-Description: Undelivered message headers",
        "",
    ]
    text = "\r\n".join(top).encode("utf-8", "surrogateescape") + b"\r\n"
    return text + headers + f"\r\n\r\n--{boundary}--\r\n".encode()
