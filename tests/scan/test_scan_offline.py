"""rspamd as the molecule scenario and the tests run it (``pyqmail_scanners__rspamd_offline``,
DNS pointed at a loopback port where nothing answers) talks to loopback only, and a scan
still ends in well under a second.

Why a network namespace and strace: the project's rule is that tests reach loopback (or its
own podman hosts) only. rspamd's own resolver is easy to point at a dead loopback port, but
some of Debian's configuration reaches out by other ways (fuzzy_check's servers are host
names rspamd resolves at start-up with the system's resolver). Here rspamd runs in a network
namespace with nothing but ``lo`` (an outside address is unreachable, so nothing leaves even
if the configuration is wrong) under ``strace``, which records every address it tries to
reach; all of them must be loopback. The scan is made by pyqmail's own client, with SPF,
DKIM, DMARC and ARC computed by rspamd (as in the molecule scenario, where
``pyqmail_control__authchecks`` is off): each of their lookups must fail at once, not wait
out Debian's timeouts (1 s, 5 retransmits: the 8 s task timeout).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scanners import AUTH_MODULES, Rspamd, auth_module_conf

# What a clean message from an outside client would make Debian's rspamd look up: the
# client's address (DNS lists, ASN, rDNS), the HELO name, the sender's domain (SPF, DMARC),
# its URLs (SURBL) and e-mail addresses.
MESSAGE = (
    b"From: Alice <alice@example.com>\r\nTo: <bob@example.org>\r\nSubject: the notes\r\n"
    b"Message-ID: <1@example.com>\r\nDate: Wed, 02 Dec 2026 10:00:00 +0000\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=sel; h=from; bh=x; b=x\r\n\r\n"
    b"See http://www.example.com/notes and write to carol@example.net.\r\n"
)

# Run inside the namespace by pyqmail's client: the verdict and the scan's time.
CLIENT = """
import asyncio, sys, time
from pyqmail.scan import rspamd
from pyqmail.scan.settings import parse_address
env = rspamd.Envelope("203.0.113.5", "mail.example.com", "alice@example.com", ("bob@example.org",))
started = time.monotonic()
reply = asyncio.run(rspamd.check(parse_address(sys.argv[1], "test"), env, sys.stdin.buffer.read()))
print(reply.action.replace(" ", "_"), f"{time.monotonic() - started:.3f}")
"""

# rspamd's /ping, asked from inside the namespace.
PING = """
import sys, urllib.request
print(urllib.request.urlopen(f"http://{sys.argv[1]}/ping", timeout=1).read().decode())
"""

_INET = re.compile(r'inet_(?:addr|pton)\((?:AF_INET6?, )?"([^"]+)"')


def destinations(trace: Path) -> set[str]:
    """Every IP address a traced connect/sendto/sendmsg named."""
    return {m.group(1) for m in _INET.finditer(trace.read_text())}


@pytest.fixture
def offline_rspamd() -> Iterator[tuple[Rspamd, subprocess.Popen[bytes], Path]]:
    """The tests' rspamd (the role's offline configuration), SPF/DKIM/DMARC/ARC on, in a
    network namespace of its own under strace."""
    server = Rspamd()
    server._configure()  # the configuration only: started our own way below
    for module in AUTH_MODULES:
        conf = server.dir / "conf" / "local.d" / f"{module}.conf"
        conf.write_text(auth_module_conf(pyqmail_checks=False))
    trace = server.dir / "trace"
    # -D: strace runs beside rspamd, so this process is rspamd itself (stopped by its PID).
    strace = ["strace", "-D", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg,sendmmsg", "-o"]
    script = "ip link set lo up && exec " + shlex.join([*strace, str(trace), *server.command()])
    with server.log.open("ab") as log:
        proc = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", script],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server.proc = proc  # rspamd's main process, stopped by its PID on exit
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if b"pong" in in_namespace(proc, [sys.executable, "-c", PING, server.address]):
                break
            time.sleep(0.2)
        else:
            log = server.log.read_text()[-2000:]
            pytest.fail(f"rspamd did not come up in its namespace:\n{log}")
        yield server, proc, trace
    finally:
        server.__exit__(None, None, None)


def in_namespace(proc: subprocess.Popen[bytes], argv: list[str], data: bytes = b"") -> bytes:
    """Run ``argv`` in ``proc``'s network namespace; its standard output."""
    done = subprocess.run(
        ["nsenter", f"--net=/proc/{proc.pid}/ns/net", *argv],
        input=data,
        capture_output=True,
        check=False,
        timeout=60,
    )
    return done.stdout


def test_rspamd_offline_reaches_loopback_only_and_fails_lookups_at_once(
    offline_rspamd: tuple[Rspamd, subprocess.Popen[bytes], Path],
) -> None:
    server, proc, trace = offline_rspamd
    client = [sys.executable, "-c", CLIENT, server.address]
    answers = [in_namespace(proc, client, MESSAGE).decode().split() for _ in range(3)]
    for answer in answers:
        assert len(answer) == 2, (answers, server.log.read_text()[-2000:])
    # The first scan also warms rspamd's caches; the later ones are what a session sees.
    assert all(float(secs) < 1.5 for _, secs in answers[1:]), answers
    assert {action for action, _ in answers} <= {"no_action", "greylist", "add_header"}, answers
    time.sleep(1)  # what the workers do after a scan (their maps' retries) is traced too
    outside = {a for a in destinations(trace) if not ipaddress.ip_address(a).is_loopback}
    assert not outside, f"rspamd tried to reach {sorted(outside)} (trace: {trace})"
    assert "127.0.0.1" in destinations(trace)  # the dead nameserver was asked
