"""AUTH brute force and slow/junk clients (TLS handshakes, idle, slow drip) against the daemon.

AUTH: wrong password and unknown user get the same
``535 5.7.8`` after the same delay; the session is dropped after a few failures; malformed
base64 gives 501; a second AUTH 503; an authorization identity cannot impersonate another
user. Timeouts (STARTTLS handshakes, limits): a client that stalls or sends junk in a handshake,
idles, or drips bytes is dropped after the configured timeout, and nothing is queued.
"""

from __future__ import annotations

import base64
import hmac
import os
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.attacks.tally import tried
from tests.attacks.wire import Wire
from tests.conftest import PKI
from tests.e2e.conftest import Daemon, QmailRoot, StartDaemon
from tests.e2e.helpers import client_context

ALICE, PW = "alice@mx.test", "s3cret-alice-pw"
FAIL_DELAY_MIN = 0.8  # pyqmail-smtpd waits AUTH_FAIL_DELAY (1 s) before a 535


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def smtps(qmail_root: QmailRoot, smtpd: StartDaemon) -> Daemon:
    qmail_root.users({ALICE: PW, "bob@mx.test": "bob-pw-123456"}, cram=(ALICE,))
    return smtpd(mode="smtps", workers=1)


def tls_wire(d: Daemon, pki: PKI) -> Wire:
    w = Wire(d.port)
    w.sock = client_context(pki).wrap_socket(w.sock, server_hostname="localhost")
    assert w.reply()[0] == 220
    assert w.cmd("EHLO guesser.test")[0] == 250
    return w


def guess(w: Wire, user: str, password: str) -> tuple[int, str, float]:
    start = time.monotonic()
    code, text = w.cmd("AUTH PLAIN " + b64(f"\0{user}\0{password}"))
    return code, text, time.monotonic() - start


def test_brute_force_same_535_delayed_then_dropped(smtps: Daemon, pki: PKI) -> None:
    attempts = [(ALICE, "wrong-1"), ("nobody@mx.test", "wrong-2"), (ALICE, "wrong-3")]
    attempts += [("root", "toor"), (ALICE, "wrong-5"), (ALICE, "wrong-6")]
    w = tls_wire(smtps, pki)
    texts, failures = set(), 0
    for user, password in attempts:
        code, text, took = guess(w, user, password)
        if code in (0, 421):
            break
        failures += 1
        assert code == 535, f"{user}/{password}: {text!r}"
        assert text.startswith("535 5.7.8"), text
        assert took >= FAIL_DELAY_MIN, f"failure answered in {took:.2f}s: no rate limit"
        texts.add(text)
    assert len(texts) == 1, f"different answers reveal which users exist: {texts}"
    assert failures <= 5, f"{failures} wrong passwords and the session is still open"
    assert code in (0, 421) or w.closed_within(3), "session not dropped after repeated failures"
    w.close()
    tried("auth-bruteforce", failures + 1)


# Parallel guessing (many connections, workers and listeners from one address) is in
# test_auth_parallel.py: the attempts are serialised per client over all of them.


@pytest.mark.parametrize(
    ("lines", "want"),
    [
        (["AUTH PLAIN !!!notbase64"], 501),
        (["AUTH PLAIN ===="], 501),
        (["AUTH PLAIN " + b64("no-nuls-at-all")], (501, 535)),
        (["AUTH PLAIN", "%%%"], 501),
        (["AUTH PLAIN", "*"], 501),
        (["AUTH LOGIN", "not base64!"], 501),
        (["AUTH LOGIN", b64(ALICE), "*"], 501),
        (["AUTH LOGIN " + b64(ALICE), "@@"], 501),
        (["AUTH CRAM-MD5", "garbage"], 501),
        (["AUTH SCRAM-SHA-1"], 504),
        (["AUTH"], 501),
        (["AUTH PLAIN " + "QUFB" * 3000], (500, 501)),
    ],
)
def test_malformed_auth(smtps: Daemon, pki: PKI, lines: list[str], want: int | tuple[int]) -> None:
    with tls_wire(smtps, pki) as w:
        code, text = 0, ""
        for line in lines:
            code, text = w.cmd(line)
        wanted = want if isinstance(want, tuple) else (want,)
        assert code in wanted, f"{lines}: {text!r}"
        assert w.cmd("NOOP")[0] == 250
    tried("auth-malformed")


