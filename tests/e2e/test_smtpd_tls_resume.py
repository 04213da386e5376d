"""TLS session resumption against the real daemon: tickets one worker issued resume on the
other, and still after a HUP (each worker builds a new context then); openssl s_client
resumes too (``-sess_out``/``-sess_in``, "Reused"). And the end of a STARTTLS handshake
after which the server writes nothing (TLS 1.3, a resumed TLS 1.2 session) does not leave
a client with Nagle's algorithm waiting for our delayed ACK."""

from __future__ import annotations

import os
import select
import signal
import socket
import ssl
import time
from pathlib import Path

from tests.conftest import PKI
from tests.e2e.conftest import Daemon, QmailRoot, StartDaemon
from tests.e2e.helpers import RawSMTP, client_context, openssl

TRIES = 40  # connections until the kernel's SO_REUSEPORT hash picks the other worker


def starttls(
    c: RawSMTP, ctx: ssl.SSLContext, resume: ssl.SSLSession | None = None, helo: str = "client.test"
) -> ssl.SSLSocket:
    """Greeting, EHLO, STARTTLS and the handshake (resuming ``resume`` when given) on ``c``;
    the TLS socket, which ``c`` now speaks through."""
    assert c.reply()[0] == 220
    assert c.cmd(f"EHLO {helo}")[0] == 250
    assert c.cmd("STARTTLS")[0] == 220
    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost", session=resume)
    return c.sock


def session(
    d: Daemon, ctx: ssl.SSLContext, resume: ssl.SSLSession | None = None
) -> tuple[bool, ssl.SSLSession | None, int]:
    """One STARTTLS session: (resumed?, the session to resume next, the worker's pid)."""
    with d.connect() as c:
        tls_sock = starttls(c, ctx, resume)
        assert c.cmd("EHLO client.test")[0] == 250  # TLS 1.3 tickets have arrived by now
        resumed, next_session = tls_sock.session_reused, tls_sock.session
        port = tls_sock.getsockname()[1]
        assert c.cmd("QUIT")[0] == 221
    m = d.wait_for(rf"pid=(\d+) conn ip=127\.0\.0\.1 port={port} ")[0]
    return resumed, next_session, int(m.group(1))


def resumed_elsewhere(d: Daemon, ctx: ssl.SSLContext, ticket: ssl.SSLSession, issuer: int) -> int:
    """Resume ``ticket`` until a worker other than ``issuer`` serves it; its pid.
    Every attempt must resume, on whichever worker."""
    for _ in range(TRIES):
        resumed, _, pid = session(d, ctx, ticket)
        assert resumed, f"not resumed on worker {pid} (issuer {issuer})"
        if pid != issuer:
            return pid
    raise AssertionError(f"{TRIES} connections, all on worker {issuer}")


def test_ticket_resumes_on_the_other_worker(smtpd: StartDaemon, pki: PKI) -> None:
    d = smtpd(workers=2)
    ctx = client_context(pki)
    resumed, ticket, issuer = session(d, ctx)
    assert not resumed and ticket is not None and ticket.has_ticket
    other = resumed_elsewhere(d, ctx, ticket, issuer)
    assert {issuer, other} == d.worker_pids()


def test_ticket_resumes_after_hup_on_either_worker(smtpd: StartDaemon, pki: PKI) -> None:
    """HUP: every worker builds a new TLS context; the ticket keys stay the listener's."""
    d = smtpd(workers=2)
    ctx = client_context(pki)
    _, ticket, issuer = session(d, ctx)
    assert ticket is not None
    d.send_signal(signal.SIGHUP)
    d.wait_for(r"pid=\d+ reload ", count=2)
    resumed_elsewhere(d, ctx, ticket, issuer)


def test_tls13_tickets_leave_with_the_first_reply(smtpd: StartDaemon, pki: PKI) -> None:
    """After a TLS 1.3 handshake the client speaks first, and the server's session tickets
    wait for its first reply (one write instead of two): nothing reaches the client's
    socket before its EHLO; with the EHLO's reply come tickets that resume."""
    d = smtpd(workers=1)
    ctx = client_context(pki)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with d.connect() as c:
        tls_sock = starttls(c, ctx)
        assert tls_sock.version() == "TLSv1.3"
        assert select.select([tls_sock], [], [], 0.5)[0] == [], "the server wrote before EHLO"
        assert c.cmd("EHLO client.test")[0] == 250
        ticket = tls_sock.session
        assert c.cmd("QUIT")[0] == 221
    assert ticket is not None and ticket.has_ticket
    assert session(d, ctx, ticket)[0], "the ticket that came with the EHLO reply did not resume"


def ehlo_wait(d: Daemon, ctx: ssl.SSLContext, resume: ssl.SSLSession | None) -> float:
    """Seconds from the EHLO sent right after a STARTTLS handshake to its answer, from a
    client with Nagle's algorithm on (RawSMTP does not set TCP_NODELAY, nor does smtplib)."""
    with d.connect() as c:
        assert c.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        assert starttls(c, ctx, resume).session_reused == (resume is not None)
        start = time.monotonic()
        assert c.cmd("EHLO client.test")[0] == 250
        wait = time.monotonic() - start
        assert c.cmd("QUIT")[0] == 221
    return wait


