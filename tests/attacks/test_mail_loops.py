"""Mail loops, end to end: pyqmail-smtpd and pyqmail-send on one qmail root, as on a server.

Reproduces issue 14's loop: a relay client's message to ``loop@[127.0.0.1]`` was delivered
by pyqmail-send to itself, accepted, queued and delivered again, one Received line more per
round. Now remote delivery refuses every destination that is this host (address literal,
smtproutes relay, MX, or a server answering EHLO with our own name) with a bounce saying
"mail for X loops back to myself", and pyqmail-smtpd refuses a message with more than
``maxhops`` Received/Delivered-To lines (``554 5.4.6``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.attacks.tally import tried
from tests.e2e.conftest import DROP_USER, IS_ROOT, Daemon, QmailRoot, StartDaemon
from tests.e2e.test_send import Host, dsn_fields, wait_for

RELAY_RULES = '127.0.0.1:allow,RELAYCLIENT=""\n:allow\n'


@dataclass
class Server:
    """One host: its smtpd (``daemon``), its pyqmail-send (``send``) and two mailboxes."""

    root: QmailRoot
    daemon: Daemon
    send: Host
    sender: Path
    postmaster: Path

    def submit(self, mail_from: str, rcpt: str, data: bytes) -> str:
        """One SMTP transaction; returns the reply to the end of DATA."""
        with self.daemon.connect() as c:
            assert c.reply()[0] == 220
            assert c.cmd("EHLO client.test")[0] == 250
            assert c.cmd(f"MAIL FROM:<{mail_from}>")[0] == 250
            code, lines = c.cmd(f"RCPT TO:<{rcpt}>")
            assert code == 250, lines
            assert c.cmd("DATA")[0] == 354
            c.send(data + b".\r\n")
            code, lines = c.reply()
            c.cmd("QUIT")
            return lines[-1] if lines else str(code)

    def maildir(self, home: Path) -> list[bytes]:
        return self.send.maildir(home)


@pytest.fixture
def server(qmail_root: QmailRoot, smtpd: StartDaemon) -> Iterator[Callable[..., Server]]:
    sends: list[Host] = []

    def start(routes: Callable[[int], str] | None = None) -> Server:
        qmail_root.control("locals", "mx.test\n")
        homes = qmail_root.path / "homes"
        homes.mkdir()
        qmail_root._own(homes)
        boxes = []
        for name in ("sender", "pm"):
            home = homes / name
            home.mkdir()
            qmail_root._own(home)
            boxes.append(f"{name}:{home}\n")
        qmail_root.write("users/mailboxes", "".join(boxes))
        qmail_root.write("alias/.qmail-postmaster", "&pm@mx.test\n")
        daemon = smtpd(mode="smtp", rules_cdb=qmail_root.rules(RELAY_RULES))
        if routes is not None:
            qmail_root.control("smtproutes", routes(daemon.port))
        send = Host(qmail_root.path, user=DROP_USER) if IS_ROOT else Host(qmail_root.path)
        sends.append(send)
        send.start()
        return Server(qmail_root, daemon, send, homes / "sender", homes / "pm")

    yield start
    for send in sends:
        send.stop()


MESSAGE = b"Subject: loop test\r\nFrom: sender@mx.test\r\n\r\nround and round\r\n"


def assert_loop_bounce(raw: bytes, recipient: str) -> None:
    _, groups = dsn_fields(raw)
    rcpt = groups[1]
    assert rcpt["final-recipient"] == f"rfc822; {recipient}"
    assert rcpt["status"] == "5.4.6", rcpt
    assert "loops back to myself" in rcpt["diagnostic-code"], rcpt


@pytest.mark.parametrize("rcpt", ["loop@[127.0.0.1]", "loop@[IPv6:::1]", "loop@[127.0.0.2]"])
def test_relayed_message_to_my_own_address_literal_bounces(
    server: Callable[..., Server], rcpt: str
) -> None:
    host = server()
    assert host.submit("sender@mx.test", rcpt, MESSAGE).startswith("250")
    wait_for(lambda: host.maildir(host.sender), what="the loop bounce")
    wait_for(host.send.queue_empty, what="the queue to drain")
    (bounce,) = host.maildir(host.sender)
    assert_loop_bounce(bounce, rcpt)
    assert "accepted" not in host.send.log()  # it never reached an SMTP server
    tried("mail loop", 1)


def test_relay_route_back_to_my_own_smtpd_bounces_at_ehlo(server: Callable[..., Server]) -> None:
    """A route to ourselves on a port the address rule lets through (a NAT or port forward
    looks the same): the server answers EHLO with our own name, so nothing is sent."""
    host = server(routes=lambda port: f"loop.test:127.0.0.1:{port}\n")
    assert host.submit("sender@mx.test", "someone@loop.test", MESSAGE).startswith("250")
    wait_for(lambda: host.maildir(host.sender), what="the loop bounce")
    wait_for(host.send.queue_empty, what="the queue to drain")
    (bounce,) = host.maildir(host.sender)
    assert_loop_bounce(bounce, "someone@loop.test")
    assert "answered EHLO with my own name" in bounce.decode()
    assert "accepted" not in host.send.log()
    tried("mail loop", 1)


def test_forged_bounce_address_on_my_own_literal_ends_in_a_double_bounce(
    server: Callable[..., Server],
) -> None:
    """An outside client (no relay rights) makes us bounce to <x%y@[127.0.0.1]>: the bounce
    loops, so it fails, and the failure goes to the postmaster, once. (An unknown mailbox
    is refused at RCPT now; an extension of a mailbox without its .qmail file still bounces.)"""
    host = server()
    assert host.submit("x%y@[127.0.0.1]", "sender-nosuch@mx.test", MESSAGE).startswith("250")
    wait_for(lambda: host.maildir(host.postmaster), what="the double bounce")
    wait_for(host.send.queue_empty, what="the queue to drain")
    (double,) = host.maildir(host.postmaster)
    assert_loop_bounce(double, "x%y@[127.0.0.1]")
    assert not host.maildir(host.sender)
    tried("mail loop", 1)


def received(n: int) -> bytes:
    lines = b"".join(b"Received: from hop%d by relay%d.test; date\r\n" % (i, i) for i in range(n))
    return lines + MESSAGE


@pytest.mark.parametrize(("hops", "reply"), [(100, "250"), (101, "554 5.4.6")])
def test_hop_limit_on_receipt(server: Callable[..., Server], hops: int, reply: str) -> None:
    host = server()
    assert host.submit("sender@mx.test", "sender@mx.test", received(hops)).startswith(reply)
    tried("hop count", 1)


def test_maxhops_control_file(server: Callable[..., Server]) -> None:
    host = server()
    host.root.control("maxhops", "3\n")
    host.daemon.send_signal(1)  # HUP: reload the control files
    host.daemon.wait_for("reload", timeout=10)
    assert host.submit("sender@mx.test", "sender@mx.test", received(4)).startswith("554 5.4.6")
    assert host.submit("sender@mx.test", "sender@mx.test", received(3)).startswith("250")
