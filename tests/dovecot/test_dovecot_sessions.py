"""A new password or a removed login ends the IMAP/POP3 sessions already open.

Dovecot checks a password once, at login: a client that logged in before the admin changed a
stolen password (or removed the mailbox) goes on reading mail over its open connection, IDLE
keeps one open for days. The pyqmail_mailboxes role, run for real on a host whose Dovecot is
running (the role's own configuration template), ends those sessions with ``doveadm kick`` and
leaves everyone else's open.
"""

from __future__ import annotations

import grp
import imaplib
import os
import poplib
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.dovecot.conftest import DOMAIN, Clients, MailHost, StartDovecot
from tests.e2e.conftest import DROP_USER
from tests.roles.playbook import run_role_tasks, task_result

KICK = "End the sessions (pyqmail-users kick)"
ENDED = "ended the IMAP/POP3 sessions of "
# The role's delivery user owns the homes as user and group of one name; Debian's "mail"
# (uid 8, group mail) is one such system user, and Dovecot opens the mailboxes as it.
MAIL_USER = "mail"


def run_role(
    mailhost: MailHost,
    config: Path,
    boxes: list[dict[str, Any]],
    play: Path,
    *,
    must_pass: bool = True,
    venv: str = sys.prefix,  # pyqmail-users of this checkout (an editable install)
    **more: Any,  # more of the role's variables
) -> dict[str, Any]:
    """The pyqmail_mailboxes role on the test host: its files, its Dovecot configuration."""
    group = grp.getgrgid(pwd.getpwnam(DROP_USER).pw_gid).gr_name
    return run_role_tasks(
        ("pyqmail_mailboxes",),
        play,
        {
            "pyqmail__root": str(mailhost.root),
            "pyqmail__service_dir": str(play / "service"),
            "pyqmail__check_fresh": False,
            "pyqmail__mailbox_user": MAIL_USER,
            "pyqmail__auth_group": group,
            "pyqmail__dovecot_config": str(config),
            "pyqmail__venv": venv,
            "pyqmail_mailboxes__home_base": str(mailhost.root / "homes"),
            "pyqmail_mailboxes__login_domain": DOMAIN,
            "pyqmail_control__locals": [DOMAIN],
            "pyqmail_aliases__aliases": [],
            "pyqmail_aliases__postmaster": f"alice@{DOMAIN}",
            "pyqmail_mailboxes__list": boxes,
            **more,
        },
        must_pass=must_pass,
    )


def kicked(out: dict[str, Any]) -> tuple[list[str], bool] | None:
    """What pyqmail-users kick said (one line per login), and whether the task changed
    anything; None when it did not run (no login recorded whose sessions must end)."""
    result = task_result(out, KICK)
    if result.get("skipped"):
        return None
    return result["stdout"].splitlines(), result["changed"]


def imap_session(clients: Clients, port: int, login: str, password: str) -> imaplib.IMAP4:
    """A logged-in IMAPS session with INBOX selected (a mail client's, left open)."""
    m = clients.imaps(port)
    m.login(login, password)
    m.select("INBOX")
    return m


def imap_open(m: imaplib.IMAP4) -> bool:
    """Whether the session still answers (a kicked one says BYE or is closed)."""
    try:
        return m.noop()[0] == "OK"
    except (imaplib.IMAP4.abort, OSError):
        return False


def pop_open(p: poplib.POP3) -> bool:
    try:
        return p.noop().startswith(b"+OK")
    except (poplib.error_proto, OSError):
        return False


