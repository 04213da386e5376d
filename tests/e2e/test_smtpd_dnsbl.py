"""Blocklists and greylisting in a running pyqmail-smtpd (issue 17 items 3, 4 and 6).

The lists come from a real knotd on loopback (``tests/dnsserver.py``), which the daemon asks
through ``control/dnsresolver``. Clients connect from the loopback address each case needs
(127.0.0.9 is on the list, 127.0.0.7 is not).
"""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.dnsserver import DnsServer
from tests.e2e.conftest import QmailRoot, StartDaemon, smtpd_command

LISTED, CLEAN = "127.0.0.9", "127.0.0.7"
V6_LOOPBACK = ".".join("1" + "0" * 31)  # ::1, reversed nibbles
ZONES = {
    "bl.test.": '9.0.0.127 300 A 127.0.0.2\n9.0.0.127 300 TXT "see https://bl.test/9"\n'
    f"{V6_LOOPBACK} 300 A 127.0.0.3\n",
    "wl.test.": "10.0.0.127 300 A 127.0.0.2\n",
}
MESSAGE = b"From: a@b.test\r\nSubject: checks\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONES) as server:
        yield server


def client(port: int, source: str) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0))


def lists(qmail_root: QmailRoot, dns: DnsServer, blocklists: str = "bl.test\n") -> None:
    qmail_root.control("dnsbl", blocklists)
    qmail_root.control("dnswl", "wl.test\n")
    qmail_root.control("dnsresolver", f"{dns.host}@{dns.port}\n")
    qmail_root.control("dnsbltimeout", "2\n")


def test_a_listed_client_is_refused_at_mail_naming_the_list(
    qmail_root: QmailRoot, smtpd: StartDaemon, dns: DnsServer
) -> None:
    lists(qmail_root, dns)
    d = smtpd()
    with client(d.port, LISTED) as s:
        assert s.ehlo("listed.test")[0] == 250  # HELO goes through, as with rblsmtpd
        code, text = s.mail("a@b.test")
        assert code == 554, text
        assert text == (
            b"5.7.1 Service unavailable; client [127.0.0.9] blocked using bl.test;"
            b" see https://bl.test/9"
        )
        assert s.rcpt("u@mx.test")[0] == 503  # no transaction
    d.wait_for(r"refuse ip=127\.0\.0\.9 code=554 dnsbl=bl\.test:127\.0\.0\.2 dnsbl_score=1 ")
    with client(d.port, CLEAN) as s:
        s.ehlo("clean.test")
        assert s.mail("a@b.test")[0] == 250
        assert s.rcpt("u@mx.test")[0] == 250
        assert s.data(MESSAGE)[0] == 250
    assert len(qmail_root.queued()) == 1


def test_an_ipv6_client_is_looked_up_by_its_nibbles(
    qmail_root: QmailRoot, smtpd: StartDaemon, dns: DnsServer
) -> None:
    lists(qmail_root, dns)
    d = smtpd(listen="[::1]:0")
    with smtplib.SMTP("::1", d.port, timeout=10) as s:
        s.ehlo("v6.test")
        code, text = s.mail("a@b.test")
    assert (code, text) == (554, b"5.7.1 Service unavailable; client [::1] blocked using bl.test")
    d.wait_for(r"refuse ip=::1 code=554 dnsbl=bl\.test:127\.0\.0\.3 ")


def test_allow_list_relay_clients_and_rblsmtpd_rules(
    qmail_root: QmailRoot, smtpd: StartDaemon, dns: DnsServer
) -> None:
    """RBLSMTPD="" skips the lists (rblsmtpd), a text refuses: 451, or 553 with "-";
    RELAYCLIENT is never refused; a client on the allow list passes."""
    lists(qmail_root, dns)
    rules = qmail_root.rules(
        f'{LISTED}:allow,RBLSMTPD=""\n'
        '127.0.0.11:allow,RBLSMTPD="-go away"\n'
        '127.0.0.12:allow,RBLSMTPD="come back later"\n'
        '127.0.0.13:allow,RELAYCLIENT=""\n'
    )
    d = smtpd(rules_cdb=rules)
    for source, want in [
        (LISTED, (250, b"2.1.0 Ok")),
        ("127.0.0.11", (553, b"5.7.1 go away")),
        ("127.0.0.12", (451, b"4.7.1 come back later")),
        ("127.0.0.13", (250, b"2.1.0 Ok")),
        ("127.0.0.10", (250, b"2.1.0 Ok")),  # on wl.test
    ]:
        with client(d.port, source) as s:
            s.ehlo("rules.test")
            assert s.mail("a@b.test") == want, source
    d.wait_for(r"dnsbl ip=127\.0\.0\.10 action=accept dnswl=wl\.test")


