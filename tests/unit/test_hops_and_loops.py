"""Mail loops: hop count on receipt and in local delivery, remote delivery never to ourselves,
NUL refused, nothing over 998 octets per line on the way out, bounded remote replies."""

from __future__ import annotations

import random
import re
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_delivery import RESOLVER, FakeResolver
from test_protocol_support import in_data, policy, ready

from pyqmail.control import smtpd as config
from pyqmail.control.send import Control, ControlError, Route
from pyqmail.headers import HopCounter, header_section, header_values
from pyqmail.queue.format import Envelope
from pyqmail.queue.store import Queue
from pyqmail.send.ipme import LocalAddresses, parse_fib_trie, parse_if_inet6
from pyqmail.send.local import LocalDelivery
from pyqmail.send.mx import DnsError, LoopError, Myself, destinations
from pyqmail.send.remote import wire_data
from pyqmail.send.smtpclient import MAX_REPLY, SMTPClient
from pyqmail.wirelines import SHORTCUT_MAX, wire_lines

QUEUED = "250 2.0.0 Ok: queued as Q1"
HOPS = "554 5.4.6 Error: too many hops, this message is looping"


def hops_message(n: int, other: str = "Received") -> bytes:
    lines = [f"{other if i % 2 else 'Received'}: from h{i} by x; date\r\n" for i in range(n)]
    return ("".join(lines) + "Subject: s\r\n\r\nReceived: in the body\r\n").encode()


# -- receipt ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hops", "maxhops", "reply"),
    [(100, 100, QUEUED), (101, 100, HOPS), (5, 5, QUEUED), (6, 5, HOPS), (1, 1, QUEUED)],
)
def test_hop_limit_on_receipt(hops: int, maxhops: int, reply: str) -> None:
    srv = in_data(policy(maxhops=maxhops))
    srv.send(hops_message(hops, "Delivered-To"))
    assert srv.send(b".\r\n") == [reply]
    msg = srv.messages[0]
    if reply == HOPS:
        assert msg.end is None and msg.aborted == f"more than {maxhops} hops"
        assert srv.cmd("MAIL FROM:<a@example.net>") == "250 2.1.0 Ok"  # the session goes on
    else:
        assert msg.end is not None


def test_hop_lines_in_the_body_or_folded_do_not_count() -> None:
    body = b"X: y\r\n Received: folded\r\nSubject: Received: no\r\n\r\n" + b"Received: b\r\n" * 300
    srv = in_data(policy(maxhops=1))
    srv.send(b"Received: one\r\n" + body)
    assert srv.send(b".\r\n") == [QUEUED]


def test_hop_counter_any_split() -> None:
    msg = hops_message(7) + b"Received: after\r\n"
    msg = msg.replace(b"Received: from h3", b"rEcEiVeD \t : from h3")
    rng = random.Random(5)
    for _ in range(500):
        counter, i = HopCounter(), 0
        while i < len(msg):
            n = rng.randint(1, 9)
            counter.feed(msg[i : i + n])
            i += n
        assert (counter.hops, counter.done) == (7, True)
    spaced = HopCounter()
    spaced.feed(b"Received" + b" " * 5000)
    spaced.feed(b":x\r\n\r\n")
    assert spaced.hops == 1


@pytest.mark.parametrize(
    ("text", "error"),
    [("0\n", "out of range"), ("10001\n", "out of range"), ("many\n", "not a non-negative")],
)
def test_maxhops_control_file_errors(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.test\n")
    assert config.load(tmp_path).maxhops == 100
    (tmp_path / "control" / "maxhops").write_text(text)
    with pytest.raises(config.ConfigError, match=rf"control/maxhops:1: .*{error}"):
        config.load(tmp_path)
    with pytest.raises(ControlError, match="maxhops"):
        Control.load(tmp_path)


def test_maxhops_control_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "maxhops").write_text("30\n")
    (tmp_path / "control" / "me").write_text("mx.test\n")
    assert config.load(tmp_path).maxhops == 30
    assert Control.load(tmp_path).maxhops == 30


