"""The checks' libraries in a running pyqmail-smtpd: loaded when the control files use them.

``pyqmail.checks.libraries``: dnspython, dkimpy (PyNaCl), pyspf, publicsuffix2 and authres
are imported before the privilege drop when control/authchecks, control/dnsbl or
control/dnswl exist, and not at all otherwise (some 9 MB less in every process). PyNaCl's
libsodium, which dkimpy pulls in, is a shared object: its mapping in a process's
/proc/<pid>/maps shows that process imported the ``auth`` group.
"""

from __future__ import annotations

import signal
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.procstat import tree  # the supervisor and its workers
from tests.conftest import PKI
from tests.dnsserver import DnsServer
from tests.e2e.conftest import Daemon, QmailRoot, StartDaemon
from tests.e2e.helpers import client_context

SODIUM = "_sodium"  # nacl/_sodium.abi3.so (Debian: libsodium.so), dkimpy's ed25519
LISTED = "127.0.0.9"
ZONES = {"bl.test.": "9.0.0.127 300 A 127.0.0.2\n"}


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONES) as server:
        yield server


def maps_sodium(pid: int) -> bool:
    return SODIUM in Path(f"/proc/{pid}/maps").read_text()


def settled_tree(d: Daemon) -> tuple[set[int], set[int]]:
    """(the supervisor and its two workers, the workers) once the spawner that forked the
    workers has exited: it logs the start line and is in the tree until just after it."""
    workers = {int(m.group(1)) for m in d.wait_for(r"pid=(\d+) ready", count=2)}
    deadline = time.monotonic() + 10
    while set(tree(d.proc.pid)) != {d.proc.pid, *workers} and time.monotonic() < deadline:
        time.sleep(0.05)
    return set(tree(d.proc.pid)), workers


def test_a_listener_without_checks_loads_none_of_their_libraries(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    d = smtpd(workers=2)
    start = d.wait_for(r"pid=\d+ start listen=.*")[0].group(0)
    assert "libraries=" not in start
    pids, _ = settled_tree(d)
    assert len(pids) == 3
    assert not any(maps_sodium(pid) for pid in pids)
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:  # and it serves
        s.sendmail("a@b.test", ["u@mx.test"], b"Subject: x\r\n\r\nbody\r\n")
    assert len(qmail_root.queued()) == 1


def test_checks_files_load_them_in_every_worker_before_the_drop(
    qmail_root: QmailRoot, smtpd: StartDaemon, dns: DnsServer
) -> None:
    qmail_root.control("authchecks", "1\n")
    qmail_root.control("dnsbl", "bl.test\n")
    qmail_root.control("dnsresolver", f"{dns.host}@{dns.port}\n")
    d = smtpd(workers=2)
    d.wait_for(
        r"pid=\d+ start listen=\S+ mode=smtp workers=2 uid=\d+ loop=\S+ libraries=auth,lists"
    )
    pids, workers = settled_tree(d)
    assert pids == {d.proc.pid, *workers}
    assert all(maps_sodium(pid) for pid in workers)
    # the supervisor imports none of the daemon (pyqmail.smtpd.prefork): its spawner did
    assert not maps_sodium(d.proc.pid)
    with smtplib.SMTP(d.host, d.port, timeout=10, source_address=(LISTED, 0)) as s:
        s.ehlo("listed.test")
        assert s.mail("a@b.test")[0] == 554  # the lists are asked (dnspython, as nobody)


def test_a_hup_that_turns_lists_on_loads_them_or_keeps_the_old_configuration(
    qmail_root: QmailRoot, smtpd: StartDaemon, dns: DnsServer
) -> None:
    """Started without lists, dnspython was never imported. A HUP that adds control/dnsbl
    imports it now, as the daemon's user: where that user can read the interpreter's
    files (a Debian host) the lists are in force; where it cannot (a Python under /root,
    as on the test machines when run as root) the reload fails naming control/dnsbl and
    the old configuration stays. Either way the daemon serves on."""
    d = smtpd(workers=1)
    qmail_root.control("dnsbl", "bl.test\n")
    qmail_root.control("dnsresolver", f"{dns.host}@{dns.port}\n")
    d.send_signal(signal.SIGHUP)
    found = d.wait_for(r"pid=\d+ (reload root=|reload-fail error=(.*))", timeout=30)[0]
    with smtplib.SMTP(d.host, d.port, timeout=10, source_address=(LISTED, 0)) as s:
        s.ehlo("listed.test")
        code = s.mail("a@b.test")[0]
    if found.group(1).startswith("reload root="):
        assert code == 554
    else:
        assert code == 250
        error = found.group(2).replace("\\x20", " ")  # the log escapes blanks
        assert "control/dnsbl: turns on checks whose libraries cannot be loaded" in error
        assert "restart it" in error


@pytest.mark.parametrize("mode", ["submission", "smtps"])
def test_login_listeners_never_load_them(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI, mode: str
) -> None:
    """smtps and submission take MAIL only from a login or a relay client, so neither the
    lists nor the authentication checks ever run there: with the same control files as
    the port-25 listener (the roles write one control directory), they load none of it,
    and a logged-in client's message gets no Authentication-Results."""
    qmail_root.users({"alice@mx.test": "wonderland"})
    qmail_root.control("authchecks", "1\n")
    qmail_root.control("dnsbl", "bl.test\n")
    qmail_root.control("dnsresolver", "127.0.0.1@9\n")  # never asked
    d = smtpd(mode=mode, workers=2)
    start = d.wait_for(r"pid=\d+ start listen=.*")[0].group(0)
    assert "libraries=" not in start
    pids, _ = settled_tree(d)  # the spawner, in the tree at the start line, exits after it
    assert not any(maps_sodium(pid) for pid in pids)
    context = client_context(pki)
    if mode == "smtps":
        s: smtplib.SMTP = smtplib.SMTP_SSL(d.host, d.port, timeout=10, context=context)
    else:
        s = smtplib.SMTP(d.host, d.port, timeout=10)
        s.starttls(context=context)
    with s:
        s.login("alice@mx.test", "wonderland")
        s.sendmail("alice@mx.test", ["u@mx.test"], b"Subject: x\r\n\r\nbody\r\n")
    [(_, body)] = qmail_root.queued()
    assert b"Authentication-Results" not in body
