"""Open-relay address tricks and CR/LF/NUL injection, against the running daemon.

Relay: an unauthenticated client, ``rcpthosts`` =
example.test (+ subdomains of sub.example.test). Every trick that once fooled relay checks
(source routes, ``%``, ``!``, quoted local parts, address literals, multiple ``@``, trailing
dots, case, encodings) is sent as ``RCPT TO``. Invariant: refused (5xx), or accepted only as
a plain local address whose domain is in rcpthosts - and the queue file's recipients prove
nothing is addressed elsewhere.

Injection: CR, LF and NUL inside HELO/EHLO, MAIL, RCPT and parameters, in every position.
Invariant: never written into the queue file's envelope or meta lines, nor into the
Received header; the envelope parses and holds only the clean values.
"""

from __future__ import annotations

import itertools
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.attacks.tally import tried
from tests.attacks.wire import Wire
from tests.conftest import PKI
from tests.e2e.conftest import Daemon, QmailRoot, StartDaemon
from tests.e2e.helpers import client_context

LOCAL_DOMAINS = {"example.test"}
SUB = ".sub.example.test"

ROUTES = [
    "<@example.test:victim@evil.test>",
    "<@example.test,@mx.test:victim@evil.test>",
    "<@evil.test:victim@example.test>",  # route ignored: local
    "<@[127.0.0.1]:victim@evil.test>",
    "<@example.test:victim%evil.test@example.test>",
    "<@example.test:@evil.test:victim@evil.test>",
    "<@:victim@evil.test>",
]
PERCENT_BANG = [
    "<victim%evil.test@example.test>",
    "<victim%evil.test%example.test@example.test>",
    "<victim%evil.test>",
    "<evil.test!victim@example.test>",
    "<evil.test!victim>",
    "<example.test!evil.test!victim@example.test>",
    "<victim%evil.test@[127.0.0.1]>",
]
QUOTED = [
    '<"victim@evil.test"@example.test>',
    '<"victim%evil.test"@example.test>',
    '<"victim"@evil.test>',
    '<"vic\\"tim@evil.test"@example.test>',
    "<vic\\@tim@example.test>",
    '<"victim@evil.test">',
]
LITERALS = [
    "<victim@[127.0.0.1]>",
    "<victim@[10.0.0.1]>",
    "<victim@[IPv6:::1]>",
    "<victim@[192.0.2.1]>",
    "<victim@[example.test]>",
    "<victim@[999.1.1.1]>",
    "<victim@[127.0.0.1>",
]
MULTI_AT = [
    "<victim@evil.test@example.test>",
    "<victim@example.test@evil.test>",
    "<@victim@example.test>",
    "<victim@@example.test>",
    "<victim@evil.test,@example.test>",
]
DOMAIN_TRICKS = [
    "<victim@example.test.>",
    "<victim@example.test.evil.test>",
    "<victim@evil.test.example.test>",  # not a subdomain of sub.example.test: refused
    "<victim@EXAMPLE.TEST>",  # case: local
    "<victim@x.sub.example.test>",  # wildcard rcpthosts: local
    "<victim@sub.example.test>",  # the wildcard does not match its own name
    "<victim@evil.test>",
    "<victim@example.test\t>",
    "<victim@example .test>",
    "<victim@ex%61mple.test>",
    "<victim@example.test;evil.test>",
    "<victim@example.test>evil.test",
    "<victim@evil.test> <victim@example.test>",
    "victim@evil.test",
    "<<victim@evil.test>>",
    "<victim@évil.test>",
    "<postmaster@evil.test>",
    "<victim@xn--evil-xyz.test>",
    "<victim@-evil.test>",
    "<victim@localhost>",
]
CLASSES = {
    "relay:source-route": ROUTES,
    "relay:percent-bang": PERCENT_BANG,
    "relay:quoted": QUOTED,
    "relay:literal": LITERALS,
    "relay:multiple-@": MULTI_AT,
    "relay:domain": DOMAIN_TRICKS,
}