def test_second_auth_and_authzid_impersonation(
    smtps: Daemon, pki: PKI, qmail_root: QmailRoot
) -> None:
    with tls_wire(smtps, pki) as w:
        code, text = w.cmd("AUTH PLAIN " + b64(f"bob@mx.test\0{ALICE}\0{PW}"))
        assert code in (235, 535), text
        if code == 235:
            assert w.cmd("MAIL FROM:<alice@mx.test>")[0] == 250
            w.cmd("RCPT TO:<u@example.test>")
            w.cmd("DATA")
            assert w.cmd(b"Subject: z\r\n\r\nbody\r\n.")[0] == 250
            [(env, _)] = qmail_root.queued()
            assert env.meta.get("auth") == ALICE, f"authorized as {env.meta.get('auth')}"
        else:
            assert guess(w, ALICE, PW)[0] == 235
        assert w.cmd("AUTH PLAIN " + b64(f"\0{ALICE}\0{PW}"))[0] == 503
    tried("auth-bruteforce", 2)


def test_cram_md5_unknown_user_same_answer(smtps: Daemon, pki: PKI) -> None:
    texts = set()
    for user, secret in [(ALICE, "wrong"), ("ghost@mx.test", PW)]:
        with tls_wire(smtps, pki) as w:
            code, text = w.cmd("AUTH CRAM-MD5")
            assert code == 334
            challenge = base64.b64decode(text[4:])
            digest = hmac.new(secret.encode(), challenge, "md5").hexdigest()
            code, text = w.cmd(b64(f"{user} {digest}"))
            assert code == 535, text
            texts.add(text)
    assert len(texts) == 1
    tried("auth-bruteforce", 2)


# -- slow and junk clients ----------------------------------------------------------------


