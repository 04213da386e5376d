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

from pyqmail.authdb import AuthDBError, add_kicks, kicks_path, read_kicks
from pyqmail.tools import dovecotkick
from pyqmail.tools.dovecotkick import Kicked, KickError, end_sessions, is_mask, remember


def test_the_pending_file_sits_beside_smtpusers() -> None:
    assert kicks_path("/var/qmail/control/smtpusers") == "/var/qmail/control/smtpusers.kick"


def test_remember_records_each_change_root_alone(tmp_path: Path) -> None:
    """A login changed twice is recorded twice (a round may have read the first line
    before the second change); the same login twice in one call is one change."""
    config = tmp_path / "dovecot.conf"
    config.write_text("")
    pending = tmp_path / "smtpusers.kick"
    remember(
        str(pending), ["alice@example.org", "bob@example.org", "alice@example.org"], str(config)
    )
    remember(str(pending), ["bob@example.org", "carol@example.org"], str(config))
    names = ("alice", "bob", "bob", "carol")
    assert read_kicks(str(pending)) == [f"{n}@example.org" for n in names]
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600
    names = sorted(p.name for p in tmp_path.iterdir())  # (the lock file stays, as flock's do)
    assert names == ["dovecot.conf", "smtpusers.kick", "smtpusers.kick.lock"]
    assert stat.S_IMODE((tmp_path / "smtpusers.kick.lock").stat().st_mode) == 0o600


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
    (tmp_path / "smtpusers.kick.lock").unlink()
    end_sessions(["bob@example.org"], absent, str(pending))
    assert list(tmp_path.iterdir()) == []  # nothing recorded: not even a lock file


def test_a_login_given_is_kicked_even_when_the_file_lost_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pending file that cannot be written (here: a directory in its place) does not keep
    the logins given from their kick; and a concurrent kick that took a login out of the file
    before this one read it does not either: the logins given are always kicked."""
    config = tmp_path / "dovecot.conf"
    config.write_text("")
    pending = tmp_path / "smtpusers.kick"
    pending.mkdir()
    asked: list[list[str]] = []

    def kick(logins: list[str], cfg: str) -> Kicked:
        asked.append(logins)
        return Kicked(ended=list(logins))

    monkeypatch.setattr(dovecotkick, "kick", kick)
    done = end_sessions(["alice@example.org"], str(config), str(pending))
    assert asked == [["alice@example.org"]]
    assert done.lines() == ["ended the IMAP/POP3 sessions of alice@example.org"]


def test_lines_that_are_no_login_are_left_out(tmp_path: Path) -> None:
    """A hand edit, CRLF, bytes that are not UTF-8: never passed to doveadm as a login."""
    pending = tmp_path / "smtpusers.kick"
    pending.write_bytes(b"# header\nalice@example.org\na b\nx\r\n\xff\xfe\nbob@example.org\n")
    assert read_kicks(str(pending)) == ["alice@example.org", "bob@example.org"]


@pytest.mark.parametrize(
    "login",
    [
        "a*@example.org",
        "?",
        "127.0.0.2",
        "127.2",
        "0x7f.1",
        "017.0.0.1",
        "4711",
        "0/0",
        "10.1/8",
        "::1",
        "[::1]",
        "2001:db8::/32",
    ],
)
def test_what_doveadm_reads_as_an_address_or_a_wildcard_is_a_mask(login: str) -> None:
    """Dovecot parses IPv4 with inet_aton: short, hex, octal and bare-number forms too."""
    assert is_mask(login)


@pytest.mark.parametrize("login", ["alice@example.org", "bob", "127.0.0.1.example.org", "a:b@c"])
def test_an_ordinary_login_is_no_mask(login: str) -> None:
    assert not is_mask(login)


def test_only_the_confirmed_logins_leave_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bookkeeping around doveadm (whose answers tests/dovecot reads for real): a login
    whose kick failed stays, one confirmed goes, and one another writer recorded during the
    kicks (the module, another pyqmail-users) is kept for the next round, not overwritten."""
    config = tmp_path / "dovecot.conf"
    config.write_text("")
    pending = tmp_path / "smtpusers.kick"
    add_kicks(str(pending), ["alice@example.org", "bob@example.org"])

    def kick(logins: list[str], cfg: str) -> Kicked:
        assert (logins, cfg) == (["alice@example.org", "bob@example.org"], str(config))
        add_kicks(str(pending), ["late@example.org"])  # meanwhile
        raise KickError("doveadm kick bob@example.org exited 75", ["bob@example.org"])

    monkeypatch.setattr(dovecotkick, "kick", kick)
    with pytest.raises(KickError):
        end_sessions([], str(config), str(pending))
    assert read_kicks(str(pending)) == ["bob@example.org", "late@example.org"]


def test_a_login_recorded_again_during_the_round_stays_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alice's password replaced while a round kicks her (the module, another
    pyqmail-users): a session opened with the old password between that kick and the change
    is still open, so the round must not take the second record out with its own. The
    round's read and confirmed lines go; the next round kicks her again, once, and the file
    goes. A failed login put back is not doubled."""
    config = tmp_path / "dovecot.conf"
    config.write_text("")
    pending = tmp_path / "smtpusers.kick"
    add_kicks(str(pending), ["alice@example.org", "bob@example.org"])
    asked: list[list[str]] = []

    def kick(logins: list[str], cfg: str) -> Kicked:
        asked.append(logins)
        if len(asked) == 1:
            add_kicks(str(pending), ["alice@example.org", "bob@example.org"])  # meanwhile
            raise KickError("doveadm kick bob@example.org exited 75", ["bob@example.org"])
        return Kicked(ended=list(logins))

    monkeypatch.setattr(dovecotkick, "kick", kick)
    with pytest.raises(KickError):
        end_sessions([], str(config), str(pending))
    assert read_kicks(str(pending)) == ["bob@example.org", "alice@example.org"]
    end_sessions([], str(config), str(pending))
    assert asked[1] == ["bob@example.org", "alice@example.org"]
    assert not pending.exists()


def test_no_doveadm_means_no_dovecot_and_no_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dovecot's package removed, its configuration file left: nothing can be open, so the
    pending logins are confirmed rather than failing every later run."""
    config = tmp_path / "dovecot.conf"
    config.write_text("")
    pending = tmp_path / "smtpusers.kick"
    add_kicks(str(pending), ["alice@example.org"])
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(dovecotkick, "DOVEADM_DIRS", str(tmp_path))
    done = end_sessions([], str(config), str(pending))
    assert done.lines() == ["Dovecot is not installed (no doveadm): no IMAP/POP3 session is open"]
    assert not pending.exists()
