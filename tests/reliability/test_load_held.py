"""Load held: legitimate clients are served while 500 slow or idle connections are open.

500 connections from ten loopback sources (127.0.0.2-11, 50 each): half idle after the
greeting, half slowloris (one byte of an endless EHLO line per second each). The daemon runs
two workers with ``maxconnip`` 60, ``maxconn`` 530 and ``stresspercent`` 100 (never
stressed below the limit). Shown:

- a complete legitimate session (EHLO, MAIL, RCPT, DATA, QUIT) from 127.0.0.1 takes well
  under 3 s, five times over, while the 500 are held;
- the per-IP limit: 15 more from 127.0.0.2 -> exactly 10 served, 5 get ``421``;
- the total limit: 30 more from 127.0.0.12 -> 20 served, 10 get ``421``;
- every slow connection is still open (nothing was dropped to make room).
"""

from __future__ import annotations

import contextlib
import resource
import threading
import time
from pathlib import Path

from tests.attacks.wire import Wire
from tests.e2e.conftest import QmailRoot, StartDaemon

SOURCES = [f"127.0.0.{i}" for i in range(2, 12)]
PER_SOURCE = 50
MAXCONNIP = 60
MAXCONN = 530


def raise_nofile(want: int = 4096) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def rss_tree(pid: int) -> int:
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if int(entry.name) == pid or int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def open_and_greet(port: int, source: str) -> tuple[Wire, int]:
    w = Wire(port, source, timeout=10)
    return w, w.reply()[0]


def legit_session(port: int) -> float:
    start = time.monotonic()
    with Wire(port, "127.0.0.1") as w:
        assert w.reply()[0] == 220
        assert w.cmd("EHLO legit.test")[0] == 250
        assert w.cmd("MAIL FROM:<legit@remote.test>")[0] == 250
        assert w.cmd("RCPT TO:<user@example.test>")[0] == 250
        assert w.cmd("DATA")[0] == 354
        assert w.cmd(b"Subject: legit\r\n\r\nhello\r\n.")[0] == 250
        assert w.cmd("QUIT")[0] == 221
    return time.monotonic() - start


def test_legitimate_clients_served_while_500_slow_connections_held(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    raise_nofile()
    qmail_root.control("maxconnip", f"{MAXCONNIP}\n")
    qmail_root.control("maxconn", f"{MAXCONN}\n")
    # 500 of 530 is over the default stresspercent (80): idle clients would then be dropped
    # after timeoutstress (tests/attacks/test_session_limits.py); this test holds them.
    qmail_root.control("stresspercent", "100\n")
    d = smtpd(workers=2)
    base_rss = rss_tree(d.pid)
    held: list[Wire] = []
    stop = threading.Event()
    try:
        for source in SOURCES:
            for _ in range(PER_SOURCE):
                w, code = open_and_greet(d.port, source)
                held.append(w)
                assert code == 220, f"connection {len(held)} from {source} refused: {code}"
        slow = held[::2]

        def drip() -> None:
            while not stop.wait(1.0):
                for w in slow:
                    with contextlib.suppress(OSError):
                        w.sock.send(b"E")

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        time.sleep(1.5)
        times = [legit_session(d.port) for _ in range(5)]
        print(f"legit sessions with 500 held: {', '.join(f'{t:.3f}s' for t in times)}")
        assert max(times) < 3.0, f"legit sessions took {times}"
        print(f"daemon RSS: {base_rss >> 20} MiB idle, {rss_tree(d.pid) >> 20} MiB with 500 held")

        extra = [open_and_greet(d.port, SOURCES[0]) for _ in range(15)]
        held.extend(w for w, _ in extra)
        codes = [c for _, c in extra]
        assert codes.count(220) == MAXCONNIP - PER_SOURCE, f"per-IP limit: {codes}"
        assert codes.count(421) == 15 - (MAXCONNIP - PER_SOURCE), f"per-IP limit: {codes}"

        more = [open_and_greet(d.port, "127.0.0.12") for _ in range(30)]
        held.extend(w for w, _ in more)
        codes = [c for _, c in more]
        room = MAXCONN - len(SOURCES) * PER_SOURCE - (MAXCONNIP - PER_SOURCE)
        assert codes.count(220) == room, f"total limit: {codes}"
        assert codes.count(421) == 30 - room, f"total limit: {codes}"

        stop.set()
        dripper.join(5)
        closed = 0
        for w in held[: len(SOURCES) * PER_SOURCE]:
            w.sock.settimeout(0.001)
            with contextlib.suppress(TimeoutError, BlockingIOError):
                closed += w.sock.recv(1) == b""
        assert closed == 0, f"{closed} held connections were closed by the server"
    finally:
        stop.set()
        for w in held:
            w.close()
    d.wait_for(r"refuse .*reason=maxconnip=60", count=5)
    d.wait_for(r"refuse .*reason=maxconn=530", count=30 - room)
    assert legit_session(d.port) < 3.0
