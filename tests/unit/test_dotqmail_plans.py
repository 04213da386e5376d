"""What a ``.qmail`` file says when it says little: dot-qmail(5)'s empty file (0 bytes:
default delivery to ``./Maildir/``) against a file of comments only (bytes, no instruction:
the message is delivered nowhere, the classic discard address such as ``noreply@``), a file
whose first line is blank (``echo > ~/.qmail``: qmail-local's "first line of .qmail file is
blank", #4.2.1, a deferral, never a discard), and an
empty alias file, which has no Maildir to fall back to and defers naming itself. And who may
write them: a ``.qmail`` file or its directory (a home, ``alias/``) writable by group or
others, or owned by neither the delivery user nor root, defers naming it (#4.7.0)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from pyqmail.control.send import Control
from pyqmail.queue.format import Envelope
from pyqmail.queue.store import Queue
from pyqmail.send.delivery import Result
from pyqmail.send.dotqmail import Plan
from pyqmail.send.local import LocalDelivery
from pyqmail.send.manager import Log, Manager

MESSAGE = b"From: <a@remote.test>\r\nSubject: hi\r\n\r\nbody\r\n"
COMMENTS = "# Written by the Ansible role pyqmail_aliases; removed when ...\n"


def _deliver(root: Path, recipient: str) -> tuple[LocalDelivery, Result]:
    local = LocalDelivery(Control.load(root), Queue(root / "queue"))
    env = Envelope("Q1", "a@remote.test", (recipient,), len(MESSAGE), 0.0)
    return local, local.deliver(env, MESSAGE, recipient)


def _delivered(root: Path) -> list[Path]:
    """Every file in a new/ or cur/ under the test's directory: what any Maildir holds."""
    return [p for p in root.parent.rglob("*") if p.is_file() and p.parent.name in ("new", "cur")]


@pytest.mark.parametrize(
    ("file", "text"),
    [
        ("qmail/alias/.qmail-noreply", COMMENTS),
        ("qmail/alias/.qmail-noreply", "# discard\n\n   \n#\n"),
        ("home/.qmail-noreply", "# the mailbox's own discard extension\n"),
    ],
)
def test_a_dotqmail_of_comments_only_discards(send_root: Path, file: str, text: str) -> None:
    path = send_root.parent / file
    path.write_text(text)
    recipient = "noreply@mx.test" if "alias" in file else "user-noreply@mx.test"
    local, result = _deliver(send_root, recipient)
    assert result.kind == "ok", result
    assert result.detail == f"discarded: {path} has no delivery instruction"
    assert _delivered(send_root) == []
    assert not (send_root / "alias" / "Maildir").exists()
    assert local.queue is not None and local.queue.ids("new") == []  # nothing forwarded


@pytest.mark.parametrize("name", [".qmail", ".qmail-ext"])
def test_an_empty_dotqmail_in_a_home_is_default_delivery(send_root: Path, name: str) -> None:
    home = send_root.parent / "home"
    (home / name).write_bytes(b"")
    _, result = _deliver(send_root, "user@mx.test" if name == ".qmail" else "user-ext@mx.test")
    assert result.kind == "ok", result
    [delivered] = _delivered(send_root)
    assert delivered.parent == home / "Maildir" / "new"


@pytest.mark.parametrize("name", [".qmail-info", ".qmail-default"])
def test_an_empty_alias_file_defers_naming_itself(send_root: Path, name: str) -> None:
    """Not qmail's default delivery into alias/Maildir/: the role makes alias/ root's, 0755,
    so the delivery user failed on EACCES for a week, then bounced."""
    path = send_root / "alias" / name
    path.write_bytes(b"")
    _, result = _deliver(send_root, "info@mx.test")
    assert (result.kind, result.status) == ("temp", "4.3.5"), result
    assert f"{path} is empty: it has no delivery instruction" in result.detail
    assert _delivered(send_root) == []
    assert not (send_root / "alias" / "Maildir").exists()


def test_the_discard_is_logged_as_a_delivery_naming_the_file(send_root: Path) -> None:
    path = send_root / "alias" / ".qmail-noreply"
    path.write_text(COMMENTS)
    Queue(send_root / "queue").enqueue("a@remote.test", ["noreply@mx.test"], MESSAGE)
    out = io.StringIO()
    m = Manager(send_root, Log(out))
    m.pickup()
    deadline = time.monotonic() + 20
    while m.msgs and time.monotonic() < deadline:
        m.dispatch()
        m.finish()
        time.sleep(0.02)
    m.children.close()
    assert not m.msgs
    [line] = [line for line in out.getvalue().splitlines() if " to=<noreply@mx.test>" in line]
    assert "result=done" in line
    assert f"detail=discarded: {path} has no delivery instruction" in line
    assert _delivered(send_root) == []


@pytest.mark.parametrize(
    ("file", "text"),
    [
        ("home/.qmail", "\n"),  # echo > ~/.qmail
        ("home/.qmail", "   \n"),
        ("home/.qmail", " \t\r\n# comment\n"),
        ("home/.qmail", "\n./Maildir/\n"),  # qmail-local defers whatever follows
        ("home/.qmail-ext", "\n"),
        ("qmail/alias/.qmail-info", "\n&user@mx.test\n"),
        ("qmail/alias/.qmail-default", "\n\n"),
    ],
)
def test_a_dotqmail_whose_first_line_is_blank_defers(send_root: Path, file: str, text: str) -> None:
    """Not a file of comments only (a discard): the message stays queued, and the reason
    names the file, as qmail-local's "Uh-oh: first line of .qmail file is blank. (#4.2.1)"."""
    path = send_root.parent / file
    path.write_text(text)
    recipient = {"home/.qmail": "user", "home/.qmail-ext": "user-ext"}.get(file, "info")
    local, result = _deliver(send_root, f"{recipient}@mx.test")
    assert (result.kind, result.status) == ("temp", "4.2.1"), result
    assert result.detail.startswith(f"{path}: first line is blank;"), result.detail
    assert result.detail.endswith("(#4.2.1)"), result.detail
    assert _delivered(send_root) == []
    assert local.queue is not None and local.queue.ids("new") == []  # nothing forwarded


