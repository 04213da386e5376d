"""pyqmail-checkpassword speaking the checkpassword interface with Dovecot's real reply program.

Each test runs the program as a process: the request goes in on descriptor 3, Dovecot's own
``checkpassword-reply`` (from dovecot-core) answers on descriptor 4, as inside Dovecot's auth.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyqmail import authdb
from pyqmail.tools.checklogin import LoginsError, parse_logins

REPLY = "/usr/lib/dovecot/checkpassword-reply"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "control").mkdir()
    (tmp_path / "users").mkdir()
    users = authdb.AuthDB([authdb.User("alice@mx.test", authdb.hash_password("secret"))])
    (tmp_path / "control" / "smtpusers").write_text(users.dump())
    (tmp_path / "users" / "mailboxes").write_text("alice:/var/vmail/alice\nbob:/var/vmail/bob\n")
    (tmp_path / "users" / "logins").write_text("# login:mailbox\nalice@mx.test:alice\n")
    return tmp_path


def run(root: Path, request: bytes, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(exit status, what the reply program wrote on fd 4, stderr)."""
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    os.write(req_w, request)
    os.close(req_w)
    argv = [sys.executable, "-m", "pyqmail.tools.checkpassword", "--root", str(root)]
    argv += ["--mail-user", "pyqmails", "--mail-group", "pyqmail", REPLY]
    script = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4);"
        " os.execv(sys.argv[3], sys.argv[3:])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(req_r), str(rep_w), *argv],
        pass_fds=(req_r, rep_w),
        capture_output=True,
        # ORIG_UID: Dovecot sets it; checkpassword-reply refuses to answer without it.
        env={**os.environ, "ORIG_UID": str(os.getuid()), **(env or {})},
        check=False,
        timeout=30,
    )
    os.close(req_r)
    os.close(rep_w)
    with os.fdopen(rep_r, "rb") as f:
        reply = f.read().decode()
    return proc.returncode, reply, proc.stderr.decode()


def test_right_password_gives_home_and_the_delivery_user(root: Path) -> None:
    status, reply, _ = run(root, b"alice@mx.test\0secret\0\0")
    assert status == 0
    fields = dict(x.split("=", 1) for x in reply.split("\t") if x)
    assert fields["user"] == "alice@mx.test"
    assert fields["userdb_home"] == "/var/vmail/alice"
    assert fields["userdb_uid"] == "pyqmails"
    assert fields["userdb_gid"] == "pyqmail"


@pytest.mark.parametrize(
    "request_",
    [
        b"alice@mx.test\0wrong\0\0",
        b"nobody@mx.test\0secret\0\0",
        b"ALICE@mx.test\0secret\0\0",  # logins are exact, as for SMTP AUTH
        b"alice@mx.test\0secret",  # malformed: no terminating NUL fields
        b"x" * 600 + b"\0secret\0\0",  # longer than the interface allows
    ],
)
def test_everything_else_fails_with_status_1_and_no_reply(root: Path, request_: bytes) -> None:
    status, reply, stderr = run(root, request_)
    assert (status, reply) == (1, "")
    assert "secret" not in stderr


def test_login_without_its_mailbox_fails(root: Path) -> None:
    (root / "users" / "mailboxes").write_text("bob:/var/vmail/bob\n")  # alice removed
    assert run(root, b"alice@mx.test\0secret\0\0")[:2] == (1, "")


def test_userdb_lookup_needs_no_password_and_knows_unknown_users(root: Path) -> None:
    status, reply, _ = run(root, b"alice@mx.test\0\0\0", {"AUTHORIZED": "1"})
    assert status == 2 and "userdb_home=/var/vmail/alice" in reply
    assert run(root, b"carol@mx.test\0\0\0", {"AUTHORIZED": "1"})[0] == 3
    refused = run(root, b"alice@mx.test\0\0\0", {"AUTHORIZED": "1", "CREDENTIALS_LOOKUP": "1"})
    assert refused[0] == 1
    assert "only PLAIN and LOGIN" in refused[2]


def test_unreadable_user_database_is_a_temporary_failure(root: Path) -> None:
    (root / "control" / "smtpusers").write_text("alice@mx.test:not-a-hash\n")
    status, reply, stderr = run(root, b"alice@mx.test\0secret\0\0")
    assert (status, reply) == (111, "")
    assert "smtpusers:1" in stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alice\n", "expected login:mailbox"),
        ("a b:alice\n", "forbidden character"),
        ("a@x:alice\na@x:bob\n", "listed twice"),
    ],
)
def test_bad_logins_file_names_file_and_line(text: str, message: str) -> None:
    with pytest.raises(LoginsError, match=rf"^logins:\d: .*{message}"):
        parse_logins(text, "logins")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--root"], "missing value: --root"),
        (["--frobnicate", "x", REPLY], "unknown option"),
        (["--root", "/var/qmail"], "no program to run"),
    ],
)
def test_bad_command_line_exits_2_naming_the_problem(argv: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pyqmail.tools.checkpassword", *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 2
    assert message in done.stderr and "usage: pyqmail-checkpassword" in done.stderr