def test_a_new_password_or_a_removed_login_ends_its_open_sessions(
    mailhost: MailHost,
    dovecot: StartDovecot,
    tmp_path: Path,
    clients: Clients,
) -> None:
    alice = {"name": "alice", "password": "alice-old-password"}
    bob = {"name": "bob", "password": "bob-password"}
    carol = {"name": "carol", "password": "carol-password"}
    aaron = {"name": "aaron", "password": "aaron-password"}  # never logged in over IMAP/POP3
    dc = dovecot(dovecot_failure_delay=0, mail_user_name=MAIL_USER)
    out = run_role(mailhost, dc.config, [aaron, alice, bob, carol], tmp_path / "play")
    assert kicked(out) is None  # new logins: nobody's session to end

    port = dc.ports["imaps"]
    a_imap = imap_session(clients, port, f"alice@{DOMAIN}", alice["password"])
    a_pop = clients.pop3s(dc.ports["pop3s"])
    a_pop.user(f"alice@{DOMAIN}")
    assert a_pop.pass_(alice["password"]).startswith(b"+OK")
    b_imap = imap_session(clients, port, f"bob@{DOMAIN}", bob["password"])
    c_imap = imap_session(clients, port, f"carol@{DOMAIN}", carol["password"])

    # Alice's password is changed (it was stolen): her IMAP and POP3 sessions end. Aaron's
    # changes too, and he has no session (doveadm: "no users kicked"), which is no error and
    # does not keep Alice's, after his in the list, from ending.
    alice_new = {**alice, "password": "alice-new-password"}
    aaron_new = {**aaron, "password": "aaron-new-password"}
    out = run_role(mailhost, dc.config, [aaron_new, alice_new, bob, carol], tmp_path / "play")
    assert not imap_open(a_imap), "alice's IMAP session outlived her password"
    assert not pop_open(a_pop), "alice's POP3 session outlived her password"
    assert imap_open(b_imap) and imap_open(c_imap)
    assert kicked(out) == (
        [f"{ENDED}alice@{DOMAIN}", f"no IMAP/POP3 session of aaron@{DOMAIN}"],
        True,
    )

    # Bob's mailbox goes (state: absent) and Carol's entry is deleted: both sessions end,
    # Alice's new one (new password) stays.
    a_imap = imap_session(clients, port, f"alice@{DOMAIN}", alice_new["password"])
    boxes = [aaron_new, alice_new, {**bob, "state": "absent"}]
    out = run_role(mailhost, dc.config, boxes, tmp_path / "play")
    assert not imap_open(b_imap) and not imap_open(c_imap)
    assert imap_open(a_imap)
    assert kicked(out) == ([f"{ENDED}bob@{DOMAIN}", f"{ENDED}carol@{DOMAIN}"], True)

    # Nothing changed: nobody is kicked, and a login already gone has no session to end.
    out = run_role(mailhost, dc.config, [aaron_new, alice_new], tmp_path / "play")
    assert kicked(out) is None
    assert imap_open(a_imap)
    a_imap.logout()


def test_a_login_moved_to_another_mailbox_ends_its_sessions(
    mailhost: MailHost,
    dovecot: StartDovecot,
    tmp_path: Path,
    clients: Clients,
) -> None:
    """The login sales@ moves from bob's mailbox to carol's, with the same password: the
    session it has open reads bob's mailbox, and must end so that its next login opens
    carol's. Bob's own login (same mailbox as before) keeps its session."""
    sales = f"sales@{DOMAIN}"
    bob = {"name": "bob", "password": "bob-password"}
    carol = {"name": "carol"}  # no login of her own
    dc = dovecot(dovecot_failure_delay=0, mail_user_name=MAIL_USER)
    play = tmp_path / "play"
    shared = {"login": sales, "password": "sales-password"}
    run_role(mailhost, dc.config, [{**bob, **shared}, carol, {**bob, "name": "bob2"}], play)
    old = imap_session(clients, dc.ports["imaps"], sales, "sales-password")
    b_imap = imap_session(clients, dc.ports["imaps"], f"bob2@{DOMAIN}", bob["password"])

    out = run_role(mailhost, dc.config, [bob, {**carol, **shared}, {**bob, "name": "bob2"}], play)
    assert not imap_open(old), "sales@ still reads bob's mailbox after moving to carol's"
    assert imap_open(b_imap)
    assert kicked(out) == ([f"{ENDED}{sales}"], True)
    assert (mailhost.root / "users" / "logins").read_text().splitlines()[-2:] == [
        f"{sales}:carol",
        f"bob2@{DOMAIN}:bob2",
    ]
    b_imap.logout()