# -- local delivery ----------------------------------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> LocalDelivery:
    root = tmp_path / "qmail"
    for sub in ("control", "alias", "users"):
        (root / sub).mkdir(parents=True)
    (root / "control" / "me").write_text("mx.test\n")
    home = root / "homes" / "u"
    home.mkdir(parents=True)
    (root / "users" / "mailboxes").write_text(f"u:{home}\n")
    queue = Queue(root / "queue")
    queue.create()
    return LocalDelivery(Control.load(root), queue)


@pytest.mark.parametrize(("hops", "kind"), [(101, "ok"), (102, "perm")])
def test_local_delivery_bounces_over_maxhops_plus_its_own_line(
    local: LocalDelivery, hops: int, kind: str
) -> None:
    env = Envelope("Q1", "s@example.net", ("u@mx.test",), 1, 0.0)
    result = local.deliver(env, hops_message(hops), "u@mx.test")
    assert result.kind == kind, result
    if kind == "perm":
        assert result.status == "5.4.6" and "too many hops" in result.detail


# -- header parsing --------------------------------------------------------------------


def test_header_section_is_bounded_and_cut_at_a_line_end() -> None:
    big = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 50) for i in range(5000))
    head = header_section(big + b"\r\nbody", limit=10_000)
    assert len(head) <= 10_000 and head.endswith(b"v" * 50)
    assert header_values(b"A: 1\r\n\r\nA: 2\r\n", "a") == ["1"]
    assert header_values(b"\r\nA: 1\r\n", "a") == []


# -- this host's addresses ----------------------------------------------------------------

FIB = """Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.0
              /8 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 198.51.100.0/24 2 0 2
           |-- 198.51.100.0
              /24 link UNICAST
           |-- 198.51.100.7
              /32 host LOCAL
"""
INET6 = "20010db8000000000000000000000025 02 40 00 80     eth0\n"


def test_ipme_reads_the_kernel_tables(tmp_path: Path) -> None:
    (tmp_path / "fib_trie").write_text(FIB)
    (tmp_path / "if_inet6").write_text(INET6)
    assert [str(n) for n in parse_fib_trie(FIB)] == ["127.0.0.0/8", "198.51.100.7/32"]
    assert [str(n) for n in parse_if_inet6(INET6)] == ["2001:db8::25/128"]
    ipme = LocalAddresses(tmp_path)
    for addr in (
        "198.51.100.7",
        "127.0.0.9",
        "2001:db8::25",
        "::1",
        "::ffff:198.51.100.7",
        "0.0.0.0",
    ):
        assert ipme.is_local(addr), addr
    for addr in ("198.51.100.8", "192.0.2.1", "2001:db8::26", "not an address"):
        assert not ipme.is_local(addr), addr


def test_ipme_of_this_machine_knows_loopback() -> None:
    assert LocalAddresses().is_local("127.0.0.1")
    assert not LocalAddresses().is_local("192.0.2.254")  # TEST-NET-1, never assigned here


# -- remote delivery never to ourselves ----------------------------------------------------

ME = Myself(
    frozenset({"mx.test"}),
    frozenset({"example.test"}),
    lambda a: a in {"127.0.0.1", "192.0.2.2", "::1"},
)
SELF_RESOLVER = FakeResolver(
    {
        "backup-of.test": [(10, "primary.test"), (20, "mx.test")],
        "named.test": [(10, "mx.test"), (20, "primary.test")],
        "byaddr.test": [(5, "backup.test")],  # backup.test is 192.0.2.2: ours
        "tie.test": [(10, "primary.test"), (10, "backup.test")],
        "local-domain-mx.test": [(10, "example.test")],
        "mx.test": None,
    },
    {**RESOLVER._hosts, "mx.test": ["192.0.2.200"], "selfrelay.test": ["127.0.0.1"]},
)


