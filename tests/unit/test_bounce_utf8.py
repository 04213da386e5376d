"""DSNs about internationalised mail (RFC 6533): raw UTF-8 only in the global types.

A failed recipient that is not ASCII (``Final-Recipient: utf-8; müller@...``) or original
headers that are not make the report message/global-delivery-status and the headers
message/global-headers; an ASCII report keeps message/delivery-status and
text/rfc822-headers. Such a DSN carries internationalized headers inside its MIME structure,
so it is queued with the meta ``smtputf8`` and remote delivery says SMTPUTF8 for it."""

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


def _dsn(tmp_path: Path, recipient: str, message: bytes) -> bytes:
    (tmp_path / "control").mkdir(exist_ok=True)
    (tmp_path / "control" / "me").write_text("mx.test\n")
    env = Envelope("qid", "joe@x.test", (recipient,), len(message), 1700000000.0)
    failure = Failure(recipient, Result.perm("no such user", "5.1.1"), 1700000100.0)
    return make_dsn(
        env,
        message,
        [failure],
        target=BounceTarget("", "joe@x.test", False),
        control=Control.load(tmp_path),
    )


def _sections(raw: bytes) -> list[bytes]:
    """The DSN cut at its boundary lines: top headers, text, report, headers, epilogue."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    boundary = msg.get_boundary()
    assert boundary is not None
    return raw.split(b"\r\n--" + boundary.encode())


@pytest.mark.parametrize(
    ("recipient", "message"),
    [
        ("müller@r.test", ASCII_HEADERS),  # a UTF-8 address in Final-Recipient
        ("a@r.test", UTF8_HEADERS),  # UTF-8 in the original headers
        ("müller@bücher.test", UTF8_HEADERS),
    ],
)
def test_a_dsn_with_utf8_uses_the_global_types(
    tmp_path: Path, recipient: str, message: bytes
) -> None:
    raw = _dsn(tmp_path, recipient, message)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "global-delivery-status"
    text, status, headers = msg.iter_parts()  # type: ignore[attr-defined]
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/global-delivery-status"
    assert headers.get_content_type() == "message/global-headers"
    assert status["Content-Transfer-Encoding"] == headers["Content-Transfer-Encoding"] == "8bit"
    top, human, report, original, end = _sections(raw)
    # raw UTF-8 only inside the two global parts
    assert top.isascii() and human.isascii() and end.isascii()
    wanted = "Final-Recipient: utf-8; " if not recipient.isascii() else "Final-Recipient: rfc822; "
    assert (wanted + recipient).encode() in report
    assert message.split(b"\r\n\r\n")[0] in original
    assert bounce.needs_smtputf8(raw)


def test_an_ascii_dsn_keeps_the_ascii_types(tmp_path: Path) -> None:
    raw = _dsn(tmp_path, "a@r.test", ASCII_HEADERS)
    assert raw.isascii() and not bounce.needs_smtputf8(raw)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_param("report-type") == "delivery-status"
    _, status, headers = msg.iter_parts()  # type: ignore[attr-defined]
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Content-Transfer-Encoding" not in status


def _bounce_of(send_root: Path, recipients: list[str]) -> Stored:
    """Queue a message from joe@remote.test to unknown local ``recipients``, let
    pyqmail-send deliver (bounce) it, and read the bounce it queued (not picked up: its
    remote delivery is not this test's)."""
    queue = Queue(send_root / "queue")
    queue.enqueue("joe@remote.test", recipients, ASCII_HEADERS)
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


def test_an_ascii_bounce_is_queued_without_smtputf8(send_root: Path) -> None:
    stored = _bounce_of(send_root, ["nobody@mx.test"])
    assert "smtputf8" not in stored.env.meta
    assert not needs_smtputf8(stored.env, stored.env.recipients, stored.body)
