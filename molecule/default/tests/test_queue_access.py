"""Messages injected by root reach pyqmail-send; pyqmail-send --check accepts the configuration."""

from __future__ import annotations

import uuid
from typing import Any

from conftest import MX_NAME
from mailcheck import put_file, wait_for

SENDMAIL = "/opt/pyqmail/bin/pyqmail-sendmail"


AS_SMTPD = "setpriv --reuid pyqmaild --regid pyqmail --init-groups"
AS_SEND = "setpriv --reuid pyqmails --regid pyqmail --init-groups"


def test_queue_layout_keeps_pyqmail_smtpd_out(mx: Any) -> None:
    """Incoming directories setgid pyqmail and sticky; the rest pyqmail-send's alone."""
    modes = {"tmp": 0o3730, "new": 0o3770, "mess": 0o700, "state": 0o700, "bad": 0o700}
    for sub, mode in modes.items():
        f = mx.file(f"/var/qmail/queue/{sub}")
        assert (f.user, f.group, f.mode) == ("pyqmails", "pyqmail", mode), sub
    for sub in ("tmp", "mess", "state", "bad"):
        out = mx.run(f"{AS_SMTPD} ls /var/qmail/queue/{sub}")
        assert out.rc != 0 and "Permission denied" in out.stderr, sub


def test_only_the_verifier_reads_the_password_hashes(mx: Any) -> None:
    f = mx.file("/var/qmail/control/smtpusers")
    assert (f.user, f.group, f.mode) == ("root", "pyqmaila", 0o640)
    assert "pyqmaila" in mx.user("pyqmaild").groups
    assert "pyqmaila" not in mx.user("pyqmails").groups
    assert mx.run(f"{AS_SMTPD} head -c1 /var/qmail/control/smtpusers").rc == 0
    out = mx.run(f"{AS_SEND} head -c1 /var/qmail/control/smtpusers")
    assert out.rc != 0 and "Permission denied" in out.stderr


def test_message_injected_by_root_is_delivered(mx: Any) -> None:
    """cron runs sendmail as root (umask 022): its queue file goes to pyqmails, 0600."""
    token = uuid.uuid4().hex
    message = f"From: <root@{MX_NAME}>\nSubject: root {token}\n\ntoken {token}\n"
    put_file(mx, f"/tmp/{token}.eml", message.encode())
    mx.check_output(
        f"umask 022 && {SENDMAIL} -f root@{MX_NAME} postmaster@{MX_NAME} < /tmp/{token}.eml"
    )

    def delivered() -> str:
        return str(mx.run(f"grep -rl {token} /var/vmail/admin/Maildir/new/").stdout.strip())

    assert wait_for(delivered, timeout=30), mx.run("ls -l /var/qmail/queue/bad").stdout


def test_send_check_accepts_the_provisioned_configuration(mx: Any) -> None:
    """What the reload handler runs before svc -h of qmail-send."""
    out = mx.run("/opt/pyqmail/bin/pyqmail-send --check --root /var/qmail --user pyqmails")
    assert out.rc == 0, out.stderr
    assert f"me {MX_NAME}" in out.stdout


def test_usr_sbin_sendmail_is_pyqmail_and_delivers(mx: Any) -> None:
    """No other MTA in the image: the role links /usr/sbin/sendmail (and /usr/lib/sendmail)
    to its pyqmail-sendmail wrapper; cron's call reaches the postmaster's mailbox."""
    for path in ("/usr/sbin/sendmail", "/usr/lib/sendmail"):
        link = mx.file(path)
        assert link.is_symlink and link.linked_to == "/opt/pyqmail/bin/sendmail", path
    token = uuid.uuid4().hex
    put_file(mx, f"/tmp/{token}.eml", f"Subject: cron {token}\n\ntoken {token}\n".encode())
    mx.check_output(
        f"/usr/sbin/sendmail -FCronDaemon -i -B8BITMIME -oem postmaster < /tmp/{token}.eml"
    )

    def delivered() -> str:
        return str(mx.run(f"grep -rl {token} /var/vmail/admin/Maildir/new/").stdout.strip())

    assert wait_for(delivered, timeout=30)


def test_senders_map_is_for_the_verifier_only(mx: Any) -> None:
    f = mx.file("/var/qmail/users/senders")
    assert (f.user, f.group, f.mode) == ("root", "pyqmaila", 0o640)
    assert f"alice@{MX_NAME}: alice@{MX_NAME}" in f.content_string
