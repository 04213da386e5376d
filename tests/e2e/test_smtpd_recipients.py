"""Unknown local recipients refused at RCPT (issue 17 item 1), against a running pyqmail-smtpd.

The qmail root holds what the roles write (``users/mailboxes``, ``alias/.qmail-*``,
``control/locals``, ``control/virtualdomains``); an outside client (127.0.0.9) talks through
smtplib. The daemon must accept exactly what local delivery would deliver
(``pyqmail.send.dotqmail.resolve`` on the same root agrees, address by address), refuse the
rest with ``550 5.1.1``, log each refusal with its reason and count it towards maxerrors.
"""

from __future__ import annotations

import os
import pwd
import smtplib
import time
from pathlib import Path

import pytest

from pyqmail.send.dotqmail import Plan, parse_mailboxes, resolve
from tests.e2e.conftest import DROP_USER, IS_ROOT, Daemon, QmailRoot, StartDaemon

OUTSIDE = "127.0.0.9"  # no rule matches it: an ordinary client from the Internet


def provision(root: QmailRoot) -> None:
    """What roles/pyqmail_control, pyqmail_mailboxes and pyqmail_aliases would write."""
    root.control("locals", "mx.test\n")
    root.control("rcpthosts", "mx.test\nvirt.test\nexample.test\n")
    root.control("virtualdomains", "virt.test:virt\n")
    homes = root.path / "homes"
    root.write("users/mailboxes", f"alice:{homes}/alice\nBob.Smith:{homes}/bob\n")
    root.write("homes/alice/.qmail-news", "./Maildir/\n", 0o600)
    for name in ("postmaster", "sales", "first:last", "lists-default", "virt-info"):
        root.write(f"alias/.qmail-{name}", "alice\n")


def client(d: Daemon) -> smtplib.SMTP:
    s = smtplib.SMTP(d.host, d.port, timeout=10, source_address=(OUTSIDE, 0))
    s.ehlo("outside.test")
    assert s.mail("someone@elsewhere.test")[0] == 250
    return s


# address -> accepted at RCPT
CASES = {
    "alice@mx.test": True,  # a mailbox
    "ALICE@MX.TEST": True,
    "bob.smith@mx.test": True,  # mailbox names are case-insensitive, dots and all
    "alice-news@mx.test": True,  # a mailbox extension with its .qmail-news
    "alice-anything@mx.test": True,  # the home's .qmail files are the mailbox user's: accepted
    "sales@mx.test": True,  # an alias file
    "first.last@mx.test": True,  # "." is ":" in alias file names
    "lists-dev@mx.test": True,  # alias/.qmail-lists-default
    "lists-dev-x@mx.test": True,
    "postmaster@mx.test": True,
    "info@virt.test": True,  # virtualdomains: virt-info
    "someone@example.test": True,  # rcpthosts but not local: relayed, not judged here
    "nosuchuser@mx.test": False,
    "lists@mx.test": False,  # only lists-* has a -default
    "sales-x@mx.test": False,  # no .qmail-sales-x nor -default: delivery would bounce it
    "alice@virt.test": False,  # in virt.test, "alice" is the alias virt-alice
    "x" * 64 + "@mx.test": False,
    "y" * 240 + "@mx.test": False,  # the longest local part a 254-octet path allows
}


