"""files/fail2ban: each example jail loads with its filter in fail2ban's own configuration reader.

(test_auth_parallel.py runs the SMTP filter against a real daemon's lines with fail2ban-regex,
tests/dovecot/test_dovecot_logins.py the Dovecot filter against a real Dovecot's.)
"""

from __future__ import annotations

import shutil
import subprocess
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