def test_a_move_is_recorded_before_the_map_changes(
    mailhost: MailHost,
    dovecot: StartDovecot,
    tmp_path: Path,
    clients: Clients,
) -> None:
    """The run that moves sales@ to carol's mailbox writes users/logins, then fails on
    another mailbox (update_password on_create refuses dave's new CRAM-MD5 secret) before
    its kick. The next run finds the map as it wants it, yet must end sales@'s session on
    bob's mailbox: the move was recorded before the map was written."""
    sales = f"sales@{DOMAIN}"
    shared = {"login": sales, "password": "sales-password"}
    dave = {"name": "dave", "password": "dave-password"}
    dc = dovecot(dovecot_failure_delay=0, mail_user_name=MAIL_USER)
    play = tmp_path / "play"
    run_role(mailhost, dc.config, [{"name": "bob", **shared}, {"name": "carol"}, dave], play)
    old = imap_session(clients, dc.ports["imaps"], sales, "sales-password")

    moved = [{"name": "bob"}, {"name": "carol", **shared}]
    bad_dave = {**dave, "password": "other", "cram_md5": True}
    out = run_role(
        mailhost,
        dc.config,
        [*moved, bad_dave],
        play,
        must_pass=False,
        pyqmail_mailboxes__update_password="on_create",
    )
    assert task_result(out, "Manage the SMTP AUTH users").get("failed")
    assert f"{sales}:carol" in (mailhost.root / "users" / "logins").read_text().splitlines()
    assert imap_open(old)

    out = run_role(mailhost, dc.config, [*moved, dave], play)
    assert kicked(out) == ([f"{ENDED}{sales}"], True)
    assert not imap_open(old), "sales@ still reads bob's mailbox: its move was never recorded"


def test_a_kick_that_failed_is_tried_again_by_the_next_run(
    mailhost: MailHost,
    dovecot: StartDovecot,
    tmp_path: Path,
    clients: Clients,
) -> None:
    """doveadm cannot answer (here: its configuration file broken after Dovecot started), so
    the run that changed alice's password fails naming her; the admin mends it and runs the
    play again, which changes nothing, yet must end her session: the login was kept in
    control/smtpusers.kick, and goes from it once her session is gone. The same for a run
    that dies between the new hash and the kick."""
    alice = {"name": "alice", "password": "alice-old-password"}
    bob = {"name": "bob", "password": "bob-password"}
    dc = dovecot(dovecot_failure_delay=0, mail_user_name=MAIL_USER)
    play = tmp_path / "play"
    run_role(mailhost, dc.config, [alice, bob], play)
    a_imap = imap_session(clients, dc.ports["imaps"], f"alice@{DOMAIN}", alice["password"])
    b_imap = imap_session(clients, dc.ports["imaps"], f"bob@{DOMAIN}", bob["password"])
    pending = mailhost.root / "control" / "smtpusers.kick"

    good = dc.config.read_text()
    dc.config.write_text("this is not a dovecot configuration {\n")
    boxes = [{**alice, "password": "alice-new-password"}, bob]
    out = run_role(mailhost, dc.config, boxes, play, must_pass=False)
    failed = task_result(out, KICK)
    assert failed.get("failed"), failed
    assert f"doveadm kick alice@{DOMAIN} exited" in failed["stderr"]
    assert imap_open(a_imap)  # (the failure: her session is still open)
    assert pending.read_text().splitlines()[1:] == [f"alice@{DOMAIN}"]
    assert (pending.stat().st_mode & 0o777, pending.stat().st_uid) == (0o600, os.geteuid())

    dc.config.write_text(good)
    out = run_role(mailhost, dc.config, boxes, play)
    assert kicked(out) == ([f"{ENDED}alice@{DOMAIN}"], True)
    assert not imap_open(a_imap), "alice's session outlived the run that failed to end it"
    assert imap_open(b_imap)
    assert not pending.exists()
    out = run_role(mailhost, dc.config, boxes, play)
    assert kicked(out) is None  # nothing pending any more: the task does not run

    # The run dies before its kick (here: no pyqmail-users where the role looks for it): bob's
    # new hash is written, and the module recorded his login before writing it.
    boxes = [boxes[0], {**bob, "password": "bob-new-password"}]
    out = run_role(mailhost, dc.config, boxes, play, must_pass=False, venv=str(tmp_path / "none"))
    assert task_result(out, KICK).get("failed")
    assert imap_open(b_imap)
    assert pending.read_text().splitlines()[1:] == [f"bob@{DOMAIN}"]
    out = run_role(mailhost, dc.config, boxes, play)
    assert kicked(out) == ([f"{ENDED}bob@{DOMAIN}"], True)
    assert not imap_open(b_imap), "bob's session outlived a run that died before its kick"
    assert not pending.exists()


def test_a_password_changed_while_dovecot_is_down_passes(
    mailhost: MailHost, dovecot: StartDovecot, tmp_path: Path
) -> None:
    """No Dovecot running (stopped by the admin, or not yet started): no session is open,
    so the run goes on; doveadm's answer is read, not taken for a failure."""
    alice = {"name": "alice", "password": "alice-old-password"}
    dc = dovecot(dovecot_failure_delay=0, mail_user_name=MAIL_USER)
    run_role(mailhost, dc.config, [alice], tmp_path / "play")
    dc.stop()
    out = run_role(mailhost, dc.config, [{**alice, "password": "alice-new"}], tmp_path / "play")
    assert kicked(out) == (["Dovecot is not running: no IMAP/POP3 session is open"], False)