@pytest.mark.parametrize(
    ("domain", "route", "expected"),
    [
        ("backup-of.test", Route(), ["192.0.2.1", "2001:db8::1"]),  # we are the backup MX
        ("[192.0.2.7]", Route(), ["192.0.2.7"]),
        ("anything", Route("127.0.0.1", 10025), ["127.0.0.1"]),  # a local filter: allowed
        ("anything", Route("selfrelay.test", 2525), ["127.0.0.1"]),
        ("anything", Route("relay.test", 25), ["192.0.2.9"]),
    ],
)
def test_destinations_that_are_not_myself(domain: str, route: Route, expected: list[str]) -> None:
    assert [d.address for d in destinations(domain, route, SELF_RESOLVER, ME)] == expected


@pytest.mark.parametrize(
    ("domain", "route", "why"),
    [
        ("[127.0.0.1]", Route(), "127.0.0.1 is an address of this host"),
        ("[IPv6:::1]", Route(), "::1 is an address of this host"),
        ("named.test", Route(), "MX mx.test is this host"),
        ("byaddr.test", Route(), "MX backup.test is 192.0.2.2"),
        ("tie.test", Route(), "is 192.0.2.2"),  # same preference as ours: not better
        ("local-domain-mx.test", Route(), "MX example.test is this host"),
        ("mx.test", Route(), "MX mx.test is this host"),  # implicit MX named me
        ("anything", Route("127.0.0.1", 25), "relay 127.0.0.1 is 127.0.0.1"),
        ("anything", Route("selfrelay.test", 587), "relay selfrelay.test is 127.0.0.1"),
        ("anything", Route("mx.test", 25), "relay mx.test is this host"),
    ],
)
def test_destinations_that_loop_back(domain: str, route: Route, why: str) -> None:
    if domain == "tie.test":  # equal preferences are shuffled: either order loops
        for _ in range(10):
            with pytest.raises(LoopError):
                destinations(domain, route, SELF_RESOLVER, ME)
        return
    with pytest.raises(LoopError, match=re.escape(why)) as info:
        destinations(domain, route, SELF_RESOLVER, ME)
    assert str(info.value).startswith(f"mail for {domain} loops back to myself")
    assert isinstance(info.value, DnsError) and info.value.permanent


class _PrimaryLookupFails:
    """MX 10 primary.test, 20 mx.test (us); primary.test's address lookup fails."""

    def __init__(self, permanent: bool) -> None:
        self.permanent = permanent

    def mx(self, domain: str) -> list[tuple[int, str]] | None:
        return [(10, "primary.test"), (20, "mx.test")]

    def addresses(self, host: str) -> list[str]:
        if host == "primary.test":
            what = "no such domain (NXDOMAIN)" if self.permanent else "SERVFAIL"
            raise DnsError(f"primary.test: {what}", permanent=self.permanent)
        return ["192.0.2.200"]


def test_a_backup_mx_defers_while_the_primary_cannot_be_looked_up() -> None:
    """A passing DNS fault on the primary must not bounce the mail its backup holds."""
    with pytest.raises(DnsError, match=r"backup MX.*SERVFAIL") as info:
        destinations("backup-of.test", Route(), _PrimaryLookupFails(False), ME)
    assert not isinstance(info.value, LoopError) and not info.value.permanent


def test_a_backup_mx_whose_primary_does_not_exist_is_a_loop() -> None:
    with pytest.raises(LoopError, match=re.escape("MX mx.test is this host")) as info:
        destinations("backup-of.test", Route(), _PrimaryLookupFails(True), ME)
    assert info.value.permanent


def test_greeting_with_my_own_name_is_me() -> None:
    assert ME.greeted_by_me(b"MX.test Hello there\n8BITMIME")
    assert ME.greeted_by_me("mx.test.")
    assert not ME.greeted_by_me(b"example.test hi")  # a local domain is not a host name
    assert not ME.greeted_by_me(b"other.test mx.test")
    assert not ME.greeted_by_me(b"")


# -- what leaves: lines of at most 998 octets, bounded replies -----------------------------


