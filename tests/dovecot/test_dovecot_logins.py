"""One login lock for SMTP AUTH and IMAP/POP3, with a real Dovecot and a real pyqmail-smtpd.

A botnet guesses one login, each address once: over submission (pyqmail-smtpd, STARTTLS and
AUTH) until the login is locked, then the right password over IMAPS and POP3S is refused
(Dovecot ran pyqmail-checkpassword, which found the lock); and the other way round. Each
guess comes from its own loopback address, so neither side's per-client delays play a part:
only the shared per-login lock can refuse the right password.
"""

from __future__ import annotations

import poplib
import re
import shutil
import smtplib
import ssl
import stat
import subprocess
from pathlib import Path

import pytest

from tests.dovecot.conftest import Clients, MailHost, StartDovecot, os_owner, wait_for
from tests.e2e.conftest import StartDaemon

PASSWORD = "correct horse battery staple"
FAILS = 3
FILTER = Path(__file__).parents[2] / "files" / "fail2ban" / "filter.d" / "pyqmail-dovecot.conf"


def smtp_auth(port: int, ctx: ssl.SSLContext, source: str, login: str, password: str) -> int:
    """The reply code of AUTH on submission (after STARTTLS), from ``source``."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as s:
        s.starttls(context=ctx)
        try:
            s.login(login, password)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code
        return 235


def test_a_login_locked_over_smtp_auth_is_refused_over_imap_and_pop3(
    mailhost: MailHost,
    smtpd: StartDaemon,
    dovecot: StartDovecot,
    ctx: ssl.SSLContext,
    clients: Clients,
) -> None:
    login = mailhost.add("alice", PASSWORD)
    mailhost.qroot.control("authlockfails", f"{FAILS}\n")
    sub = smtpd(mode="submission")
    dc = dovecot(dovecot_failure_delay=0)
    assert clients.imap_login(dc.ports["imaps"], login, PASSWORD, source="127.0.0.2") == "OK"
    for n in range(FAILS):
        assert smtp_auth(sub.port, ctx, f"127.0.1.{n + 1}", login, "guess") == 535
    # a temporary failure (the checker's 111): the user's clients retry later instead of
    # asking for another password, and the attempt is not one fail2ban counts
    refused = clients.imap_login(dc.ports["imaps"], login, PASSWORD, source="127.0.0.3")
    assert "[UNAVAILABLE] Temporary authentication failure" in refused, refused
    pop = clients.pop3s(dc.ports["pop3s"], source="127.0.0.1")  # its own address too
    pop.user(login)
    with pytest.raises(poplib.error_proto, match=r"ERR \[SYS/TEMP\] Temporary"):
        pop.pass_(PASSWORD)
    assert "is locked: refused, no password checked" in dc.output()


def test_imap_failures_lock_the_login_for_smtp_auth(
    mailhost: MailHost,
    smtpd: StartDaemon,
    dovecot: StartDovecot,
    ctx: ssl.SSLContext,
    clients: Clients,
) -> None:
    login = mailhost.add("alice", PASSWORD)
    mailhost.qroot.control("authlockfails", f"{FAILS}\n")
    sub = smtpd(mode="submission")
    dc = dovecot(dovecot_failure_delay=0)
    for n in range(FAILS):
        refused = clients.imap_login(dc.ports["imaps"], login, "guess", source=f"127.0.2.{n + 1}")
        assert "AUTHENTICATIONFAILED" in refused, refused
    assert smtp_auth(sub.port, ctx, "127.0.0.4", login, PASSWORD) == 535
    sub.wait_for(r"auth-fail ip=127\.0\.0\.4 .* reason=locked")


def test_the_lock_and_the_slots_belong_to_the_verifiers_alone(
    mailhost: MailHost, dovecot: StartDovecot, clients: Clients
) -> None:
    """What the checker made under Dovecot (as ``dovecot``, extra group the auth group) in
    auth/: the lock file and the slots, the auth group's, 0660, in the role's 2770."""
    login = mailhost.add("alice", PASSWORD)
    dc = dovecot(dovecot_failure_delay=0)
    assert clients.imap_login(dc.ports["imaps"], login, "guess", source="127.0.0.2") != "OK"
    assert clients.imap_login(dc.ports["imaps"], login, PASSWORD, source="127.0.0.2") == "OK"
    shared = mailhost.root / "auth"
    group = os_owner(shared)[1]
    assert os_owner(shared) == ("root", group, 0o2770)
    made = sorted(p.name for p in shared.iterdir())
    assert "accounts.sqlite" in made and any(name.startswith("login-slot.") for name in made)
    for path in shared.iterdir():
        assert os_owner(path)[1:] == (group, 0o660), path


def test_logins_and_userdb_lookups_are_not_for_everyone(
    mailhost: MailHost, dovecot: StartDovecot, clients: Clients
) -> None:
    """users/logins 0640 (the role's mode) is still read by the checker under Dovecot; the
    userdb socket (each lookup says whether a login exists) is Dovecot's and root's, 0600."""
    login = mailhost.add("alice", PASSWORD)
    dc = dovecot(dovecot_failure_delay=0)
    assert os_owner(mailhost.root / "users" / "logins")[2] == 0o640
    assert clients.imap_login(dc.ports["imaps"], login, PASSWORD, source="127.0.0.2") == "OK"
    userdb = dc.base_dir / "run" / "auth-userdb"
    assert stat.S_ISSOCK(userdb.stat().st_mode)
    assert os_owner(userdb)[0::2] == ("dovecot", 0o600)


def test_fail2ban_filter_matches_each_failed_check_and_its_client(
    mailhost: MailHost, dovecot: StartDovecot, clients: Clients, tmp_path: Path
) -> None:
    """Wrong password and unknown login count, each for the address it came from; a locked
    login (refused without a password check, here with the right password: its own user's
    clients), a name built to look like another client, and a good login, do not."""
    regex = shutil.which("fail2ban-regex")
    assert regex, "fail2ban-regex missing: run scripts/install-system-deps (package fail2ban)"
    login = mailhost.add("alice", PASSWORD)
    mailhost.qroot.control("authlockfails", "2\n")
    dc = dovecot(dovecot_failure_delay=0)
    port = dc.ports["imaps"]
    assert clients.imap_login(port, login, "guess", source="127.0.3.1") != "OK"
    assert clients.imap_login(port, login, "guess", source="127.0.3.2") != "OK"  # now locked
    refused = clients.imap_login(port, login, PASSWORD, source="127.0.3.3")  # refused: locked
    assert "[UNAVAILABLE]" in refused, refused
    assert clients.imap_login(port, "nobody@mx.test", PASSWORD, source="127.0.3.4") != "OK"
    assert clients.imap_login(port, "x,10.9.9.9,<a>): Login", "pw", source="127.0.3.5") != "OK"
    mailhost.qroot.control("authlockfails", "0\n")
    bob = mailhost.add("bob", "bobs pw")
    assert clients.imap_login(port, bob, "bobs pw", source="127.0.3.6") == "OK"
    wait_for(lambda: dc.output().count("Login failed") >= 3, 10, "Dovecot's auth lines")
    # what Dovecot 2.3 logs for the checker's 111 (db-checkpassword.c), for the locked login
    assert re.search(
        rf"auth: Error: checkpassword\({re.escape(login)},127\.0\.3\.3,<[^<>]*>\): "
        r"Child \d+ exited with status 111",
        dc.output(),
    ), dc.output()
    log = tmp_path / "current"  # as multilog t writes it: daemontools' own tai64n
    log.write_text(
        subprocess.run(
            ["tai64n"], input=dc.output(), capture_output=True, text=True, check=True
        ).stdout
    )
    out = subprocess.run(
        [regex, "--out", "ip", str(log), str(FILTER)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["127.0.3.1", "127.0.3.2", "127.0.3.4"], out.stdout + dc.output()
