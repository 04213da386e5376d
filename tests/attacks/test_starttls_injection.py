"""STARTTLS plaintext injection (CVE-2011-0411, CVE-2024-34083) against the running daemon.

Payloads an attacker on the path would inject (MAIL/RCPT, AUTH with a valid password, EHLO,
RSET, QUIT, a second STARTTLS, half a line) are delivered four ways:

- ``same``: in the same packet as ``STARTTLS``;
- ``pipelined``: as separate packets right after ``STARTTLS``, before its reply is read;
- ``split``: half in the STARTTLS packet, half in a later packet, before the reply is read;
- ``pre_handshake``: after the ``220``, as plaintext where the ClientHello should be.

Invariant: nothing injected is ever executed. After a good handshake no reply to injected
input arrives, the envelope is empty (``RCPT`` gets 503), the client is not authenticated
(``MAIL`` gets 530 in submission), and the session works normally. ``pre_handshake`` bytes
are taken as a broken handshake: the connection is dropped. Nothing reaches the queue.
"""

from __future__ import annotations

import base64
import contextlib
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.attacks.tally import tried
from tests.attacks.wire import Wire
from tests.conftest import PKI
from tests.e2e.conftest import QmailRoot, StartDaemon
from tests.e2e.helpers import client_context

USER, PASSWORD = "alice@mx.test", "correct horse battery"
PLAIN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
PAYLOADS = {
    "mail": b"MAIL FROM:<evil@remote.test>\r\n",
    "envelope": b"RSET\r\nMAIL FROM:<evil@remote.test>\r\nRCPT TO:<u@example.test>\r\n",
    "auth": b"AUTH PLAIN " + PLAIN + b"\r\n",
    "auth-login": b"AUTH LOGIN\r\n"
    + base64.b64encode(USER.encode())
    + b"\r\n"
    + base64.b64encode(PASSWORD.encode())
    + b"\r\n",
    "ehlo": b"EHLO evil.test\r\n",
    "quit": b"QUIT\r\n",
    "starttls": b"STARTTLS\r\n",
    "half-line": b"MAIL FROM:<evil@remote.test>",
    "data": b"MAIL FROM:<e@remote.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\nSubject: x\r\n\r\n"
    b"injected\r\n.\r\n",
}
METHODS = ("same", "pipelined", "split", "pre_handshake")
VERBS = ("STARTTLS", "starttls", "StartTls")


@pytest.fixture
def daemons(qmail_root: QmailRoot, smtpd: StartDaemon) -> dict[str, int]:
    qmail_root.users({USER: PASSWORD})
    return {mode: smtpd(mode=mode).port for mode in ("smtp", "submission")}


def attempt(case: tuple[int, str, str, str, bytes], pki: PKI) -> None:
    port, mode, method, verb, payload = case
    where = f"mode={mode} method={method} verb={verb} payload={payload[:40]!r}"
    with Wire(port) as w:
        assert w.reply()[0] == 220
        assert w.cmd("EHLO client.test")[0] == 250
        start = verb.encode() + b"\r\n"
        try:
            if method == "same":
                w.send(start + payload)
            elif method == "pipelined":
                w.send(start)
                for line in payload.splitlines(keepends=True):
                    w.send(line)
            elif method == "split":
                cut = max(1, len(payload) // 2)
                w.send(start + payload[:cut])
                time.sleep(0.02)
                w.send(payload[cut:])
            else:
                w.send(start)
        except (BrokenPipeError, ConnectionResetError):
            # The server read the first injected packet as a broken ClientHello and hung up
            # before the next one was sent: dropped, and whatever reply is left is the 220.
            assert method in ("pipelined", "split"), f"{where}: dropped before the 220"
            with contextlib.suppress(OSError):
                assert w.reply()[0] in (0, 220), f"{where}: plaintext reply: {w.buf!r}"
            return
        code, text = w.reply()
        assert code == 220, f"{where}: STARTTLS answered {text!r}"
        time.sleep(0.05)
        if not w.quiet(0.1):
            # Bytes that arrived after the server's read of STARTTLS are handshake bytes:
            # a broken handshake, dropped - never a plaintext reply.
            assert not w.buf, f"{where}: plaintext reply after STARTTLS: {w.buf!r}"
            assert method in ("pipelined", "split"), f"{where}: dropped after 220"
            return
        if method == "pre_handshake":
            w.send(payload)
            with pytest.raises((ssl.SSLError, OSError)):
                w.starttls(client_context(pki))
                w.cmd("EHLO client.test")
            return
        try:
            w.starttls(client_context(pki))
        except (ssl.SSLError, OSError):
            # the later packet was still in the socket: taken as a broken ClientHello
            assert method in ("pipelined", "split"), f"{where}: handshake failed"
            return
        assert w.quiet(0.15), f"{where}: reply to injected input after the handshake: {w.buf!r}"
        code, text = w.cmd("EHLO client.test")
        assert code == 250, f"{where}: EHLO after TLS: {text}"
        assert w.quiet(0.05), f"{where}: extra replies after EHLO: {w.buf!r}"
        code, text = w.cmd("RCPT TO:<u@example.test>")
        assert code == 503, f"{where}: injected MAIL FROM survived the handshake: {text}"
        if mode == "submission":
            code, text = w.cmd("MAIL FROM:<alice@mx.test>")
            assert code == 530, f"{where}: injected AUTH survived the handshake: {text}"
        assert w.cmd("QUIT")[0] == 221


@pytest.mark.parametrize("method", METHODS)
def test_injected_plaintext_is_never_executed(
    daemons: dict[str, int], qmail_root: QmailRoot, pki: PKI, method: str
) -> None:
    cases = [
        (port, mode, method, verb, payload)
        for mode, port in daemons.items()
        for name, payload in PAYLOADS.items()
        for verb in (VERBS if name in ("mail", "auth") else VERBS[:1])
    ]
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda case: attempt(case, pki), cases))
    tried("starttls-injection", len(cases))
    assert qmail_root.queued() == [], "an injected message reached the queue"