@pytest.mark.parametrize("length", [997, 998, 999, 1996, 5000, 1_048_576])
def test_wire_lines_never_exceed_998_octets(length: int) -> None:
    message = b"Subject: " + b"s" * length + b"\n\n" + b"." + b"b" * length + b"\nshort\n"
    wire = wire_data(message)
    lines = wire.split(b"\r\n")
    assert lines[-1] == b"" and lines[-2] == b"."
    assert max(len(line) for line in lines) <= 998
    # undo: each continuation is CRLF SPACE; the content is intact
    unfolded = wire[: -len(b".\r\n")].replace(b"\r\n ", b"").replace(b"\r\n..", b"\r\n.")
    assert unfolded == message.replace(b"\n", b"\r\n")


@pytest.mark.parametrize("length", [996, 997, 998, 999])
@pytest.mark.parametrize("lead", [b"", b"."])
def test_wire_lines_breaks_exactly_the_lines_too_long_once_dot_stuffed(
    length: int, lead: bytes
) -> None:
    """The shortcut for messages with no long line agrees with the rule at its edge: a
    line of 998 octets stays unless it starts with a dot (999 once stuffed)."""
    line = lead + b"x" * (length - len(lead))
    wire = wire_lines(b"Subject: s\r\n\r\n" + line + b"\r\n")
    broken = length > 998 or (length == 998 and lead == b".")
    assert (line + b"\r\n" not in wire) is broken
    stuffed = [b"." + x if x.startswith(b".") else x for x in wire.split(b"\r\n")]
    assert max(map(len, stuffed)) <= 998


def test_wire_lines_of_a_large_message_allocates_no_copy_per_line() -> None:
    """The shortcut's split makes an object per line (some 14 times a message of 2-octet
    lines); past ``SHORTCUT_MAX`` the regex, which allocates nothing when nothing is
    broken, does the work alone."""
    message = b"ab\r\n" * ((SHORTCUT_MAX + 4) // 4)
    tracemalloc.start()
    try:
        assert wire_lines(message) is message
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(message) // 4, peak


@pytest.fixture
def chatty_server() -> Iterator[int]:
    """An SMTP 'server' whose greeting never ends (continuation lines forever)."""
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = sock.accept()
        with conn:
            try:
                while not stop.is_set():
                    conn.sendall(b"220-" + b"x" * 1000 + b"\r\n")
            except OSError:
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    sock.close()
    thread.join(10)


def test_endless_reply_is_cut_off(chatty_server: int) -> None:
    smtp = SMTPClient("127.0.0.1", "client.test", 10)
    try:
        with pytest.raises(Exception, match=f"reply over {MAX_REPLY} bytes"):
            smtp.connect("127.0.0.1", chatty_server)
    finally:
        smtp.close()


# -- address literals on receipt ------------------------------------------------------------


@pytest.mark.parametrize(
    "rcpt", ["loop@[127.0.0.1]", "x%y@[127.0.0.1]", "loop@[IPv6:::1]", "loop@[192.0.2.2]"]
)
def test_address_literal_recipients_need_relay_rights(tmp_path: Path, rcpt: str) -> None:
    """rcpthosts holds domain names only (a literal there is a control-file error), so a
    literal recipient is relaying: refused to outsiders, and for relay clients remote
    delivery refuses the literals that are ours (test_destinations_that_loop_back)."""
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.test\n")
    (tmp_path / "control" / "rcpthosts").write_text("[127.0.0.1]\n")
    with pytest.raises(config.ConfigError, match="not a valid domain name"):
        config.load(tmp_path)
    (tmp_path / "control" / "rcpthosts").write_text("mx.test\n")
    cfg = config.load(tmp_path)
    outsider = ready(policy(rcpthosts=cfg.rcpthost))
    assert outsider.cmd("MAIL FROM:<x@[127.0.0.1]>").startswith("250")
    assert outsider.cmd(f"RCPT TO:<{rcpt}>").startswith("5")
    relay = ready(policy(rcpthosts=cfg.rcpthost, relay_client=True))
    assert relay.cmd("MAIL FROM:<x@mx.test>").startswith("250")
    reply = relay.cmd(f"RCPT TO:<{rcpt}>")
    assert reply.startswith("553 5.1.3" if "%" in rcpt else "250"), reply  # no %-hack relaying
