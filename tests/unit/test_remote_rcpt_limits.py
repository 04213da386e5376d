"""Recipients a server refuses for their number (RFC 5321 4.5.3.1.10: 452 "too many
recipients", and 552, which older servers answer and the RFC says to take as temporary):
they are not bounced, and they go in a further transaction on the same connection at
once instead of waiting for the next retry round. Against a loopback server
(``tests.smtpserver``) that takes at most two recipients per transaction.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pyqmail.control.send import Control
from pyqmail.queue.format import Envelope
from pyqmail.send.remote import RemoteDelivery
from tests.smtpserver import Conversation, SmtpServer, standard

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


def _two_per_transaction(refusal: str) -> SmtpServer:
    """A server taking two recipients per transaction (``refusal`` to the third and on),
    and never full@ (452 4.2.2: its mailbox is full, whatever the transaction)."""

    def talk(conv: Conversation) -> None:
        count = 0

        def hook(conv: Conversation, line: str) -> bool:
            nonlocal count
            verb = line.split(" ", 1)[0].upper()
            if verb in ("MAIL", "RSET"):
                count = 0
            if verb != "RCPT":
                return False
            if "full@" in line:
                conv.say("452 4.2.2 mailbox full")
                return True
            count += 1
            conv.say("250 ok" if count <= 2 else refusal)
            return True

        standard(conv, hook)

    return SmtpServer(talk)


def _deliver(tmp_path: Path, port: int, rcpts: list[str]) -> list[str]:
    root = tmp_path / "control"
    root.mkdir(exist_ok=True)
    (root / "me").write_text("mx.test\n")
    (root / "smtproutes").write_text(f"remote.test:127.0.0.1:{port}\n")
    (root / "timeoutremote").write_text("5\n")
    session = RemoteDelivery(Control.load(tmp_path)).session("remote.test")
    env = Envelope("id", "me@mx.test", tuple(rcpts), len(MESSAGE), 0.0)
    try:
        results = session.deliver(env, MESSAGE, rcpts)
    finally:
        session.close()
    return [f"{r.kind} {r.status}" for r in results]


@pytest.mark.parametrize(
    "refusal", ["452 4.5.3 Too many recipients", "552 5.5.3 Too many recipients"]
)
def test_recipients_refused_for_their_number_go_in_a_further_transaction(
    tmp_path: Path, refusal: str
) -> None:
    rcpts = ["a@remote.test", "b@remote.test", "full@remote.test", "c@remote.test"]
    rcpts += ["d@remote.test", "e@remote.test"]
    with _two_per_transaction(refusal) as server:
        kinds = _deliver(tmp_path, server.port, rcpts)
        server.wait_closed()
    assert kinds == ["ok 2.0.0"] * 2 + ["temp 4.2.2"] + ["ok 2.0.0"] * 3
    (conv,) = server.conversations  # one connection
    assert conv.verbs().count("MAIL") == 4  # (a, b), (c, d), (e), then full@ alone, refused
    assert len(conv.messages) == 3


def test_a_552_at_rcpt_is_temporary(tmp_path: Path) -> None:
    """A 552 for one recipient, every time: deferred (4.5.3), not bounced; the others go."""

    def hook(conv: Conversation, line: str) -> bool:
        if line.upper().startswith("RCPT") and "many@" in line:
            conv.say("552 5.5.3 Too many recipients")
            return True
        return False

    with SmtpServer(lambda conv: standard(conv, hook)) as server:
        kinds = _deliver(tmp_path, server.port, ["a@remote.test", "many@remote.test"])
    assert kinds == ["ok 2.0.0", "temp 4.5.3"]
