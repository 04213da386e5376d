"""Messages injected by root reach pyqmail-send; pyqmail-send --check accepts the configuration."""

from __future__ import annotations

import uuid
from typing import Any

from conftest import MX_NAME
from mailcheck import put_file, wait_for

SENDMAIL = "/opt/pyqmail/bin/pyqmail-sendmail"


def test_incoming_queue_dirs_are_setgid_pyqmail(mx: Any) -> None:
    for sub in ("tmp", "new"):
        f = mx.file(f"/var/qmail/queue/{sub}")
        assert (f.user, f.group, f.mode) == ("pyqmails", "pyqmail", 0o2770), sub


def test_message_injected_by_root_is_delivered(mx: Any) -> None:
    """cron runs sendmail as root: its queue file must get group pyqmail (setgid new/ tmp/)."""
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
