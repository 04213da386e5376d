"""pyqmail-smtpd with real clients: smtplib over plain, STARTTLS, SMTPS and submission."""

from __future__ import annotations

import signal
import smtplib
import ssl
import time
from pathlib import Path

import pytest

from tests.conftest import PKI
from tests.e2e.conftest import QmailRoot, StartDaemon
from tests.e2e.helpers import MESSAGE, RawSMTP, client_context

USERS = {"alice@mx.test": "correct horse battery", "bob@mx.test": "s3cret-b0b"}


def test_plain_message_lands_in_queue_with_envelope_and_log(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    d = smtpd()
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        code, _ = s.ehlo("client.test")
        assert code == 250
        assert s.has_extn("starttls")
        assert not s.has_extn("auth"), "port-25 style must not offer AUTH by default"
        refused = s.sendmail(
            "sender@remote.test", ["user@example.test", "x@a.sub.example.test"], MESSAGE
        )
        assert refused == {}
    [(env, body)] = qmail_root.queued()
    assert env.sender == "sender@remote.test"
    assert env.recipients == ("user@example.test", "x@a.sub.example.test")
    assert env.meta["client"] == "127.0.0.1"
    assert env.meta["helo"] == "client.test"
    received, rest = body.split(b"\r\n", 1)
    assert received.startswith(b"Received: from client.test (unknown [127.0.0.1])")
    assert b"by mx.test (pyqmail) with ESMTP;" in rest
    assert body.endswith(MESSAGE), "message must be stored un-dot-stuffed with CRLF"
    assert qmail_root.tmp_files() == []
    m = d.wait_for(r"msg qid=(\S+) mid=(\S+) size=(\d+) ip=127\.0\.0\.1 from=(\S+) to=(\S+)")[0]
    assert m.group(1) == env.queue_id
    assert m.group(2) == "<e2e-1@remote.test>"
    assert int(m.group(3)) == env.size == len(body)
    assert m.group(4) == "<sender@remote.test>"
    assert m.group(5) == "<user@example.test>,<x@a.sub.example.test>"
    d.wait_for(r"conn ip=127\.0\.0\.1 port=\d+ secs=[\d.]+ msgs=1")


@pytest.mark.parametrize(
    ("rcpt", "code"),
    [
        ("user@example.test", 250),
        ("USER@Example.TEST", 250),
        ("x@deep.a.sub.example.test", 250),
        ("x@sub.example.test", 553),  # ".sub.example.test" covers subdomains only (qmail)
        ("x@elsewhere.test", 553),
        ("x%elsewhere.test@example.test", 553),
        ("elsewhere.test!x@example.test", 553),
        ("@elsewhere.test:x@example.test", 250),  # source route ignored: local address
        ('"x@elsewhere.test"@example.test', 553),  # quoted local parts refused
        ("x@[127.0.0.1]", 553),
    ],
)
def test_relay_rules_without_relay_rights(smtpd: StartDaemon, rcpt: str, code: int) -> None:
    d = smtpd()
    c = d.connect()
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<s@remote.test>")[0] == 250
    got, lines = c.cmd(f"RCPT TO:<{rcpt}>")
    assert got == code, lines
    if code == 553:
        assert lines[0].startswith("553 5.")
    c.close()


def test_starttls_then_message_records_tls(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    d = smtpd()
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.ehlo("client.test")
        code, _ = s.starttls(context=client_context(pki))
        assert code == 220
        s.ehlo("client.test")
        assert not s.has_extn("starttls"), "STARTTLS must not be offered inside TLS"
        assert isinstance(s.sock, ssl.SSLSocket)
        version = s.sock.version()
        s.sendmail("sender@remote.test", ["user@example.test"], MESSAGE)
    [(env, body)] = qmail_root.queued()
    head = body.split(b"\r\n\r\n", 1)[0].decode()
    assert "with ESMTPS;" in head
    assert version is not None and version in head
    assert env.meta["tls"].startswith(f"{version}:")
    d.wait_for(rf"msg qid=\S+ .* tls={version}:\S+:\d+")


def test_smtps_auth_relays_and_logs_user(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    qmail_root.users(USERS)
    d = smtpd(mode="smtps")
    with smtplib.SMTP_SSL(d.host, d.port, timeout=10, context=client_context(pki)) as s:
        s.ehlo("laptop.test")
        assert not s.has_extn("starttls")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        s.login("alice@mx.test", USERS["alice@mx.test"])
        s.sendmail("alice@mx.test", ["friend@elsewhere.test"], MESSAGE)
    [(env, body)] = qmail_root.queued()
    assert env.recipients == ("friend@elsewhere.test",)
    assert env.meta["auth"] == "alice@mx.test"
    head = body.split(b"\r\n\r\n", 1)[0].decode()
    assert "authenticated user" not in head  # control/authheader is off by default
    assert "with ESMTPSA;" in head
    assert "TLSv1.3" in head
    d.wait_for(r"msg qid=\S+ .* auth=alice@mx\.test from=<alice@mx\.test> to=<friend@")


def test_submission_forces_tls_before_auth_and_mail(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    qmail_root.users(USERS)
    d = smtpd(mode="submission")
    c = d.connect()
    assert c.reply()[0] == 220
    code, lines = c.cmd("EHLO laptop.test")
    assert code == 250
    assert "250-STARTTLS" in lines
    assert not any("AUTH" in line for line in lines), "AUTH offered before STARTTLS"
    code, lines = c.cmd("AUTH PLAIN AGFsaWNlQG14LnRlc3QAeA==")
    assert code in (503, 530, 538), lines
    code, lines = c.cmd("MAIL FROM:<alice@mx.test>")
    assert code == 530, lines
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls(client_context(pki))
    code, lines = c.cmd("EHLO laptop.test")
    assert any(line[4:].startswith("AUTH PLAIN LOGIN") for line in lines), lines
    code, lines = c.cmd("MAIL FROM:<alice@mx.test>")
    assert code == 530, "submission must require AUTH before MAIL"
    c.close()
    assert qmail_root.queued() == []


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_submission_auth_mechanisms(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI, mechanism: str
) -> None:
    qmail_root.users(USERS, cram=("bob@mx.test",))
    d = smtpd(mode="submission")
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.starttls(context=client_context(pki))
        s.ehlo("laptop.test")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN", "CRAM-MD5"]
        s.user, s.password = "bob@mx.test", USERS["bob@mx.test"]
        auth = {"PLAIN": s.auth_plain, "LOGIN": s.auth_login, "CRAM-MD5": s.auth_cram_md5}
        code, _ = s.auth(mechanism, auth[mechanism], initial_response_ok=mechanism == "PLAIN")
        assert code == 235
        s.sendmail("bob@mx.test", ["x@elsewhere.test"], MESSAGE)
    [(env, _)] = qmail_root.queued()
    assert env.meta["auth"] == "bob@mx.test"


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("alice@mx.test", "wrong"),
        ("nobody@mx.test", "correct horse battery"),
        ("ALICE@mx.test", "x"),
    ],
)
def test_bad_credentials_same_535_and_no_relay(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI, user: str, password: str
) -> None:
    qmail_root.users(USERS)
    d = smtpd(mode="smtps")
    with smtplib.SMTP_SSL(d.host, d.port, timeout=10, context=client_context(pki)) as s:
        s.ehlo("laptop.test")
        s.user, s.password = user, password
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            s.auth("PLAIN", s.auth_plain)
        assert err.value.smtp_code == 535
        assert err.value.smtp_error.startswith(b"5.7.8")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:  # 465 is submission
            s.sendmail("alice@mx.test", ["x@elsewhere.test"], MESSAGE)
        assert refused.value.smtp_code == 530
    assert qmail_root.queued() == []


def test_cram_md5_not_offered_without_cram_users(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    qmail_root.users(USERS)
    d = smtpd(mode="smtps")
    ctx = ssl.create_default_context(cafile=str(qmail_root.pki.ca_file))
    with smtplib.SMTP_SSL(d.host, d.port, timeout=10, context=ctx) as s:
        s.ehlo("laptop.test")
        assert "CRAM-MD5" not in s.esmtp_features["auth"]


@pytest.mark.parametrize(
    "listing",
    [("relay.test\n", True), ("RELAY.test\n", True), ("someone-else.test\n", False)],
)
def test_client_certificate_relay(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI, tmp_path: Path, listing: tuple[str, bool]
) -> None:
    listed, relays = listing
    qmail_root.control("clientca.pem", pki.ca.cert_pem)
    qmail_root.control("tlsclients", listed)
    d = smtpd()
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.starttls(context=client_context(pki, pki.client, tmp_path))
        s.ehlo("relay.test")
        s.mail("app@relay.test")
        code, _ = s.rcpt("someone@elsewhere.test")
        assert code == (250 if relays else 553)


def test_rogue_client_certificate_is_refused(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI, tmp_path: Path
) -> None:
    qmail_root.control("clientca.pem", pki.ca.cert_pem)
    qmail_root.control("tlsclients", "relay.test\n")
    d = smtpd()
    s = smtplib.SMTP(d.host, d.port, timeout=10)
    s.ehlo("relay.test")
    with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
        s.starttls(context=client_context(pki, pki.rogue_client, tmp_path))
        # TLS 1.3: the client learns of the rejected certificate at its next read
        s.ehlo("relay.test")
        s.sendmail("app@relay.test", ["someone@elsewhere.test"], MESSAGE)
    s.close()
    d.wait_for(r"tls-fail ip=127\.0\.0\.1")
    assert qmail_root.queued() == []


def test_starttls_injection_is_never_executed(smtpd: StartDaemon, pki: PKI) -> None:
    """CVE-2011-0411 class: commands pipelined behind STARTTLS die with the plaintext."""
    d = smtpd()
    c = d.connect()
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@remote.test>\r\n")
    code, lines = c.reply()
    assert code == 220, lines
    assert c.nothing_pending(0.5), f"plaintext reply after STARTTLS: {c.buf!r}"
    c.starttls(client_context(pki))
    # after TLS: state was reset, the injected MAIL was never run
    assert c.nothing_pending(0.5), f"a reply to injected input arrived: {c.buf!r}"
    code, lines = c.cmd("RCPT TO:<user@example.test>")
    assert code == 503, f"injected MAIL FROM survived the handshake: {lines}"
    code, lines = c.cmd("NOOP")
    assert code == 250, lines
    assert c.nothing_pending(0.3)
    c.close()


def test_starttls_refused_inside_tls_and_with_argument(smtpd: StartDaemon, pki: PKI) -> None:
    d = smtpd()
    c = d.connect()
    c.reply()
    c.cmd("EHLO client.test")
    code, _ = c.cmd("STARTTLS now")
    assert code == 501
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls(client_context(pki))
    c.cmd("EHLO client.test")
    code, _ = c.cmd("STARTTLS")
    assert code in (503, 554)
    c.close()


@pytest.mark.parametrize("mode", ["starttls", "smtps"])
def test_close_notify_from_the_client_ends_the_session(
    smtpd: StartDaemon, pki: PKI, mode: str
) -> None:
    """A client that says goodbye in TLS (close_notify) but keeps its TCP connection
    open: the server answers with its own close_notify and closes at once, not at the
    idle timeout (``control/timeoutsmtpd``, 300 s by default)."""
    d = smtpd(mode="smtp" if mode == "starttls" else "smtps")
    c = d.connect()
    if mode == "starttls":
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("STARTTLS")[0] == 220
        c.starttls(client_context(pki))
    else:
        c.starttls(client_context(pki))
        assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    tls_sock = c.sock
    assert isinstance(tls_sock, ssl.SSLSocket)
    tls_sock.settimeout(5)
    c.sock = tls_sock.unwrap()  # our close_notify, then the server's (TimeoutError without)
    assert c.is_closed(5), "the server kept the connection open"
    c.close()


@pytest.mark.parametrize("lines", [10, 900, 5000])  # in memory, around, beyond SPOOL_LIMIT
def test_message_sizes_are_stored_byte_exact(
    qmail_root: QmailRoot, smtpd: StartDaemon, lines: int
) -> None:
    d = smtpd()
    body = b"Subject: size\r\n\r\n" + b"".join(
        b"%06d " % i + b"." * (i % 70) + b"\r\n" for i in range(lines)
    )
    with smtplib.SMTP(d.host, d.port, timeout=20) as s:
        s.sendmail("s@remote.test", ["user@example.test"], body)
    [(env, stored)] = qmail_root.queued()
    assert stored.endswith(body)
    assert env.size == len(stored)
    assert qmail_root.tmp_files() == []


def test_auth_failures_slow_down_across_sessions(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    qmail_root.users(USERS)
    d = smtpd(mode="smtps")
    took = []
    for _ in range(2):
        with smtplib.SMTP_SSL(d.host, d.port, timeout=10, context=client_context(pki)) as s:
            s.ehlo("guesser.test")
            t0 = time.monotonic()
            s.user, s.password = "alice@mx.test", "guess"
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.auth("PLAIN", s.auth_plain)
            took.append(time.monotonic() - t0)
    assert took[0] >= 0.9
    assert took[1] >= 1.9, f"second failure from the same client answered after {took[1]:.2f}s"
    d.wait_for(
        r"auth-fail ip=127\.0\.0\.1 port=\d+ mech=PLAIN user=alice@mx\.test reason=password delay=2"
    )


def test_plaintext_sent_after_starttls_in_a_later_packet_is_not_executed(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """The variant where the injected bytes miss the STARTTLS read: they can only ever be
    taken as (broken) handshake bytes, never as a command."""
    d = smtpd()
    c = d.connect()
    c.reply()
    c.cmd("EHLO client.test")
    c.send(b"STARTTLS\r\n")
    time.sleep(0.2)
    c.send(b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n")
    code, _ = c.reply()
    assert code == 220
    # the server took the plaintext as a ClientHello, failed the handshake and hung up
    assert c.is_closed(5)
    assert c.buf == b"" or c.buf.startswith(b"\x15\x03"), f"not a TLS alert: {c.buf!r}"
    d.wait_for(r"tls-fail ip=127\.0\.0\.1")
    assert qmail_root.queued() == []


def test_user_changes_apply_without_restart(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    qmail_root.users({"alice@mx.test": "first-password"})
    d = smtpd(mode="smtps")

    def auth(user: str, password: str) -> int:
        with smtplib.SMTP_SSL(d.host, d.port, timeout=10, context=client_context(pki)) as s:
            s.ehlo("laptop.test")
            s.user, s.password = user, password
            try:
                return s.auth("PLAIN", s.auth_plain)[0]
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code

    assert auth("alice@mx.test", "first-password") == 235
    qmail_root.users({"alice@mx.test": "second-password", "carol@mx.test": "carol-pw"})
    assert auth("carol@mx.test", "carol-pw") == 235, "a new user must work at once"
    assert auth("alice@mx.test", "first-password") == 535, "an old password must stop working"
    qmail_root.control("smtpusers", "carol@mx.test:broken\n", 0o640)
    assert auth("carol@mx.test", "carol-pw") == 235, "a broken file keeps the users before"
    d.wait_for(r"warning text=.*smtpusers.*keeping\\x20the\\x20users")
    qmail_root.remove_control("smtpusers")
    assert auth("carol@mx.test", "carol-pw") == 535, "no file, no users"


def _up_to_data(c: RawSMTP, sender: str) -> None:
    """MAIL from ``sender``, RCPT to user@example.test and DATA, each accepted."""
    assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    assert c.cmd("RCPT TO:<user@example.test>")[0] == 250
    assert c.cmd("DATA")[0] == 354


def test_commands_pipelined_behind_the_end_of_data_are_answered_after_the_commit(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """RFC 2920: the message may be followed in the same packet by the next transaction;
    what arrives while the commit is on disk is held and answered in order after the 250."""
    d = smtpd()
    c = d.connect()
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    _up_to_data(c, "s@remote.test")
    second = b"MAIL FROM:<t@remote.test>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n"
    c.send(b"Subject: one\r\n\r\nfirst\r\n.\r\n" + second)
    codes = [c.reply()[0] for _ in range(4)]
    assert codes == [250, 250, 250, 354]
    c.send(b"Subject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
    assert c.reply()[0] == 250
    assert c.reply()[0] == 221
    c.close()
    assert sorted(env.sender for env, _ in qmail_root.queued()) == [
        "s@remote.test",
        "t@remote.test",
    ]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
def test_pipelined_mail_rcpt_data_are_answered_in_one_segment(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI, tls: bool
) -> None:
    """RFC 2920 as MTAs use it: MAIL, RCPT and DATA in one packet get their three replies
    in one write (one TCP segment on loopback, counted by the client's kernel), not one
    write per reply; the message is then taken as usual."""
    d = smtpd()
    c = d.connect()
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    if tls:
        assert c.cmd("STARTTLS")[0] == 220
        c.starttls(client_context(pki))
        assert c.cmd("EHLO client.test")[0] == 250
    before = c.data_segments_in()
    c.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n")
    assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
    assert c.data_segments_in() - before == 1, "three replies, three writes"
    c.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\n")
    assert c.reply()[0] == 250
    assert c.cmd("QUIT")[0] == 221
    c.close()
    assert [env.sender for env, _ in qmail_root.queued()] == ["s@remote.test"]


def _timed_message(c: RawSMTP, n: int) -> float:
    """Seconds from the end of the message to its 250."""
    _up_to_data(c, f"s{n}@remote.test")
    started = time.monotonic()
    c.send(b"Subject: timed\r\n\r\nbody\r\n.\r\n")
    code, _ = c.reply()
    assert code == 250
    return time.monotonic() - started


def test_commitdelay_waits_only_while_another_session_could_join(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """control/commitdelay: a message waits for company only while another session of the
    worker is not itself waiting for a commit, and never longer than the delay."""
    qmail_root.control("commitdelay", "1000\n")
    d = smtpd()
    lone = d.connect()
    assert lone.reply()[0] == 220
    assert lone.cmd("EHLO client.test")[0] == 250
    assert _timed_message(lone, 1) < 0.9, "a lone message must not wait"
    other = d.connect()  # connected, in no transaction: it could send a message any time
    assert other.reply()[0] == 220
    assert other.cmd("EHLO other.test")[0] == 250
    waited = _timed_message(lone, 2)
    assert 0.95 <= waited < 10
    # The other session leaves while a message waits for it: the wait ends there.
    assert lone.cmd("MAIL FROM:<s3@remote.test>")[0] == 250
    assert lone.cmd("RCPT TO:<user@example.test>")[0] == 250
    assert lone.cmd("DATA")[0] == 354
    started = time.monotonic()
    lone.send(b"Subject: timed\r\n\r\nbody\r\n.\r\n")
    time.sleep(0.2)
    other.cmd("QUIT")
    other.close()
    assert lone.reply()[0] == 250
    assert time.monotonic() - started < 0.9, "the session that left was still waited for"
    d.wait_for(r"conn ip=127\.0\.0\.1 port=\d+ secs=[\d.]+ msgs=0")
    assert _timed_message(lone, 4) < 0.9, "alone again: no wait"
    qmail_root.control("commitdelay", "0\n")  # HUP applies it to the running worker
    d.send_signal(signal.SIGHUP)
    d.wait_for(r"pid=\d+ reload ", count=1)
    other = d.connect()
    assert other.reply()[0] == 220
    assert _timed_message(lone, 5) < 0.9, "commitdelay 0: never wait"
    assert len(qmail_root.queued()) == 5


def test_a_session_gone_with_its_message_in_commit_no_longer_counts_as_waiting(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """A client that hangs up right after its end of data leaves its message with the group
    commit. It is not a session waiting for that commit any more: the batch goes on
    waiting for the session still in a transaction (counted as waiting, it made the
    batch go at once, on the loop, while that session was mid-transaction)."""
    qmail_root.control("commitdelay", "1000\n")
    d = smtpd()
    busy = d.connect()
    assert busy.reply()[0] == 220
    assert busy.cmd("EHLO busy.test")[0] == 250
    assert busy.cmd("MAIL FROM:<busy@remote.test>")[0] == 250
    gone = d.connect()
    assert gone.reply()[0] == 220
    assert gone.cmd("EHLO gone.test")[0] == 250
    _up_to_data(gone, "gone@remote.test")
    gone.send(b"Subject: gone\r\n\r\nbody\r\n.\r\n")
    gone.close()
    d.wait_for(r"conn ip=127\.0\.0\.1 port=\d+ secs=[\d.]+ msgs=\d+")
    time.sleep(0.3)  # the batch's wait (1 s from the message) is not over
    assert qmail_root.queued() == [], "committed while a session was mid-transaction"
    assert busy.cmd("RCPT TO:<user@example.test>")[0] == 250
    assert busy.cmd("DATA")[0] == 354
    busy.send(b"Subject: busy\r\n\r\nbody\r\n.\r\n")
    assert busy.reply()[0] == 250
    assert sorted(env.sender for env, _ in qmail_root.queued()) == [
        "busy@remote.test",
        "gone@remote.test",
    ]


def test_a_message_received_with_smtputf8_is_marked_for_remote_delivery(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """Its header may hold UTF-8 (RFC 6531): queued with smtputf8=client, which remote
    delivery reads (``send.remote.needs_smtputf8``); without the parameter, no mark."""
    d = smtpd()
    utf8 = "Subject: Grüße\r\n\r\nbody\r\n".encode()
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.ehlo("client.test")
        assert s.has_extn("smtputf8")
        s.sendmail("sender@remote.test", ["user@example.test"], utf8, mail_options=["SMTPUTF8"])
        s.sendmail("sender@remote.test", ["user@example.test"], MESSAGE)
    marks = sorted(env.meta.get("smtputf8", "-") for env, _ in qmail_root.queued())
    assert marks == ["-", "client"]
