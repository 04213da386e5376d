"""The reply to the end of DATA and the delivery deadline, against scripted loopback
servers (``tests.smtpserver``).

Once the final dot is sent the server may have stored the message: giving up on its reply
defers a delivered message, and every retry delivers it again. So that wait gets its own
``timeoutremote`` (plus the allowance for unsent bytes) whatever is left of the delivery's
deadline, and the deadline grows with the number of recipients, whose RCPTs may each be
slow (callouts, tarpits) on an honest server.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pyqmail.control.send import Control
from pyqmail.queue.format import Envelope
from pyqmail.send.delivery import Result
from pyqmail.send.peers import PeerMemory
from pyqmail.send.remote import RemoteDelivery
from pyqmail.send.smtpclient import delivery_deadline
from tests.smtpserver import Conversation, SmtpServer, standard

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


def _deliver(tmp_path: Path, server: SmtpServer, rcpts: list[str]) -> tuple[list[Result], float]:
    """One delivery with ``timeoutremote`` 1 s, in a thread joined with a bound."""
    root = tmp_path / "control"
    root.mkdir(exist_ok=True)
    (root / "me").write_text("mx.test\n")
    (root / "smtproutes").write_text(f"remote.test:127.0.0.1:{server.port}\n")
    (root / "timeoutremote").write_text("1\n")
    delivery = RemoteDelivery(Control.load(tmp_path), peers=PeerMemory())
    session = delivery.session("remote.test")
    env = Envelope("id", "me@mx.test", tuple(rcpts), len(MESSAGE), 0.0)
    out: list[list[Result]] = []
    start = time.monotonic()
    thread = threading.Thread(
        target=lambda: out.append(session.deliver(env, MESSAGE, rcpts)), daemon=True
    )
    thread.start()
    thread.join(20)
    took = time.monotonic() - start
    assert not thread.is_alive(), "the delivery still runs after 20 s"
    session.close()
    assert out, "the delivery raised"
    return out[0], took


def _slow(rcpt: float, final: float) -> Callable[[Conversation, str], bool]:
    """A hook answering each RCPT after ``rcpt`` s and the end of DATA after ``final`` s."""

    def hook(conv: Conversation, line: str) -> bool:
        verb = line.split(" ", 1)[0].upper()
        if verb == "RCPT":
            time.sleep(rcpt)
            conv.say("250 2.1.5 ok")
            return True
        if verb == "DATA":
            conv.say("354 go")
            conv.messages.append(conv.data())
            time.sleep(final)
            conv.say("250 2.0.0 accepted")
            return True
        return False

    return hook


def test_the_final_reply_is_waited_for_after_slow_rcpts_used_the_deadline(
    tmp_path: Path,
) -> None:
    """The reviewer's reproduction: 6 RCPTs answered after 0.6 s each (3.6 s of a 4.3 s
    deadline), the final 250 after 0.8 s, within ``timeoutremote``. Before, the wait
    ended at the deadline: a temporary failure for a message the server had stored."""
    with SmtpServer(lambda conv: standard(conv, _slow(0.6, 0.8))) as server:
        rcpts = [f"u{i}@remote.test" for i in range(6)]
        results, took = _deliver(tmp_path, server, rcpts)
        server.wait_closed()
    assert [r.kind for r in results] == ["ok"] * 6, results[0]
    assert took > 4.3  # past the deadline, and still waited for
    assert len(server.conversations) == 1
    assert len(server.conversations[0].messages) == 1


def test_the_final_reply_still_has_timeoutremote(tmp_path: Path) -> None:
    """Not cut by the deadline is not waited for ever: ``timeoutremote`` (1 s) plus the
    message's 25 bytes at 500 bytes/s if the kernel still counts them as unsent, and no
    more, named as such."""
    with SmtpServer(lambda conv: standard(conv, _slow(0.0, 3.0))) as server:
        (result,), took = _deliver(tmp_path, server, ["a@remote.test"])
    assert result.kind == "temp", result
    wait = r"timed out after 1(\.05)? s waiting for the reply to the end of DATA"
    assert re.search(wait, result.detail), result
    assert "deadline" not in result.detail
    assert took < 2.5


def test_each_recipient_adds_to_the_deadline(tmp_path: Path) -> None:
    """30 RCPTs answered after 0.15 s each: 4.5 s, more than 4 x ``timeoutremote``; the
    29 recipients beyond the first add 29 x 1/20 s, and the message goes (before, it was
    cut at the 23rd RCPT at every try)."""
    with SmtpServer(lambda conv: standard(conv, _slow(0.15, 0.0))) as server:
        rcpts = [f"u{i}@remote.test" for i in range(30)]
        results, _ = _deliver(tmp_path, server, rcpts)
        server.wait_closed()
    assert [r.kind for r in results] == ["ok"] * 30, results[0]
    assert len(server.conversations[0].messages) == 1


def test_the_deadline_in_numbers() -> None:
    """At the default ``timeoutremote`` (1200 s): 4 waits, a minute per further recipient,
    the message at 500 bytes/s."""
    assert delivery_deadline(1200, 0) == 4800
    assert delivery_deadline(1200, 1_000_000, 10) == 4800 + 9 * 60 + 2000
    assert delivery_deadline(1200, 0, 0) == 4800
