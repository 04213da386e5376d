"""Fixtures shared by the queue and pyqmail-send unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyqmail.queue.store import Queue


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    """An empty queue directory with its layout."""
    q = Queue(tmp_path / "queue")
    q.create()
    return q


@pytest.fixture
def send_root(tmp_path: Path) -> Path:
    """A qmail root for pyqmail-send: mx.test is local, user@mx.test has a Maildir in
    ``tmp_path / "home"``."""
    root = tmp_path / "qmail"
    for sub in ("control", "alias", "users"):
        (root / sub).mkdir(parents=True)
    Queue(root / "queue").create()
    (root / "control" / "me").write_text("mx.test\n")
    (root / "control" / "locals").write_text("mx.test\n")
    home = tmp_path / "home"
    home.mkdir()
    (root / "users" / "mailboxes").write_text(f"user:{home}\n")
    return root
