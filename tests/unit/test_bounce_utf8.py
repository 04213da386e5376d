"""DSNs about internationalised mail (RFC 6533): the global types when the DSN is one.

A failed recipient or the DSN's To that is not ASCII (``Final-Recipient: utf-8; müller@...``),
or an original received with SMTPUTF8 (meta ``smtputf8``: ``client``, or ``1``) whose
headers are not ASCII, make the report message/global-delivery-status and the headers
message/global-headers; such a DSN carries internationalized headers inside its MIME
structure, so it is queued with the meta ``smtputf8`` and remote delivery says SMTPUTF8 for
it. Otherwise the report keeps message/delivery-status and text/rfc822-headers, and no
SMTPUTF8 is needed: an original with raw UTF-8 in its header sent without SMTPUTF8 (older
mailers) has its header copied as it came, and its DSN reaches a sender's MX without
SMTPUTF8 (the review: it failed 5.6.7 there, a double bounce the sender never saw)."""

from __future__ import annotations

import email
import email.policy
import io
import time
from pathlib import Path

import pytest

from pyqmail.control.send import Control
from pyqmail.queue.format import Envelope, Stored
from pyqmail.queue.store import Queue
from pyqmail.send import bounce
from pyqmail.send.bounce import BounceTarget, Failure, make_dsn
from pyqmail.send.delivery import Result
from pyqmail.send.manager import Log, Manager
from pyqmail.send.remote import needs_smtputf8

ASCII_HEADERS = b"Subject: hi\r\nFrom: joe@x.test\r\n\r\nbody\r\n"
UTF8_HEADERS = "Subject: Grüße\r\nFrom: Jürgen <joe@x.test>\r\n\r\nbody\r\n".encode()


def _dsn(
    tmp_path: Path,
    recipient: str,
    message: bytes,
    meta: dict[str, str] | None = None,
    sender: str = "joe@x.test",
) -> bytes:
    (tmp_path / "control").mkdir(exist_ok=True)
    (tmp_path / "control" / "me").write_text("mx.test\n")
    env = Envelope("qid", sender, (recipient,), len(message), 1700000000.0, meta or {})
    failure = Failure(recipient, Result.perm("no such user", "5.1.1"), 1700000100.0)
    return make_dsn(
        env,
        message,
        [failure],
        target=BounceTarget("", sender, False),
        control=Control.load(tmp_path),
    )