def client_hello(pki: PKI) -> bytes:
    """The bytes of a real ClientHello, for dripping."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context(pki).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def drip(w: Wire, data: bytes, every: float, limit: float) -> bool:
    """Send ``data`` a byte at a time; True if the server dropped us within ``limit``."""
    deadline = time.monotonic() + limit
    for byte in data:
        try:
            w.send(bytes([byte]))
        except OSError:
            return True
        if w.closed_within(every):
            return True
        if time.monotonic() > deadline:
            return False
    return w.closed_within(max(0.1, deadline - time.monotonic()))


def plain_session(w: Wire) -> None:
    assert w.reply()[0] == 220


Scenario = Callable[[Daemon, Daemon, PKI], float]
OPENED: list[Wire] = []


def opened(w: Wire) -> Wire:
    OPENED.append(w)
    return w


def silent_smtps(plain: Daemon, tls: Daemon, pki: PKI) -> float:
    w = opened(Wire(tls.port))
    start = time.monotonic()
    assert w.closed_within(8), "silent client on smtps not dropped"
    return time.monotonic() - start


def dripped_client_hello(plain: Daemon, tls: Daemon, pki: PKI) -> float:
    w = opened(Wire(tls.port))
    start = time.monotonic()
    assert drip(w, client_hello(pki), 0.4, 8), "ClientHello drip not dropped"
    return time.monotonic() - start


def huge_record_then_stall(plain: Daemon, tls: Daemon, pki: PKI) -> float:
    w = opened(Wire(tls.port))
    start = time.monotonic()
    w.send(b"\x16\x03\x01\x3f\xff" + b"\x01" * 100)
    assert w.closed_within(8), "partial huge TLS record not dropped"
    return time.monotonic() - start


def http_junk(plain: Daemon, tls: Daemon, pki: PKI) -> float:
    w = opened(Wire(tls.port))
    start = time.monotonic()
    w.send(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    assert w.closed_within(8), "HTTP request on smtps not dropped"
    return time.monotonic() - start


def random_junk(plain: Daemon, tls: Daemon, pki: PKI) -> float:
    w = opened(Wire(tls.port))
    start = time.monotonic()
    try:
        w.send(os.urandom(4096))
    except OSError:
        return 0.0
    assert w.closed_within(8), "random bytes on smtps not dropped"
    return time.monotonic() - start


def starttls_then_stall(plain: Daemon, tls: Daemon, pki: PKI) -> float:
    w = opened(Wire(plain.port))
    plain_session(w)
    w.cmd("EHLO staller.test")
    assert w.cmd("STARTTLS")[0] == 220
    start = time.monotonic()
    assert w.closed_within(8), "stalled STARTTLS handshake not dropped"
    return time.monotonic() - start


def starttls_then_junk(plain: Daemon, tls: Daemon, pki: PKI) -> float:
    w = opened(Wire(plain.port))
    plain_session(w)
    w.cmd("EHLO junk.test")
    assert w.cmd("STARTTLS")[0] == 220
    start = time.monotonic()
    w.send(b"EHLO not-a-client-hello\r\n")
    assert w.closed_within(8), "junk after STARTTLS not dropped"
    assert not w.buf, f"plaintext reply to junk after STARTTLS: {w.buf!r}"
    return time.monotonic() - start


def idle_after_greeting(plain: Daemon, tls: Daemon, pki: PKI) -> float:
    w = opened(Wire(plain.port))
    plain_session(w)
    start = time.monotonic()
    assert w.closed_within(8), "idle client not dropped"
    assert w.buf.startswith(b"421"), w.buf
    return time.monotonic() - start


def dripped_command(plain: Daemon, tls: Daemon, pki: PKI) -> float:
    w = opened(Wire(plain.port))
    plain_session(w)
    start = time.monotonic()
    assert drip(w, b"EHLO " + b"x" * 200, 0.3, 8), "slowloris command not dropped"
    return time.monotonic() - start


def dripped_data(plain: Daemon, tls: Daemon, pki: PKI) -> float:
    w = opened(Wire(plain.port))
    plain_session(w)
    w.cmd("EHLO drip.test")
    w.cmd("MAIL FROM:<drip@remote.test>")
    w.cmd("RCPT TO:<u@example.test>")
    assert w.cmd("DATA")[0] == 354
    start = time.monotonic()
    assert drip(w, b"Subject: drip\r\n\r\n" + b"x\r\n" * 200, 0.3, 9), "DATA drip not dropped"
    return time.monotonic() - start


SCENARIOS: list[Scenario] = [
    silent_smtps,
    dripped_client_hello,
    huge_record_then_stall,
    http_junk,
    random_junk,
    starttls_then_stall,
    starttls_then_junk,
    idle_after_greeting,
    dripped_command,
    dripped_data,
]


def test_slow_and_junk_clients_are_dropped(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    """timeouttls=2, timeoutsmtpd=2, timeoutdata=4: every scenario dropped within 8 s."""
    qmail_root.control("timeouttls", "2\n")
    qmail_root.control("timeoutsmtpd", "2\n")
    qmail_root.control("timeoutdata", "4\n")
    plain, tls = smtpd(workers=1), smtpd(mode="smtps", workers=1)
    try:
        with ThreadPoolExecutor(len(SCENARIOS)) as pool:
            futures = {s.__name__: pool.submit(s, plain, tls, pki) for s in SCENARIOS}
            took = {name: f.result() for name, f in futures.items()}
    finally:
        while OPENED:
            OPENED.pop().close()
    print(" ".join(f"{k}={v:.1f}s" for k, v in took.items()))
    tried("slow-or-junk-client", len(SCENARIOS))
    assert qmail_root.queued() == []
    assert qmail_root.tmp_files() == []
    for d in (plain, tls):
        w = Wire(d.port)
        if d is tls:
            w.sock = client_context(pki).wrap_socket(w.sock, server_hostname="localhost")
        assert w.reply()[0] == 220, "daemon stopped serving after the slow clients"
        w.close()