def is_plain_local(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    if not at or not local or set(local) & set('@%!"\\:,<> '):
        return False
    return domain in LOCAL_DOMAINS or (domain.endswith(SUB) and domain != SUB[1:])


@pytest.fixture
def daemon(qmail_root: QmailRoot, smtpd: StartDaemon) -> Daemon:
    qmail_root.control("rcpthosts", "example.test\n.sub.example.test\n")
    return smtpd(workers=1)


@pytest.mark.parametrize("cls", sorted(CLASSES))
def test_relay_tricks_never_forward(daemon: Daemon, qmail_root: QmailRoot, cls: str) -> None:
    accepted = {}
    for n, trick in enumerate(CLASSES[cls]):
        with Wire(daemon.port) as w:
            w.reply()
            w.cmd("EHLO attacker.test")
            assert w.cmd(f"MAIL FROM:<t{n}@remote.test>")[0] == 250
            code, text = w.cmd(f"RCPT TO:{trick}")
            assert 500 <= code < 600 or code == 250, f"{trick}: {text!r}"
            if code == 250:
                assert w.cmd("DATA")[0] == 354
                assert w.cmd(f"Subject: {n}\r\n\r\nbody\r\n.")[0] == 250
                accepted[f"t{n}@remote.test"] = trick
            w.cmd("QUIT")
    tried(cls, len(CLASSES[cls]))
    for env, _ in qmail_root.queued():
        for rcpt in env.recipients:
            assert is_plain_local(rcpt), f"{accepted[env.sender]!r} queued for {rcpt!r}: RELAY"


def test_source_route_to_local_keeps_only_the_mailbox(
    daemon: Daemon, qmail_root: QmailRoot
) -> None:
    with Wire(daemon.port) as w:
        w.reply()
        w.cmd("EHLO attacker.test")
        assert w.cmd("MAIL FROM:<a@remote.test>")[0] == 250
        # accepted with the route dropped (protocol/address.py, RFC 5321 4.1.1.3)
        code, text = w.cmd("RCPT TO:<@evil.test,@other.test:victim@example.test>")
        assert code == 250, text
        assert w.cmd("DATA")[0] == 354
        assert w.cmd(b"Subject: r\r\n\r\nbody\r\n.")[0] == 250
    [(env, _)] = qmail_root.queued()
    assert env.recipients == ("victim@example.test",)
    tried("relay:source-route")


def test_client_certificate_not_listed_or_no_clientca_does_not_relay(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI, tmp_path: Path
) -> None:
    cases = [("clientca", "someone-else.test\n"), ("no-clientca", "relay.test\n")]
    for name, listed in cases:
        if name == "clientca":
            qmail_root.control("clientca.pem", pki.ca.cert_pem)
        else:
            qmail_root.remove_control("clientca.pem")
        qmail_root.control("tlsclients", listed)
        d = smtpd(workers=1)
        with Wire(d.port) as w:
            w.reply()
            w.cmd("EHLO relay.test")
            assert w.cmd("STARTTLS")[0] == 220
            w.starttls(client_context(pki, pki.client, tmp_path))
            w.cmd("EHLO relay.test")
            w.cmd("MAIL FROM:<app@relay.test>")
            code, text = w.cmd("RCPT TO:<someone@elsewhere.test>")
            assert code == 553, f"{name}: client certificate relayed: {text!r}"
    tried("relay:client-cert", len(cases))


# -- CR / LF / NUL injection --------------------------------------------------------------

BAD = ["\r", "\n", "\x00", "\r\n", "\x00\r\n", "\x0b", "\x1b"]
PAYLOAD = "Bcc: victim@evil.test"


def injected(template: str) -> list[bytes]:
    """``template`` with {} replaced by each bad byte (+ an injected header) at the slot."""
    return [template.format(bad + PAYLOAD).encode() for bad in BAD] + [
        template.format(bad).encode() for bad in BAD
    ]


HELOS = [*injected("EHLO client.test{}"), *injected("HELO client.test{}")]
MAILS = [*injected("MAIL FROM:<a{}@remote.test>"), *injected("MAIL FROM:<a@remote.test> {}")]
MAILS += injected("MAIL FROM:<a@remote.test> BODY=8BITMIME{}")
RCPTS = [*injected("RCPT TO:<u{}@example.test>"), *injected("RCPT TO:<u@example.test>{}")]
RCPTS += injected("RCPT TO:<u@example.test> NOTIFY=NEVER{}")


def _clean_envelope(qmail_root: QmailRoot) -> list[str]:
    problems = []
    for env, data in qmail_root.queued():
        values = [env.sender, *env.recipients, *env.meta.values(), *env.meta.keys()]
        for value in values:
            if re.search(r"[\r\n\x00\x0b\x1b]", value) or "Bcc" in value:
                problems.append(f"envelope value {value!r}")
        head = data.split(b"\r\n\r\n", 1)[0]
        if b"\x00" in head or b"Bcc:" in head or b"evil.test" in head:
            problems.append(f"headers {head[:300]!r}")
        if re.search(rb"\r(?!\n)|(?<!\r)\n", head):
            problems.append(f"bare CR/LF in headers {head[:300]!r}")
    return problems


def inject_once(port: int, source: str, stage: str, line: bytes) -> None:
    with Wire(port, source) as w:
        w.reply()
        script = {
            "helo": [line, b"MAIL FROM:<a@remote.test>", b"RCPT TO:<u@example.test>"],
            "mail": [b"EHLO client.test", line, b"RCPT TO:<u@example.test>"],
            "rcpt": [b"EHLO client.test", b"MAIL FROM:<a@remote.test>", line],
        }[stage]
        for cmd in script:
            w.send(cmd + b"\r\n")
            code, _ = w.reply()
            while code and not w.quiet(0.05):  # an injected line got its own reply
                code, _ = w.reply()
            if code in (0, 421, 554):
                return
            if cmd is line and stage == "helo" and code != 250:
                # the rejected greeting must leave no trace: greet again cleanly
                assert w.cmd("EHLO fallback.test")[0] == 250
        w.send(b"DATA\r\n")
        if w.reply()[0] == 354:
            w.cmd(b"Subject: inj\r\n\r\nbody\r\n.")


@pytest.mark.parametrize(
    ("stage", "lines"),
    [("helo", HELOS), ("mail", MAILS), ("rcpt", RCPTS)],
    ids=["helo", "mail", "rcpt"],
)
def test_crlf_nul_injection_never_reaches_queue_or_headers(
    qmail_root: QmailRoot, smtpd: StartDaemon, stage: str, lines: list[bytes]
) -> None:
    rules = qmail_root.rules('127.0.0.2:allow,BARELF="1"\n:allow\n')
    d = smtpd(workers=1, rules_cdb=rules)
    cases = list(itertools.product(("127.0.0.1", "127.0.0.2"), lines))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda case: inject_once(d.port, case[0], stage, case[1]), cases))
    tried(f"injection:{stage}", len(cases))
    problems = _clean_envelope(qmail_root)
    assert not problems, "\n".join(problems[:20])
    queued = qmail_root.queued()
    assert queued, "no message was queued at all: the test proves nothing"
    for env, _ in queued:
        assert env.meta.get("helo") in ("client.test", "fallback.test"), env.meta
