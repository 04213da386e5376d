"""DMARC quarantine at delivery: pyqmail-send's local delivery puts a message whose queue
meta says ``junk=1`` (set by pyqmail-smtpd's checks) into the Maildir++ folder ``.Junk`` of
the mailbox, and every other message into the Maildir itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyqmail.control.send import Control
from pyqmail.queue.format import Envelope
from pyqmail.queue.store import Queue
from pyqmail.send.local import LocalDelivery

MESSAGE = b"From: <news@junk.test>\r\nSubject: offer\r\n\r\nbuy\r\n"


@pytest.fixture
def home(tmp_path: Path) -> tuple[LocalDelivery, Path]:
    root = tmp_path / "qmail"
    for sub in ("control", "alias", "users"):
        (root / sub).mkdir(parents=True)
    (root / "control" / "me").write_text("mx.test\n")
    home = root / "homes" / "u"
    home.mkdir(parents=True)
    (root / "users" / "mailboxes").write_text(f"u:{home}\n")
    queue = Queue(root / "queue")
    queue.create()
    return LocalDelivery(Control.load(root), queue), home


@pytest.mark.parametrize(("meta", "folder"), [({"junk": "1"}, ".Junk/new"), ({}, "new")])
def test_junk_meta_picks_the_junk_folder(home, meta, folder):
    local, path = home
    env = Envelope("Q1", "s@junk.test", ("u@mx.test",), len(MESSAGE), 0.0, meta)
    result = local.deliver(env, MESSAGE, "u@mx.test")
    assert result.kind == "ok", result
    [delivered] = [p for p in path.rglob("*") if p.is_file() and p.parent.name == "new"]
    assert str(delivered.parent).endswith(folder)
    assert delivered.read_bytes().endswith(b"buy\n")
    assert (".Junk" in delivered.parts) == bool(meta)
