"""files/fail2ban: each example jail loads with its filter in fail2ban's own configuration reader;
each filter counts a failed check but not a login refused by the lock (no password tested).

(test_auth_parallel.py runs the SMTP filter against a real daemon's lines with fail2ban-regex,
tests/dovecot/test_dovecot_logins.py the Dovecot filter against a real Dovecot's.)
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

FILES = Path(__file__).parents[2] / "files" / "fail2ban"


@pytest.mark.parametrize(
    ("jail", "name", "regex"),
    [
        ("pyqmail.conf", "pyqmail-smtpd", "auth-fail ip=<ADDR>"),
        ("pyqmail-dovecot.conf", "pyqmail-dovecot", "checkpassword\\\\([^,()<>]*,<ADDR>,"),
    ],
)
def test_example_jail_loads_with_the_filter(
    tmp_path: Path, jail: str, name: str, regex: str
) -> None:
    client = shutil.which("fail2ban-client")
    assert client, "fail2ban-client missing: run scripts/install-system-deps (package fail2ban)"
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    for old in (conf / "jail.d").iterdir():
        old.unlink()
    shutil.copy(FILES / "filter.d" / f"{name}.conf", conf / "filter.d")
    log = tmp_path / "current"
    log.write_text("")
    text = (FILES / "jail.d" / jail).read_text()
    lines = [
        f"logpath  = {log}" if line.startswith("logpath") else line for line in text.splitlines()
    ]
    lines = [line for line in lines if "/var/log/pyqmail/" not in line]  # the other logs
    (conf / "jail.d" / jail).write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        [client, "-c", str(conf), "-d"], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"['add', '{name}', 'polling']" in out.stdout
    assert regex in out.stdout, out.stdout
    assert f"'addlogpath', '{log}'" in out.stdout


def tai64n(lines: list[str]) -> str:
    """The lines as ``multilog t`` writes them: a TAI64N stamp (now, TAI = UTC + 10 s) first."""
    stamp = f"@{(1 << 62) + int(time.time()) + 10:016x}{0:08x}"
    return "".join(f"{stamp} {line}\n" for line in lines)


def banned(tmp_path: Path, name: str, lines: list[str]) -> list[str]:
    """The address of each line ``fail2ban-regex`` counts with filter ``name``, in order."""
    regex = shutil.which("fail2ban-regex")
    assert regex, "fail2ban-regex missing: run scripts/install-system-deps (package fail2ban)"
    log = tmp_path / "current"
    log.write_text(tai64n(lines))
    out = subprocess.run(
        [regex, "--out", "ip", str(log), str(FILES / "filter.d" / f"{name}.conf")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.split()


# pyqmail-smtpd's lines as src/pyqmail/smtpd/auth.py:log_auth_fail writes them (field values
# escaped by pyqmail.log.clean: no blank in a value)
SMTPD_LINES = [
    # counted: a password (or something that could be one) was tested
    (
        "192.0.2.1",
        "pid=7 auth-fail ip=192.0.2.1 port=4001 mech=PLAIN user=alice@mx.test"
        " reason=password delay=2",
    ),
    ("192.0.2.2", "pid=7 auth-fail ip=192.0.2.2 port=4002 mech=PLAIN user=- reason=malformed"),
    (
        "192.0.2.3",
        "pid=7 auth-fail ip=192.0.2.3 port=4003 mech=LOGIN user=x\\x20reason=locked"
        " reason=password delay=1",
    ),  # a name built to look locked
    (
        "192.0.2.4",
        "pid=7 auth-fail ip=192.0.2.4 port=4004 mech=PLAIN user=reason=locked reason=password",
    ),
    ("192.0.2.5", "pid=7 auth-fail ip=192.0.2.5 port=4005 mech=PLAIN user=AAAA...(cut)"),
    # not counted: the name was locked, no password was checked
    (
        None,
        "pid=7 auth-fail ip=192.0.2.10 port=4010 mech=PLAIN user=alice@mx.test"
        " reason=locked delay=2",
    ),
    (None, "pid=7 auth-fail ip=192.0.2.11 port=4011 mech=LOGIN user=nobody@mx.test reason=locked"),
]


def test_the_smtpd_filter_counts_failed_checks_but_not_a_locked_name(tmp_path: Path) -> None:
    """A locked name is refused without its password being checked, most often its own
    user's clients retrying the right password while a botnet holds the lock: fail2ban must
    not ban them for it."""
    lines = [line for _, line in SMTPD_LINES]
    assert banned(tmp_path, "pyqmail-smtpd", lines) == [ip for ip, _ in SMTPD_LINES if ip]


# Dovecot 2.3's auth process (log_timestamp =, auth_verbose = yes), src/auth/db-checkpassword.c:
# exit 1 is "Login failed (status=1)" (Info), exit 111 "Child <pid> exited with status 111"
# (Error); the checker's stderr comes out as an Error line of its own.
DOVECOT_LINES = [
    (
        "192.0.2.1",
        "auth: Info: checkpassword(alice@mx.test,192.0.2.1,<AbCd1234>): Login failed (status=1)",
    ),
    (
        "192.0.2.2",
        "auth: Info: checkpassword(nobody@mx.test,192.0.2.2,<EfGh5678>): Login failed (status=1)",
    ),
    (
        None,
        "auth: Error: pyqmail-checkpassword: login 'alice@mx.test' from 192.0.2.10 is locked:"
        " refused, no password checked",
    ),
    (
        None,
        "auth: Error: checkpassword(alice@mx.test,192.0.2.10,<IjKl9012>):"
        " Child 4242 exited with status 111",
    ),
]


def test_the_dovecot_filter_counts_failed_checks_but_not_a_locked_login(tmp_path: Path) -> None:
    lines = [line for _, line in DOVECOT_LINES]
    assert banned(tmp_path, "pyqmail-dovecot", lines) == [ip for ip, _ in DOVECOT_LINES if ip]
