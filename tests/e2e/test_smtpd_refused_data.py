"""A message refused during DATA (pyqmail.smtpd.session): the core reads the rest and drops
it, so the client hears why after its end of data (RFC 5321 4.1.1.4). The bytes it still
sends are progress for the idle timer, and the DATA deadline (``timeoutdata``) bounds them
as it bounds an accepted message."""

from __future__ import annotations

import time

import pytest

from tests.e2e.conftest import QmailRoot, StartDaemon
from tests.e2e.helpers import open_data


@pytest.mark.parametrize(
    ("databytes", "first", "code"),
    [("10", b"Subject: more than databytes\r\n", 552), ("0", b"Subject: NUL \0\r\n", 554)],
)
def test_a_refused_message_is_read_to_its_end_and_answered(
    qmail_root: QmailRoot, smtpd: StartDaemon, databytes: str, first: bytes, code: int
) -> None:
    """Refused early in DATA (databytes, a NUL), the rest is read and dropped, and every
    line of it is progress: the client hears the refusal after its end of data (RFC 5321
    4.1.1.4), not the idle timeout's 421 while it is still sending."""
    qmail_root.control("timeoutsmtpd", "1\n")
    qmail_root.control("databytes", databytes + "\n")
    d = smtpd()
    c = d.connect()
    open_data(c)
    c.send(first)
    for _ in range(15):  # 3 s, three idle timeouts
        time.sleep(0.2)
        c.send(b"a line of the message\r\n")
    assert c.cmd(".")[0] == code
    assert c.cmd("NOOP")[0] == 250, "the session goes on"
    assert qmail_root.queued() == [] and qmail_root.tmp_files() == []


def test_a_refused_message_dripped_still_meets_the_data_deadline(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """The lines of a refused message keep the idle timer at bay, not the DATA deadline."""
    qmail_root.control("timeoutdata", "2\n")
    qmail_root.control("databytes", "10\n")
    d = smtpd()
    c = d.connect()
    open_data(c)
    t0 = time.monotonic()
    with pytest.raises((ConnectionError, OSError)):
        for _ in range(80):
            c.send(b"a line of a message refused for its size\r\n")
            time.sleep(0.2)
    assert time.monotonic() - t0 < 12
    d.wait_for(r"timeout ip=127\.0\.0\.1 port=\d+ phase=data")
