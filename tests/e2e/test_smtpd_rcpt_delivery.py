"""Recipients pyqmail-smtpd must take and pyqmail-send must deliver here (s34 review items
2 to 4), end to end: pyqmail-smtpd and pyqmail-send on one qmail root, an outside client
(smtplib from 127.0.0.9), real Maildirs.

``me`` is mx.test, which is not in ``locals`` (example.test and the IDN domain
bücher.example, listed as its A-labels). Before the fix a bare ``RCPT TO:<postmaster>``
was queued for postmaster@mx.test and went to remote delivery; ``postmaster`` of a virtual
domain without its own alias got 550 at RCPT; ``anna@bücher.example`` got 553.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import DROP_USER, IS_ROOT, QmailRoot, StartDaemon
from tests.e2e.test_send import Host, parse, wait_for

OUTSIDE = "127.0.0.9"  # no rule matches it: an ordinary client from the Internet
IDN = "xn--bcher-kva.example"  # bücher.example


@pytest.fixture
def homes(qmail_root: QmailRoot) -> dict[str, Path]:
    """What the roles write: mailboxes pm and anna, the postmaster alias, a virtual domain
    with an alias of its own but no postmaster."""
    qmail_root.control("locals", f"example.test\n{IDN}\n")
    qmail_root.control("rcpthosts", f"example.test\n{IDN}\nvirt.test\n")
    qmail_root.control("virtualdomains", "virt.test:virt\n")
    base = qmail_root.path / "homes"
    base.mkdir()
    qmail_root._own(base)
    found = {}
    for name in ("pm", "anna"):
        found[name] = base / name
        found[name].mkdir()
        qmail_root._own(found[name])
    qmail_root.write("users/mailboxes", "".join(f"{n}:{h}\n" for n, h in found.items()))
    qmail_root.write("alias/.qmail-postmaster", "&pm@example.test\n")
    qmail_root.write("alias/.qmail-virt-info", "&anna@example.test\n")
    return found


@pytest.fixture
def send(qmail_root: QmailRoot) -> Iterator[Host]:
    host = Host(qmail_root.path, user=DROP_USER) if IS_ROOT else Host(qmail_root.path)
    yield host
    host.stop()


def submit(port: int, rcpt: str, subject: str, *, utf8: bool = False) -> None:
    message = f"From: someone@elsewhere.test\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(OUTSIDE, 0)) as s:
        s.ehlo("outside.test")
        refused = s.sendmail(
            "someone@elsewhere.test", [rcpt], message, mail_options=["SMTPUTF8"] if utf8 else []
        )
        assert refused == {}


def subjects(send: Host, home: Path) -> list[str]:
    return sorted(str(parse(m)["Subject"]) for m in send.maildir(home))


def test_postmaster_and_idn_recipients_are_accepted_and_delivered_here(
    qmail_root: QmailRoot, smtpd: StartDaemon, homes: dict[str, Path], send: Host
) -> None:
    d = smtpd()
    submit(d.port, "postmaster", "bare")
    submit(d.port, "PostMaster@virt.test", "virtual")
    submit(d.port, "anna@bücher.example", "idn", utf8=True)
    submit(d.port, "anna@BÜCHER.example", "idn-upper", utf8=True)
    queued = sorted(env.recipients for env, _ in qmail_root.queued())
    assert queued == [
        ("PostMaster@virt.test",),
        (f"anna@{IDN}",),
        (f"anna@{IDN}",),
        ("postmaster@example.test",),  # a domain delivered here, not me (mx.test)
    ]
    send.start()
    wait_for(lambda: len(send.maildir(homes["pm"])) == 2, what="postmaster's two messages")
    wait_for(lambda: len(send.maildir(homes["anna"])) == 2, what="anna's two messages")
    wait_for(send.queue_empty, what="the queue to drain")
    assert subjects(send, homes["pm"]) == ["bare", "virtual"]
    assert subjects(send, homes["anna"]) == ["idn", "idn-upper"]
    assert "loops back to myself" not in send.log()
    assert "5.1.1" not in send.log()


def test_an_invalid_u_label_is_refused_naming_it(
    smtpd: StartDaemon, homes: dict[str, Path]
) -> None:
    d = smtpd()
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10, source_address=(OUTSIDE, 0)) as s:
        s.ehlo("outside.test")
        s.command_encoding = "utf-8"
        assert s.docmd("MAIL FROM:<someone@elsewhere.test> SMTPUTF8")[0] == 250
        code, text = s.docmd("RCPT TO:<anna@straße.example>")
    assert (code, text) == (
        553,
        b"5.1.3 sorry, the domain label 'stra\\xdfe' has no IDNA A-label form",
    )
