"""Over-long lines and NUL bytes in DATA (issue 14, Info).

Decisions (README "Mail loops and message limits"): a NUL byte anywhere in the message is
refused at the end of DATA (``554 5.6.0``, nothing queued, the session goes on); long lines are
accepted as they come and leave pyqmail-send broken every 998 octets with CRLF + space
(Postfix's ``smtp_line_length_limit``), so nothing on the wire exceeds 998 + CRLF.
Real daemons: pyqmail-smtpd and pyqmail-send on one root, a recording SMTP sink as the relay.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.attacks.tally import tried
from tests.e2e.conftest import DROP_USER, IS_ROOT, QmailRoot, StartDaemon
from tests.e2e.test_send import Host, Recorder, wait_for

RULES = '127.0.0.1:allow,RELAYCLIENT=""\n:allow\n'


@pytest.fixture
def sink() -> Iterator[Recorder]:
    rec = Recorder(tls=None)  # no STARTTLS: every byte is recorded as it crossed the wire
    yield rec
    rec.close()


def submit(daemon_connect: object, data: bytes) -> str:
    with daemon_connect() as c:  # type: ignore[operator]
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<a@mx.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@far.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")  # dot-stuffed
        _, lines = c.reply()
        assert c.cmd("NOOP")[0] == 250  # the session goes on either way
        return str(lines[-1])


@pytest.mark.parametrize("line", [999, 5000, 1 << 20])
def test_long_lines_leave_in_pieces_of_at_most_998_octets(
    qmail_root: QmailRoot, smtpd: StartDaemon, sink: Recorder, line: int
) -> None:
    qmail_root.control("databytes", "0\n")
    daemon = smtpd(mode="smtp", rules_cdb=qmail_root.rules(RULES))
    qmail_root.control("smtproutes", f"far.test:127.0.0.1:{sink.port}\n")
    send = Host(qmail_root.path, user=DROP_USER) if IS_ROOT else Host(qmail_root.path)
    try:
        send.start()
        header = b"X-Long: " + b"h" * line + b"\r\n"
        body = b"." + b"b" * line + b"\r\nshort\r\n"
        reply = submit(daemon.connect, b"Subject: long\r\n" + header + b"\r\n" + body)
        assert reply.startswith("250"), reply
        wait_for(lambda: sink.accepted, 30, "the relayed message")
    finally:
        send.stop()
    wire = bytes(sink.cleartext)
    longest = max(len(x) for x in wire.split(b"\r\n"))
    assert longest <= 998, longest
    ((_, _, data),) = sink.accepted
    unfolded = data.replace(b"\r\n ", b"").replace(b"\r\n..", b"\r\n.")  # the sink keeps stuffing
    assert b"X-Long: " + b"h" * line + b"\r\n" in unfolded  # content intact once unfolded
    assert b"\r\n." + b"b" * line + b"\r\nshort\r\n" in unfolded
    tried("long lines", 1)


@pytest.mark.parametrize(
    "data",
    [
        b"Subject: nul\r\n\r\na\x00b\r\n",
        b"Subject: n\x00l\r\n\r\nbody\r\n",
        b"Subject: nul\r\n\r\n" + b"x" * 100_000 + b"\x00\r\n",
        b"\x00\r\n",
    ],
)
def test_nul_is_refused_and_nothing_is_queued(
    qmail_root: QmailRoot, smtpd: StartDaemon, data: bytes
) -> None:
    daemon = smtpd(mode="smtp", rules_cdb=qmail_root.rules(RULES))
    assert submit(daemon.connect, data).startswith("554 5.6.0")
    assert qmail_root.queued() == []
    assert not qmail_root.tmp_files()
    tried("NUL in DATA", 1)