def test_injection_then_legitimate_auth_still_works(daemons: dict[str, int], pki: PKI) -> None:
    """The discard is exact: after the handshake the real client's own AUTH succeeds."""
    with Wire(daemons["submission"]) as w:
        w.reply()
        w.cmd("EHLO client.test")
        w.send(b"STARTTLS\r\n" + PAYLOADS["auth"])
        assert w.reply()[0] == 220
        w.starttls(client_context(pki))
        code, text = w.cmd("EHLO client.test")
        assert code == 250
        assert "AUTH" in text
        assert w.cmd(b"AUTH PLAIN " + PLAIN)[0] == 235
        assert w.cmd("AUTH PLAIN " + PLAIN.decode())[0] == 503, "second AUTH must be refused"
    tried("starttls-injection")


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "plain"])
def test_auth_before_tls_refused_where_tls_is_forced(daemons: dict[str, int], mech: str) -> None:
    with Wire(daemons["submission"]) as w:
        w.reply()
        code, text = w.cmd("EHLO client.test")
        assert "AUTH" not in text, "AUTH advertised before STARTTLS on submission"
        code, text = w.cmd(f"AUTH {mech} {PLAIN.decode()}")
        assert code in (530, 538), f"AUTH {mech} in plaintext answered {text!r}"
        assert w.cmd("MAIL FROM:<alice@mx.test>")[0] == 530
    tried("auth-plaintext")


def test_session_state_reset_and_starttls_refused_inside_tls(
    daemons: dict[str, int], qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    """RFC 3207 4.2: HELO, AUTH and envelope are forgotten; STARTTLS is not repeatable."""
    count = 0
    for verb in ("STARTTLS", "starttls", "STARTTLS x", "STARTTLS\t"):
        with Wire(daemons["smtp"]) as w:
            w.reply()
            w.cmd("EHLO before.test")
            assert w.cmd("MAIL FROM:<a@remote.test>")[0] == 250
            assert w.cmd("STARTTLS")[0] == 503, "STARTTLS accepted inside a mail transaction"
            assert w.cmd("RSET")[0] == 250
            assert w.cmd("STARTTLS")[0] == 220
            w.starttls(client_context(pki))
            code, text = w.cmd("MAIL FROM:<a@remote.test>")
            assert code == 503, f"EHLO from before TLS still in force: {text!r}"
            code, text = w.cmd("EHLO after.test")
            assert "STARTTLS" not in text, "STARTTLS advertised inside TLS"
            code, text = w.cmd(verb)
            assert code in (500, 501, 502, 503, 554), f"{verb!r} inside TLS: {text!r}"
            assert w.cmd("NOOP")[0] == 250 or code == 554
            count += 1
    smtps = smtpd(mode="smtps")
    with Wire(smtps.port) as w:
        w.sock = client_context(pki).wrap_socket(w.sock, server_hostname="localhost")
        w.reply()
        assert "STARTTLS" not in w.cmd("EHLO implicit.test")[1]
        assert w.cmd("STARTTLS")[0] in (502, 503, 554)
        count += 1
    tried("starttls-state", count)
    assert qmail_root.queued() == []
