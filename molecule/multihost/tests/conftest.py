"""Fixtures of the multihost scenario: two MX hosts, a client host and a sink host."""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import testinfra

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))

import mailcheck

MX1 = "mx1.pyqmail.test"
MX2 = "mx2.pyqmail.test"
SINK = "sink.pyqmail.test"
SINK_MAILDIR = "/var/sink/Maildir"
SENDMAIL = "/opt/pyqmail/bin/pyqmail-sendmail"
QUEUE_TOOL = "/opt/pyqmail/bin/pyqmail-queue"
PIN = f"/var/qmail/control/tlshosts/{MX2}.pem"
CLIENT_CAS = "/tmp/pyqmail-cas.pem"  # both MX CAs, on the client host
MX1_PASSWORD = "molecule-admin-secret"  # of admin@mx1.pyqmail.test (molecule.yml)


@pytest.fixture(scope="session")
def mx1() -> Any:
    return testinfra.get_host("podman://mh-mx1")


@pytest.fixture(scope="session")
def mx2() -> Any:
    return testinfra.get_host("podman://mh-mx2")


@pytest.fixture(scope="session")
def sink() -> Any:
    return testinfra.get_host("podman://mh-sink")


@pytest.fixture(scope="session")
def client(mx1: Any, mx2: Any) -> Any:
    host = testinfra.get_host("podman://mh-client")
    cas = mx1.file(mailcheck.CA_PATH).content + mx2.file(mailcheck.CA_PATH).content
    mailcheck.put_file(host, CLIENT_CAS, cas)
    return host


def address_of(host: Any) -> str:
    return str(host.check_output("hostname -I").split()[0])


def submit(client: Any, sender: str, recipients: list[str], token: str) -> None:
    """A user of mx1 sends mail: submission (587) from the client host, STARTTLS, AUTH.

    (Not pyqmail-sendmail as root: see test_local_injection_as_root_is_delivered.)"""
    out = mailcheck.smtp_session(
        client,
        host=MX1,
        port=587,
        cafile=CLIENT_CAS,
        starttls=True,
        user=f"admin@{MX1}",
        password=MX1_PASSWORD,
        sender=sender,
        rcpts=recipients,
        subject=f"multihost {token}",
        message_id=f"<{token}@multihost.pyqmail.test>",
        body=f"token {token}\n",
    )
    assert out.get("auth") == "ok", out
    assert out.get("data", [0])[0] == 250, out


def inject_as_root(host: Any, sender: str, recipients: list[str], token: str) -> None:
    """Queue a message on an MX with pyqmail-sendmail run by root (cron, monitoring)."""
    message = (
        f"From: <{sender}>\nTo: {', '.join(recipients)}\nSubject: multihost {token}\n"
        f"Message-ID: <{token}@multihost.pyqmail.test>\n\ntoken {token}\n"
    )
    mailcheck.put_file(host, f"/tmp/{token}.eml", message.encode())
    rcpts = " ".join(recipients)
    host.check_output(f"{SENDMAIL} -f {sender} {rcpts} < /tmp/{token}.eml")


def new_token() -> str:
    return uuid.uuid4().hex[:16]


_DELIVERY = re.compile(
    r"^delivery (?P<qid>\S+) (?P<index>\d+) to=<(?P<to>[^>]*)> result=(?P<result>\S+)"
    r" host=(?P<host>\S*) tls=(?P<tls>\S+) verified=(?P<verified>\S+) detail=(?P<detail>.*)$"
)


def deliveries(host: Any, recipient: str) -> list[dict[str, str]]:
    """pyqmail-send's delivery lines (one per attempt) for ``recipient``, oldest first."""
    out = []
    for line in mailcheck.service_log(host, "qmail-send"):
        m = _DELIVERY.match(line)
        if m and m["to"] == recipient:
            out.append(m.groupdict())
    return out


def in_sink(sink: Any, token: str) -> str:
    """The sink's message file holding ``token`` ("" if none yet)."""
    out = sink.run(f"grep -rl {token} {SINK_MAILDIR}/new/")
    return str(out.stdout.strip())