def test_unknown_local_recipients_are_refused_and_logged(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    provision(qmail_root)
    d = smtpd()
    refused = []
    for address, accepted in CASES.items():
        with client(d) as s:
            code, text = s.rcpt(address)
        if accepted:
            assert code == 250, (address, text)
        else:
            assert (code, text) == (550, b"5.1.1 sorry, no mailbox here by that name"), address
            refused.append(address)
    for address in refused:
        d.wait_for(
            rf"rcpt-refused ip=127\.0\.0\.9 rcpt={address} status=5\.1\.1 "
            r"reason=unknown-recipient"
        )


def test_the_check_agrees_with_local_delivery(
    qmail_root: QmailRoot, smtpd: StartDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each local address: accepted at RCPT exactly when delivery finds a plan for it (the
    mailbox extension without a .qmail file, which only delivery can see, excepted).
    ``resolve`` runs as the delivery user would: the owner of the ``.qmail`` files (here the
    daemon's user, who must read them), since delivery defers on files of anyone else."""
    provision(qmail_root)
    delivery_uid = pwd.getpwnam(DROP_USER).pw_uid if IS_ROOT else os.geteuid()
    boxes = parse_mailboxes((qmail_root.path / "users/mailboxes").read_text(), "mailboxes")
    alias = qmail_root.path / "alias"
    d = smtpd()
    for address, accepted in CASES.items():
        local, domain = address.lower().rsplit("@", 1)
        if domain == "example.test" or address.startswith("alice-anything"):
            continue
        if domain == "virt.test":
            local = f"virt-{local}"
        with monkeypatch.context() as patch:
            patch.setattr(os, "geteuid", lambda: delivery_uid)
            plan = resolve(local, address, boxes, alias, "mx.test")
        assert isinstance(plan, Plan) is accepted, (address, plan)
        with client(d) as s:
            assert (s.rcpt(address)[0] == 250) is accepted, address


def test_refusals_count_towards_maxerrors(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    provision(qmail_root)
    qmail_root.control("maxerrors", "3\n")
    d = smtpd()
    with client(d) as s:
        for i in range(3):
            assert s.rcpt(f"guess{i}@mx.test")[0] == 550
        code, text = s.rcpt("alice@mx.test")
        assert (code, text[:5]) == (421, b"4.7.0"), text  # the 4th command: too many errors
    d.wait_for(r"rcpt-refused .*rcpt=guess2@mx\.test")


def test_a_recipient_added_later_is_accepted_without_a_reload(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """users/mailboxes is re-read when it changes and alias files are looked up per RCPT."""
    provision(qmail_root)
    d = smtpd()
    with client(d) as s:
        assert s.rcpt("carol@mx.test")[0] == 550
        assert s.rcpt("help@mx.test")[0] == 550
    mailboxes = qmail_root.path / "users/mailboxes"
    text = mailboxes.read_text() + f"carol:{qmail_root.path}/homes/carol\n"
    time.sleep(0.01)  # a new mtime even on a coarse clock
    qmail_root.write("users/mailboxes", text)
    qmail_root.write("alias/.qmail-help", "alice\n")
    with client(d) as s:
        assert s.rcpt("carol@mx.test")[0] == 250
        assert s.rcpt("help@mx.test")[0] == 250
    os.unlink(qmail_root.path / "alias/.qmail-help")
    with client(d) as s:
        assert s.rcpt("help@mx.test")[0] == 550


@pytest.mark.parametrize(
    "case",
    [
        ("rcptcatchall", "mx.test\n", "anyone@mx.test", 250),  # opt-in catch-all per domain
        ("rcptcatchall", "virt.test\n", "anyone@mx.test", 550),  # ... of that domain only
        ("rcptcatchall", "virt.test\n", "anyone@virt.test", 250),
        ("rcptcheck", "0\n", "anyone@mx.test", 250),  # off: accepted, bounced later
        ("validrcptto", "extra@mx.test\n", "extra@mx.test", 250),  # listed: accepted too
        ("validrcptto", "extra@mx.test\n", "alice@mx.test", 250),
        ("validrcptto", "extra@mx.test\n", "other@mx.test", 550),
    ],
)
def test_catchall_switch_and_validrcptto(
    qmail_root: QmailRoot, smtpd: StartDaemon, case: tuple[str, str, str, int]
) -> None:
    name, content, address, code = case
    provision(qmail_root)
    qmail_root.control(name, content)
    d = smtpd()
    with client(d) as s:
        assert s.rcpt(address)[0] == code, (name, content, address)


def test_a_root_without_local_addressing_accepts(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    """No users/mailboxes and no alias/: nothing to consult (a relay-only host)."""
    d = smtpd()
    with client(d) as s:
        assert s.rcpt("anyone@mx.test")[0] == 250


def test_a_bad_rcptcatchall_stops_the_daemon_naming_it(qmail_root: QmailRoot) -> None:
    from pyqmail.control import smtpd as config

    qmail_root.control("rcptcatchall", "not a domain\n")
    with pytest.raises(config.ConfigError, match=r"rcptcatchall:1: not a valid domain name"):
        config.load(Path(qmail_root.path))
    qmail_root.control("rcptcatchall", "example.test\n")  # in rcpthosts, but relayed
    with pytest.raises(config.ConfigError, match=r"rcptcatchall: example\.test is not a local"):
        config.load(Path(qmail_root.path))
    qmail_root.control("rcptcatchall", "mx.test\n")
    qmail_root.control("rcptcheck", "2\n")
    with pytest.raises(config.ConfigError, match=r"rcptcheck"):
        config.load(Path(qmail_root.path))