def _sections(raw: bytes) -> list[bytes]:
    """The DSN cut at its boundary lines: top headers, text, report, headers, epilogue."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    boundary = msg.get_boundary()
    assert boundary is not None
    return raw.split(b"\r\n--" + boundary.encode())


@pytest.mark.parametrize(
    ("recipient", "message", "meta", "sender"),
    [
        ("müller@r.test", ASCII_HEADERS, {}, "joe@x.test"),  # UTF-8 in Final-Recipient
        ("a@r.test", UTF8_HEADERS, {"smtputf8": "client"}, "joe@x.test"),  # came with SMTPUTF8
        ("a@r.test", UTF8_HEADERS, {"smtputf8": "1"}, "joe@x.test"),  # a DSN's DSN, a forward
        ("müller@bücher.test", UTF8_HEADERS, {}, "joe@x.test"),
        ("a@r.test", UTF8_HEADERS, {}, "jörg@x.test"),  # the DSN's To is not ASCII
    ],
)
def test_a_dsn_with_utf8_uses_the_global_types(
    tmp_path: Path, recipient: str, message: bytes, meta: dict[str, str], sender: str
) -> None:
    raw = _dsn(tmp_path, recipient, message, meta, sender)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "global-delivery-status"
    text, status, headers = msg.iter_parts()  # type: ignore[attr-defined]
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/global-delivery-status"
    assert headers.get_content_type() == "message/global-headers"
    assert status["Content-Transfer-Encoding"] == headers["Content-Transfer-Encoding"] == "8bit"
    top, human, report, original, end = _sections(raw)
    # raw UTF-8 only inside the two global parts (and the To of a sender that is not ASCII)
    assert (top.isascii() or not sender.isascii()) and human.isascii() and end.isascii()
    wanted = "Final-Recipient: utf-8; " if not recipient.isascii() else "Final-Recipient: rfc822; "
    assert (wanted + recipient).encode() in report
    assert message.split(b"\r\n\r\n")[0] in original
    assert bounce.needs_smtputf8(raw)


@pytest.mark.parametrize(
    ("message", "meta"),
    [
        (ASCII_HEADERS, {}),
        (ASCII_HEADERS, {"smtputf8": "client"}),  # SMTPUTF8 asked for, nothing of it used
        (UTF8_HEADERS, {}),  # the review: raw UTF-8 from a mailer without SMTPUTF8
        (UTF8_HEADERS, {"smtputf8": "0"}),
    ],
)
def test_an_ascii_dsn_keeps_the_ascii_types(
    tmp_path: Path, message: bytes, meta: dict[str, str]
) -> None:
    raw = _dsn(tmp_path, "a@r.test", message, meta)
    assert not bounce.needs_smtputf8(raw)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_param("report-type") == "delivery-status"
    _, status, headers = msg.iter_parts()  # type: ignore[attr-defined]
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Content-Transfer-Encoding" not in status and "Content-Transfer-Encoding" not in headers
    top, human, report, original, end = _sections(raw)
    assert top.isascii() and human.isascii() and report.isascii() and end.isascii()
    # the header copied as it came, 8-bit bytes and all, as before RFC 6533's types
    assert message.split(b"\r\n\r\n")[0] in original


def _bounce_of(
    send_root: Path,
    recipients: list[str],
    message: bytes = ASCII_HEADERS,
    meta: dict[str, str] | None = None,
) -> Stored:
    """Queue a message from joe@remote.test to unknown local ``recipients``, let
    pyqmail-send deliver (bounce) it, and read the bounce it queued (not picked up: its
    remote delivery is not this test's)."""
    queue = Queue(send_root / "queue")
    queue.enqueue("joe@remote.test", recipients, message, meta)
    out = io.StringIO()
    m = Manager(send_root, Log(out))
    m.pickup()
    deadline = time.monotonic() + 20
    while " bounce qp " not in out.getvalue() and time.monotonic() < deadline:
        m.dispatch()
        m.finish()
        time.sleep(0.02)
    m.children.close()
    [queued] = queue.ids("new")
    [stored] = queue.load("new", queued)
    return stored


def test_a_utf8_bounce_is_queued_for_smtputf8(send_root: Path) -> None:
    """müller@mx.test is unknown: the bounce to the (ASCII) sender carries a UTF-8
    Final-Recipient, so it is queued with smtputf8 and remote delivery asks for SMTPUTF8
    (a server without it refuses it, 5.6.7, rather than getting raw UTF-8 unannounced)."""
    stored = _bounce_of(send_root, ["müller@mx.test", "nobody@mx.test"])
    assert (stored.env.sender, stored.env.recipients) == ("", ("joe@remote.test",))
    assert stored.env.meta["smtputf8"] == "1" and stored.env.meta["origin"] == "bounce"
    assert needs_smtputf8(stored.env, stored.env.recipients, stored.body)
    msg = email.message_from_bytes(stored.body, policy=email.policy.default)
    assert [p.get_content_type() for p in msg.iter_parts()] == [  # type: ignore[attr-defined]
        "text/plain",
        "message/global-delivery-status",
        "message/global-headers",
    ]


def test_a_bounce_of_a_smtputf8_original_is_queued_for_smtputf8(send_root: Path) -> None:
    """The original came with MAIL's SMTPUTF8 (meta client) and a UTF-8 header: its DSN is
    internationalized mail too."""
    stored = _bounce_of(send_root, ["nobody@mx.test"], UTF8_HEADERS, {"smtputf8": "client"})
    assert stored.env.meta["smtputf8"] == "1"
    assert needs_smtputf8(stored.env, stored.env.recipients, stored.body)
    msg = email.message_from_bytes(stored.body, policy=email.policy.default)
    assert msg.get_param("report-type") == "global-delivery-status"


@pytest.mark.parametrize("message", [ASCII_HEADERS, UTF8_HEADERS])
def test_an_ascii_bounce_is_queued_without_smtputf8(send_root: Path, message: bytes) -> None:
    """UTF8_HEADERS: the review's case, an ASCII envelope, ``Subject: Grüße``, no SMTPUTF8:
    the DSN goes to a sender's MX without SMTPUTF8 as it did before RFC 6533's types."""
    stored = _bounce_of(send_root, ["nobody@mx.test"], message)
    assert "smtputf8" not in stored.env.meta
    assert not needs_smtputf8(stored.env, stored.env.recipients, stored.body)
    msg = email.message_from_bytes(stored.body, policy=email.policy.default)
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()] == [  # type: ignore[attr-defined]
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