def test_logins_with_doveadm_wildcards_are_not_kicked(
    mailhost: MailHost,
    dovecot: StartDovecot,
    tmp_path: Path,
    clients: Clients,
) -> None:
    """A login 'a*' (SMTP AUTH allows it, Dovecot never lets it in) would be a wildcard to
    doveadm kick, one like an address a network, and '127.2' the address 127.0.0.2 (Dovecot
    parses with inet_aton): removing them must not end alice's session (which comes from
    127.0.0.2)."""
    alice = {"name": "alice", "password": "alice-password"}
    star = {"name": "star", "login": f"a*@{DOMAIN}", "password": "star-password"}
    net = {"name": "net", "login": "127.0.0.0/8", "password": "net-password"}
    short = {"name": "short", "login": "127.2", "password": "short-password"}  # 127.0.0.2
    dc = dovecot(dovecot_failure_delay=0, mail_user_name=MAIL_USER)
    run_role(mailhost, dc.config, [alice, star, net, short], tmp_path / "play")
    a_imap = imap_session(clients, dc.ports["imaps"], f"alice@{DOMAIN}", alice["password"])
    out = run_role(mailhost, dc.config, [alice], tmp_path / "play")
    assert imap_open(a_imap)
    assert kicked(out) == (
        [
            "left out 127.0.0.0/8: doveadm would read it as a mask",
            "left out 127.2: doveadm would read it as a mask",
            f"left out a*@{DOMAIN}: doveadm would read it as a mask",
        ],
        False,
    )
    a_imap.logout()


def users_cli(
    mailhost: MailHost, config: Path, *args: str, password: str = ""
) -> subprocess.CompletedProcess[str]:
    """pyqmail-users on the test host's control/smtpusers and the given Dovecot."""
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("pyqmail-users")),
            "--file",
            str(mailhost.root / "control" / "smtpusers"),
            "--dovecot-config",
            str(config),
            *args,
        ],
        input=password,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_pyqmail_users_ends_the_sessions_of_a_changed_or_deleted_user(
    mailhost: MailHost, dovecot: StartDovecot, clients: Clients, tmp_path: Path
) -> None:
    """The same for a password changed by hand: ``pyqmail-users add`` of an existing user and
    ``del`` end that login's sessions; a Dovecot that cannot answer is an error (exit 3) that
    names the login, after the file's change (which stays)."""
    alice = mailhost.add("alice", "alice-old")
    bob = mailhost.add("bob", "bob-password")
    dc = dovecot(dovecot_failure_delay=0)
    port = dc.ports["imaps"]
    a_imap = imap_session(clients, port, alice, "alice-old")
    b_imap = imap_session(clients, port, bob, "bob-password")

    proc = users_cli(mailhost, dc.config, "add", alice, password="alice-new\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"updated {alice}", f"{ENDED}{alice}"]
    assert not imap_open(a_imap)
    assert imap_open(b_imap)

    proc = users_cli(mailhost, dc.config, "del", bob)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"deleted {bob}", f"{ENDED}{bob}"]
    assert not imap_open(b_imap)

    broken = tmp_path / "broken.conf"
    broken.write_text("this is not a dovecot configuration {\n")
    a_imap = imap_session(clients, port, alice, "alice-new")
    proc = users_cli(mailhost, broken, "add", alice, password="alice-newer\n")
    assert proc.returncode == 3
    assert proc.stdout.splitlines() == [f"updated {alice}"]
    assert f"doveadm kick {alice} exited" in proc.stderr
    assert f"doveadm -c {broken} kick LOGIN" in proc.stderr
    pending = mailhost.root / "control" / "smtpusers.kick"
    assert f"kept in {pending} for the next pyqmail-users kick" in proc.stderr
    assert pending.read_text().splitlines()[1:] == [alice]
    assert imap_open(a_imap)

    # The next pyqmail-users run, whatever it does, tries the pending login again: here
    # `kick` with no login of its own; her session ends and the file goes.
    proc = users_cli(mailhost, dc.config, "kick")
    assert (proc.returncode, proc.stdout.splitlines()) == (0, [f"{ENDED}{alice}"]), proc.stderr
    assert not imap_open(a_imap)
    assert not pending.exists()
