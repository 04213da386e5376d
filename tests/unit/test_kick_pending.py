"""The logins whose IMAP/POP3 sessions must still end (``control/smtpusers.kick``).

What doveadm answers is tests/dovecot/test_dovecot_sessions.py's, with a real Dovecot; here
the file itself: written only where Dovecot is set up, root's alone, one valid login a line,
gone once nothing can be open.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pyqmail.authdb import AuthDBError, kicks_path, read_kicks
from pyqmail.tools.dovecotkick import end_sessions, remember


def test_the_pending_file_sits_beside_smtpusers() -> None:
    assert kicks_path("/var/qmail/control/smtpusers") == "/var/qmail/control/smtpusers.kick"


def test_remember_adds_each_login_once_root_alone(tmp_path: Path) -> None:
    config = tmp_path / "dovecot.conf"
    config.write_text("")
    pending = tmp_path / "smtpusers.kick"
    remember(str(pending), ["alice@example.org", "bob@example.org"], str(config))
    remember(str(pending), ["bob@example.org", "carol@example.org"], str(config))
    assert read_kicks(str(pending)) == [f"{n}@example.org" for n in ("alice", "bob", "carol")]
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dovecot.conf", "smtpusers.kick"]


@pytest.mark.parametrize("login", ["a\nb@example.org", "a b", "x:y", "", "#comment"])
def test_a_login_that_is_not_one_line_of_the_file_is_refused(tmp_path: Path, login: str) -> None:
    """A newline would make two logins of one (and end a stranger's sessions next time)."""
    config = tmp_path / "dovecot.conf"
    config.write_text("")
    pending = tmp_path / "smtpusers.kick"
    with pytest.raises(AuthDBError, match="user name"):
        remember(str(pending), ["alice@example.org", login], str(config))
    assert not pending.exists()


def test_nothing_is_kept_or_left_where_dovecot_is_not_set_up(tmp_path: Path) -> None:
    """No configuration file: no Dovecot, no session; a file left from when there was one
    (its logins could not be ended then) goes, since nothing can be open now."""
    pending = tmp_path / "smtpusers.kick"
    absent = str(tmp_path / "no-dovecot.conf")
    remember(str(pending), ["alice@example.org"], absent)
    assert not pending.exists()
    pending.write_text("# left\nalice@example.org\n")
    done = end_sessions(["bob@example.org"], absent, str(pending))
    assert (done.configured, done.lines()) == (False, [])
    assert not pending.exists()
    assert not os.path.exists(absent)