def test_a_dns_server_that_never_answers_costs_the_timeout_and_no_mail(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        qmail_root.control("dnsbl", "bl.test\n")
        qmail_root.control("dnsresolver", f"127.0.0.1@{silent.getsockname()[1]}\n")
        qmail_root.control("dnsbltimeout", "1\n")
        d = smtpd()
        began = time.monotonic()
        with client(d.port, LISTED) as s:
            greeted = time.monotonic() - began
            s.ehlo("slow-dns.test")
            assert s.mail("a@b.test")[0] == 250
            assert s.rcpt("u@mx.test")[0] == 250
            assert s.data(MESSAGE)[0] == 250
    assert 0.8 < greeted < 2.0, greeted
    d.wait_for(r"dnsbl ip=127\.0\.0\.9 action=accept dnsbl_fail=bl\.test")
    d.wait_for(r"msg qid=\S+ .*dnsbl_fail=bl\.test")


def test_tempfail_defers_when_a_list_cannot_be_asked(
    qmail_root: QmailRoot, smtpd: StartDaemon, dns: DnsServer
) -> None:
    lists(qmail_root, dns, "bl.test\nnosuch.test\n")  # knotd refuses nosuch.test
    qmail_root.control("dnsbltempfail", "1\n")
    d = smtpd()
    with client(d.port, CLEAN) as s:
        s.ehlo("strict.test")
        code, text = s.mail("a@b.test")
    assert (code, text[:5]) == (451, b"4.7.1"), text


def greylisted(port: int, rcpt: str = "u@mx.test") -> tuple[int, bytes]:
    with client(port, CLEAN) as s:
        s.ehlo("grey.test")
        assert s.mail("a@b.test")[0] == 250
        code, text = s.rcpt(rcpt)
        if code == 250:
            assert s.data(MESSAGE)[0] == 250
        return code, text


def test_greylisting_across_listeners_and_a_restart(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """First try: 451 4.7.1 with the time left; too early again: still 451, on another
    daemon of the same root; after the delay: accepted; after a restart: known."""
    qmail_root.control("greylistdelay", "2\n")
    first, second = smtpd(), smtpd(workers=2)
    code, text = greylisted(first.port)
    assert (code, text) == (451, b"4.7.1 Greylisted, please try again in 2 seconds")
    first.wait_for(r"refuse ip=127\.0\.0\.7 code=451 greylist=new greylist_wait=2 ")
    code, _ = greylisted(second.port)
    assert code == 451
    time.sleep(2.1)
    assert greylisted(second.port)[0] == 250
    second.wait_for(r"msg qid=\S+ .* greylist=pass")
    assert first.stop() == 0
    assert second.stop() == 0
    third = smtpd()
    assert greylisted(third.port)[0] == 250
    third.wait_for(r"msg qid=\S+ .* greylist=known")
    assert greylisted(third.port, "other@mx.test")[0] == 451  # a new triplet


def test_greylisting_skips_relay_clients_and_allow_listed_hosts(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    qmail_root.control("greylistdelay", "60\n")
    rules = qmail_root.rules(f'{CLEAN}:allow,RELAYCLIENT=""\n127.0.0.8:allow,RBLSMTPD=""\n')
    d = smtpd(rules_cdb=rules)
    assert greylisted(d.port)[0] == 250
    with client(d.port, "127.0.0.8") as s:
        s.ehlo("known.test")
        assert s.mail("a@b.test")[0] == 250
        assert s.rcpt("u@mx.test")[0] == 250


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"dnsbl": "bl.test\nnot a zone\n"}, r"control/dnsbl:2: not a DNS list zone"),
        (
            {"greylistdelay": "600\n", "greylistlifetime": "300\n"},
            r"control/greylistdelay: 600 seconds is not shorter than .*control/greylistlifetime",
        ),
        (
            {"dnsresolver": "resolver.example\n"},
            r"control/dnsresolver:1: 'resolver.example' is not an IP address",
        ),
    ],
)
def test_bad_files_stop_the_check_and_the_daemon_naming_the_file(
    qmail_root: QmailRoot, smtpd: StartDaemon, files: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        qmail_root.control(name, text)
    argv = [*smtpd_command(), "--root", str(qmail_root.path), "--check", "--mode", "smtp"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 111
    assert re.search(message, result.stderr), result.stderr
    d = smtpd(expect_ready=False)
    assert d.wait_exit() != 0
    assert re.search(message, d.output), d.output


def test_the_check_says_which_lists_and_greylisting_are_in_force(qmail_root: QmailRoot) -> None:
    qmail_root.control("dnsbl", "bl.test=2\nweak.test\n")
    qmail_root.control("dnswl", "wl.test\n")
    qmail_root.control("greylistdelay", "300\n")
    argv = [*smtpd_command(), "--root", str(qmail_root.path), "--check", "--mode", "smtp"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "2 blocklist(s), 1 allow list(s), greylist 300s" in result.stdout


def test_a_client_that_talks_while_the_lookups_run_is_still_a_pregreeter(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """The greeting waits for the lists; input before it is refused as before (554 5.5.0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        qmail_root.control("dnsbl", "bl.test\n")
        qmail_root.control("dnsresolver", f"127.0.0.1@{silent.getsockname()[1]}\n")
        qmail_root.control("dnsbltimeout", "1\n")
        d = smtpd()
        with socket.create_connection(("127.0.0.1", d.port), timeout=5) as sock:
            sock.sendall(b"EHLO early.test\r\nMAIL FROM:<a@b.test>\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    assert data.startswith(b"554 5.5.0"), data
    assert b"220 " not in data