def test_echo_to_dotqmail_keeps_the_mail_in_the_queue(send_root: Path) -> None:
    """Through pyqmail-send (its delivery children): the recipient is deferred, not done,
    and once the blank line is gone the message is delivered."""
    path = send_root.parent / "home" / ".qmail"
    path.write_text("\n")
    queue = Queue(send_root / "queue")
    queue.enqueue("a@remote.test", ["user@mx.test"], MESSAGE)
    out = io.StringIO()
    m = Manager(send_root, Log(out))
    m.pickup()
    deadline = time.monotonic() + 20
    while " to=<user@mx.test>" not in out.getvalue() and time.monotonic() < deadline:
        m.dispatch()
        m.finish()
        time.sleep(0.02)
    [line] = [line for line in out.getvalue().splitlines() if " to=<user@mx.test>" in line]
    assert "result=deferred" in line, line
    assert f"detail={path}: first line is blank;" in line, line
    assert "discarded" not in out.getvalue()
    assert m.msgs and len(queue.ids("mess")) == 1  # still queued
    path.write_text("./Maildir/\n")
    m.retry_all()
    deadline = time.monotonic() + 20
    while m.msgs and time.monotonic() < deadline:
        m.dispatch()
        m.finish()
        time.sleep(0.02)
    m.children.close()
    assert not m.msgs and queue.ids("mess") == []
    [delivered] = _delivered(send_root)
    assert delivered.parent == send_root.parent / "home" / "Maildir" / "new"


# -- who may write the .qmail files: qmail-local's "home directory is writable" ---------------

OTHER_UID = 61234  # neither root nor the delivery user of any of these tests


def _plan(root: Path, recipient: str) -> Plan | Result:
    return LocalDelivery(Control.load(root), Queue(root / "queue")).plan(recipient)


@pytest.mark.parametrize("where", ["home", "qmail/alias"])
@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_a_directory_others_may_write_defers_naming_it(
    send_root: Path, where: str, mode: int
) -> None:
    directory = send_root.parent / where
    (send_root / "alias" / ".qmail-info").write_text("&user@mx.test\n")
    directory.chmod(mode)
    plan = _plan(send_root, "user@mx.test" if where == "home" else "info@mx.test")
    assert isinstance(plan, Result) and (plan.kind, plan.status) == ("temp", "4.7.0"), plan
    assert f"directory {directory} is writable by group or others" in plan.detail


@pytest.mark.parametrize("where", ["home", "qmail/alias"])
def test_a_directory_of_another_user_defers_naming_it(send_root: Path, where: str) -> None:
    directory = send_root.parent / where
    (send_root / "alias" / ".qmail-info").write_text("&user@mx.test\n")
    os.chown(directory, OTHER_UID, -1)
    recipients = ("user@mx.test", "user-ext@mx.test") if where == "home" else ("info@mx.test",)
    for recipient in recipients:
        plan = _plan(send_root, recipient)
        assert isinstance(plan, Result) and (plan.kind, plan.status) == ("temp", "4.7.0"), plan
        assert f"directory {directory} is owned by uid {OTHER_UID}" in plan.detail
        assert "neither the delivery user" in plan.detail


@pytest.mark.parametrize("file", ["home/.qmail", "qmail/alias/.qmail-info"])
def test_a_dotqmail_of_another_user_defers_naming_it(send_root: Path, file: str) -> None:
    path = send_root.parent / file
    path.write_text("&elsewhere@remote.test\n")
    os.chown(path, OTHER_UID, -1)
    plan = _plan(send_root, "user@mx.test" if "home" in file else "info@mx.test")
    assert isinstance(plan, Result) and (plan.kind, plan.status) == ("temp", "4.7.0"), plan
    assert f"{path} is owned by uid {OTHER_UID}" in plan.detail


def test_the_roles_layout_delivers_as_the_mailbox_user(
    send_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyqmail_mailboxes makes each home the delivery user's, 0700; pyqmail_aliases makes
    alias/ root's, 0755, and its files root's, 0644: all pass for the delivery user."""
    home, alias = send_root.parent / "home", send_root / "alias"
    (home / ".qmail-ext").write_text("./Maildir/\n")
    (alias / ".qmail-info").write_text("&user@mx.test\n")
    home.chmod(0o700)
    alias.chmod(0o755)
    (alias / ".qmail-info").chmod(0o644)
    for path in (home, home / ".qmail-ext"):
        os.chown(path, OTHER_UID, -1)
    monkeypatch.setattr(os, "geteuid", lambda: OTHER_UID)  # the delivery child's pyqmailv
    for recipient in ("user@mx.test", "user-ext@mx.test", "info@mx.test"):
        assert isinstance(_plan(send_root, recipient), Plan), recipient
    monkeypatch.setattr(os, "geteuid", lambda: OTHER_UID + 1)  # someone else's homes
    plan = _plan(send_root, "user@mx.test")
    assert isinstance(plan, Result) and "is owned by uid" in plan.detail
    assert isinstance(_plan(send_root, "info@mx.test"), Plan)  # root's alias/ is anyone's
