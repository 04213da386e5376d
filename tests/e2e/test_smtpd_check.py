"""pyqmail-smtpd --check: load the configuration as the daemon will, exit 0 or 111, touch nothing.

The role's reload handler runs it per listener (with that listener's --mode and --rules, as
its user) before ``svc -h``/``svc -t``: a configuration the daemon could not load refuses
the signal with the daemon's own message. Each broken root is also given to the daemon
itself, which must fail with the same line.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import IMPOSSIBLE_HERE
from tests.e2e.conftest import DROP_USER, IS_ROOT, QmailRoot, smtpd_command

RULES = '127.:allow,RELAYCLIENT=""\n:allow\n'


def run(root: QmailRoot, *args: str, user: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [*smtpd_command(), "--root", str(root.path), *args]
    if user and IS_ROOT:
        argv += ["--user", DROP_USER]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def check(root: QmailRoot, *args: str, user: bool = True) -> subprocess.CompletedProcess[str]:
    return run(
        root, "--check", "--mode", "smtp", "--rules", str(rules_path(root)), *args, user=user
    )


def rules_path(root: QmailRoot) -> Path:
    return root.path / "etc" / "smtp.cdb"


def tree(root: QmailRoot) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(root.path)), p.stat().st_mode, p.stat().st_mtime_ns)
        for p in root.path.rglob("*")
    )


@pytest.fixture
def good_root(qmail_root: QmailRoot) -> QmailRoot:
    qmail_root.rules(RULES)
    qmail_root.users({"joe": "secret"})
    return qmail_root


def test_good_configuration_exits_0_with_one_line_and_touches_nothing(good_root: QmailRoot) -> None:
    before = tree(good_root)
    result = check(good_root)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"pyqmail-smtpd: configuration of {good_root.path} for --mode smtp OK"
    )
    assert "me mx.test, 3 rcpthosts, TLS on, AUTH 1 user(s), senders off" in lines[0]
    assert f"rules {rules_path(good_root)}" in lines[0]
    assert tree(good_root) == before  # no AUTH state, no queue file, nothing
    assert not (good_root.path / "smtpd").exists()


def test_listen_is_optional_with_check_but_checked_when_given(good_root: QmailRoot) -> None:
    assert check(good_root, "--listen", "127.0.0.1:0").returncode == 0
    bad = check(good_root, "--listen", "0.0.0.0:25")
    assert bad.returncode == 111
    assert "refusing to listen on every address" in bad.stderr
    no_listen = run(good_root, "--mode", "smtp")  # the daemon itself still needs --listen
    assert no_listen.returncode == 2
    assert "the following arguments are required: --listen" in no_listen.stderr


def test_warnings_stay_on_the_ok_line(good_root: QmailRoot) -> None:
    good_root.remove_control("servercert.pem")
    good_root.remove_control("rcpthosts")
    result = check(good_root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert "TLS off" in result.stdout
    assert "; warning: no control/servercert.pem: STARTTLS not offered" in result.stdout
    assert "; warning: control/rcpthosts empty or missing" in result.stdout


def _control(name: str, data: bytes, mode: int = 0o644) -> Callable[[QmailRoot], None]:
    def apply(root: QmailRoot) -> None:
        root.control(name, data, mode)

    return apply


def _remove_me(root: QmailRoot) -> None:
    root.remove_control("me")


def _corrupt_rules(root: QmailRoot) -> None:
    root.write("etc/smtp.cdb", b"\x00" * 100)


def _missing_queue_dir(root: QmailRoot) -> None:
    (root.path / "queue" / "new").rmdir()


def _servercert_for_root_only(root: QmailRoot) -> None:
    os.chown(root.path / "control" / "servercert.pem", 0, 0)  # mode 0400: root alone


def _bad_senders(root: QmailRoot) -> None:
    root.write("users/senders", "joe: joe@mx.test bob\n")


BROKEN = [
    ("databytes", _control("databytes", b"ten\n"), "control/databytes:1: not a non-negative"),
    ("me", _remove_me, "control/me: missing or empty; it must name this host"),
    ("me-crlf", _control("me", b"mx.test\r\n"), "control/me:1: carriage return"),
    ("rules", _corrupt_rules, "etc/smtp.cdb: "),
    ("servercert", _control("servercert.pem", b"not a pem\n", 0o400), "servercert.pem: "),
    ("queue", _missing_queue_dir, "queue directory missing"),
    ("senders", _bad_senders, "users/senders:1: 'bob' is neither an address nor @domain"),
    (
        "dmarcreject",
        _control("dmarcreject", b"bounce\n"),
        "control/dmarcreject:1: 'bounce' is not a DMARC action",
    ),
    (
        "dnsresolver",
        _control("dnsresolver", b"ns1.example.org\n"),
        "control/dnsresolver:1: 'ns1.example.org' is not an IP address",
    ),
]
if IS_ROOT:
    BROKEN.append(("unreadable-servercert", _servercert_for_root_only, "servercert.pem: "))


@pytest.mark.parametrize(
    ("breakage", "message"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_broken_configuration_exits_111_with_the_daemons_message(
    good_root: QmailRoot, breakage: Callable[[QmailRoot], None], message: str
) -> None:
    breakage(good_root)
    before = tree(good_root)
    result = check(good_root)
    assert result.returncode == 111, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("pyqmail-smtpd: fatal: ")
    assert message in lines[0]
    assert tree(good_root) == before
    daemon = run(good_root, "--listen", "127.0.0.1:0", "--mode", "smtp", "--rules",
                 str(rules_path(good_root)))  # fmt: skip
    assert daemon.returncode == 111
    assert lines[0] in daemon.stderr.splitlines(), (lines, daemon.stderr)


def test_every_problem_is_reported_one_line_each(good_root: QmailRoot) -> None:
    _corrupt_rules(good_root)
    good_root.control("maxrcpt", "lots\n")
    _missing_queue_dir(good_root)
    result = check(good_root)
    assert result.returncode == 111
    lines = result.stderr.splitlines()
    assert len(lines) == 3, lines
    assert all(line.startswith("pyqmail-smtpd: fatal: ") for line in lines)
    assert "control/maxrcpt:1: not a non-negative integer" in lines[0]
    assert "queue directory missing" in lines[1]
    assert "etc/smtp.cdb" in lines[2]


def test_tls_modes_need_the_certificate(good_root: QmailRoot) -> None:
    good_root.remove_control("servercert.pem")
    result = run(good_root, "--check", "--mode", "submission")
    assert result.returncode == 111
    assert "servercert.pem: missing, and --mode submission needs TLS" in result.stderr


@pytest.mark.skipif(not IS_ROOT, reason=f"{IMPOSSIBLE_HERE} switching users needs root")
def test_check_runs_as_the_daemons_user(good_root: QmailRoot) -> None:
    """A file only root can read passes as root and fails as --user, as the daemon would."""
    _servercert_for_root_only(good_root)
    assert check(good_root, user=False).returncode == 0
    as_user = check(good_root)
    assert as_user.returncode == 111
    assert "servercert.pem" in as_user.stderr


@pytest.mark.skipif(not IS_ROOT, reason=f"{IMPOSSIBLE_HERE} switching users needs root")
def test_auth_state_directory_must_be_writable_by_the_user(good_root: QmailRoot) -> None:
    state_dir = good_root.path / "smtpd"
    state_dir.mkdir(mode=0o700)  # root's: the daemon's user cannot create its state there
    result = check(good_root)
    assert result.returncode == 111
    assert f"{state_dir}/authstate.sqlite: cannot open the AUTH state" in result.stderr
    assert list(state_dir.iterdir()) == []


@pytest.mark.skipif(not IS_ROOT, reason=f"{IMPOSSIBLE_HERE} switching users needs root")
def test_greylist_state_directory_must_be_writable_by_the_user(good_root: QmailRoot) -> None:
    good_root.remove_control("smtpusers")  # no AUTH: only the greylist needs the directory
    good_root.control("greylistdelay", "300\n")
    state_dir = good_root.path / "smtpd"
    state_dir.mkdir(mode=0o700)
    result = check(good_root)
    assert result.returncode == 111
    [line] = result.stderr.splitlines()
    assert line.startswith(
        f"pyqmail-smtpd: fatal: {state_dir}/greylist3.sqlite: cannot open the greylist:"
        f" cannot create files in {state_dir} as uid "
    ), line
