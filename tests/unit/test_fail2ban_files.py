"""files/fail2ban: the example jail and the filter load in fail2ban's own configuration reader.

(test_auth_parallel.py runs the filter against a real daemon's lines with fail2ban-regex.)
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

FILES = Path(__file__).parents[2] / "files" / "fail2ban"


def test_example_jail_loads_with_the_filter(tmp_path: Path) -> None:
    client = shutil.which("fail2ban-client")
    assert client, "fail2ban-client missing: run scripts/install-system-deps (package fail2ban)"
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    for old in (conf / "jail.d").iterdir():
        old.unlink()
    shutil.copy(FILES / "filter.d" / "pyqmail-smtpd.conf", conf / "filter.d")
    log = tmp_path / "current"
    log.write_text("")
    jail = (FILES / "jail.d" / "pyqmail.conf").read_text()
    lines = [
        f"logpath  = {log}" if line.startswith("logpath") else line for line in jail.splitlines()
    ]
    lines = [line for line in lines if "/var/log/pyqmail/" not in line]  # the other two logs
    (conf / "jail.d" / "pyqmail.conf").write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        [client, "-c", str(conf), "-d"], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "['add', 'pyqmail-smtpd', 'polling']" in out.stdout
    assert "auth-fail ip=<ADDR>" in out.stdout
    assert f"'addlogpath', '{log}'" in out.stdout
