"""Every shell script template of every role (run, log/run, conftest, sendmail): an inventory
value with a line break stays in its comment, and where a number is expected only a number.

Root runs these scripts (supervise, pyqmail-restart-stale, the reload handlers): a value printed
raw in a ``#`` comment that holds a newline ends the comment, and what follows is a command.
Rendered in-process by Ansible's own templating (``Templar``, with the template action's
settings: trim_blocks, no backslash escaping), every value of the role set to a word, a newline
and ``INJECTED``: ``sh -n`` passes and, with the comments gone (``shlex``, as sh splits words),
no word starts with INJECTED (a quoted word holding the newline is one argument, not a line).
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = [
    *sorted(
        p.relative_to(REPO / "roles")
        for pattern in ("*/templates/**/run.j2", "*/templates/**/conftest.j2")
        for p in (REPO / "roles").glob(pattern)
    ),
    Path("pyqmail_install/templates/sendmail.j2"),
]
EVIL = "x\nINJECTED"


def hostile(stubs: Path) -> dict[str, Any]:
    """Every variable the scripts print, each with a line break (the conftest commands are the
    roles' own lists: stand-ins here)."""
    users = [f"pyqmail__{u}_user" for u in ("smtpd", "send", "remote", "mailbox", "log")]
    paths = ["pyqmail__venv", "pyqmail__root", "pyqmail__log_dir", "pyqmail__dovecot_config"]
    scanners = ["clamd_listen", "rspamd_listen", "clamd_config"]
    scanners += ["rspamd_confdir", "rspamd_rundir", "rspamd_dbdir"]
    paths += [f"pyqmail_scanners__{name}" for name in scanners]
    conftest = [str(stubs / "conftest"), f"--flag{EVIL}"]
    return {
        "ansible_managed": "tests/roles/test_script_comments.py",
        **dict.fromkeys(users, f"u{EVIL}"),
        **dict.fromkeys(paths, f"/p{EVIL}"),
        "pyqmail__dovecot_service": f"dovecot{EVIL}",
        "pyqmail__smtpd_conftest": conftest,
        "pyqmail__send_conftest": conftest,
        "pyqmail__dovecot_conftest": conftest,
        "pyqmail__allow_wildcard": False,
        "pyqmail_services__softlimit": f"1073741824{EVIL}",
        "pyqmail_services__workers": f"2{EVIL}",
        "pyqmail_services__log_size": f"1000000{EVIL}",
        "pyqmail_services__log_count": f"10{EVIL}",
        "pyqmail_services__listen_host": f"127.0.0.1{EVIL}",
        "pyqmail_services__kinds": {"smtp": {"mode": f"smtp{EVIL}"}},
        "pyqmail_scanners__service": f"clamd{EVIL}",
        "pyqmail_dovecot__listen_ip": f"::{EVIL}",
        "pyqmail_dovecot__listen_ports": {f"imap{EVIL}": f"143{EVIL}", "pop3": 110},
        "item": {"name": f"qmail-smtpd{EVIL}", "kind": "smtp", "port": f"25{EVIL}", "rules": "/r"},
    }


def render(template: Path, variables: dict[str, Any]) -> str:
    """The template as the template action renders it (trim_blocks, no backslash escaping)."""
    templar = Templar(loader=DataLoader(), variables=variables)
    text = trust_as_template((REPO / "roles" / template).read_text())
    overrides = {"trim_blocks": True, "lstrip_blocks": False, "newline_sequence": "\n"}
    return str(templar.template(text, escape_backslashes=False, overrides=overrides))


def test_every_script_template_is_here() -> None:
    """A new run or conftest template is checked too: the list is found, not written."""
    assert len(SCRIPTS) == 14, SCRIPTS
    assert {p.parts[0] for p in SCRIPTS} == {
        "pyqmail_dovecot",
        "pyqmail_install",
        "pyqmail_scanners",
        "pyqmail_services",
    }


@pytest.mark.parametrize("template", SCRIPTS, ids=[str(p) for p in SCRIPTS])
def test_a_line_break_in_a_value_makes_no_command(template: Path, tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text(render(template, hostile(tmp_path)))
    text = script.read_text()
    assert "INJECTED" in text, "the template prints none of the values: test nothing"
    check = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr + text
    words = shlex.split(text, comments=True)
    leaked = [w for w in words if w.startswith("INJECTED")]
    assert leaked == [], text


def test_comments_read_as_before_with_plain_values(tmp_path: Path) -> None:
    """Plain values print as they are: the filters change only blanks, and numbers."""
    plain = {
        **hostile(tmp_path),
        "pyqmail__smtpd_user": "pyqmaild",
        "pyqmail__send_user": "pyqmails",
        "pyqmail__smtpd_conftest": ["/opt/pyqmail/bin/pyqmail-smtpd", "--check"],
        "pyqmail__dovecot_config": "/etc/dovecot/pyqmail.conf",
        "pyqmail_dovecot__listen_ip": "::",
        "pyqmail_dovecot__listen_ports": {"imap": 143, "pop3": 110},
        "pyqmail_services__softlimit": 1073741824,
        "item": {"name": "qmail-smtpd", "kind": "smtp", "port": 25, "rules": "/r"},
    }
    supervise = Path("pyqmail_services/templates/var/qmail/supervise")
    conftest = render(supervise / "listener" / "conftest.j2", plain).splitlines()
    assert conftest[2].startswith("# qmail-smtpd: exits 0 when")
    assert conftest[3].endswith("(its --mode and rules cdb, as pyqmaild), touching nothing.")
    assert conftest[-1] == "exec softlimit -a 1073741824 /opt/pyqmail/bin/pyqmail-smtpd --check"
    send = render(supervise / "qmail-send" / "conftest.j2", plain).splitlines()
    assert send[3].startswith("# (as pyqmails), touching nothing.")
    run = render(supervise / "listener" / "run.j2", plain).splitlines()
    assert run[2].startswith("# qmail-smtpd: SMTP on port 25 - STARTTLS offered")
    dovecot = render(Path("pyqmail_dovecot/templates/var/qmail/supervise/dovecot/run.j2"), plain)
    assert dovecot.splitlines()[2] == "# dovecot: IMAP/POP3 on :: (imap 143, pop3 110)."
    assert dovecot.endswith("exec /usr/sbin/dovecot -F -c /etc/dovecot/pyqmail.conf\n")
