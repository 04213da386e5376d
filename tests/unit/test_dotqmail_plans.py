"""What a ``.qmail`` file says when it says little: dot-qmail(5)'s empty file (0 bytes:
default delivery to ``./Maildir/``) against a file of comments only (bytes, no instruction:
the message is delivered nowhere, the classic discard address such as ``noreply@``), and an
empty alias file, which has no Maildir to fall back to and defers naming itself."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from pyqmail.control.send import Control
from pyqmail.queue.format import Envelope
from pyqmail.queue.store import Queue
from pyqmail.send.delivery import Result
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
