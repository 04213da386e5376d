"""The roles write the valid recipients; a running pyqmail-smtpd refuses everyone else.

ansible-playbook (local connection) runs the tasks of pyqmail_control, pyqmail_aliases and
pyqmail_mailboxes into the qmail root of a real pyqmail-smtpd (the e2e harness), with their
defaults: nobody lists a recipient by hand, yet an unknown one gets ``550 5.1.1`` at RCPT.
A second run adds a mailbox, an alias and a catch-all domain; after the reload the role's
handlers would send (SIGHUP), each is accepted. The account and queue tasks are left out
(``pyqmail__check_fresh``): they would change this machine's users.
"""

from __future__ import annotations

import signal
import smtplib
from typing import Any

from tests.e2e.conftest import Daemon, QmailRoot, StartDaemon, qmail_root, smtpd
from tests.roles.playbook import run_role_tasks

__all__ = ["qmail_root", "smtpd"]  # the e2e harness's fixtures

OUTSIDE = "127.0.0.9"
ROLES = ("pyqmail_control", "pyqmail_aliases", "pyqmail_mailboxes")


def run_roles(root: QmailRoot, **more: Any) -> None:
    """The three roles' tasks with their defaults and the role pyqmail's handlers."""
    base = root.path.parent / f"{root.path.name}-play"
    run_role_tasks(
        ROLES,
        base,
        {
            "pyqmail__root": str(root.path),
            "pyqmail__service_dir": str(base / "service"),
            "pyqmail__me": "mx.test",
            "pyqmail__check_fresh": True,
            "pyqmail_control__locals": ["mx.test", "example.org"],
            "pyqmail_control__relay_domains": [],
            "pyqmail_aliases__postmaster": "alice@mx.test",
            "pyqmail_mailboxes__list": [{"name": "alice"}],
            # the checks (on by default) ask no one else
            "pyqmail_control__dnsresolver": ["127.0.0.1"],
            **more,
        },
    )


def rcpt(d: Daemon, address: str) -> int:
    with smtplib.SMTP(d.host, d.port, timeout=10, source_address=(OUTSIDE, 0)) as s:
        s.ehlo("outside.test")
        assert s.mail("someone@elsewhere.test")[0] == 250
        return s.rcpt(address)[0]


def test_the_roles_defaults_refuse_unknown_recipients_and_accept_added_ones(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    run_roles(qmail_root)
    assert (qmail_root.path / "control" / "rcptcheck").read_text() == "1\n"
    assert not (qmail_root.path / "control" / "rcptcatchall").exists()
    d = smtpd()
    assert rcpt(d, "alice@mx.test") == 250  # pyqmail_mailboxes__list
    assert rcpt(d, "alice@example.org") == 250  # a mailbox is in every local domain
    assert rcpt(d, "alice-lists@example.org") == 250  # an extension of it
    assert rcpt(d, "postmaster@mx.test") == 250  # pyqmail_aliases: root, postmaster, ...
    assert rcpt(d, "mailer-daemon@example.org") == 250
    for unknown in ("bob@mx.test", "help@example.org", "anyone@example.org"):
        assert rcpt(d, unknown) == 550, unknown
    d.wait_for(r"rcpt-refused ip=127\.0\.0\.9 rcpt=bob@mx\.test status=5\.1\.1 reason=")

    run_roles(
        qmail_root,
        pyqmail_mailboxes__list=[{"name": "alice"}, {"name": "Bob"}],
        pyqmail_aliases__aliases=[{"name": "help", "targets": ["alice@mx.test"]}],
        pyqmail_control__rcptcatchall=["example.org"],
    )
    d.send_signal(signal.SIGHUP)  # what the role's handler sends to a supervised listener
    d.wait_for(r"pid=\d+ reload root=", timeout=30)
    assert rcpt(d, "bob@mx.test") == 250
    assert rcpt(d, "help@mx.test") == 250
    assert rcpt(d, "anyone@example.org") == 250  # the catch-all domain
    assert rcpt(d, "anyone@mx.test") == 550  # ... only that one

    run_roles(qmail_root, pyqmail_control__rcptcheck=False)
    d.send_signal(signal.SIGHUP)
    d.wait_for(r"pid=\d+ reload root=", timeout=30, count=2)
    assert rcpt(d, "anyone@mx.test") == 250  # off: accepted (and bounced later)