def test_a_nagle_client_is_not_kept_waiting_after_the_handshake(
    smtpd: StartDaemon, pki: PKI
) -> None:
    """After a TLS 1.3 handshake (the tickets wait for the first reply) and after a resumed
    TLS 1.2 one (the client's Finished comes last) nothing of ours carries the ACK of the
    client's Finished, and a client with Nagle on holds its EHLO until that ACK: Linux
    delays it 40 ms at least. The pump hastens it (TCP_QUICKACK), so the EHLO is answered
    at loopback speed; without that every wait below was 40-44 ms."""
    d = smtpd(workers=1)
    tls13 = client_context(pki)
    tls13.minimum_version = ssl.TLSVersion.TLSv1_3
    tls12 = client_context(pki)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    ticket = session(d, tls12)[1]
    assert ticket is not None
    waits13 = [ehlo_wait(d, tls13, None) for _ in range(5)]
    waits12 = [ehlo_wait(d, tls12, ticket) for _ in range(5)]
    # Without the ACK every wait is 40 ms or more (Linux's shortest delayed ACK); with it
    # a loopback round trip. The fastest of five tells them apart on a loaded machine too.
    assert min(waits13) < 0.030, waits13
    assert min(waits12) < 0.030, waits12


def test_tls12_ticket_resumes(smtpd: StartDaemon, pki: PKI) -> None:
    d = smtpd(workers=2)
    ctx = client_context(pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    _, ticket, issuer = session(d, ctx)
    assert ticket is not None and ticket.has_ticket
    resumed_elsewhere(d, ctx, ticket, issuer)


def test_openssl_s_client_reuses_the_session(smtpd: StartDaemon, pki: PKI, tmp_path: Path) -> None:
    d = smtpd(workers=2)
    sess = tmp_path / "session.pem"
    base = ["s_client", "-starttls", "smtp", "-connect", f"{d.host}:{d.port}"]
    base += ["-CAfile", str(pki.ca_file), "-verify_return_error", "-servername", "localhost"]
    code, out = openssl([*base, "-sess_out", str(sess)], stdin=b"EHLO a.test\r\nQUIT\r\n")
    assert code == 0, out
    assert "New, TLSv1.3" in out
    assert sess.exists()
    code, out = openssl([*base, "-sess_in", str(sess)], stdin=b"EHLO a.test\r\nQUIT\r\n")
    assert code == 0, out
    assert "Reused, TLSv1.3" in out, out


def relays(d: Daemon, ctx: ssl.SSLContext, resume: ssl.SSLSession) -> tuple[bool, int]:
    """Resume, then ask to relay: (resumed?, the RCPT reply code)."""
    with d.connect() as c:
        tls_sock = starttls(c, ctx, resume, helo="relay.test")
        assert c.cmd("EHLO relay.test")[0] == 250
        assert c.cmd("MAIL FROM:<app@relay.test>")[0] == 250
        code = c.cmd("RCPT TO:<someone@elsewhere.test>")[0]
        return tls_sock.session_reused, code


def test_client_certificate_relay_survives_resumption_not_a_new_clientca(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI, tmp_path: Path
) -> None:
    """The resumed session carries the certificate verified at the full handshake, so
    relay by certificate still works; a changed clientca.pem (HUP) forces a full
    handshake, where the certificate is verified against the new file."""
    qmail_root.control("clientca.pem", pki.ca.cert_pem)
    qmail_root.control("tlsclients", "relay.test\n")
    d = smtpd(workers=2)
    ctx = client_context(pki, pki.client, tmp_path)
    _, ticket, _ = session(d, ctx)
    assert ticket is not None
    for _ in range(4):
        assert relays(d, ctx, ticket) == (True, 250)
    qmail_root.control("clientca.pem", pki.ca.cert_pem + pki.other_ca.cert_pem)
    d.send_signal(signal.SIGHUP)
    d.wait_for(r"pid=\d+ reload ", count=2)
    for _ in range(4):
        assert relays(d, ctx, ticket) == (False, 250)


def test_ticket_resumes_on_a_replacement_worker(smtpd: StartDaemon, pki: PKI) -> None:
    """A worker forked later (here: the replacement of a killed one) derives the same keys
    from the supervisor's state."""
    d = smtpd(workers=2)
    ctx = client_context(pki)
    _, ticket, issuer = session(d, ctx)
    assert ticket is not None
    os.kill(issuer, signal.SIGKILL)
    d.wait_for(rf"worker-exit worker={issuer} ")
    d.wait_for(r"pid=\d+ ready", count=3)
    pids: set[int] = set()
    for _ in range(TRIES):
        resumed, _, pid = session(d, ctx, ticket)
        assert resumed, f"not resumed on worker {pid}"
        pids.add(pid)
        if len(pids) == 2:
            break
    assert issuer not in pids and len(pids) == 2
