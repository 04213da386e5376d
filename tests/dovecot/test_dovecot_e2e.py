"""IMAP and POP3 through a real Dovecot over pyqmail's Maildirs and users, end to end.

Mail is submitted on the submission port of a real pyqmail-smtpd (STARTTLS, AUTH with the
same login and password), delivered by a real pyqmail-send into the mailbox, and read back
with Python's imaplib and poplib over TLS, all on 127.0.0.1.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import ssl
import time
import warnings

import pytest

from tests.conftest import PKI
from tests.dovecot.conftest import (
    CLIENT_IP,
    DOMAIN,
    IMAP,
    IMAPS,
    POP3,
    Clients,
    MailHost,
    StartDovecot,
    os_owner,
    wait_for,
)
from tests.e2e.conftest import DROP_USER, StartDaemon

PASSWORD = "correct horse battery staple"


def submit(port: int, ctx: ssl.SSLContext, login: str, password: str, subject: str) -> None:
    """One message on submission: STARTTLS, AUTH, to the mailbox itself."""
    body = f"From: {login}\r\nTo: {login}\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.starttls(context=ctx)
        s.login(login, password)
        s.sendmail(login, [login], body.encode())


def deliver(mailhost: MailHost, smtpd: StartDaemon, ctx: ssl.SSLContext, login: str) -> str:
    """Submit one message on 587-style submission and wait until it is in Maildir/new."""
    d = smtpd(mode="submission")
    before = len(mailhost.new_mail("alice"))
    subject = f"delivered by pyqmail {time.monotonic_ns()}"
    submit(d.port, ctx, login, PASSWORD, subject)
    wait_for(lambda: len(mailhost.new_mail("alice")) > before, 30, "delivery into Maildir/new")
    return subject


def test_submitted_mail_is_read_over_imaps_and_pop3s(
    mailhost: MailHost,
    smtpd: StartDaemon,
    dovecot: StartDovecot,
    ctx: ssl.SSLContext,
    clients: Clients,
) -> None:
    login = mailhost.add("alice", PASSWORD)
    mailhost.start_send()
    dc = dovecot()
    subject = deliver(mailhost, smtpd, ctx, login)
    with clients.imaps(dc.ports["imaps"]) as m:
        m.login(login, PASSWORD)
        typ, data = m.select("INBOX")
        assert typ == "OK" and int(data[0] or b"0") == 1
        typ, fetched = m.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK"
        raw = fetched[0][1] if isinstance(fetched[0], tuple) else b""
        assert f"Subject: {subject}".encode() in raw
        assert b"body of" in raw
        typ, boxes = m.list()
        names = b" ".join(x for x in boxes if isinstance(x, bytes))
        for special in (b"\\Sent", b"\\Junk", b"\\Trash"):
            assert special in names
    pop = clients.pop3s(dc.ports["pop3s"])
    pop.user(login)
    pop.pass_(PASSWORD)
    count, _ = pop.stat()
    assert count == 1
    lines = pop.retr(1)[1]
    assert f"Subject: {subject}".encode() in lines
    pop.quit()
    # Dovecot worked as the delivery user: what it created has the Maildir's owner and modes.
    maildir = mailhost.home("alice") / "Maildir"
    for path in [maildir / "cur", *maildir.glob("dovecot*"), *(maildir / "cur").iterdir()]:
        user, _group, mode = os_owner(path)
        assert user == DROP_USER, path
        # Nothing readable by others, except Dovecot's empty uidvalidity marker (0444).
        assert mode & 0o077 == 0 or path.stat().st_size == 0, f"{path} mode {mode:o}"
        assert mode & 0o022 == 0, f"{path} mode {mode:o}"


def test_imap_143_refuses_login_before_starttls(
    mailhost: MailHost, dovecot: StartDovecot, ctx: ssl.SSLContext
) -> None:
    login = mailhost.add("alice", PASSWORD)
    dc = dovecot()
    m = IMAP("127.0.0.1", dc.ports["imap"], timeout=20)
    try:
        assert "LOGINDISABLED" in m.capabilities
        assert "STARTTLS" in m.capabilities
        with pytest.raises(imaplib.IMAP4.error, match=r"(?i)plaintext|disabled|ssl|tls"):
            m.login(login, PASSWORD)
        # Even AUTHENTICATE PLAIN is refused in clear.
        with pytest.raises(imaplib.IMAP4.error):
            m.authenticate("PLAIN", lambda _: f"\0{login}\0{PASSWORD}".encode())
        m.starttls(ssl_context=ctx)
        assert "LOGINDISABLED" not in m.capabilities
        typ, _ = m.login(login, PASSWORD)
        assert typ == "OK"
    finally:
        m.logout()


def test_pop3_110_refuses_user_before_stls(
    mailhost: MailHost, dovecot: StartDovecot, ctx: ssl.SSLContext
) -> None:
    login = mailhost.add("alice", PASSWORD)
    dc = dovecot()
    pop = POP3("127.0.0.1", dc.ports["pop3"], timeout=20)
    try:
        assert "STLS" in pop.capa()
        with pytest.raises(poplib.error_proto):
            pop.user(login)
            pop.pass_(PASSWORD)
        pop.stls(context=ctx)
        pop.user(login)
        assert pop.pass_(PASSWORD).startswith(b"+OK")
    finally:
        pop.quit()


def refused(answer: str) -> bool:
    """Whether LOGIN was answered as a failed authentication (wrong password, no such login)."""
    return "AUTHENTICATIONFAILED" in answer or "failed" in answer.lower()


def test_wrong_password_changed_password_and_removed_mailbox_are_refused(
    mailhost: MailHost, dovecot: StartDovecot, clients: Clients
) -> None:
    login = mailhost.add("alice", PASSWORD)
    other = mailhost.add("bob", "bobs password")
    dc = dovecot(dovecot_failure_delay=0)
    port = dc.ports["imaps"]
    assert refused(clients.imap_login(port, login, "wrong"))
    assert refused(clients.imap_login(port, f"nobody@{DOMAIN}", PASSWORD))
    assert refused(clients.imap_login(port, other, PASSWORD))  # another account's password
    assert clients.imap_login(port, login, PASSWORD) == "OK"
    # A new password counts at the next login (nothing is cached).
    mailhost.password(login, "new secret")
    assert refused(clients.imap_login(port, login, PASSWORD))
    assert clients.imap_login(port, login, "new secret") == "OK"
    # A removed mailbox cannot log in any more, over IMAP or POP3.
    mailhost.remove("alice")
    assert refused(clients.imap_login(port, login, "new secret"))
    pop = clients.pop3s(dc.ports["pop3s"])
    pop.user(login)
    with pytest.raises(poplib.error_proto):
        pop.pass_("new secret")
    assert clients.imap_login(port, other, "bobs password") == "OK"


def test_failed_logins_are_delayed_per_client(
    mailhost: MailHost, dovecot: StartDovecot, clients: Clients
) -> None:
    login = mailhost.add("alice", PASSWORD)
    # Dovecot checks its delayed failures every 500 ms against a clock of whole seconds
    # (ioloop_time): with auth_failure_delay N the answer comes after more than N - 1 s.
    dc = dovecot(dovecot_failure_delay=2)
    started = time.monotonic()
    assert refused(clients.imap_login(dc.ports["imaps"], login, "wrong"))
    assert time.monotonic() - started >= 1.0, "a failed login answered without the delay"
    # The right password still works from that client (after Dovecot's per-IP penalty).
    assert clients.imap_login(dc.ports["imaps"], login, PASSWORD) == "OK"


def test_flags_set_over_imap_survive_a_new_delivery(
    mailhost: MailHost,
    smtpd: StartDaemon,
    dovecot: StartDovecot,
    ctx: ssl.SSLContext,
    clients: Clients,
) -> None:
    login = mailhost.add("alice", PASSWORD)
    mailhost.start_send()
    dc = dovecot()
    first = deliver(mailhost, smtpd, ctx, login)
    with clients.imaps(dc.ports["imaps"]) as m:
        m.login(login, PASSWORD)
        m.select("INBOX")
        assert m.store("1", "+FLAGS", "(\\Seen \\Flagged)")[0] == "OK"
        m.logout()
    second = deliver(mailhost, smtpd, ctx, login)
    with clients.imaps(dc.ports["imaps"]) as m:
        m.login(login, PASSWORD)
        typ, data = m.select("INBOX")
        assert int(data[0] or b"0") == 2
        typ, fetched = m.fetch("1:2", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK"
        by_subject = {}
        for item in fetched:
            if isinstance(item, tuple):
                by_subject[item[1].decode().strip()] = item[0].decode()
        assert "\\Seen" in by_subject[f"Subject: {first}"]
        assert "\\Flagged" in by_subject[f"Subject: {first}"]
        assert "\\Seen" not in by_subject[f"Subject: {second}"]
        assert m.search(None, "UNSEEN")[1][0] == b"2"


def test_tls_profile_is_the_smtp_one(mailhost: MailHost, dovecot: StartDovecot, pki: PKI) -> None:
    mailhost.add("alice", PASSWORD)
    dc = dovecot()
    for port in (dc.ports["imaps"], dc.ports["pop3s"]):
        old = ssl.create_default_context(cafile=str(pki.ca_file))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the point: an old version
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
        with (
            pytest.raises((ssl.SSLError, OSError)),
            IMAPS("127.0.0.1", port, ssl_context=old, timeout=10),
        ):
            pass
        cbc = ssl.create_default_context(cafile=str(pki.ca_file))
        cbc.maximum_version = ssl.TLSVersion.TLSv1_2
        cbc.set_ciphers("ECDHE+AES128+SHA:ECDHE+AES256+SHA:AES128-SHA256")
        with (
            pytest.raises((ssl.SSLError, OSError)),
            IMAPS("127.0.0.1", port, ssl_context=cbc, timeout=10),
        ):
            pass
        good = ssl.create_default_context(cafile=str(pki.ca_file))
        good.maximum_version = ssl.TLSVersion.TLSv1_2
        with socket_tls(port, good) as tls:
            cipher = tls.cipher()
            assert cipher is not None and ("GCM" in cipher[0] or "CHACHA20" in cipher[0])
            assert tls.version() == "TLSv1.2"


def socket_tls(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), 10, (CLIENT_IP, 0))
    return ctx.wrap_socket(raw, server_hostname="localhost")


def test_renewed_certificate_is_served_after_a_reload(
    mailhost: MailHost, dovecot: StartDovecot, pki: PKI
) -> None:
    mailhost.add("alice", PASSWORD)
    dc = dovecot()
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    with socket_tls(dc.ports["imaps"], ctx) as tls:
        before = tls.getpeercert(binary_form=True)
    renewed = pki.ca.issue(["localhost", "mx.test"])
    mailhost.qroot.servercert(renewed)
    dc.reload()

    def serves_new() -> bool:
        try:
            with socket_tls(dc.ports["imaps"], ctx) as tls:
                return tls.getpeercert(binary_form=True) != before
        except OSError:
            return False

    wait_for(serves_new, 20, "the renewed certificate on IMAPS after SIGHUP")
