"""Pipelining abuse, over-long input, absurd parameters and limits against the running daemon.

Attack classes (pipelining and protocol abuse, limits): commands before the
greeting or before EHLO, huge pipelined bursts, a client that never reads, over-long
lines/addresses/parameters, absurd or repeated or unknown ESMTP parameters, databytes,
maxrcpt, endless header folding, error floods. Invariants: only the documented reply codes,
the daemon's memory stays flat (VmRSS), it keeps serving, and nothing unintended is queued.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest

from tests.attacks.tally import tried
from tests.attacks.wire import Wire
from tests.e2e.conftest import Daemon, QmailRoot, StartDaemon

MB = 1 << 20
TXN = (
    b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n"
    b"Subject: pipelined\r\n\r\nbody\r\n.\r\n"
)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def still_serves(d: Daemon) -> None:
    with Wire(d.port) as w:
        assert w.reply()[0] == 220
        assert w.cmd("EHLO ok.test")[0] == 250
        assert w.cmd("NOOP")[0] == 250


@pytest.fixture
def daemon(qmail_root: QmailRoot, smtpd: StartDaemon) -> Daemon:
    qmail_root.control("databytes", "1000000\n")
    qmail_root.control("maxrcpt", "3\n")
    return smtpd(workers=1)


# -- pipelining -------------------------------------------------------------------------

EARLY = {
    "before-greeting-ehlo": b"EHLO early.test\r\n" + TXN,
    "before-greeting-helo": b"HELO early.test\r\n" + TXN,
    "before-greeting-no-helo": TXN,
    "before-greeting-quit": b"QUIT\r\n" + TXN,
}
BEFORE_EHLO = {
    "no-ehlo": TXN,
    "helo-pipelined": b"HELO x.test\r\n" + TXN,
    "ehlo-then-burst": b"EHLO x.test\r\n" + TXN,
    "rset-then-burst": b"RSET\r\n" + TXN,
    "noop-then-burst": b"NOOP\r\n" + TXN,
}


def test_commands_before_greeting_never_queue(daemon: Daemon, qmail_root: QmailRoot) -> None:
    for name, data in EARLY.items():
        with Wire(daemon.port) as w:
            w.send(data)  # at once, before reading the greeting
            replies = w.until_eof(5)
        codes = [c for c, _ in replies]
        assert 354 not in codes, f"{name}: pipelined DATA before the greeting accepted: {replies}"
        assert 554 in codes or codes[-1] != -1, f"{name}: neither rejected nor closed: {replies}"
    tried("pipelining", len(EARLY))
    assert qmail_root.queued() == []


def test_pipelining_before_ehlo_is_a_sync_error(daemon: Daemon, qmail_root: QmailRoot) -> None:
    for name, data in BEFORE_EHLO.items():
        with Wire(daemon.port) as w:
            assert w.reply()[0] == 220
            w.send(data)
            replies = w.until_eof(5)
        codes = [c for c, _ in replies]
        assert 354 not in codes, f"{name}: DATA accepted from a desynchronised client: {replies}"
        assert 554 in codes, f"{name}: expected 554 5.5.0 synchronization error: {replies}"
    tried("pipelining", len(BEFORE_EHLO))
    assert qmail_root.queued() == []


def test_legal_pipelining_answers_in_order(daemon: Daemon, qmail_root: QmailRoot) -> None:
    with Wire(daemon.port) as w:
        w.reply()
        assert "PIPELINING" in w.cmd("EHLO ok.test")[1]
        w.send(
            b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u1@example.test>\r\n"
            b"RCPT TO:<far@elsewhere.test>\r\nRCPT TO:<u2@example.test>\r\nDATA\r\n"
        )
        codes = [w.reply()[0] for _ in range(5)]
        assert codes == [250, 250, 553, 250, 354]
        assert w.cmd(b"Subject: ok\r\n\r\nbody\r\n.")[0] == 250
    [(env, _)] = qmail_root.queued()
    assert env.recipients == ("u1@example.test", "u2@example.test")
    tried("pipelining")


def test_huge_pipelined_burst_memory_flat(daemon: Daemon) -> None:
    """60k RSETs (360 KB) in one burst, read concurrently: in-order 250s or a 554/421 cut-off.

    The junk limit (maxjunk 100 + maxerrors 10) cuts it off after 110 replies; the close
    with RSETs still unread may reach us as a reset that takes the 421 with it."""
    before = rss(daemon.pid)
    count = 60_000
    with Wire(daemon.port) as w:
        w.reply()
        w.cmd("EHLO burst.test")
        sender = threading.Thread(target=lambda: _send_quietly(w, b"RSET\r\n" * count))
        sender.start()
        data, reset = b"", False
        while data.count(b"\r\n") < count:
            try:
                chunk = w.sock.recv(1 << 20)
            except ConnectionResetError:
                reset = True
                break
            if not chunk:
                break
            data += chunk
        peak = rss(daemon.pid)
        sender.join(30)
    lines = data.split(b"\r\n")[:-1]
    oks = len(lines) - len([x for x in lines if not x.startswith(b"250 ")])
    assert all(x.startswith(b"250 ") for x in lines[:oks]), "replies out of order"
    rest = lines[oks:]
    cut = (rest and rest[0][:3] in (b"421", b"554")) or (reset and not rest and oks <= 110)
    assert oks == count or cut, f"{oks} oks then {rest[:2]}"
    assert peak - before < 30 * MB, f"RSS grew by {(peak - before) // MB} MiB"
    still_serves(daemon)
    tried("pipelining")


def _send_quietly(w: Wire, data: bytes) -> None:
    with contextlib.suppress(OSError):
        w.send(data)


def test_client_that_never_reads_is_bounded(daemon: Daemon) -> None:
    """Pipelined RSETs without ever reading a reply: the server must stop reading."""
    before = rss(daemon.pid)
    w = Wire(daemon.port, timeout=1.5)
    w.reply()
    w.cmd("EHLO deaf.test")
    sent = 0
    chunk = b"RSET\r\n" * 10_000
    deadline = time.monotonic() + 2
    try:
        while time.monotonic() < deadline and sent < 200 * MB:
            w.send(chunk)
            sent += len(chunk)
    except OSError:
        pass  # our send blocked (timeout) or the server gave up on us: both bounded
    peak = rss(daemon.pid)
    w.close()
    assert sent < 100 * MB, f"server kept reading {sent // MB} MiB from a client that never reads"
    assert peak - before < 40 * MB, f"RSS grew by {(peak - before) // MB} MiB"
    still_serves(daemon)
    tried("pipelining")


def test_bdat_refused_when_not_advertised(daemon: Daemon) -> None:
    with Wire(daemon.port) as w:
        w.reply()
        ehlo = w.cmd("EHLO x.test")[1]
        # pyqmail-smtpd implements no BDAT (protocol/connection.py: _NOT_IMPLEMENTED)
        assert "CHUNKING" not in ehlo, f"CHUNKING advertised without BDAT: {ehlo}"
        assert w.cmd("MAIL FROM:<a@remote.test>")[0] == 250
        assert w.cmd("RCPT TO:<u@example.test>")[0] == 250
        code, text = w.cmd("BDAT 5 LAST")
        assert (code, text) == (502, "502 5.5.1 Error: command not implemented")
    tried("pipelining")


# -- over-long input and absurd parameters ------------------------------------------------

LONG_COMMANDS = [
    b"EHLO " + b"h" * 10_000,
    b"MAIL FROM:<" + b"a" * 5_000 + b"@remote.test>",
    b"MAIL FROM:<a@" + b"d" * 300 + b".test>",
    b"MAIL FROM:<a@" + b"a." * 200 + b"test>",
    b"MAIL FROM:<" + b"@r" * 2000 + b":a@remote.test>",
    b"NOOP " + b"x" * 100_000,
    b"X" * 1_000_000,
]
PARAMS = [
    "SIZE=99999999999999999999",
    "SIZE=1000001",
    "SIZE=-1",
    "SIZE=1e9",
    "SIZE=",
    "SIZE",
    "SIZE=0x10",
    "SIZE=1 SIZE=2",
    "BODY=8BITMIME BODY=7BIT",
    "BODY=BINARYMIME",
    "BODY=9BIT",
    "FOO=bar",
    "X-UNKNOWN",
    "SMTPUTF8=yes",
    "RET=FULL",
    "ENVID=abc",
    " ".join(f"P{i}=1" for i in range(20)),
    "SIZE=1 " + "A" * 5000 + "=1",
    "BODY=" + "8" * 10_000,
    "SIZE=1\tBODY=7BIT",
]


def test_over_long_lines_and_addresses(daemon: Daemon, qmail_root: QmailRoot) -> None:
    before = rss(daemon.pid)
    for line in LONG_COMMANDS:
        with Wire(daemon.port) as w:
            w.reply()
            assert w.cmd("EHLO x.test")[0] == 250
            code, text = w.cmd(line)
            assert code in (421, 500, 501, 552, 553, 555), f"{line[:40]!r}...: {text!r}"
            if code != 421:
                assert w.cmd("NOOP")[0] == 250, "session unusable after an over-long line"
    tried("over-long", len(LONG_COMMANDS))
    assert rss(daemon.pid) - before < 20 * MB
    assert qmail_root.queued() == []


def test_line_without_end_is_bounded(daemon: Daemon) -> None:
    """8 MiB without a line end: 500 (and maybe close), memory flat."""
    before = rss(daemon.pid)
    with Wire(daemon.port, timeout=5) as w:
        w.reply()
        w.cmd("EHLO x.test")
        try:
            for _ in range(8):
                w.send(b"A" * MB)
        except OSError:
            pass
        peak = rss(daemon.pid)
        w.send(b"\r\n") if not w.eof else None
        code, text = w.reply()
        assert code in (0, 421, 500), text
    assert peak - before < 20 * MB, f"RSS grew by {(peak - before) // MB} MiB"
    still_serves(daemon)
    tried("over-long")


@pytest.mark.parametrize("where", ["MAIL", "RCPT"])
def test_absurd_repeated_unknown_parameters(daemon: Daemon, where: str) -> None:
    for params in PARAMS:
        with Wire(daemon.port) as w:
            w.reply()
            w.cmd("EHLO x.test")
            if where == "MAIL":
                code, text = w.cmd(f"MAIL FROM:<a@remote.test> {params}")
            else:
                assert w.cmd("MAIL FROM:<a@remote.test>")[0] == 250
                code, text = w.cmd(f"RCPT TO:<u@example.test> {params}")
            assert code in (500, 501, 504, 552, 553, 555), f"{where} {params[:40]!r}: {text!r}"
            assert w.cmd("NOOP")[0] == 250
    tried("absurd-params", len(PARAMS))


def test_databytes_enforced_at_mail_and_after_data(daemon: Daemon, qmail_root: QmailRoot) -> None:
    with Wire(daemon.port) as w:
        w.reply()
        w.cmd("EHLO x.test")
        assert w.cmd("MAIL FROM:<a@remote.test> SIZE=1000001")[0] == 552
        assert w.cmd("MAIL FROM:<a@remote.test> SIZE=1000")[0] == 250  # a lie
        assert w.cmd("RCPT TO:<u@example.test>")[0] == 250
        assert w.cmd("DATA")[0] == 354
        line = b"x" * 998 + b"\r\n"
        w.send(b"Subject: big\r\n\r\n" + line * 1100)
        code, text = w.cmd(b".")
        assert code == 552, f"oversize DATA: {text!r}"
        assert w.cmd("NOOP")[0] == 250
    assert qmail_root.queued() == []
    assert qmail_root.tmp_files() == []
    tried("limits", 2)


def test_maxrcpt_keeps_earlier_recipients(daemon: Daemon, qmail_root: QmailRoot) -> None:
    with Wire(daemon.port) as w:
        w.reply()
        w.cmd("EHLO x.test")
        w.cmd("MAIL FROM:<a@remote.test>")
        codes = [w.cmd(f"RCPT TO:<u{i}@example.test>")[0] for i in range(5)]
        assert codes == [250, 250, 250, 452, 452]
        w.cmd("DATA")
        assert w.cmd(b"Subject: x\r\n\r\nbody\r\n.")[0] == 250
    [(env, _)] = qmail_root.queued()
    assert env.recipients == ("u0@example.test", "u1@example.test", "u2@example.test")
    tried("limits")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("endless-folding", b"X-Fold: start\r\n" + b" folded continuation line\r\n" * 30_000),
        ("huge-header-line", b"X-Long: " + b"v" * 900_000 + b"\r\n"),
        ("long-body-line", b"Subject: x\r\n\r\n" + b"L" * 900_000 + b"\r\n"),
        ("many-headers", b"".join(b"X-H%d: v\r\n" % i for i in range(40_000))),
    ],
)
def test_message_shapes_memory_flat(
    daemon: Daemon, qmail_root: QmailRoot, name: str, content: bytes
) -> None:
    """Under databytes: stored whole (250) or refused (5xx); memory flat either way."""
    before = rss(daemon.pid)
    with Wire(daemon.port) as w:
        w.reply()
        w.cmd("EHLO x.test")
        w.cmd("MAIL FROM:<a@remote.test>")
        w.cmd("RCPT TO:<u@example.test>")
        assert w.cmd("DATA")[0] == 354
        w.send(content)
        code, text = w.cmd(b"\r\n.")
        assert code in (250, 552, 554, 500), f"{name}: {text!r}"
    assert rss(daemon.pid) - before < 20 * MB, f"{name}: memory grew"
    stored = qmail_root.queued()
    if code == 250:
        [(_, data)] = stored
        assert data.endswith(content + b"\r\n"), f"{name}: stored message differs"
    else:
        assert stored == []
    tried("limits")


def test_error_flood_is_cut_off(daemon: Daemon) -> None:
    with Wire(daemon.port) as w:
        w.reply()
        w.cmd("EHLO x.test")
        codes = []
        for i in range(30):
            code, _ = w.cmd(f"XBOGUS{i}")
            codes.append(code)
            if code in (0, 421):
                break
        assert codes[-1] in (0, 421), f"30 bad commands and still talking: {codes}"
        assert w.closed_within(3)
    tried("limits")
