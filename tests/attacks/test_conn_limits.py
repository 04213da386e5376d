"""maxconnip counts exact clients across workers (issue 14, item 3).

The old counter shared one limit per ``crc32(key) % 4096`` bucket: while 127.0.11.243 held
its 50 connections, 127.0.0.77 (same bucket, none) got ``421 too many connections`` and the
log blamed it. Now the count is per exact address (IPv6: per /64) over all workers.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import zlib
from collections.abc import Iterator

import pytest

from tests.attacks.tally import tried
from tests.attacks.wire import Wire
from tests.e2e.conftest import QmailRoot, StartDaemon

HOG, NEIGHBOUR = "127.0.11.243", "127.0.0.77"
MAXCONNIP = 50


@pytest.fixture
def wires() -> Iterator[list[Wire]]:
    """Every connection a test opens, closed at its end whatever happened."""
    opened: list[Wire] = []
    yield opened
    for w in opened:
        with contextlib.suppress(OSError):
            w.close()


def open_many(wires: list[Wire], port: int, source: str, count: int) -> list[Wire]:
    out = []
    for _ in range(count):
        w = Wire(port, source)
        wires.append(w)
        assert w.reply()[0] == 220
        out.append(w)
    return out


def one(wires: list[Wire], port: int, source: str) -> Wire:
    w = Wire(port, source)
    wires.append(w)
    return w


def test_a_full_client_does_not_lock_out_its_old_bucket_neighbour(
    qmail_root: QmailRoot, smtpd: StartDaemon, wires: list[Wire]
) -> None:
    assert zlib.crc32(HOG.encode()) % 4096 == zlib.crc32(NEIGHBOUR.encode()) % 4096
    d = smtpd(workers=2)
    open_many(wires, d.port, HOG, MAXCONNIP)  # the kernel spreads them over both workers
    extra = one(wires, d.port, HOG)
    code, text = extra.reply()
    assert code == 421 and text.startswith("421 4.7.0"), text
    d.wait_for(rf"refuse ip={HOG.replace('.', '[.]')} port=\d+ reason=maxconnip={MAXCONNIP}")
    neighbour = one(wires, d.port, NEIGHBOUR)
    code, text = neighbour.reply()
    assert code == 220, f"{NEIGHBOUR} refused because {HOG} is full: {text!r}"
    assert neighbour.cmd("QUIT")[0] == 221
    assert f"refuse ip={NEIGHBOUR}" not in d.output
    tried("conn-limit-collision", MAXCONNIP + 2)


def test_limit_is_shared_by_the_workers_and_freed(
    qmail_root: QmailRoot, smtpd: StartDaemon, wires: list[Wire]
) -> None:
    qmail_root.control("maxconnip", "6\n")
    d = smtpd(workers=2)
    held = open_many(wires, d.port, "127.0.5.5", 6)
    pids = {int(p) for p in re.findall(r"pid=(\d+) ready", d.output)}
    assert len(pids) == 2
    for _ in range(3):  # whichever worker gets it, the client is at its limit
        assert one(wires, d.port, "127.0.5.5").reply()[0] == 421
    leaving = held.pop()
    leaving.cmd("QUIT")
    d.wait_for(r"conn ip=127\.0\.5\.5")
    assert one(wires, d.port, "127.0.5.5").reply()[0] == 220, "a freed slot is reusable"
    tried("conn-limit-collision", 10)


def test_ipv6_client_counted_per_64(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    qmail_root.control("maxconnip", "2\n")
    d = smtpd(workers=2, listen="[::1]:0")
    socks = []
    for _ in range(2):
        s = socket.create_connection(("::1", d.port), timeout=10)
        assert s.recv(100).startswith(b"220")
        socks.append(s)
    s = socket.create_connection(("::1", d.port), timeout=10)
    assert s.recv(100).startswith(b"421")
    socks.append(s)
    d.wait_for(r"refuse ip=::1 port=\d+ reason=maxconnip=2")
    for s in socks:
        s.close()
    tried("conn-limit-collision", 3)


def test_connections_of_a_killed_worker_are_released(
    qmail_root: QmailRoot, smtpd: StartDaemon, wires: list[Wire]
) -> None:
    qmail_root.control("maxconnip", "8\n")
    d = smtpd(workers=2)
    first, second = sorted(d.worker_pids())
    held = open_many(wires, d.port, "127.0.6.6", 8)
    assert one(wires, d.port, "127.0.6.6").reply()[0] == 421
    os.kill(first, signal.SIGKILL)
    d.wait_for(rf"worker-exit worker={first} ")
    died = sum(w.closed_within(3) for w in held)
    ready = 3  # the two first workers, then the replacement
    if not died:  # the kernel gave every connection to the other worker (1 in 128)
        os.kill(second, signal.SIGKILL)
        d.wait_for(rf"worker-exit worker={second} ")
        died = sum(w.closed_within(3) for w in held)
        ready = 4  # that worker's replacement too: its spawner uncounts the 8
    assert died
    d.wait_for(r"pid=\d+ ready", count=ready, timeout=15)  # the replacements serve
    open_many(wires, d.port, "127.0.6.6", died)  # the dead worker's share is free again
    assert one(wires, d.port, "127.0.6.6").reply()[0] == 421, "released more than died"
    tried("conn-limit-collision", died + 10)
