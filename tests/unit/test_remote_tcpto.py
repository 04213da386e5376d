"""qmail's tcpto in the remote delivery child (``pyqmail.send.peers``): an address that
timed out (no TCP connection, or no greeting) is not tried again for a while, by any
worker of the child, while one that refused is tried after the others.

Against loopback servers (``tests.smtpserver``) that accept and never greet, and, for a
host with two addresses, a real DNS server on loopback (``tests.dnsserver``): its relay
name has 127.0.0.1 (silent) and 127.0.0.2 (a working server) on one port.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.control.send import Control
from pyqmail.send.mx import Destination, DnsResolver
from pyqmail.send.peers import BACKOFF_FIRST, BACKOFF_MAX, PeerMemory
from pyqmail.send.remote import RemoteDelivery
from tests.dnsserver import DnsServer
from tests.smtpserver import SmtpServer, deliver_once, standard

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


def _control(tmp_path: Path, route: str) -> Control:
    root = tmp_path / "control"
    root.mkdir(exist_ok=True)
    (root / "me").write_text("mx.test\n")
    (root / "smtproutes").write_text(f"remote.test:{route}\n")
    (root / "timeoutremote").write_text("1\n")
    (root / "timeoutconnect").write_text("1\n")
    return Control.load(tmp_path)


@pytest.fixture
def silent() -> Iterator[SmtpServer]:
    """Accepts, and never greets (dead.py of the review)."""
    with SmtpServer(lambda conv: conv.hold()) as server:
        yield server


def test_an_address_that_never_greets_is_not_tried_again_for_a_while(
    tmp_path: Path, silent: SmtpServer
) -> None:
    delivery = RemoteDelivery(_control(tmp_path, f"127.0.0.1:{silent.port}"), peers=PeerMemory())
    first, took = deliver_once(delivery, MESSAGE)
    assert first.kind == "temp" and "no greeting within 1 s" in first.detail, first
    assert took >= 0.9
    for _ in range(2):
        again, took = deliver_once(delivery, MESSAGE)
        assert again.kind == "temp" and again.status == "4.4.1"
        assert "not tried" in again.detail and "tcpto" in again.detail, again
        assert took < 0.2
    assert len(silent.conversations) == 1


def _free_on_both() -> int:
    """A port free on both 127.0.0.1 and 127.0.0.2."""
    for _ in range(20):
        with socket.create_server(("127.0.0.2", 0)) as probe:
            port = int(probe.getsockname()[1])
            with socket.socket() as other:
                try:
                    other.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


def test_a_resting_address_is_skipped_for_the_next_one_of_the_host(tmp_path: Path) -> None:
    """relay.tcpto.test: 127.0.0.1 never greets, 127.0.0.2 works (DNS answers them in
    that order). The first message waits for the greeting once; the next ones go to
    127.0.0.2 at once."""
    port = _free_on_both()
    zone = "relay A 127.0.0.1\nrelay A 127.0.0.2\n"
    with (
        DnsServer({"tcpto.test.": zone}) as dns,
        SmtpServer(lambda conv: conv.hold(), "127.0.0.1", port) as dead,
        SmtpServer(standard, "127.0.0.2", port) as alive,
    ):
        resolver = DnsResolver(lifetime=2.0, resolver=dns.resolver())
        control = _control(tmp_path, f"relay.tcpto.test:{port}")
        delivery = RemoteDelivery(control, resolver=resolver, peers=PeerMemory())
        results = [deliver_once(delivery, MESSAGE) for _ in range(3)]
        alive.wait_closed()
    assert [r.kind for r, _ in results] == ["ok"] * 3, results
    assert results[0][1] >= 0.9  # the silent address's greeting wait, once
    assert all(took < 0.5 for _, took in results[1:])
    assert len(dead.conversations) == 1
    assert sum(len(c.messages) for c in alive.conversations) == 3


def test_refusals_go_last_timeouts_rest_and_the_back_off_grows() -> None:
    """The memory itself, on a clock the test moves: a refused address is tried after the
    others, a timed-out one not at all until its back-off ends (60 s, doubling with each
    failed probe, at most an hour); a greeting clears the record."""
    now = [1000.0]
    peers = PeerMemory(clock=lambda: now[0])
    refused, dead, fine = (Destination("h", f"192.0.2.{i}", 25) for i in (1, 2, 3))
    peers.connect_failed(refused, timed_out=False)
    peers.connect_failed(dead, timed_out=True)
    assert peers.order([refused, dead, fine]) == ([fine, refused], [dead])
    assert peers.resting(dead) == BACKOFF_FIRST
    for backoff in (2 * BACKOFF_FIRST, 4 * BACKOFF_FIRST):
        now[0] += peers.resting(dead)
        assert peers.order([dead]) == ([dead], [])  # its back-off is over: tried again
        peers.connect_failed(dead, timed_out=True)
        assert peers.resting(dead) == backoff
    for _ in range(20):
        now[0] += peers.resting(dead)
        assert peers.order([dead]) == ([dead], [])
        peers.connect_failed(dead, timed_out=True)
    assert peers.resting(dead) == BACKOFF_MAX
    peers.connected(dead)
    assert peers.order([dead, refused]) == ([dead, refused], [])


def test_every_delivery_object_of_a_child_shares_one_memory(tmp_path: Path) -> None:
    """A HUP makes a new RemoteDelivery: what its sessions learnt stays."""
    control = _control(tmp_path, "127.0.0.1:2525")
    assert RemoteDelivery(control).peers is RemoteDelivery(control).peers
